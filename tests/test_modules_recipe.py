"""mergekit's `modules:` recipes: each module of a VLM (text_decoder, vision_tower, multi_modal_projector) or of a
text-only LLM (default) merged from its own models or slices with its own parameters, equal to mergekit 0.1.5
where it can merge the recipe (Qwen2.5-VL whole, Qwen2-VL's vision modules, text-only LLMs) and to the formula
elsewhere (LLaVA, which mergekit 0.1.5 does not define); bad module recipes refused in one line; and a slice's
residual_weight, which mergekit accepts and reads nowhere, ignored with a warning."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from conftest import one_error_line, read_tensors, write_recipe
from safetensors.torch import load_file, save_file
from vlm_models import make_llava, make_qwen2_vl, qwen2_config

from shoal.checkpoint.reader import open_checkpoint
from shoal.errors import ShoalWarning
from shoal.merge.engine import run_merge
from shoal.recipe import parse_recipe
from shoal.synthetic import make_parents

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VISION_AND_PROJECTOR = ("vision_tower", "multi_modal_projector")


@pytest.fixture(scope="module")
def llms(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("llms")
    return {"llama": make_parents(root / "llama", ("base", "a", "b"), seed=0),
            "qwen2": make_parents(root / "qwen2", ("base", "a", "b"), config=qwen2_config(), seed=0)}


def _jittered(folder: Path, seed: int) -> Path:
    """The VLM with noise on its vision tower and projector too, whose norms start equal (ones and zeros) in every
    freshly made model."""
    for shard in folder.glob("*.safetensors"):
        state = load_file(shard)
        for name, tensor in state.items():
            if "language_model" not in name and not name.startswith(("model.layers", "model.embed", "model.norm",
                                                                       "lm_head")):
                # the same noise for a tensor whatever the layout's names (model.vision_tower.* or vision_tower.*)
                generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name.removeprefix('model.')}".encode()))
                state[name] = tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
        save_file(state, str(shard), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def vlms(llms, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per family a base and two parents: each a VLM of its own random vision tower and projector (seed) over the
    LLM of the same name plus noise."""
    root = tmp_path_factory.mktemp("vlms")
    names = ("base", "a", "b")
    qwen, llama = llms["qwen2"], llms["llama"]
    return {
        "qwen2_5_vl": {n: _jittered(make_qwen2_vl(root / f"q25-{n}", qwen[n], noise=0.01, seed=i, v2_5=True), i)
                       for i, n in enumerate(names)},
        "qwen2_vl": {n: _jittered(make_qwen2_vl(root / f"q2-{n}", qwen[n], noise=0.01, seed=i), i)
                     for i, n in enumerate(names)},
        "llava": {n: _jittered(make_llava(root / f"llava-{n}", llama[n], noise=0.01, seed=i), i)
                  for i, n in enumerate(names)},
        "llava-live": {"base": _jittered(make_llava(root / "llava-live-base", llama["base"], noise=0.01, seed=0,
                                                    layout="live"), 0)},
    }


