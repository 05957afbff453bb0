"""The resident merger writes the same weights into its live model as `shoal merge` writes to disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from shoal.errors import ShoalError
from shoal.merge.engine import run_merge
from shoal.merge.resident import ResidentMerger
from shoal.recipe import parse_recipe


def _recipe(parents: dict[str, Path], method: str, weights, densities, seed: int = 3, dtype: str | None = None) -> dict:
    recipe = {
        "merge_method": method,
        "models": [
            {"model": str(parents[n]), "parameters": {"weight": w} | ({"density": d} if d is not None else {})}
            for n, w, d in zip(("a", "b"), weights, densities)
        ],
        "seed": seed,
    }
    if method != "linear":
        recipe["base_model"] = str(parents["base"])
    if dtype:
        recipe["dtype"] = dtype
    return recipe


def _on_disk(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    run_merge(parse_recipe(yaml.safe_dump(recipe)), out)
    return {k: v for shard in sorted(out.glob("*.safetensors")) for k, v in load_file(shard).items()}


CASES = [
    ("ties", [[0.2, 0.9, 0.4], 0.7], [[0.3, 0.8], 0.5]),
    ("dare_ties", [[1.0, 0.1], [0.3, 0.6]], [0.4, [0.9, 0.2, 0.6]]),
    ("task_arithmetic", [[0.5, -0.2], 0.8], [None, None]),
    ("dare_linear", [0.6, 0.4], [0.3, 0.7]),
    ("della", [[1.0, 0.2], 0.5], [0.4, [0.3, 0.6]]),
    ("della_linear", [0.6, 0.4], [0.3, 0.7]),
    ("linear", [[0.1, 0.9], 0.5], [None, None]),
]


@pytest.mark.parametrize("method,weights,densities", CASES, ids=[c[0] for c in CASES])
def test_resident_model_equals_shoal_merge_tensor_for_tensor(parents, tmp_path, method, weights, densities) -> None:
    first = _recipe(parents, method, [0.5, 0.5], [0.5 if d is not None else None for d in densities])
    merger = ResidentMerger(parse_recipe(yaml.safe_dump(first)))
    for i, recipe in enumerate([first, _recipe(parents, method, weights, densities)]):
        merger.apply(parse_recipe(yaml.safe_dump(recipe)))
        expected = _on_disk(recipe, tmp_path / f"out{i}")
        live = dict(merger.model.named_parameters())
        assert set(expected) <= set(live)
        for name, tensor in expected.items():
            assert torch.equal(live[name].detach(), tensor), name


@pytest.mark.parametrize("method,params,shared", [
    ("breadcrumbs_ties", {"weight": [0.4, 0.9], "density": [0.5, 0.8], "gamma": 0.03}, {}),
    ("sce", {}, {"select_topk": [0.3, 0.8]}),
])
def test_resident_model_equals_shoal_merge_for_other_searchable_methods(parents, tmp_path, method, params, shared):
    recipe = {"merge_method": method, "base_model": str(parents["base"]), "parameters": shared,
              "models": [{"model": str(parents[n]), "parameters": params} for n in ("a", "b")]}
    merger = ResidentMerger(parse_recipe(yaml.safe_dump(recipe)))
    merger.apply(parse_recipe(yaml.safe_dump(recipe)))
    live = dict(merger.model.named_parameters())
    for name, tensor in _on_disk(recipe, tmp_path / "out").items():
        assert torch.equal(live[name].detach(), tensor), name


def test_resident_merge_in_bfloat16_matches_too(bf16_parents, tmp_path) -> None:
    recipe = _recipe(bf16_parents, "ties", [0.7, [0.2, 0.6]], [[0.2, 0.9], 0.35], dtype="bfloat16")
    merger = ResidentMerger(parse_recipe(yaml.safe_dump(recipe)))
    merger.apply(parse_recipe(yaml.safe_dump(recipe)))
    expected = _on_disk(recipe, tmp_path / "out")
    live = dict(merger.model.named_parameters())
    assert live["model.embed_tokens.weight"].dtype == torch.bfloat16
    for name, tensor in expected.items():
        assert torch.equal(live[name].detach(), tensor), name


def test_dare_masks_follow_the_recipe_seed(parents) -> None:
    recipe = _recipe(parents, "dare_ties", [0.5, 0.5], [0.3, 0.3], seed=1)
    merger = ResidentMerger(parse_recipe(yaml.safe_dump(recipe)))
    name = "model.layers.1.mlp.up_proj.weight"
    merger.apply(parse_recipe(yaml.safe_dump(recipe)))
    first = dict(merger.model.named_parameters())[name].detach().clone()
    merger.apply(parse_recipe(yaml.safe_dump(recipe | {"seed": 2})))
    other = dict(merger.model.named_parameters())[name].detach().clone()
    merger.apply(parse_recipe(yaml.safe_dump(recipe)))
    again = dict(merger.model.named_parameters())[name].detach()
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_a_search_finds_each_task_vectors_l1_norm_once(parents, tmp_path, monkeypatch) -> None:
    """The rescale's |τ|_1 of each task vector is found at its first merge and kept (merge.norms): later merges,
    with other densities and seeds, find only |τ · keep|_1, and every merge is what `shoal merge` writes, bit for
    bit; streamed, a recipe listing the parents in the other order finds them again (they are kept by the job's
    inputs, in order: a vocabulary job's aligned rows depend on them), not another parent's."""
    from shoal.merge import norms
    from shoal.merge.memory import MemoryPlan

    recipes = [_recipe(parents, "dare_ties", [0.6, 0.5], densities, seed=seed, dtype="bfloat16")
               for densities, seed in (([0.3, 0.5], 4), ([0.3, 0.25], 5), ([0.75, 0.5], 5))]
    swapped = recipes[0] | {"models": recipes[0]["models"][::-1]}
    merger = ResidentMerger(parse_recipe(yaml.safe_dump(recipes[0])), memory=MemoryPlan(inputs="stream"))
    found = []
    original = norms.block_exponents
    monkeypatch.setattr(norms, "block_exponents", lambda magnitude: found.append(1) or original(magnitude))
    for i, recipe in enumerate(recipes + [swapped]):
        found.clear()
        merger.apply(parse_recipe(yaml.safe_dump(recipe)))
        assert bool(found) == (i in (0, 3)), i
        live = dict(merger.model.named_parameters())
        for name, tensor in _on_disk(recipe, tmp_path / str(i)).items():
            assert torch.equal(live[name].detach(), tensor), (i, name)


def test_weights_summing_to_zero_are_refused_like_shoal_merge(parents) -> None:
    recipe = _recipe(parents, "linear", [0.5, 0.5], [None, None])
    merger = ResidentMerger(parse_recipe(yaml.safe_dump(recipe)))
    with pytest.raises(ShoalError, match="sum to 0 with normalize: true"):  # normalising by a zero sum of weights
        merger.apply(parse_recipe(yaml.safe_dump(_recipe(parents, "linear", [1.0, -1.0], [None, None]))))


def test_a_recipe_over_other_parents_is_refused(parents) -> None:
    merger = ResidentMerger(parse_recipe(yaml.safe_dump(_recipe(parents, "ties", [0.5, 0.5], [0.5, 0.5]))))
    other = _recipe(parents, "ties", [0.5, 0.5], [0.5, 0.5])
    other["models"][1]["model"] = str(parents["c"])
    with pytest.raises(ShoalError, match="other parents"):
        merger.apply(parse_recipe(yaml.safe_dump(other)))
