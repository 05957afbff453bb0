"""Parents named by Hub id resolve through the Hugging Face cache (a local mirror here: no hub is reachable)."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors import safe_open

from shoal.checkpoint.reader import resolve_model
from shoal.errors import ShoalError
from shoal.merge.engine import run_merge
from shoal.recipe import parse_recipe


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, parents):
    """An HF cache holding `shoal-test/a` (a copy of parent a) as the snapshot of its main branch."""
    from huggingface_hub import constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--shoal-test--a"
    shutil.copytree(parents["a"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / commit


def test_a_hub_id_resolves_to_its_cached_snapshot(offline_cache):
    assert resolve_model("shoal-test/a") == offline_cache


def test_a_merge_reads_a_parent_given_by_hub_id(offline_cache, parents, tmp_path):
    recipe = {"merge_method": "linear", "models": [
        {"model": "shoal-test/a", "parameters": {"weight": 1.0}},
        {"model": str(parents["b"]), "parameters": {"weight": 1.0}}]}
    run_merge(parse_recipe(yaml.safe_dump(recipe)), tmp_path / "m")
    name = "model.layers.0.self_attn.q_proj.weight"
    read = lambda folder: safe_open(str(next(folder.glob("*.safetensors"))), "pt").get_tensor(name)
    assert torch.allclose(read(tmp_path / "m"), (read(parents["a"]) + read(parents["b"])) / 2)


def test_an_unreachable_hub_id_is_one_clear_error(offline_cache):
    with pytest.raises(ShoalError, match="'nobody/nothing' not found: no such folder, and the Hub could not provide it"):
        resolve_model("nobody/nothing")


def test_a_path_that_is_not_a_hub_id_is_not_looked_up(tmp_path):
    with pytest.raises(ShoalError, match="not a Hub id"):
        resolve_model(str(tmp_path / "missing" / "deeper" / "model"))


def test_both_search_spaces_take_a_parent_given_by_hub_id(offline_cache, parents, tmp_path):
    from transformers import AutoModelForCausalLM

    from shoal.search.spaces import FlowSpace, ParameterSpace
    from shoal.search.spec import SearchSpec

    spec = SearchSpec.model_validate({
        "base": str(parents["base"]), "parents": {"a": "shoal-test/a", "b": str(parents["b"])},
        "tasks": [{"path": "unused"}], "space": "dfs", "dfs": {"repeats": 1, "scaling": "seam"},
    })
    flow = FlowSpace(spec)
    values = flow.genome.values(flow.genome.start())
    assert flow.build(values, 0).config.num_hidden_layers == 4  # A's layers: the start of a DFS search
    flow.export(values, 0, tmp_path / "path")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "path").config.num_hidden_layers == 4
    ps = ParameterSpace(spec.model_copy(update={"space": "ps", "overlap": False}))
    merged = ps.build(ps.genome.values(ps.genome.start()), 0)
    name = "model.layers.1.mlp.up_proj.weight"
    with safe_open(str(next(offline_cache.glob("*.safetensors"))), "pt") as f:
        assert not torch.equal(dict(merged.named_parameters())[name].detach(), f.get_tensor(name))
