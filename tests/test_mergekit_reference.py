"""shoal merge agrees with mergekit 0.1.5 on whole random models, recipe for recipe.

Deterministic methods must match tensor for tensor (max |diff| < 1e-5 in fp32, < 1e-2 in bf16).
DARE's and DELLA's random masks differ between the two tools (shoal seeds a generator per tensor, mergekit
draws from torch's global one in its own order), so for whole models the statistics are compared: the
fraction of entries changed from the base and the mean and spread of the merged task vector. DELLA's drop
step alone is compared exactly, with mergekit's global generator and shoal's seeded alike.

Trimming (TIES, breadcrumbs) keeps the k largest magnitudes, SCE the k largest variances. In bfloat16 many
are exactly equal, and which of the tied entries at the threshold survive is arbitrary: mergekit takes
whatever order torch's unstable parallel argsort (or topk) gives. shoal breaks such ties by index (a stable
sort's order, found in linear time). So mergekit runs here with its sorts made stable; everything else is
its own code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from shoal.merge.engine import run_merge
from shoal.recipe import parse_recipe

mergekit = pytest.importorskip("mergekit", reason="mergekit is a test-only dependency")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k).float() for k in f.keys()})
    return out


class _StableSorts:
    """torch, except that argsort and sort are stable (mergekit.sparsify's only source of arbitrariness)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def argsort(x, descending=False, **kw):
        return torch.sort(x, descending=descending, stable=True).indices

    @staticmethod
    def sort(x, descending=False, **kw):
        return torch.sort(x, descending=descending, stable=True)

    @staticmethod
    def topk(x, k, largest=True, **kw):
        values, indices = torch.sort(x, descending=largest, stable=True)
        return values[:k], indices[:k]


@pytest.fixture(autouse=True)
def stable_mergekit_sorts(monkeypatch):
    import mergekit.merge_methods.sce
    import mergekit.sparsify

    monkeypatch.setattr(mergekit.sparsify, "torch", _StableSorts())
    monkeypatch.setattr(mergekit.merge_methods.sce, "torch", _StableSorts())


def both(recipe: dict, tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_merge

    text = yaml.safe_dump(recipe, sort_keys=False)
    run_merge(parse_recipe(text), tmp_path / "shoal")
    mergekit_merge(
        MergeConfiguration.model_validate(yaml.safe_load(text)),
        str(tmp_path / "mergekit"),
        MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0),
    )
    return tensors(tmp_path / "shoal"), tensors(tmp_path / "mergekit")


def three(parents, **params) -> list[dict]:
    return [{"model": str(parents[n]), "parameters": dict(params)} for n in ("a", "b", "c")]


RECIPES = {
    "linear": lambda p: {"merge_method": "linear", "models": [
        {"model": str(p["a"]), "parameters": {"weight": [0.2, 0.9]}},
        {"model": str(p["b"]), "parameters": {"weight": 0.5}},
        {"model": str(p["c"]), "parameters": {"weight": [{"filter": "self_attn", "value": 0.1}, {"value": 0.7}]}}]},
    "task_arithmetic": lambda p: {"merge_method": "task_arithmetic", "base_model": str(p["base"]),
                                  "models": three(p, weight=[0.3, 1.1]), "parameters": {"lambda": 0.8}},
    "ties": lambda p: {"merge_method": "ties", "base_model": str(p["base"]),
                       "models": [{"model": str(p["a"]), "parameters": {"weight": 1.0, "density": [0.2, 0.8]}},
                                  {"model": str(p["b"]), "parameters": {"weight": 0.6, "density": 0.5}},
                                  {"model": str(p["c"]), "parameters": {"weight": 0.3, "density": 0.7}}]},
    "breadcrumbs": lambda p: {"merge_method": "breadcrumbs", "base_model": str(p["base"]),
                              "models": three(p, weight=0.5, density=0.6, gamma=0.05)},
    "della_dense": lambda p: {"merge_method": "della", "base_model": str(p["base"]),  # density 1: no random drop
                              "models": three(p, weight=0.7), "parameters": {"lambda": 1.3}},
    "sce": lambda p: {"merge_method": "sce", "base_model": str(p["base"]), "models": three(p),
                      "parameters": {"select_topk": [0.3, 1.0]}},
    "ram": lambda p: {"merge_method": "ram", "base_model": str(p["base"]),
                      "models": [{"model": str(p[n])} for n in "abc"],
                      "parameters": {"epsilon": 0.01}},
    "ramplus_tl": lambda p: {"merge_method": "ramplus_tl", "base_model": str(p["base"]),
                             "models": [{"model": str(p[n])} for n in "abc"],
                             "parameters": {"epsilon": 0.02, "r": [0.1, 0.5], "alpha": 0.4}},
    "nearswap": lambda p: {"merge_method": "nearswap", "base_model": str(p["base"]), "models": [{"model": str(p["a"])}],
                           "parameters": {"t": [0.001, 0.02]}},
    "arcee_fusion": lambda p: {"merge_method": "arcee_fusion", "base_model": str(p["base"]),
                               "models": [{"model": str(p["b"])}]},
    "slerp": lambda p: {"merge_method": "slerp", "base_model": str(p["a"]),
                        "models": [{"model": str(p["a"])}, {"model": str(p["b"])}],
                        "parameters": {"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.4}]}},
    "nuslerp": lambda p: {"merge_method": "nuslerp", "base_model": str(p["base"]), "models": [
        {"model": str(p["a"]), "parameters": {"weight": [0.2, 0.9]}},
        {"model": str(p["b"]), "parameters": {"weight": 0.6}}]},
    "nuslerp_rows": lambda p: {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False}, "models": [
        {"model": str(p["a"]), "parameters": {"weight": 0.3}}, {"model": str(p["b"]), "parameters": {"weight": 0.5}}]},
    "nuslerp_columns": lambda p: {"merge_method": "nuslerp", "base_model": str(p["base"]),
                                  "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                                  "models": [{"model": str(p[n]), "parameters": {"weight": w}}
                                             for n, w in (("a", 1.0), ("c", 0.4))]},
    "multislerp": lambda p: {"merge_method": "multislerp", "base_model": str(p["base"]), "models": [
        {"model": str(p[n]), "parameters": {"weight": w}} for n, w in (("a", 0.5), ("b", [0.1, 1.0]), ("c", 0.3))]},
    "multislerp_no_base": lambda p: {"merge_method": "multislerp", "parameters": {"normalize_weights": False},
                                     "models": [{"model": str(p[n]), "parameters": {"weight": w}}
                                                for n, w in (("a", 0.2), ("b", 0.5))]},
    "karcher": lambda p: {"merge_method": "karcher", "base_model": str(p["base"]),  # the base is one more input
                          "models": [{"model": str(p[n])} for n in ("a", "b")], "parameters": {"max_iter": 20}},
    "model_stock": lambda p: {"merge_method": "model_stock", "base_model": str(p["base"]),
                              "models": [{"model": str(p[n])} for n in ("a", "b", "c")]},
    "passthrough": lambda p: {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(p["a"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(p["b"]), "layer_range": [2, 4], "parameters": {"scale": 0.5}}]}]},
}


