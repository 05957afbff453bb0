"""The zoo's VLM part: pictures, the LLaVA made from the base, its training examples, the caption tasks, and
vlm.json's reuse and integrity checks (smoke size)."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from conftest import kill_once_stored
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from shoal.errors import ShoalError
from shoal.evaluate import evaluate, load_task
from shoal.search.evolve import evolve
from shoal.search.spec import load_search
from shoal.search.storage import open_storage
from shoal.zoo import Zoo, build_zoo
from shoal.zoo.captions import PROMPTS, SCENES, held_out, training_renders
from shoal.zoo.language import EN_LOOK, XX_LOOK, scene
from shoal.zoo.pictures import INKS, render
from shoal.zoo.vlm import examples, from_base
from shoal.zoo.vlmzoo import VLM_SIZES, VlmZoo, build_vlm_zoo, load_vlm_zoo

SMOKE = VLM_SIZES["smoke"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    return build_zoo(tmp_path_factory.mktemp("zoo"), seed=0, size="smoke", threads=1)


@pytest.fixture(scope="module")
def vlm_zoo(zoo: Zoo) -> VlmZoo:
    return build_vlm_zoo(zoo)


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _stages(zoo: Zoo, notices: list[str] | None = None, **options) -> list[str]:
    steps: list[str] = []
    build_vlm_zoo(zoo, progress=lambda stage, step, total: steps.append(stage),
                  notice=(notices.append if notices is not None else None), **options)
    return sorted(set(steps))


def test_a_render_is_deterministic_from_the_rng_and_renders_of_one_scene_differ() -> None:
    first = render((0, 1, 2), random.Random(7))
    assert first.size == (32, 32) and first.mode == "RGB"
    assert first.tobytes() == render((0, 1, 2), random.Random(7)).tobytes()
    rng = random.Random(7)
    again = [render((0, 1, 2), rng).tobytes() for _ in range(20)]
    assert len(set(again)) == 20


def _ink(image: Image.Image, colour: int) -> np.ndarray:
    """A mask of the pixels nearer the scene's ink than grey: where the shape is."""
    pixels = np.asarray(image, dtype=np.float32)
    grey = pixels.mean(axis=2, keepdims=True)
    return np.abs(pixels - np.array(INKS[colour])).sum(axis=2) < np.abs(pixels - grey).sum(axis=2) + 60


def test_a_render_shows_its_colour_in_its_place() -> None:
    rng = random.Random(0)
    for colour, shape, place in SCENES:
        mask = _ink(render((colour, shape, place), rng), colour)
        ys, xs = np.nonzero(mask)
        assert 30 <= len(xs) <= 32 * 32 // 3, (colour, shape, place)
        x, y = xs.mean() / 32, ys.mean() / 32
        assert {0: x < 0.45, 1: x > 0.55, 2: y < 0.45, 3: y > 0.55}[place], (colour, shape, place, x, y)


def test_held_out_and_training_pictures_are_all_different_and_cover_every_scene() -> None:
    splits = held_out(64, side=16)
    pool = training_renders(128, 0, 16, splits["dev"] + splits["test"])
    keys = [r.key for r in splits["dev"] + splits["test"] + pool]
    assert len(set(keys)) == len(keys)
    assert {r.scene for r in splits["dev"]} == {r.scene for r in splits["test"]} == set(SCENES)
    assert [r.key for r in held_out(64, side=16)["dev"]] == [r.key for r in splits["dev"]]  # not the zoo's seed


