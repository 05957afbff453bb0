"""Vision-language parents (EvoVLM): a VLM's language model merges with text-only LLMs by layer and role, and the
output is the VLM (its names, class, vision tower, projector and processor), for every family shoal knows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_recipe, read_tensors as tensors
from PIL import Image
from vlm_models import make_llava, make_qwen2_vl, qwen2_config

from shoal.checkpoint.reader import open_checkpoint
from shoal.errors import ShoalError
from shoal.merge.engine import run_merge
from shoal.merge.resident import ResidentMerger
from shoal.recipe import parse_recipe
from shoal.search.evolve import evolve
from shoal.search.spec import load_search
from shoal.search.storage import open_storage
from shoal.synthetic import make_parents, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ["llava", "llava-live", "llava_next", "qwen2_vl", "qwen2_vl-live", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def llms(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Text-only parents, per language-model architecture: a base and two fine-tunes (base + noise)."""
    root = tmp_path_factory.mktemp("llms")
    return {"llama": make_parents(root / "llama", ("base", "a", "b"), seed=0),
            "qwen2": make_parents(root / "qwen2", ("base", "a", "b"), config=qwen2_config(), seed=0)}


@pytest.fixture(scope="module")
def vlms(llms, tmp_path_factory) -> dict[str, Path]:
    """One VLM per family (and saved layout) whose language model is exactly the LLM parent b."""
    root = tmp_path_factory.mktemp("vlms")
    return {
        "llava": make_llava(root / "llava", llms["llama"]["b"], noise=0.0),
        "llava-live": make_llava(root / "llava-live", llms["llama"]["b"], noise=0.0, layout="live"),
        "llava_next": make_llava(root / "llava_next", llms["llama"]["b"], noise=0.0, next_=True),
        "qwen2_vl": make_qwen2_vl(root / "qwen2_vl", llms["qwen2"]["b"], noise=0.0),
        "qwen2_vl-live": make_qwen2_vl(root / "qwen2_vl-live", llms["qwen2"]["b"], noise=0.0, layout="live"),
        "qwen2_5_vl": make_qwen2_vl(root / "qwen2_5_vl", llms["qwen2"]["b"], noise=0.0, v2_5=True),
    }


def _llm_of(family: str) -> str:
    return "qwen2" if family.startswith("qwen2") else "llama"


def _recipe(method: str, base: Path, a: Path, b: Path, seed: int = 4) -> dict:
    density = {"density": 0.4} if method != "task_arithmetic" else {}
    return {"merge_method": method, "base_model": str(base), "seed": seed, "models": [
        {"model": str(a), "parameters": {"weight": [0.3, 0.9], **density}},
        {"model": str(b), "parameters": {"weight": [{"filter": "mlp", "value": 0.6}, {"value": 0.8}], **density}}]}


def _merge(recipe: dict, out: Path) -> Path:
    return run_merge(parse_recipe(yaml.safe_dump(recipe)), out)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_maps_its_language_model_onto_the_llms_tensor_names(family, llms, vlms) -> None:
    vlm, llm = open_checkpoint(vlms[family]), open_checkpoint(llms[_llm_of(family)]["b"])
    assert vlm.is_vlm and not llm.is_vlm
    assert sorted(vlm.lm_names) == sorted(llm.names)
    assert vlm.num_layers == llm.num_layers
    for name in llm.names:  # the VLM was built from b with no noise: each role holds b's very tensor
        assert torch.equal(vlm.tensor(vlm.lm.own(name)), llm.tensor(name)), name
    assert vlm.extra_names and all(vlm.lm.canonical(n) is None for n in vlm.extra_names)
    assert all(("vision" in n or "visual" in n or "projector" in n or n == "image_newline") for n in vlm.extra_names)