def shoal(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    return read_tensors(run_merge(parse_recipe(yaml.safe_dump(recipe, sort_keys=False)), out))


def mergekit(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    pytest.importorskip("mergekit", reason="mergekit is a test-only dependency")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_merge

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
    mergekit_merge(MergeConfiguration.model_validate(recipe), str(out), options)
    return read_tensors(out)


def assert_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert (tensor.float() - theirs[name].float()).abs().max() < atol, name


def ties_modules(vlm: dict[str, Path]) -> dict:
    """TIES with each module's own models, gradients and parameters (module parameters between a model's and the
    recipe's)."""
    return {"merge_method": "ties", "base_model": str(vlm["base"]), "dtype": "float32",
            "parameters": {"density": 0.9},
            "modules": {
                "text_decoder": {"models": [
                    {"model": str(vlm["a"]), "parameters": {"weight": [0.3, 0.9], "density": 0.5}},
                    {"model": str(vlm["b"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.6},
                                                                       {"value": 0.8}]}}]},
                "vision_tower": {"parameters": {"density": 0.6, "weight": 0.4}, "models": [
                    {"model": str(vlm["a"]), "parameters": {"weight": [0.2, 1.0]}},
                    {"model": str(vlm["b"])}]},
                "multi_modal_projector": {"models": [
                    {"model": str(vlm["b"]), "parameters": {"weight": 0.7, "density": 1.0}}]}}}


def linear_slices(vlm: dict[str, Path]) -> dict:
    """Linear over slices that take each module's layers from other depths of other parents (depths unchanged)."""
    def src(name: str, start: int, **parameters) -> dict:
        return {"model": str(vlm[name]), "layer_range": [start, start + 1]} | (
            {"parameters": parameters} if parameters else {})

    return {"merge_method": "linear", "dtype": "float32",
            "modules": {
                "text_decoder": {"parameters": {"weight": 0.5}, "slices": [
                    {"sources": [src("a", 0), src("b", 1, weight=0.25)]},
                    {"sources": [src("b", 1), src("base", 0)], "parameters": {"weight": [0.9]}}]},
                "vision_tower": {"slices": [
                    {"sources": [src("a", 1, weight=0.3), src("b", 0, weight=0.7)]},
                    {"sources": [src("a", 0, weight=0.6), src("b", 0, weight=0.6)],
                     "parameters": {"normalize": False}}]},
                "multi_modal_projector": {"models": [{"model": str(vlm["b"]), "parameters": {"weight": 2.0}}]}}}


@pytest.mark.parametrize("recipe", [ties_modules, linear_slices])
def test_a_qwen2_5_vl_modules_recipe_agrees_with_mergekit(recipe, vlms, tmp_path) -> None:
    """mergekit 0.1.5 defines Qwen2.5-VL's three modules (its layer count under text_config, which it reads)."""
    theirs = mergekit(recipe(vlms["qwen2_5_vl"]), tmp_path / "mergekit")
    ours = shoal(recipe(vlms["qwen2_5_vl"]), tmp_path / "shoal")
    assert_close(ours, theirs)
    assert set(ours) == set(open_checkpoint(vlms["qwen2_5_vl"]["base"]).names)


def test_qwen2_vl_vision_modules_agree_with_mergekit_merging_each_alone(vlms, tmp_path) -> None:
    """mergekit 0.1.5 cannot plan Qwen2-VL's text_decoder (its definition looks for num_hidden_layers at the top of
    a config that keeps it under text_config), but merges the vision tower and projector each alone (writing those
    tensors only). shoal's whole recipe agrees with those, and its text_decoder is the language model a `models:`
    recipe of the same models merges."""
    recipe = ties_modules(vlms["qwen2_vl"])
    with pytest.raises(Exception, match="num_hidden_layers"):
        mergekit(recipe, tmp_path / "mergekit")
    ours = shoal(recipe, tmp_path / "shoal")
    for module in VISION_AND_PROJECTOR:
        alone = recipe | {"modules": {module: recipe["modules"][module]}}
        theirs = mergekit(alone, tmp_path / f"mergekit-{module}")
        assert theirs and all(n.startswith("visual.") for n in theirs)
        assert_close({n: ours[n] for n in theirs}, theirs)
    plain = {k: v for k, v in recipe.items() if k != "modules"}
    plain["models"] = recipe["modules"]["text_decoder"]["models"]
    language = shoal(plain, tmp_path / "plain")
    base = open_checkpoint(vlms["qwen2_vl"]["base"])
    for name in base.names:
        if base.lm.canonical(name) is not None:
            assert torch.equal(ours[name], language[name]), name


def test_a_text_only_modules_recipe_is_its_models_recipe_and_agrees_with_mergekit(parents, tmp_path) -> None:
    """A text-only LLM has one module, default."""
    models = [{"model": str(parents["a"]), "parameters": {"weight": [0.2, 0.9], "density": 0.5}},
              {"model": str(parents["b"]), "parameters": {"weight": 0.6, "density": [0.3, 0.8]}}]
    common = {"merge_method": "ties", "base_model": str(parents["base"]), "dtype": "float32"}
    modules = common | {"modules": {"default": {"models": models, "parameters": {"normalize": False}}}}
    ours = shoal(modules, tmp_path / "modules")
    assert_close(ours, mergekit(modules, tmp_path / "mergekit"))
    plain = shoal(common | {"models": models, "parameters": {"normalize": False}}, tmp_path / "plain")
    assert set(ours) == set(plain) and all(torch.equal(ours[n], plain[n]) for n in ours)


def _llava_recipe(llms, vlm: dict[str, Path], base: Path) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"weight": 0.1},
            "modules": {
                "text_decoder": {"models": [
                    {"model": str(llms["llama"]["a"]), "parameters": {"weight": 0.5}},
                    {"model": str(vlm["b"]), "parameters": {"weight": [0.2, 0.8]}}]},
                "vision_tower": {"parameters": {"weight": 0.3}, "models": [
                    {"model": str(vlm["a"])},
                    {"model": str(vlm["b"]), "parameters": {"weight": [0.0, 1.0]}}]},
                "multi_modal_projector": {"models": [{"model": str(vlm["a"])}]}}}


