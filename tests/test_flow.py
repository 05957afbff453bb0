"""Data-flow paths: slot bookkeeping, the live path model, and the exported checkpoint that reproduces it."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from shoal.errors import ShoalError
from shoal.flow.export import export_path
from shoal.flow.model import PathModel
from shoal.flow.path import Layout, Step, choose_path, seams


def test_slots_repeat_the_layout_of_all_parents() -> None:
    layout = Layout(("a", "b"), (2, 3), repeats=3)
    assert (layout.m, layout.t) == (5, 15)
    assert [layout.slot(t) for t in range(6)] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2), ("a", 0)]
    assert layout.slot(14) == ("b", 2)
    with pytest.raises(IndexError):
        layout.slot(15)


def test_indicator_picks_slots_in_order_and_full_w_scales_each_transition() -> None:
    layout = Layout(("a", "b"), (2, 2), repeats=2)  # places: a0 a1 b0 b1 | a0 a1 b0 b1
    indicator = [1, -1, 0.5, 0, 0, 2, -3, 1]  # slot 3 has 0: off (on means > 0)
    w = [[10 * i + j for j in range(4)] for i in range(4)]
    path = choose_path(layout, indicator, "full", [x for row in w for x in row])
    assert [(s.parent, s.layer) for s in path] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert [s.scale for s in path] == [1.0, w[0][2], w[2][1], w[1][3]]  # the first layer follows A's embeddings


def test_seam_scaling_applies_only_between_parents() -> None:
    layout = Layout(("a", "b"), (2, 2), repeats=1)
    assert seams(layout) == [("a", "b"), ("b", "a")]
    path = choose_path(layout, [-1, 1, 1, 1], "seam", [0.8, 1.25])
    assert [s.scale for s in path] == [1.0, 0.8, 1.0]
    starts_in_b = choose_path(layout, [-1, -1, 1, 1], "seam", [0.8, 1.25])
    assert [s.scale for s in starts_in_b] == [0.8, 1.0]  # A's embeddings feed B's layer: a seam
    assert choose_path(layout, [1, 1, 1, 1]) == [Step("a", 0, 1.0), Step("a", 1, 1.0), Step("b", 0, 1.0), Step("b", 1, 1.0)]
    with pytest.raises(ValueError, match="2 scales"):
        choose_path(layout, [1, 1, 1, 1], "seam", [1.0])


PATH = [Step("a", 0, 1.0), Step("b", 1, 0.7), Step("a", 1, 1.3), Step("b", 1, 0.9), Step("a", 3, 1.1)]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_exported_path_reproduces_the_path_models_logits(parents, tmp_path) -> None:
    flow = PathModel({"a": parents["a"], "b": parents["b"]})
    ids = torch.randint(4, 60, (3, 17), generator=torch.Generator().manual_seed(0))
    live = _logits(flow.set_path(PATH), ids)
    out = export_path(PATH, {"a": parents["a"], "b": parents["b"]}, tmp_path / "exported")
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.config.num_hidden_layers == len(PATH)
    # RMSNorm's epsilon is the one term folding does not carry over; this random model's residual stream is
    # small (mean square ~1e-3 against eps 1e-6), so it shows: 2e-4 on logits of magnitude ~1
    assert (_logits(exported, ids) - live).abs().max() < 1e-3
    for norm in [m for model in (flow.model, exported) for m in model.modules() if hasattr(m, "variance_epsilon")]:
        norm.variance_epsilon = 0.0
    assert (_logits(exported, ids) - _logits(flow.model, ids)).abs().max() < 1e-5  # otherwise exact
    unfolded = _logits(flow.set_path([Step(s.parent, s.layer, 1.0) for s in PATH]), ids)
    assert (unfolded - live).abs().max() > 1e-2  # the scales matter, so the agreement above is not vacuous
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5


def test_path_model_generates_with_the_cache_like_the_exported_model(parents, tmp_path) -> None:
    """A layer used twice on the path keeps its own KV-cache entry at each position."""
    flow = PathModel({"a": parents["a"], "b": parents["b"]})
    exported = AutoModelForCausalLM.from_pretrained(export_path(PATH, {"a": parents["a"], "b": parents["b"]}, tmp_path / "e"))
    ids = torch.randint(4, 60, (2, 6), generator=torch.Generator().manual_seed(1))
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(flow.set_path(PATH).generate(ids, **settings), exported.generate(ids, **settings))


def test_bfloat16_parents_export_within_bfloat16_tolerance(bf16_parents, tmp_path) -> None:
    flow = PathModel({"a": bf16_parents["a"], "b": bf16_parents["b"]})
    ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(2))
    live = _logits(flow.set_path(PATH), ids).float()
    exported = AutoModelForCausalLM.from_pretrained(export_path(PATH, dict(a=bf16_parents["a"], b=bf16_parents["b"]), tmp_path / "e"))
    assert exported.dtype == torch.bfloat16
    assert (_logits(exported, ids).float() - live).abs().max() < 0.1 * live.abs().max()


def test_a_scale_that_cannot_be_folded_is_refused(parents, tmp_path) -> None:
    with pytest.raises(ShoalError, match="cannot be folded"):
        export_path([Step("a", 0, 1.0), Step("b", 1, -0.5)], {"a": parents["a"], "b": parents["b"]}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_an_architecture_without_exact_folding_is_refused(parents, tmp_path) -> None:
    import shutil

    other = tmp_path / "gemma-like"
    shutil.copytree(parents["b"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "gemma2"}))
    with pytest.raises(ShoalError, match="'gemma2' model; seam scales can be folded exactly only"):
        export_path(PATH, {"a": parents["a"], "b": other}, tmp_path / "x")


def test_a_path_through_a_missing_layer_is_refused(parents) -> None:
    flow = PathModel({"a": parents["a"], "b": parents["b"]})
    with pytest.raises(ShoalError, match="layer 9 of b"):
        flow.set_path([Step("b", 9, 1.0)])


def test_a_qwen2_path_longer_than_a_runs_and_exports(tmp_path) -> None:
    """Qwen2 keeps a per-layer attention kind (config.layer_types); a path reuses layers, so it must follow them."""
    from transformers import Qwen2Config

    from shoal.synthetic import make_parents

    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         architectures=["Qwen2ForCausalLM"])
    qwen = make_parents(tmp_path / "qwen", names=("a", "b"), config=config, seed=3)
    path = [Step("a", 0, 1.0), Step("b", 1, 0.8), Step("a", 1, 1.2), Step("b", 0, 1.0), Step("a", 1, 0.9)]
    flow = PathModel({"a": qwen["a"], "b": qwen["b"]})
    ids = torch.randint(4, 60, (2, 11), generator=torch.Generator().manual_seed(4))
    live = _logits(flow.set_path(path), ids)
    exported = AutoModelForCausalLM.from_pretrained(export_path(path, {"a": qwen["a"], "b": qwen["b"]}, tmp_path / "e"))
    assert exported.config.layer_types == ["full_attention"] * 5
    assert (_logits(exported, ids) - live).abs().max() < 1e-3