BF16_TOLERANCE = {"karcher": 2e-2}
"""mergekit keeps karcher's iterates (unit vectors, mean, dot products) in bfloat16, shoal in float32: within two
bfloat16 units near 1."""


@pytest.mark.parametrize("method", list(RECIPES))
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_deterministic_methods_match_mergekit(method, precision, parents, bf16_parents, tmp_path):
    source = parents if precision == "float32" else bf16_parents
    recipe = {**RECIPES[method](source), "dtype": precision}
    ours, theirs = both(recipe, tmp_path)
    assert set(ours) == set(theirs)
    tolerance = 1e-5 if precision == "float32" else BF16_TOLERANCE.get(method, 1e-2)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst < tolerance, f"{method} {precision}: max |diff| {worst}"


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_drop_statistics_match_mergekit(method, parents, tmp_path):
    extra = {"epsilon": 0.2} if method.startswith("della") else {}
    recipe = {"merge_method": method, "base_model": str(parents["base"]), "dtype": "float32",
              "models": three(parents, weight=0.5, density=0.3, **extra)}
    ours, theirs = both(recipe, tmp_path)
    base = tensors(parents["base"])
    for name in ("model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"):
        d_ours, d_theirs = ours[name] - base[name], theirs[name] - base[name]
        changed_ours = (d_ours.abs() > 1e-7).float().mean().item()
        changed_theirs = (d_theirs.abs() > 1e-7).float().mean().item()
        assert abs(changed_ours - changed_theirs) < 0.02, (changed_ours, changed_theirs)
        assert abs(changed_ours - (1 - 0.7**3)) < 0.02
        assert abs(d_ours.std().item() / d_theirs.std().item() - 1) < 0.05
        assert abs(d_ours.abs().mean().item() / d_theirs.abs().mean().item() - 1) < 0.05


@pytest.mark.parametrize("shape", [(64, 128), (300,)])
def test_della_drop_equals_mergekit_given_the_same_draws(shape, monkeypatch):
    """shoal draws from its own hash (merge.draws), mergekit from torch's generator: given torch's draws (torch.rand
    in order from the seeded generator, what torch.bernoulli of float32 probabilities draws on a CPU), shoal's keep
    probabilities and drop give mergekit's, and the rescale its values but for the scale's rounding (shoal's norms are
    exact sums: merge.norms)."""
    from mergekit.sparsify import RescaleNorm, della_magprune

    from shoal.merge import draws, methods

    delta = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(11)
    theirs = della_magprune(delta, density=0.4, epsilon=0.25, rescale_norm=RescaleNorm.l1)
    generator = torch.Generator().manual_seed(11)
    monkeypatch.setattr(draws, "uniforms", lambda seed, start, count, device: torch.rand(count, generator=generator))
    mask = methods.magprune_mask(methods.magnitude_fractions(delta), 0.4, 0.25, 5)
    ours = methods.rescaled(methods.TaskVector(delta, mask=mask))[0]
    assert torch.equal(ours.part() != 0, theirs != 0)  # the same drop
    # the same rescale, but for its rounding: mergekit's norms are float32 sums, shoal's exact (merge.norms)
    exact = delta.double().abs().sum() / (delta.double() * mask).abs().sum()
    assert abs(ours.scale.item() / exact.item() - 1) < 2**-23
    torch.testing.assert_close(ours.part(), theirs, rtol=2**-21, atol=0)