def test_a_llava_modules_recipe_merges_each_module_by_its_formula(llms, vlms, tmp_path) -> None:
    """mergekit 0.1.5 has no LLaVA definition (it infers modules named after tensor prefixes), so the formula is the
    reference: task arithmetic per module, with the module's models, gradients over the module's own layers, and
    the weight of a model, else of its module, else of the recipe; the text_decoder takes a text-only LLM too."""
    from transformers import AutoModelForImageTextToText

    vlm = vlms["llava"]
    out = tmp_path / "m"
    merged = shoal(_llava_recipe(llms, vlm, vlm["base"]), out)
    base, a, b = (read_tensors(vlm[n]) for n in ("base", "a", "b"))
    llm_a = read_tensors(llms["llama"]["a"])
    assert set(merged) == set(base)
    for layer in range(4):
        for role in ("mlp.up_proj.weight", "self_attn.q_proj.weight"):
            name = f"model.layers.{layer}.{role}"
            own = f"language_model.{name}"
            expected = base[own] + 0.5 * (llm_a[name] - base[own]) + (0.2 + 0.6 * layer / 3) * (b[own] - base[own])
            assert torch.allclose(merged[own], expected, atol=1e-6), own
    for own in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):  # t = 0
        name = own.removeprefix("language_model.")
        expected = base[own] + 0.5 * (llm_a[name] - base[own]) + 0.2 * (b[own] - base[own])
        assert torch.allclose(merged[own], expected, atol=1e-6), own
    vision = [n for n in base if n.startswith("vision_tower.")]
    assert len(vision) > 20
    for name in vision:
        layer = int(name.split(".")[3]) if ".layers." in name else None
        weight_b = 0.0 if layer is None else float(layer)  # [0.0, 1.0] over the tower's 2 layers; 0 outside them
        expected = base[name] + 0.3 * (a[name] - base[name]) + weight_b * (b[name] - base[name])
        assert torch.allclose(merged[name], expected, atol=1e-6), name
    for name in (n for n in base if n.startswith("multi_modal_projector.")):  # the recipe's weight 0.1
        assert torch.allclose(merged[name], base[name] + 0.1 * (a[name] - base[name]), atol=1e-6), name
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    assert type(AutoModelForImageTextToText.from_pretrained(out)).__name__ == "LlavaForConditionalGeneration"


def test_the_output_takes_the_base_vlms_names_whatever_its_parents_layouts(llms, vlms, tmp_path) -> None:
    """The same merge over a base saved with transformers' live names (model.vision_tower.*, model.language_model.*)
    writes those names, with the values the checkpoint-named base gives."""
    checkpoint = shoal(_llava_recipe(llms, vlms["llava"], vlms["llava"]["base"]), tmp_path / "checkpoint")
    live = shoal(_llava_recipe(llms, vlms["llava"], vlms["llava-live"]["base"]), tmp_path / "live")
    assert set(live) == set(open_checkpoint(vlms["llava-live"]["base"]).names)

    def checkpoint_name(name: str) -> str:
        if name.startswith("model.language_model."):
            return "language_model.model." + name.removeprefix("model.language_model.")
        return "language_model." + name if name.startswith("lm_head.") else name.removeprefix("model.")

    assert len(live) == len(checkpoint)
    for name, tensor in live.items():
        assert torch.equal(tensor, checkpoint[checkpoint_name(name)]), name


