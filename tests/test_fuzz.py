"""Seeded mutations of a recipe and of a search file: every one is either merged (or parsed) or refused with a
ShoalError, never another exception."""

from __future__ import annotations

import copy
import random
import shutil
from pathlib import Path

import pytest
import yaml

from shoal.errors import ShoalError
from shoal.merge.engine import run_merge
from shoal.recipe import parse_recipe
from shoal.search.spec import parse_search

ODD_VALUES: list[object] = [
    "abc", "", "[red]x[/]", "0.5", -1, 0, 1, 5, 2**70, -0.0, 1e308, -1e39, 1e38, float("nan"), float("inf"), -float("inf"),
    True, False, None, [], {}, [0.2, 0.8], [0.5, "x"], {"value": 0.5}, {"filter": 3}, [{"value": 1, "filter": "mlp"}],
    {"a": {"b": {"c": []}}}, "cuda:7", "bfloat16", "float8", [0, 2], [3, 1],
]


def _paths(value: object, at: tuple = ()) -> list[tuple]:
    """Every key path in a nested dict/list document."""
    found = [at]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, at + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            found += _paths(child, at + (i,))
    return found


def _mutate(doc: dict, rng: random.Random) -> dict:
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_paths(doc)[1:])
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        choice = rng.random()
        if choice < 0.6:
            parent[path[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
        elif choice < 0.8 and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[rng.choice(["extra", "densty", "t", "weight", "filter"])] = copy.deepcopy(rng.choice(ODD_VALUES))
        else:
            parent.append(copy.deepcopy(rng.choice(ODD_VALUES)))
    return doc


def _recipes(parents: dict[str, Path]) -> list[dict]:
    a, b, base = (str(parents[n]) for n in ("a", "b", "base"))
    return [
        {"merge_method": "dare_ties", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": [0.2, 0.8], "density": 0.6}},
            {"model": b, "parameters": {"weight": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}],
                                        "density": 0.5}}],
         "parameters": {"normalize": False}, "dtype": "bfloat16", "seed": 0},
        {"merge_method": "slerp", "base_model": base, "models": [{"model": a}], "parameters": {"t": [0, 0.5, 1]}},
        {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"scale": 0.5}}]},
            {"sources": [{"model": b, "layer_range": [1, 4]}]}]},
        {"merge_method": "breadcrumbs_ties", "base_model": base, "tokenizer_source": "base",
         "models": [{"model": a, "parameters": {"weight": 1, "density": 0.9, "gamma": 0.01}}]},
    ]


def test_mutated_recipes_merge_or_give_a_shoal_error(parents, tmp_path) -> None:
    rng = random.Random(13)
    originals = _recipes(parents)
    outcomes = {"merged": 0, "refused": 0}
    for i in range(300):
        text = yaml.safe_dump(_mutate(rng.choice(originals), rng), sort_keys=False)
        out = tmp_path / f"out{i}"
        try:
            run_merge(parse_recipe(text, "fuzz.yaml"), out)
        except ShoalError:
            outcomes["refused"] += 1
            assert not out.exists(), text
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{type(exc).__name__}: {exc} for recipe\n{text}")
        else:
            outcomes["merged"] += 1
            shutil.rmtree(out)
    assert outcomes["merged"] >= 5 and outcomes["refused"] > 100, outcomes


def test_mutated_search_files_parse_or_give_a_shoal_error(parents, tmp_path) -> None:
    rng = random.Random(14)
    original = {
        "base": str(parents["base"]), "parents": {"a": str(parents["a"]), "b": str(parents["b"])},
        "space": "hybrid", "method": "dare_ties",
        "genome": {"layers_per_group": 1, "embeddings": "search", "split_attention_mlp": False},
        "dfs": {"parents": ["a", "b"], "repeats": 2, "scaling": "full", "scale_bounds": [0.5, 1.5], "budget": 3},
        "bounds": {"weight": [0.0, 1.0], "density": [0.1, 1.0]},
        "tasks": [{"path": "t", "weight": 1.0}, {"lm_eval": {"task": "x", "splits": {"dev": "validation"}}}],
        "budget": 10, "population": 4, "sigma": 0.2, "seed": 0, "batch_size": 8, "device": "cpu",
        "engine": "hf", "vllm": {"enforce_eager": True},
    }
    parsed = 0
    for _ in range(400):
        text = yaml.safe_dump(_mutate(original, rng), sort_keys=False)
        try:
            spec = parse_search(text, "fuzz.yaml", tmp_path)
            spec.search_hash()
            parsed += 1
        except ShoalError:
            pass
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{type(exc).__name__}: {exc} for search file\n{text}")
    assert parsed > 20