@pytest.mark.parametrize("method", ["dare_ties", "ties", "task_arithmetic"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_vlm_parent_merges_like_its_language_model_and_keeps_its_vision_tensors(
    family, method, llms, vlms, tmp_path
) -> None:
    """The VLM stands where b stood: every language tensor equals the text-only merge (the formula, DARE's seeds and
    filters all see the LLM's names), written under the VLM's names; the rest is the VLM's, bit for bit."""
    llm = llms[_llm_of(family)]
    text = tensors(_merge(_recipe(method, llm["base"], llm["a"], llm["b"]), tmp_path / "text"))
    out = _merge(_recipe(method, llm["base"], llm["a"], vlms[family]), tmp_path / "vlm")
    merged, vlm = tensors(out), open_checkpoint(vlms[family])
    assert set(merged) == set(vlm.names)
    for name, expected in text.items():
        assert torch.equal(merged[vlm.lm.own(name)], expected), name
    for name in vlm.extra_names:
        assert torch.equal(merged[name], vlm.tensor(name)), name
    assert json.loads((out / "config.json").read_text())["model_type"] == vlm.config["model_type"]


def test_the_language_tensors_follow_the_task_arithmetic_formula(llms, vlms, tmp_path) -> None:
    llm = llms["llama"]
    out = tensors(_merge(_recipe("task_arithmetic", llm["base"], llm["a"], vlms["llava"]), tmp_path / "m"))
    base, a, b = (tensors(llm[n]) for n in ("base", "a", "b"))
    for layer in range(4):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        wa = 0.3 + 0.6 * layer / 3
        expected = base[name] + wa * (a[name] - base[name]) + 0.6 * (b[name] - base[name])
        assert torch.allclose(out[f"language_model.{name}"], expected, atol=1e-6)


def _image(size: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype("uint8"))


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_the_merged_llava_loads_with_its_class_and_processor_and_answers_an_image(family, llms, vlms, tmp_path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    llm = llms["llama"]
    out = _merge(_recipe("dare_ties", llm["base"], llm["a"], vlms[family]), tmp_path / "m")
    for name in ("processor_config.json", "chat_template.jinja", "tokenizer.json"):
        assert (out / name).read_bytes() == (vlms[family] / name).read_bytes(), name
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == open_checkpoint(vlms[family]).architecture
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w5 w6"}]}]
    prompt = processor.apply_chat_template(messages)
    inputs = processor(images=_image(32), text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() > 0
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
    with torch.no_grad():  # the image reaches the answer: another image, other logits
        other = processor(images=_image(32).rotate(90), text=prompt, return_tensors="pt")
        assert not torch.allclose(model(**inputs).logits[0, -1], model(**other).logits[0, -1])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_the_merged_qwen2_vl_loads_with_its_class_and_image_processor_and_answers_an_image(
    family, llms, vlms, tmp_path
) -> None:
    """Qwen2VLProcessor needs torchvision (its video processor), not a dependency here; its image processor and
    tokenizer do the same for an image: the image pad token repeated once per merged patch."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    llm = llms["qwen2"]
    out = _merge(_recipe("dare_ties", llm["base"], llm["a"], vlms[family]), tmp_path / "m")
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == open_checkpoint(vlms[family]).architecture
    images = AutoImageProcessor.from_pretrained(out)(images=_image(56), return_tensors="pt")
    tokenizer = AutoTokenizer.from_pretrained(out)
    pads = int(images["image_grid_thw"].prod()) // 4
    prompt = "<|vision_start|>" + "<|image_pad|>" * pads + "<|vision_end|> w5 w6"
    inputs = tokenizer(prompt, return_tensors="pt") | dict(images)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_a_slice_recipe_over_a_vlm_writes_the_vlm_with_its_new_depth(llms, vlms, tmp_path) -> None:
    from transformers import AutoModelForImageTextToText

    llm = llms["llama"]
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(vlms["llava"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(llm["a"]), "layer_range": [3, 4]}]}]}
    out = _merge(recipe, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 3 and config["model_type"] == "llava"
    merged, a = tensors(out), tensors(llm["a"])
    assert torch.equal(merged["language_model.model.layers.2.mlp.up_proj.weight"], a["model.layers.3.mlp.up_proj.weight"])
    assert "vision_tower.encoder.layers.1.mlp.fc1.weight" in merged
    AutoModelForImageTextToText.from_pretrained(out)


def _expect_error(run_cli, tmp_path: Path, recipe: dict, *needles: str) -> None:
    code, _, err = run_cli("merge", write_recipe(tmp_path, recipe), tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config,needles", [
    (tiny_config(hidden_size=32), ["hidden_size", "64", "32"]),
    (tiny_config(num_hidden_layers=2), ["layer count", "num_hidden_layers", "4", "2"]),
    (tiny_config(vocab_size=260), ["model.embed_tokens.weight", "(260, 64)", "(256, 64)"]),
], ids=["width", "depth", "vocabulary"])
def test_a_vlm_and_an_llm_of_other_sizes_are_refused_in_one_line(config, needles, run_cli, vlms, tmp_path) -> None:
    other = make_parents(tmp_path / "other", ("x",), config=config)["x"]
    recipe = {"merge_method": "ties", "base_model": str(other),
              "models": [{"model": str(vlms["llava"]), "parameters": {"weight": 1.0}}]}
    _expect_error(run_cli, tmp_path, recipe, *needles, str(other), str(vlms["llava"]))


def test_a_vlm_over_another_language_model_architecture_is_refused(run_cli, llms, vlms, tmp_path) -> None:
    recipe = {"merge_method": "ties", "base_model": str(llms["qwen2"]["base"]),
              "models": [{"model": str(vlms["llava"]), "parameters": {"weight": 1.0}}]}
    _expect_error(run_cli, tmp_path, recipe, "different language-model architectures", "llama", "qwen2")


def test_a_multimodal_family_shoal_does_not_know_is_refused(run_cli, llms, vlms, tmp_path) -> None:
    unknown = tmp_path / "unknown"
    shutil.copytree(vlms["llava"], unknown)
    config = json.loads((unknown / "config.json").read_text())
    config |= {"model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"]}
    (unknown / "config.json").write_text(json.dumps(config))
    recipe = {"merge_method": "ties", "base_model": str(llms["llama"]["base"]),
              "models": [{"model": str(unknown), "parameters": {"weight": 1.0}}]}
    _expect_error(run_cli, tmp_path, recipe, "PaliGemmaForConditionalGeneration", "cannot merge", "llava, llava_next")


def test_a_tokenizer_other_than_the_vlms_is_refused(run_cli, llms, vlms, tmp_path) -> None:
    llm = llms["llama"]
    recipe = _recipe("ties", llm["base"], llm["a"], vlms["llava"]) | {"tokenizer_source": str(llm["a"])}
    _expect_error(run_cli, tmp_path, recipe, "tokenizer_source", "processor", str(vlms["llava"]))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_resident_merger_holds_the_vlm_and_matches_shoal_merge(family, llms, vlms, tmp_path) -> None:
    from transformers import AutoModelForImageTextToText

    llm = llms[_llm_of(family)]
    first = _recipe("dare_ties", llm["base"], llm["a"], vlms[family])
    merger = ResidentMerger(parse_recipe(yaml.safe_dump(first)))
    assert type(merger.model).__name__ == open_checkpoint(vlms[family]).architecture
    second = _recipe("dare_ties", llm["base"], llm["a"], vlms[family], seed=9)
    second["models"][0]["parameters"] = {"weight": 0.1, "density": 0.8}
    for i, recipe in enumerate([first, second]):
        merger.apply(parse_recipe(yaml.safe_dump(recipe)))
        on_disk = _merge(recipe, tmp_path / f"out{i}")
        loaded = AutoModelForImageTextToText.from_pretrained(on_disk).state_dict()
        live = merger.model.state_dict()
        assert set(loaded) == set(live)
        for name, tensor in loaded.items():
            assert torch.equal(live[name], tensor), name


def test_mergekit_0_1_5_cannot_merge_vlm_recipes(llms, vlms, tmp_path) -> None:
    """So there is no mergekit output to agree with. Under transformers 5, a recipe of LLaVAs only (base and parents
    alike) gets back the vision tower and projector without any language-model tensor; a Qwen2-VL parent stops it
    (its config keeps num_hidden_layers under text_config)."""
    mergekit = pytest.importorskip("mergekit", reason="mergekit is a test-only dependency")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_merge

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
    llavas = {n: make_llava(tmp_path / n, llms["llama"][n], noise=0.0) for n in ("base", "a")}
    recipe = _recipe("ties", llavas["base"], llavas["a"], vlms["llava"])
    mergekit_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"), options)
    written = tensors(tmp_path / "mk")
    assert written and not any("layers" in n and "vision" not in n for n in written)
    assert not any("embed_tokens" in n or "lm_head" in n for n in written)
    qwen = _recipe("ties", llms["qwen2"]["base"], llms["qwen2"]["a"], vlms["qwen2_vl"])
    with pytest.raises(Exception, match="num_hidden_layers"):
        mergekit_merge(MergeConfiguration.model_validate(qwen), str(tmp_path / "mk-qwen"),
                       MergeOptions(**options.model_dump() | {"allow_crimes": True}))


def _text_task(folder: Path) -> Path:
    """Mean log-probability of a fixed continuation: a score that differs between any two candidates."""
    folder.mkdir()
    spec = {"name": "words", "metric": "answer_logprob", "splits": {"dev": "dev.jsonl", "test": "test.jsonl"}}
    (folder / "task.yaml").write_text(yaml.safe_dump(spec))
    rng = np.random.default_rng(0)
    for split in ("dev", "test"):
        rows = [{"prompt": " ".join(f"w{i}" for i in rng.integers(4, 200, 5)), "answer": f" w{rng.integers(4, 200)}"}
                for _ in range(6)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _stored(run_dir: Path) -> list[tuple]:
    import optuna

    study = optuna.load_study(study_name="shoal", storage=open_storage(str(run_dir / "study.log")))
    return [(t.params, t.value, t.state.name) for t in sorted(study.trials, key=lambda t: t.number)]


def _llava_search(llms, folder: Path, budget: int = 9):
    """A PS search over a Llama base, a Llama fine-tune and a LLaVA whose language model is another fine-tune."""
    llm = llms["llama"]
    llava = make_llava(folder / "llava", llm["b"], noise=0.02, seed=3)
    spec = {"base": str(llm["base"]), "parents": {"ja": str(llm["a"]), "vlm": str(llava)}, "method": "dare_ties",
            "genome": {"layers_per_group": 2}, "tasks": [{"path": str(_text_task(folder / "task"))}],
            "budget": budget, "seed": 2, "population": 4}
    (folder / "search.yaml").write_text(yaml.safe_dump(spec))
    return load_search(folder / "search.yaml")


def test_evolve_with_a_llava_parent_resumes_storing_the_same_trials(llms, tmp_path) -> None:
    """Candidates are merged into the resident LLaVA and scored on a text task; a run stopped and resumed stores
    the trials of one that ran whole, and its best folder is the VLM."""
    search = _llava_search(llms, tmp_path)
    evolve(search.model_copy(update={"budget": 5}), tmp_path / "resumed")  # stops inside the second generation
    summary = evolve(search, tmp_path / "resumed")
    evolve(search, tmp_path / "whole")
    resumed, whole = _stored(tmp_path / "resumed"), _stored(tmp_path / "whole")
    assert resumed == whole and len(whole) == 9 and summary.sessions == 2
    assert len({value for _, value, _ in whole}) > 1
    best = tmp_path / "resumed" / "best"
    assert json.loads((best / "config.json").read_text())["model_type"] == "llava"
    assert set(summary.parents) == {"base", "ja", "vlm"}


def test_ray_workers_with_a_llava_parent_store_the_trials_of_a_serial_run(llms, tmp_path) -> None:
    ray = pytest.importorskip("ray")
    search = _llava_search(llms, tmp_path, budget=8)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        parallel = evolve(search, tmp_path / "parallel", workers=2)
    finally:
        ray.shutdown()
    serial = evolve(search, tmp_path / "serial")
    import optuna

    def by_index(run: Path) -> dict[int, tuple]:
        study = optuna.load_study(study_name="shoal", storage=open_storage(str(run / "study.log")))
        return {t.user_attrs["index"]: (t.params, t.value, t.state.name, t.user_attrs["seed"]) for t in study.trials}

    assert by_index(tmp_path / "parallel") == by_index(tmp_path / "serial")
    assert len(by_index(tmp_path / "serial")) == 8
    assert parallel.best == serial.best


@pytest.mark.parametrize("inputs", ["device", "stream"])
def test_a_vlm_of_mixed_dtypes_is_merged_in_memory_as_shoal_merge_writes_it(inputs, tmp_path) -> None:
    """A LLaVA whose language model is bfloat16 and vision tower float32: the live model stays float32, and its
    language tensors hold the merge rounded to bfloat16, as written on disk."""
    from transformers import AutoModelForImageTextToText

    from shoal.merge.memory import MemoryPlan

    llm = make_parents(tmp_path / "llm", ("base", "a", "b"), dtype=torch.bfloat16, seed=0)
    vlm = make_llava(tmp_path / "llava", llm["b"], noise=0.01)
    assert {open_checkpoint(vlm).dtype(n) for n in open_checkpoint(vlm).tensors} == {"BF16", "F32"}
    recipe = _recipe("task_arithmetic", llm["base"], llm["a"], vlm)
    merger = ResidentMerger(parse_recipe(yaml.safe_dump(recipe)), memory=MemoryPlan(inputs=inputs))
    merger.apply(parse_recipe(yaml.safe_dump(recipe)))
    loaded = AutoModelForImageTextToText.from_pretrained(_merge(recipe, tmp_path / "out")).state_dict()
    live = merger.model.state_dict()
    assert live["model.language_model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    for name, tensor in loaded.items():
        assert torch.equal(live[name], tensor.to(live[name].dtype)), name


def test_the_resident_merger_refuses_tokenizer_settings_a_vlm_output_cannot_take(llms, vlms) -> None:
    """Refused when the search starts, as `shoal merge` refuses them, not after it at the export."""
    llm = llms["llama"]
    for extra in ({"tokenizer_source": "union"}, {"chat_template": "chatml"}):
        recipe = _recipe("ties", llm["base"], llm["a"], vlms["llava"]) | extra
        with pytest.raises(ShoalError, match="vision-language model"):
            ResidentMerger(parse_recipe(yaml.safe_dump(recipe)))


def test_other_families_embedding_names_are_vocabulary_tensors() -> None:
    from shoal import layout

    for name in ("model.embed_tokens.weight", "gpt_neox.embed_in.weight", "embed_out.weight", "lm_head.weight",
                 "transformer.wte.weight", "model.tok_embeddings.weight"):
        assert layout.is_vocabulary(name), name
    assert not layout.is_vocabulary("model.layers.0.mlp.up_proj.weight")


@pytest.fixture(scope="module")
def vlm_family(llms, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per family, three VLMs over the LLM base, a and b, each with its own vision tower and projector (seeds)."""
    root = tmp_path_factory.mktemp("vlm_family")
    made = {}
    for family, make, llm in (("llava", make_llava, "llama"), ("qwen2_vl", make_qwen2_vl, "qwen2")):
        made[family] = {name: make(root / family / name, llms[llm][name], noise=0.0, seed=seed)
                        for seed, name in enumerate(("base", "a", "b"))}
    return made


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_models_recipe_of_vlms_only_merges_every_module_as_mergekit_reads_it(family, vlm_family, tmp_path) -> None:
    """mergekit 0.1.5 reads `models:` as every module merged from those models; with VLMs only shoal does the same:
    the output equals the `modules:` recipe that says so, bit for bit, and a vision tensor follows the formula with
    the gradient over the vision tower's own layers."""
    vlm = vlm_family[family]
    plain = _recipe("task_arithmetic", vlm["base"], vlm["a"], vlm["b"])
    out = _merge(plain, tmp_path / "plain")
    names = open_checkpoint(vlm["base"]).lm
    modules = {key: value for key, value in plain.items() if key != "models"}
    modules["modules"] = {module: {"models": plain["models"]} for module in names.modules}
    explicit = tensors(_merge(modules, tmp_path / "modules"))
    merged = tensors(out)
    assert set(merged) == set(explicit) and all(torch.equal(merged[n], explicit[n]) for n in merged)
    base, a, b = (tensors(vlm[n]) for n in ("base", "a", "b"))
    tower = "vision_tower.encoder.layers.{}.mlp.fc1.weight" if family == "llava" else "visual.blocks.{}.mlp.fc1.weight"
    checked = 0
    for layer in range(2):  # two blocks: the gradient [0.3, 0.9] gives 0.3, then 0.9
        name = next(n for n in merged if n.endswith(tower.format(layer)))
        wa = 0.3 + 0.6 * layer
        wb = 0.6 if "mlp" in name else 0.8
        expected = base[name] + wa * (a[name] - base[name]) + wb * (b[name] - base[name])
        assert not torch.equal(a[name], base[name])
        assert torch.allclose(merged[name], expected, atol=1e-6), name
        checked += 1
    assert checked == 2
    card = (out / "README.md").read_text()
    assert "every module (language model, vision tower, projector) is merged" in card and "unchanged" not in card


def test_with_a_text_llm_among_vlms_only_the_language_model_is_merged(llms, vlm_family, tmp_path) -> None:
    vlm = vlm_family["llava"]
    out = _merge(_recipe("task_arithmetic", llms["llama"]["base"], vlm["a"], vlm["b"]), tmp_path / "m")
    merged, first = tensors(out), open_checkpoint(vlm["a"])
    for name in first.extra_names:  # the vision parts are the first VLM listed's, unchanged
        assert torch.equal(merged[name], first.tensor(name)), name
    assert "are `" in (out / "README.md").read_text() and "unchanged" in (out / "README.md").read_text()


def test_the_resident_merger_of_vlms_only_matches_shoal_merge(vlm_family, tmp_path) -> None:
    from transformers import AutoModelForImageTextToText

    vlm = vlm_family["llava"]
    recipes = [_recipe("dare_ties", vlm["base"], vlm["a"], vlm["b"]), _recipe("dare_ties", vlm["base"], vlm["a"],
                                                                              vlm["b"], seed=9)]
    recipes[1]["models"][0]["parameters"] = {"weight": 0.1, "density": 0.8}
    merger = ResidentMerger(parse_recipe(yaml.safe_dump(recipes[0])))
    for i, recipe in enumerate(recipes):
        merger.apply(parse_recipe(yaml.safe_dump(recipe)))
        loaded = AutoModelForImageTextToText.from_pretrained(_merge(recipe, tmp_path / f"out{i}")).state_dict()
        live = merger.model.state_dict()
        assert set(loaded) == set(live)
        for name, tensor in loaded.items():
            assert torch.equal(live[name], tensor), name
    fc1 = next(n for n in live if "vision_tower" in n and n.endswith("layers.0.mlp.fc1.weight"))
    assert not torch.equal(live[fc1], AutoModelForImageTextToText.from_pretrained(vlm["a"]).state_dict()[fc1])


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_on_llavas_only_the_vision_tensors_equal_what_mergekit_0_1_5_writes(method, vlm_family, tmp_path) -> None:
    """The tensors mergekit 0.1.5 does write for a recipe of LLaVAs only (the vision tower and projector; it loses
    the language model under transformers 5) are shoal's, within float32 rounding."""
    pytest.importorskip("mergekit", reason="mergekit is a test-only dependency")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_merge

    vlm = vlm_family["llava"]
    recipe = _recipe(method, vlm["base"], vlm["a"], vlm["b"])
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
    mergekit_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"), options)
    ours = tensors(_merge(recipe, tmp_path / "shoal"))
    # mergekit names them as transformers 5 holds them live (model.vision_tower.*), shoal as the checkpoint did
    theirs = {n.removeprefix("model."): t for n, t in tensors(tmp_path / "mk").items()}
    vision = [n for n in theirs if n.startswith(("vision_tower.", "multi_modal_projector."))]
    assert len(vision) == len(open_checkpoint(vlm["a"]).extra_names) > 20
    for name in vision:
        assert torch.allclose(ours[name], theirs[name], atol=1e-5, rtol=0), name
    assert any(not torch.equal(ours[n], open_checkpoint(vlm["a"]).tensor(n)) for n in vision)


def test_a_linear_merge_of_vlms_takes_their_depth_not_that_of_the_base_it_ignores(llms, vlm_family, tmp_path) -> None:
    short = make_parents(tmp_path / "short", ("base",), config=tiny_config(num_hidden_layers=2), seed=5)["base"]
    vlm = vlm_family["llava"]
    recipe = {"merge_method": "linear", "base_model": str(short), "models": [
        {"model": str(vlm["a"]), "parameters": {"weight": 0.5}},
        {"model": str(vlm["b"]), "parameters": {"weight": 0.5}}]}
    out = _merge(recipe, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["text_config"]["num_hidden_layers"] == 4
    a, b, merged = tensors(vlm["a"]), tensors(vlm["b"]), tensors(out)
    name = "language_model.model.layers.3.mlp.up_proj.weight"
    assert torch.allclose(merged[name], 0.5 * a[name] + 0.5 * b[name], atol=1e-6)


def test_a_multi_document_rerun_merges_again_an_intermediate_keyed_before_vlms_merged_every_module(
        vlm_family, tmp_path, monkeypatch) -> None:
    """multi.FORMAT keys intermediates by how a document merges; one made before VLM-only documents merged every
    module (format 2, which copied the vision parts) is merged again, not reused."""
    from shoal.merge import multi
    from shoal.merge.multi import merge_documents
    from shoal.recipe_documents import load_documents

    vlm = vlm_family["llava"]
    inner = {"name": "ab", "merge_method": "task_arithmetic", "base_model": str(vlm["base"]), "models": [
        {"model": str(vlm["a"]), "parameters": {"weight": 0.7}},
        {"model": str(vlm["b"]), "parameters": {"weight": 0.4}}]}
    outer = {"merge_method": "linear", "models": [{"model": "ab", "parameters": {"weight": 1.0}}]}
    text = yaml.safe_dump_all([outer, inner], sort_keys=False)
    docs = load_documents(write_recipe(tmp_path, text))
    with monkeypatch.context() as old:
        old.setattr(multi, "FORMAT", 2)
        merge_documents(docs, tmp_path / "first", tmp_path / "parts", recipe_text=text, notice=print)
    notices: list[str] = []
    merge_documents(docs, tmp_path / "again", tmp_path / "parts", recipe_text=text, notice=notices.append)
    assert any("merged from another version" in n for n in notices), notices
    assert not any("reused" in n for n in notices), notices


def test_vlms_of_other_vision_shapes_are_refused_with_the_way_to_keep_one_vlms_vision_parts(
        llms, vlm_family, tmp_path, monkeypatch) -> None:
    import vlm_models

    clip = vlm_models.CLIPVisionConfig
    monkeypatch.setattr(vlm_models, "CLIPVisionConfig", lambda **kw: clip(**(kw | {"hidden_size": 48})))
    wide = make_llava(tmp_path / "wide", llms["llama"]["b"], noise=0.0, seed=7)
    vlm = vlm_family["llava"]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(vlm["base"]), "models": [
        {"model": str(vlm["a"]), "parameters": {"weight": 0.5}}, {"model": str(wide), "parameters": {"weight": 0.5}}]}
    with pytest.raises(ShoalError, match="VLMs of other vision shapes .* slices of that VLM alone"):
        _merge(recipe, tmp_path / "out")


def test_evolve_over_vlms_only_exports_the_model_it_scored(vlm_family, tmp_path) -> None:
    from transformers import AutoModelForImageTextToText

    from shoal.search.spaces import ParameterSpace

    vlm = vlm_family["llava"]
    spec = {"base": str(vlm["base"]), "parents": {"a": str(vlm["a"]), "b": str(vlm["b"])}, "method": "dare_ties",
            "genome": {"layers_per_group": 2}, "tasks": [{"path": str(_text_task(tmp_path / "task"))}],
            "budget": 4, "seed": 2, "population": 4}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(spec))
    search = load_search(tmp_path / "search.yaml")
    evolve(search, tmp_path / "run")
    best = tmp_path / "run" / "best"
    space = ParameterSpace(search)
    space.merger.apply(parse_recipe((best / "recipe.yaml").read_text()))
    live = space.merger.model.state_dict()
    written = AutoModelForImageTextToText.from_pretrained(best).state_dict()
    assert set(written) == set(live) and all(torch.equal(live[n], t) for n, t in written.items())
    tower = next(n for n in written if "vision_tower" in n and n.endswith("layers.0.mlp.fc1.weight"))
    assert not torch.equal(written[tower], AutoModelForImageTextToText.from_pretrained(vlm["base"]).state_dict()[tower])
    assert "every module" in (best / "README.md").read_text()


@pytest.mark.parametrize("family", ["llava_next", "llava-live", "qwen2_vl-live", "qwen2_5_vl"])
def test_the_resident_merger_of_vlms_only_matches_shoal_merge_in_every_layout(family, llms, tmp_path) -> None:
    from transformers import AutoModelForImageTextToText

    qwen = family.startswith("qwen")
    llm = llms["qwen2" if qwen else "llama"]
    layout = "live" if family.endswith("-live") else "checkpoint"
    make = (lambda f, lm, s: make_qwen2_vl(f, lm, noise=0.0, seed=s, layout=layout, v2_5=family == "qwen2_5_vl")) \
        if qwen else (lambda f, lm, s: make_llava(f, lm, noise=0.0, seed=s, layout=layout,
                                                  next_=family == "llava_next"))
    vlm = {n: make(tmp_path / n, llm[n], s) for s, n in enumerate(("base", "a", "b"))}
    recipe = {"merge_method": "ties", "base_model": str(vlm["base"]), "seed": 3, "models": [
        {"model": str(vlm["a"]), "parameters": {"weight": [0.3, 0.9], "density": 0.5}},
        {"model": str(vlm["b"]), "parameters": {"weight": 0.6, "density": 0.7}}]}
    merger = ResidentMerger(parse_recipe(yaml.safe_dump(recipe)))
    merger.apply(parse_recipe(yaml.safe_dump(recipe)))
    loaded = AutoModelForImageTextToText.from_pretrained(_merge(recipe, tmp_path / "out")).state_dict()
    live = merger.model.state_dict()
    assert set(loaded) == set(live) and all(torch.equal(live[n], t) for n, t in loaded.items())
    base = AutoModelForImageTextToText.from_pretrained(vlm["base"]).state_dict()
    vision = [n for n in live if "visual" in n or "vision_tower" in n or "projector" in n or "image_newline" in n]
    assert any(not torch.equal(live[n], base[n]) for n in vision)