def _slices(*models: Path, residual_weight: float | None = None) -> dict:
    piece = {"sources": [{"model": str(m), "layer_range": [0, 4]} for m in models],
             "parameters": {"weight": [0.2, 0.7]}}
    if residual_weight is not None:
        piece["residual_weight"] = residual_weight
    return {"merge_method": "linear", "slices": [piece]}


def test_residual_weight_changes_nothing_and_a_warning_says_so(run_cli, parents, tmp_path) -> None:
    """mergekit 0.1.5 accepts residual_weight on an output slice and reads it nowhere."""
    with pytest.warns(ShoalWarning, match=r"^<recipe>:\d+: residual_weight changes nothing"):
        with_it = shoal(_slices(parents["a"], parents["b"], residual_weight=0.3), tmp_path / "with")
    without = shoal(_slices(parents["a"], parents["b"]), tmp_path / "without")
    assert set(with_it) == set(without) and all(torch.equal(with_it[n], without[n]) for n in without)
    path = write_recipe(tmp_path, _slices(parents["a"], parents["b"], residual_weight=0.3))
    code, _, err = run_cli("merge", path, tmp_path / "cli")
    assert code == 0, err
    warning = [row for row in err.splitlines() if row.startswith("warning:")]
    line = next(i for i, row in enumerate(path.read_text().splitlines(), 1) if "residual_weight" in row)
    assert len(warning) == 1 and f"recipe.yaml:{line}: residual_weight changes nothing" in warning[0], err
    assert all(torch.equal(t, without[n]) for n, t in read_tensors(tmp_path / "cli").items())


def test_a_multi_document_recipe_resolves_document_names_inside_modules(run_cli, parents, tmp_path) -> None:
    first = {"name": "ab", "merge_method": "linear",
             "models": [{"model": str(parents[n]), "parameters": {"weight": 0.5}} for n in ("a", "b")]}
    second = {"merge_method": "task_arithmetic", "base_model": str(parents["base"]), "modules": {"default": {
        "models": [{"model": "ab", "parameters": {"weight": 0.8}}, {"model": str(parents["c"]),
                                                                    "parameters": {"weight": 0.3}}]}}}
    code, _, err = run_cli("merge", write_recipe(tmp_path, yaml.safe_dump_all([first, second])), tmp_path / "out")
    assert code == 0, err
    merged, base, ab, c = (read_tensors(f) for f in (tmp_path / "out", parents["base"],
                                                     tmp_path / "out.intermediate" / "ab", parents["c"]))
    for name, tensor in merged.items():
        expected = base[name] + 0.8 * (ab[name] - base[name]) + 0.3 * (c[name] - base[name])
        assert torch.allclose(tensor, expected, atol=1e-6), name


def _refused(run_cli, tmp_path: Path, recipe: dict, *needles: str) -> None:
    code, _, err = run_cli("merge", write_recipe(tmp_path, recipe), tmp_path / "out")
    one_error_line(code, err, *needles)
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def _modules(vlm: dict[str, Path], **modules) -> dict:
    one = {"models": [{"model": str(vlm["a"]), "parameters": {"weight": 1.0}}]}
    return {"merge_method": "linear", "modules": {m: one for m in ("text_decoder", *VISION_AND_PROJECTOR)} | modules}


def test_a_module_the_architecture_lacks_is_refused_naming_its_modules(run_cli, vlms, tmp_path) -> None:
    recipe = _modules(vlms["llava"], vision_towr={"models": [{"model": str(vlms["llava"]["a"])}]})
    _refused(run_cli, tmp_path, recipe, "'vision_towr' is not a module of a llava model",
             "(its modules: text_decoder, vision_tower, multi_modal_projector)")