def test_caption_tasks_pair_the_same_pictures_with_english_and_xx_captions(vlm_zoo: VlmZoo) -> None:
    en, xx = vlm_zoo.tasks["en-caption"], vlm_zoo.tasks["xx-caption"]
    assert vlm_zoo.roles == {"en-caption": "skill", "xx-caption": "target"} and vlm_zoo.target == xx
    splits = held_out(SMOKE.held_out, SMOKE.vision.side)
    for split, shown in splits.items():
        en_rows, xx_rows = _read_jsonl(en / f"{split}.jsonl"), _read_jsonl(xx / f"{split}.jsonl")
        assert len(en_rows) == len(xx_rows) == SMOKE.held_out
        for r, e, x in zip(shown, en_rows, xx_rows):
            assert e["image"] == x["image"] == f"images/{split}-{shown.index(r):03d}.png"
            assert (en / e["image"]).read_bytes() == (xx / x["image"]).read_bytes()
            assert Image.open(en / e["image"]).tobytes() == r.image.tobytes()
            assert (e["prompt"], x["prompt"]) == (f"<image> {EN_LOOK}", f"<image> {XX_LOOK}")
            assert (e["answer"], x["answer"]) == (scene(r.scene, "en"), scene(r.scene, "xx"))
    dev = {(en / r["image"]).read_bytes() for r in _read_jsonl(en / "dev.jsonl")}
    test = {(en / r["image"]).read_bytes() for r in _read_jsonl(en / "test.jsonl")}
    assert len(dev) == len(test) == SMOKE.held_out and not dev & test


def test_xx_captions_pass_the_targets_constraints_and_english_ones_fail_them(vlm_zoo: VlmZoo) -> None:
    task = load_task(vlm_zoo.target)
    vocabulary = set(task.spec.constraints[0].words)
    form = task.spec.constraints[1].pattern
    for row in task.splits["test"]:
        assert re.fullmatch(form, row.answer) and set(row.answer.split()) <= vocabulary
    english = scene((0, 0, 0), "en")
    assert not re.fullmatch(form, english) and not set(english.split()) <= vocabulary
    assert not re.fullmatch(form, "tomo kiru i hasu ta")  # the full stop is part of the form
    assert not re.fullmatch(form, "ra 5 lo ne .")  # an XX sentence, but not a caption


def test_the_language_model_starts_equal_to_the_base(zoo: Zoo) -> None:
    model, _ = from_base(zoo.base, SMOKE.vision, seed=0)
    base = load_file(zoo.base / "model.safetensors")
    state = model.state_dict()
    language = {k: v for k, v in state.items() if k.startswith("model.language_model.") or k.startswith("lm_head.")}
    assert len(language) == len(base)
    for name, tensor in base.items():
        mapped = name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name
        assert torch.equal(language[mapped], tensor), name
    assert any(k.startswith("model.vision_tower.") for k in state) and any("multi_modal_projector" in k for k in state)