def test_a_text_only_model_has_only_the_default_module(run_cli, parents, tmp_path) -> None:
    recipe = {"merge_method": "linear", "modules": {"text_decoder": {"models": [{"model": str(parents["a"])}]}}}
    _refused(run_cli, tmp_path, recipe, "'text_decoder' is not a module of a text-only model", "(its modules: default)")


def test_a_module_left_out_is_refused_rather_than_written_without_its_tensors(run_cli, vlms, tmp_path) -> None:
    recipe = _modules(vlms["qwen2_5_vl"])
    del recipe["modules"]["multi_modal_projector"]
    _refused(run_cli, tmp_path, recipe, "leaves out multi_modal_projector of a qwen2_5_vl model",
             "mergekit 0.1.5 would write the merge without those tensors",
             "with a text LLM among its models merges the language model and keeps the rest",
             "one of VLMs only merges every module")


def test_a_text_only_model_in_a_vision_module_is_refused(run_cli, llms, vlms, tmp_path) -> None:
    llm = llms["llama"]["a"]
    recipe = _modules(vlms["llava"], vision_tower={"models": [{"model": str(llm), "parameters": {"weight": 1.0}}]})
    _refused(run_cli, tmp_path, recipe, "modules.vision_tower:", str(llm), "is a text-only model (LlamaForCausalLM)",
             "merges llava models only")


def test_vision_slices_that_change_the_towers_depth_are_refused(run_cli, vlms, tmp_path) -> None:
    slices = [{"sources": [{"model": str(vlms["llava"]["a"]), "layer_range": [0, 1]}]}]
    recipe = _modules(vlms["llava"], vision_tower={"slices": slices})
    _refused(run_cli, tmp_path, recipe, "modules.vision_tower: the slices make 1 layer", "whose vision_tower has 2")


@pytest.mark.parametrize("change,needles", [
    (lambda r: r["modules"]["vision_tower"].update(slices=[{"sources": [{"model": "x", "layer_range": [0, 1]}]}]),
     ["recipe.yaml:", "modules.vision_tower: give exactly one of models or slices"]),
    (lambda r: r.update(models=[{"model": "x"}]), ["give exactly one of `models`, `slices` or `modules`"]),
    (lambda r: r["modules"].update(vision_tower={}), ["modules.vision_tower: give exactly one of models or slices"]),
], ids=["models-and-slices", "models-and-modules", "neither"])
def test_a_module_needs_exactly_one_of_models_or_slices(change, needles, run_cli, vlms, tmp_path) -> None:
    recipe = _modules(vlms["llava"])
    recipe["modules"] = {k: dict(v) for k, v in recipe["modules"].items()}
    change(recipe)
    _refused(run_cli, tmp_path, recipe, *needles)


def test_vision_slices_take_the_towers_embeddings_from_the_first_and_its_final_norm_from_the_last(vlms, tmp_path):
    """As mergekit plans a module: the tensors before the layers come from the first slice's sources, those after
    (CLIP's post_layernorm) from the last slice's."""
    vlm = vlms["llava"]
    slices = [{"sources": [{"model": str(vlm["a"]), "layer_range": [0, 1]}]},
              {"sources": [{"model": str(vlm["b"]), "layer_range": [1, 2]}]}]
    recipe = _modules(vlm, vision_tower={"slices": slices, "parameters": {"weight": 1.0}})
    merged, a, b = shoal(recipe, tmp_path / "m"), read_tensors(vlm["a"]), read_tensors(vlm["b"])
    vision = [n for n in a if n.startswith("vision_tower.")]
    for name in vision:
        if ".layers.0." in name or ".layers." not in name and "post_layernorm" not in name:
            assert torch.equal(merged[name], a[name]), name
        else:
            assert torch.equal(merged[name], b[name]), name
    assert any("post_layernorm" in n for n in vision) and any("pre_layrnorm" in n for n in vision)