def test_training_labels_are_the_caption_and_eos_after_the_prompt_the_processor_makes(zoo: Zoo) -> None:
    _, processor = from_base(zoo.base, SMOKE.vision, seed=0)
    pictures = [r.image for r in held_out(2, SMOKE.vision.side)["dev"]]
    captions = ["a red circle on the left .", "a blue star on the top ."]
    data = examples(processor, pictures, [PROMPTS["en"]] * 2, captions)
    tokenizer = processor.tokenizer
    for i, caption in enumerate(captions):
        prompt = processor(text=[PROMPTS["en"]], images=[pictures[i]], return_tensors="pt")
        width = prompt["input_ids"].shape[1]
        assert torch.equal(data.input_ids[i, :width], prompt["input_ids"][0])
        assert torch.equal(data.pixel_values[i], prompt["pixel_values"][0])
        assert (data.labels[i, :width] == -100).all()
        assert tokenizer.decode(data.labels[i, width:]) == f"{caption} <eos>"
    n_image = (SMOKE.vision.side // SMOKE.vision.patch) ** 2
    assert (data.input_ids[0] == processor.image_token_id).sum() == n_image


def test_the_vlm_folder_loads_with_auto_classes_and_captions_through_evaluate(vlm_zoo: VlmZoo) -> None:
    model = AutoModelForImageTextToText.from_pretrained(vlm_zoo.vlm)
    processor = AutoProcessor.from_pretrained(vlm_zoo.vlm)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert processor.image_token == "<image>" and processor.image_token_id == model.config.image_token_index
    for name, folder in vlm_zoo.tasks.items():
        result = evaluate(vlm_zoo.vlm, load_task(folder), "dev", return_outputs=True)
        assert result.n == SMOKE.held_out and len(result.outputs) == SMOKE.held_out
        live = evaluate(model.eval(), load_task(folder), "dev", processor=processor, return_outputs=True)
        assert live.outputs == result.outputs, name


def test_training_changes_every_part_of_the_vlm(vlm_zoo: VlmZoo) -> None:
    trained = load_file(vlm_zoo.vlm / "model.safetensors")
    fresh, _ = from_base(vlm_zoo.base, SMOKE.vision, seed=0)
    start = fresh.state_dict()
    for part in ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head."):
        names = [k for k in trained if k.startswith(part) and "norm" not in k and "embed" not in k]
        assert names and any(not torch.equal(trained[k], start[k]) for k in names), part


@pytest.mark.parametrize("lm_lr_ratio", [0.0, 0.5])
def test_alignment_stage_leaves_the_language_model_bit_equal_and_the_second_trains_both(
    zoo: Zoo, lm_lr_ratio: float
) -> None:
    from shoal.zoo.train import Schedule
    from shoal.zoo.vlm import train_vlm

    model, processor = from_base(zoo.base, SMOKE.vision, seed=0)
    pictures = [r.image for r in held_out(4, SMOKE.vision.side)["dev"]]
    data = examples(processor, pictures, [PROMPTS["en"]] * 4, ["a red circle on the left ."] * 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_vlm(model, data, Schedule(steps=3, batch_size=2, lr=1e-2, warmup=1), 0, lm_lr_ratio)
    assert len(losses) == 3 and all(p.requires_grad for p in model.parameters())  # unfrozen afterwards
    language = lambda k: k.startswith("model.language_model.") or k.startswith("lm_head.")  # noqa: E731
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.vision_tower.") for k in changed)
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    assert any(language(k) for k in changed) == (lm_lr_ratio > 0)


def test_second_call_reuses_the_vlm_without_training(vlm_zoo: VlmZoo, zoo: Zoo) -> None:
    stamp = (vlm_zoo.vlm / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert _stages(zoo) == []
    assert time.perf_counter() - start < 1.0
    assert build_vlm_zoo(zoo) == vlm_zoo == load_vlm_zoo(zoo)
    assert (vlm_zoo.vlm / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_same_seed_gives_identical_vlm_tensors(vlm_zoo: VlmZoo, zoo: Zoo, tmp_path: Path) -> None:
    other = build_zoo(tmp_path / "z", seed=0, size="smoke", threads=1)
    again = build_vlm_zoo(other)
    ours, theirs = load_file(vlm_zoo.vlm / "model.safetensors"), load_file(again.vlm / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((zoo.root / "vlm.json").read_text())["files"] == json.loads((other.root / "vlm.json").read_text())["files"]


def test_another_seed_rebuilds_the_vlm(tmp_path: Path) -> None:
    built = build_zoo(tmp_path / "z", seed=0, size="smoke", threads=1)
    first = build_vlm_zoo(built)
    assert _stages(built, seed=1) == ["vlm", "vlm-align"]
    assert json.loads((built.root / "vlm.json").read_text())["seed"] == 1
    assert _stages(built) == ["vlm", "vlm-align"] and build_vlm_zoo(built) == first


@pytest.mark.parametrize("damage", ["truncate-weights", "edit-caption", "delete-image", "vlm-json"])
def test_a_damaged_vlm_part_is_found_and_rebuilt(tmp_path: Path, damage: str) -> None:
    built = build_zoo(tmp_path / "z", seed=0, size="smoke", threads=1)
    vlm = build_vlm_zoo(built)
    weights = vlm.vlm / "model.safetensors"
    original = weights.read_bytes()
    if damage == "truncate-weights":
        weights.write_bytes(original[: len(original) // 2])
        expected = "models/vlm/model.safetensors has"
    elif damage == "edit-caption":
        dev = vlm.target / "dev.jsonl"
        dev.write_text(dev.read_text().replace("ta .", "tu .", 1))
        expected = "tasks/xx-caption/dev.jsonl has changed"
    elif damage == "delete-image":
        (vlm.tasks["en-caption"] / "images" / "test-003.png").unlink()
        expected = "tasks/en-caption/images/test-003.png is missing"
    else:
        (built.root / "vlm.json").write_text("{not json")
        expected = "vlm.json is damaged"
    with pytest.raises(ShoalError, match=re.escape(expected)):
        load_vlm_zoo(built)
    notices: list[str] = []
    assert _stages(built, notices) == ["vlm", "vlm-align"]
    assert len(notices) == 1 and expected in notices[0] and "rebuilding" in notices[0]
    assert weights.read_bytes() == original
    assert load_vlm_zoo(built) == vlm


def test_a_missing_vlm_part_is_an_error_to_load(zoo: Zoo, tmp_path: Path) -> None:
    other = build_zoo(tmp_path / "z", seed=0, size="smoke", threads=1)
    with pytest.raises(ShoalError, match=r"vlm.json not found.*shoal zoo build --vlm"):
        load_vlm_zoo(other)


def test_unknown_size_and_zero_threads_are_refused(zoo: Zoo) -> None:
    with pytest.raises(ShoalError, match="unknown VLM zoo size 'huge'"):
        build_vlm_zoo(zoo, size="huge")
    with pytest.raises(ShoalError, match="threads must be at least 1"):
        build_vlm_zoo(zoo, threads=0)


def test_cli_build_vlm_builds_then_reuses_the_vlm_part(tmp_path: Path, run_cli) -> None:
    code, out, err = run_cli("zoo", "build", "--out", tmp_path, "--size", "smoke", "--vlm")
    assert code == 0, err
    assert "xx-caption" in out and "en-caption" in out and "built in" in err
    assert load_vlm_zoo(tmp_path).vlm == tmp_path / "models" / "vlm"
    code, out, err = run_cli("zoo", "build", "--out", tmp_path, "--size", "smoke", "--vlm")
    assert code == 0 and "reused" in err
    code, out, err = run_cli("zoo", "build", "--out", tmp_path, "--size", "smoke")
    assert code == 0 and "xx-caption" not in out


def _f1_target(vlm_zoo: VlmZoo, folder: Path) -> Path:
    """en-caption scored by token F1 instead of exact match, so that smoke models' scores (their captions are
    English-like word salad) differ from trial to trial."""
    shutil.copytree(vlm_zoo.tasks["en-caption"], folder)
    spec = (folder / "task.yaml").read_text().replace('metric: "exact_match"', 'metric: "token_f1"')
    (folder / "task.yaml").write_text(spec.replace('name: "en-caption"', 'name: "en-caption-f1"'))
    return folder


def _vlm_search(vlm_zoo: VlmZoo, folder: Path, budget: int) -> Path:
    spec = {"base": str(vlm_zoo.base), "parents": {"vlm": str(vlm_zoo.vlm), "language": str(vlm_zoo.language)},
            "method": "dare_ties", "genome": {"layers_per_group": 1, "embeddings": "search"},
            "tasks": [{"path": str(_f1_target(vlm_zoo, folder / "task"))}], "budget": budget, "seed": 3}
    (folder / "search.yaml").write_text(yaml.safe_dump(spec))
    return folder / "search.yaml"


def _stored(run_dir: Path) -> list[tuple]:
    study = optuna.load_study(study_name="shoal", storage=open_storage(str(run_dir / "study.log")))
    return [(t.params, t.value, t.state.name) for t in sorted(study.trials, key=lambda t: t.number)]


def test_a_killed_search_on_the_vlm_zoo_resumes_into_the_trials_of_a_whole_run(vlm_zoo: VlmZoo, tmp_path: Path) -> None:
    """An image-task search with the VLM parent, killed (SIGKILL) in its second generation or later, resumed from
    the command line, stores exactly the trials of a run that was never stopped. The killed session's budget is
    out of its reach, so the kill lands inside the search however late it comes on a loaded machine; the budget
    is no part of the search's identity, and the resumed and the whole run are given one a generation beyond
    what the killed session stored."""
    population = 10  # 2 parents x (weight, density) x (2 layers + embeddings) = 12 genes: 4 + floor(3 ln 12)
    path = _vlm_search(vlm_zoo, tmp_path, budget=10_000)
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "shoal", "evolve", str(path), str(killed), "--threads", "1"]
    kill_once_stored(command, killed, population + 3)
    before = _stored(killed)
    assert len(before) >= population + 3  # killed in its second generation or later
    budget = len(before) + population
    resumed = subprocess.run([*command, "--budget", str(budget)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole_search = tmp_path / "whole.yaml"
    whole_search.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "budget": budget}))
    evolve(load_search(whole_search), tmp_path / "whole")
    after, whole = _stored(killed), _stored(tmp_path / "whole")
    assert after[: len(before)] == before and after == whole and len(whole) == budget
    assert len({value for _, value, _ in whole}) > 1  # the fitness is not flat: the trials are really scored
    assert json.loads((killed / "best" / "config.json").read_text())["model_type"] == "llava"


def test_text_parents_of_a_vlm_search_are_scored_inside_the_vlms_vision_shell(vlm_zoo: VlmZoo, tmp_path: Path) -> None:
    """The base and the language parent cannot see: each is scored as its language model in the VLM's tower and
    projector, the same number evaluate gives for that model put together by hand."""
    summary = evolve(load_search(_vlm_search(vlm_zoo, tmp_path, budget=2)), tmp_path / "run")
    assert set(summary.parents) == {"base", "vlm", "language"}
    task = load_task(tmp_path / "task")
    processor = AutoProcessor.from_pretrained(vlm_zoo.vlm)
    for name, path in (("base", vlm_zoo.base), ("language", vlm_zoo.language)):
        shell = LlavaForConditionalGeneration.from_pretrained(vlm_zoo.vlm).eval()
        state = shell.state_dict()
        for key, tensor in load_file(path / "model.safetensors").items():
            state[key.replace("model.", "model.language_model.", 1) if key.startswith("model.") else key] = tensor
        shell.load_state_dict(state)
        by_hand = evaluate(shell, task, split="test", processor=processor).score
        assert summary.parents[name] == pytest.approx(by_hand, abs=1e-9)
    assert summary.parents["vlm"] == pytest.approx(evaluate(vlm_zoo.vlm, task, split="test").score, abs=1e-9)


def test_demo_vlm_evolves_the_vlm_with_the_language_parent_and_prints_the_table(vlm_zoo: VlmZoo, tmp_path: Path,
                                                                               run_cli) -> None:
    code, out, err = run_cli("demo", "--vlm", "--out", tmp_path / "demo", "--budget", 3, "--zoo", vlm_zoo.root,
                             "--zoo-size", "smoke")
    assert code == 0, err
    summary = json.loads((tmp_path / "demo" / "run" / "summary.json").read_text())
    assert summary["trials"] == 3 and summary["target"] == "xx-caption"
    assert set(summary["parents"]) == {"base", "vlm", "language"}
    assert "parent: language" in out and "untuned merge: dare_ties" in out and "vision tower" in err
    code, out, err = run_cli("demo", "--vlm", "--space", "dfs", "--out", tmp_path / "d2", "--zoo", vlm_zoo.root,
                             "--zoo-size", "smoke")
    assert code == 2 and "--space ps" in err
