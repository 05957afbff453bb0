"""The demo zoo: layout, loadability, determinism, caching and its integrity checks, held-out tasks, the joint
fine-tune baseline, and merging its parents."""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import write_recipe
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from shoal.errors import ShoalError
from shoal.zoo import Zoo, build_zoo, load_zoo
from shoal.zoo.build import (
    BASE_MIX,
    BUILDING,
    HARD_FRACTION,
    PARENTS,
    SIZES,
    default_zoo_dir,
    joint_mix,
    joint_schedule,
)
from shoal.zoo.language import mixture, split_operands
from shoal.zoo.pool import SCHEDULES as POOL_SCHEDULES
from shoal.zoo.train import llama_config
from shoal.zoo.vlmzoo import VLM_SIZES


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    return build_zoo(tmp_path_factory.mktemp("zoo"), seed=0, size="smoke", threads=1)


def _models(zoo: Zoo) -> dict[str, Path]:
    return {"base": zoo.base, **zoo.parents, "joint": zoo.joint}


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _pairs(prompts: list[str]) -> set[tuple[int, int]]:
    return {tuple(int(n) for n in re.findall(r"\d+", p)[:2]) for p in prompts}


def test_layout_and_zoo_json_name_base_parents_and_tasks(zoo: Zoo) -> None:
    data = json.loads((zoo.root / "zoo.json").read_text())
    assert data["seed"] == 0 and data["size"] == "smoke" and data["base"] == "base"
    assert {name: p["skill"] for name, p in data["parents"].items()} == {"math": "en-math", "language": "xx-easy"}
    # the base is checked from step 20, every 10, up to its 40; the math parent from step 10, every 5 steps, up to
    # its 30; the language parent runs its 15
    assert data["base_steps"] in (20, 30, 40)
    assert data["parents"]["math"]["steps"] in (10, 15, 20, 25, 30) and data["parents"]["language"]["steps"] == 15
    assert {name: t["role"] for name, t in data["tasks"].items()} == {
        "en-math": "skill", "xx-easy": "skill", "xx-math": "target", "union": "union"
    }
    for name in ["base", *data["parents"]]:
        assert (zoo.root / "models" / name / "model.safetensors").is_file()
    for name in data["tasks"]:
        assert {p.name for p in (zoo.root / "tasks" / name).iterdir()} == {"task.yaml", "dev.jsonl", "test.jsonl"}
    assert zoo.target == zoo.root / "tasks" / "xx-math"
    assert load_zoo(zoo.root) == zoo


def test_models_and_tokenizer_load_with_transformers(zoo: Zoo) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    for path in _models(zoo).values():
        model = AutoModelForCausalLM.from_pretrained(path)
        assert isinstance(model, LlamaForCausalLM) and not model.config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    ids = tokenizer("ka 34 to 129 pela ? ra 163 lo ne .")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ka 34 to 129 pela ? ra 163 lo ne ."


def test_same_seed_gives_identical_tensors(zoo: Zoo, tmp_path: Path) -> None:
    again = build_zoo(tmp_path / "again", seed=0, size="smoke", threads=1)
    for name, path in _models(zoo).items():
        first, second = load_file(path / "model.safetensors"), load_file(_models(again)[name] / "model.safetensors")
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), name
    for name, path in zoo.tasks.items():
        assert (path / "test.jsonl").read_text() == (again.tasks[name] / "test.jsonl").read_text()
    math, base = load_file(zoo.parents["math"] / "model.safetensors"), load_file(zoo.base / "model.safetensors")
    assert not all(torch.equal(math[k], base[k]) for k in base)


def test_second_call_reuses_the_zoo_without_training(zoo: Zoo) -> None:
    stamp = (zoo.base / "model.safetensors").stat().st_mtime_ns
    steps: list[str] = []
    start = time.perf_counter()
    again = build_zoo(zoo.root, seed=0, size="smoke", progress=lambda stage, step, total: steps.append(stage))
    assert time.perf_counter() - start < 1.0
    assert again == zoo and steps == []
    assert (zoo.base / "model.safetensors").stat().st_mtime_ns == stamp


def _stages(zoo_dir: Path, notices: list[str]) -> list[str]:
    steps: list[str] = []
    build_zoo(zoo_dir, seed=0, size="smoke", progress=lambda stage, step, total: steps.append(stage), notice=notices.append)
    return sorted(set(steps))


def test_changed_settings_rebuild_the_zoo(tmp_path: Path) -> None:
    first = build_zoo(tmp_path / "z", seed=0, size="smoke", threads=1)
    data = json.loads((first.root / "zoo.json").read_text())
    (first.root / "zoo.json").write_text(json.dumps(data | {"settings_hash": "stale"}))
    notices: list[str] = []
    assert _stages(first.root, notices) == ["base", "joint", "language", "math"]
    assert notices == [f"the zoo at {first.root} cannot be reused (it was built by another version of shoal's zoo "
                       "recipe); rebuilding it"]
    assert json.loads((first.root / "zoo.json").read_text())["settings_hash"] == data["settings_hash"]
    assert not (first.root / BUILDING).exists()


def test_a_folder_of_the_users_own_is_refused_and_left_as_it_was(tmp_path: Path, run_cli) -> None:
    mine = tmp_path / "project" / "models" / "my-finetune" / "model.safetensors"
    mine.parent.mkdir(parents=True)
    mine.write_text("precious")
    (tmp_path / "project" / "tasks").mkdir()
    code, _, err = run_cli("zoo", "build", "--out", tmp_path / "project", "--size", "smoke")
    assert code == 2 and err.count("\n") == 1
    assert f"error: {tmp_path / 'project'} is neither empty nor a shoal zoo (it holds models, tasks)" in err
    assert mine.read_text() == "precious" and sorted(p.name for p in (tmp_path / "project").iterdir()) == [
        "models", "tasks"]


def test_the_zoo_of_another_seed_or_size_is_refused_not_replaced(zoo: Zoo) -> None:
    stamp = (zoo.base / "model.safetensors").stat().st_mtime_ns
    for seed, size in ((1, "smoke"), (0, "default")):
        with pytest.raises(ShoalError, match=f"holds the zoo of seed 0, size smoke; building seed {seed}, size {size} "
                                             "there would replace it"):
            build_zoo(zoo.root, seed=seed, size=size)
    assert (zoo.base / "model.safetensors").stat().st_mtime_ns == stamp
    assert load_zoo(zoo.root) == zoo


def test_a_build_that_was_stopped_is_cleared_and_built_again(tmp_path: Path) -> None:
    stopped = tmp_path / "z"
    (stopped / "models" / "base").mkdir(parents=True)
    (stopped / "models" / "base" / "model.safetensors").write_text("half")
    (stopped / BUILDING).touch()
    notices: list[str] = []
    assert _stages(stopped, notices) == ["base", "joint", "language", "math"]
    assert notices == [] and not (stopped / BUILDING).exists()
    assert load_zoo(stopped).base == stopped / "models" / "base"


def test_joint_fine_tune_trains_on_both_parents_data_for_their_steps_together(zoo: Zoo) -> None:
    mix = joint_mix()
    assert mix.keys() == {kind for p in PARENTS.values() for kind in p.mix}
    assert sum(mix.values()) == pytest.approx(1.0)
    steps = {name: p["steps"] for name, p in json.loads((zoo.root / "zoo.json").read_text())["parents"].items()}
    assert joint_schedule(SIZES["smoke"], steps).steps == sum(steps.values()) and steps["language"] == 15
    joint, base = load_file(zoo.joint / "model.safetensors"), load_file(zoo.base / "model.safetensors")
    assert not any(torch.equal(joint[k], base[k]) for k in base if "norm" not in k)


def test_a_truncated_model_file_is_found_and_the_zoo_rebuilt(tmp_path: Path) -> None:
    built = build_zoo(tmp_path / "z", seed=0, size="smoke")
    weights = built.parents["math"] / "model.safetensors"
    original = {k: v.clone() for k, v in load_file(weights).items()}  # load_file maps the file we truncate next
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    with pytest.raises(ShoalError, match=f"models/math/model.safetensors has {size // 2} bytes where {size} were written"):
        load_zoo(built.root)
    notices: list[str] = []
    assert _stages(built.root, notices) == ["base", "joint", "language", "math"]
    assert len(notices) == 1 and "models/math/model.safetensors" in notices[0] and "rebuilding" in notices[0]
    rebuilt = load_file(weights)
    assert all(torch.equal(rebuilt[k], original[k]) for k in original)
    assert load_zoo(built.root) == built


def test_a_changed_task_file_of_the_same_size_is_found(tmp_path: Path) -> None:
    built = build_zoo(tmp_path / "z", seed=0, size="smoke")
    dev = built.target / "dev.jsonl"
    text = dev.read_text()
    dev.write_text(text.replace("ra", "ro", 1))
    with pytest.raises(ShoalError, match="tasks/xx-math/dev.jsonl has changed since it was written"):
        load_zoo(built.root)
    notices: list[str] = []
    assert _stages(built.root, notices) == ["base", "joint", "language", "math"]
    assert dev.read_text() == text


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", '{"seed": 0}', "\udcff"])
def test_a_damaged_zoo_json_is_an_error_to_load_and_rebuilt_by_build(tmp_path: Path, content: str) -> None:
    (tmp_path / "zoo.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(ShoalError, match="zoo.json is damaged"):
        load_zoo(tmp_path)
    notices: list[str] = []
    assert _stages(tmp_path, notices) == ["base", "joint", "language", "math"]
    assert "zoo.json is damaged" in notices[0]
    load_zoo(tmp_path)


def test_zero_threads_is_refused(tmp_path: Path, run_cli) -> None:
    with pytest.raises(ShoalError, match="threads must be at least 1"):
        build_zoo(tmp_path, size="smoke", threads=0)
    code, _, err = run_cli("zoo", "build", "--out", tmp_path, "--size", "smoke", "--threads", "0")
    assert code == 2 and "--threads" in err and not (tmp_path / "zoo.json").exists()


def test_missing_zoo_json_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ShoalError, match="shoal zoo build"):
        load_zoo(tmp_path)


def test_dev_and_test_splits_are_disjoint(zoo: Zoo) -> None:
    for name, path in zoo.tasks.items():
        dev, test = _read_jsonl(path / "dev.jsonl"), _read_jsonl(path / "test.jsonl")
        assert dev and test and all(set(row) == {"prompt", "answer"} for row in dev + test)
        assert not {r["prompt"] for r in dev} & {r["prompt"] for r in test}, name
    target = _pairs([r["prompt"] for r in _read_jsonl(zoo.target / "dev.jsonl")])
    assert len(target) == SIZES["smoke"].held_out // 2
    assert not target & _pairs([r["prompt"] for r in _read_jsonl(zoo.target / "test.jsonl")])


def test_target_pairs_never_appear_in_training_data(zoo: Zoo) -> None:
    held_out = set()
    for split in ("dev", "test"):
        held_out |= _pairs([r["prompt"] for r in _read_jsonl(zoo.target / f"{split}.jsonl")])
    operands = split_operands(SIZES["smoke"].held_out)
    assert not held_out & set(operands.hard)
    rng = random.Random(0)
    for mix in [BASE_MIX, *(p.mix for p in PARENTS.values()), joint_mix()]:
        sample = mixture(mix, operands, HARD_FRACTION)
        for _ in range(3000):
            numbers = [int(n) for n in re.findall(r"\d+", sample(rng))]
            assert tuple(numbers[:2]) not in held_out


def test_target_answers_are_xx_and_english_answers_fail_its_form(zoo: Zoo) -> None:
    import yaml

    spec = yaml.safe_load((zoo.target / "task.yaml").read_text())
    form = next(c for c in spec["constraints"] if c["type"] == "regex")["pattern"]
    vocabulary = set(next(c for c in spec["constraints"] if c["type"] == "vocabulary")["words"])
    for row in _read_jsonl(zoo.target / "test.jsonl"):
        assert re.fullmatch(form, row["answer"]) and set(row["answer"].split()) <= vocabulary
    english = _read_jsonl(zoo.tasks["en-math"] / "test.jsonl")[0]["answer"]
    assert not re.fullmatch(form, english) and not set(english.split()) <= vocabulary


def test_shoal_merge_accepts_the_parents(zoo: Zoo, tmp_path: Path, run_cli) -> None:
    from transformers import AutoModelForCausalLM

    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo.base),
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in zoo.parents.values()],
    }
    code, _, err = run_cli("merge", write_recipe(tmp_path, recipe), tmp_path / "merged")
    assert code == 0, err
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), torch.nn.Module)


def test_cli_build_reports_reuse(zoo: Zoo, run_cli) -> None:
    code, out, err = run_cli("zoo", "build", "--out", zoo.root, "--size", "smoke")
    assert code == 0, err
    assert "reused" in err and "xx-math" in out


def test_unknown_size_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ShoalError, match="unknown zoo size"):
        build_zoo(tmp_path, size="huge")


def test_the_deep_size_has_twice_the_layers_narrower_at_about_the_defaults_parameters_and_schedules() -> None:
    def layer_parameters(size: str) -> int:
        config = llama_config(SIZES[size].shape, vocab_size=600, pad_id=0, bos_id=1, eos_id=2)
        return sum(p.numel() for p in LlamaForCausalLM(config).model.layers.parameters())

    deep, default = SIZES["deep"], SIZES["default"]
    assert deep.shape.layers == 2 * default.shape.layers and deep.shape.hidden < default.shape.hidden
    assert 1.0 <= layer_parameters("deep") / layer_parameters("default") <= 1.15  # 1,992,960 vs 1,771,008
    assert (deep.base, deep.parents, deep.stops, deep.held_out) == (
        default.base, default.parents, default.stops, default.held_out)


def test_every_zoo_size_has_its_vlm_part_and_pool_so_no_build_fails_after_training_the_text_zoo() -> None:
    assert set(SIZES) == set(VLM_SIZES) == set(POOL_SCHEDULES)


def test_zoos_of_each_seed_and_size_get_their_own_default_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folders = [default_zoo_dir(seed, size) for seed in (0, 3) for size in ("default", "deep")]
    assert [f.name for f in folders] == ["zoo", "zoo-deep", "zoo-seed3", "zoo-deep-seed3"]
    assert {f.parent for f in folders} == {tmp_path / "shoal"}


def test_a_stage_stops_at_the_first_check_that_meets_every_need(tmp_path: Path) -> None:
    """stop_check asks only from `first` on, every `every` steps, and says stop once every need's share is met: by
    answers outside the XX form (english), by right XX answers (right), by right answers to the same pairs asked in
    English (en-right)."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from shoal.zoo.build import Stop, stop_check

    built = build_zoo(tmp_path / "z", seed=0, size="smoke")
    model = LlamaForCausalLM.from_pretrained(built.parents["math"]).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(built.base)
    operands = split_operands(SIZES["smoke"].held_out)

    def check(needs: dict, first: int, every: int, name: str):
        return stop_check(model, tokenizer, operands, Stop(needs, first=first, every=every), tmp_path / name)

    never_xx = check({"english": 1.0}, 10, 5, "a")
    assert [step for step in range(1, 31) if never_xx(step)] == [10, 15, 20, 25, 30]  # a smoke model never answers in XX
    assert not any(check({"english": 1.01}, 10, 5, "b")(step) for step in (10, 15, 20))
    # a smoke model answers no question right, in XX or English: a share of 0 is met at once, any positive share never
    assert check({"right": 0.0}, 3, 7, "c")(10)
    assert not check({"right": 0.3}, 3, 7, "d")(10)
    assert check({"english": 1.0, "en-right": 0.0}, 3, 7, "e")(10)
    assert not check({"english": 1.0, "en-right": 0.01}, 3, 7, "f")(10)  # every need, not any


def test_the_pool_adds_a_useful_parent_and_two_distractors_from_the_base_and_is_reused(zoo: Zoo, tmp_path: Path) -> None:
    from shoal.zoo.pool import POOL, build_pool, load_pool

    root = tmp_path / "z"
    shutil.copytree(zoo.root, root)
    built = load_zoo(root)
    pool = build_pool(built)
    assert list(pool.parents) == ["math", "language", *POOL]
    assert {name: pool.roles[name] for name in POOL} == {"equations": "useful", "prose": "distractor", "scenes": "distractor"}
    assert pool.skills["math"] == "en-math" and pool.skills["prose"] == "en-prose" and pool.target == built.target
    base = load_file(built.base / "model.safetensors")
    for name in POOL:  # each a fine-tune of the base: same tensors, changed values
        tuned = load_file(pool.parents[name] / "model.safetensors")
        assert tuned.keys() == base.keys() and not torch.equal(tuned["lm_head.weight"], base["lm_head.weight"])
    data = json.loads((root / "pool.json").read_text())
    assert {n: p["steps"] for n, p in data["parents"].items()} == {n: 10 for n in POOL}
    before = (root / "models" / "prose" / "model.safetensors").stat().st_mtime_ns
    assert build_pool(built) == pool and load_pool(root) == pool  # reused, not trained again
    assert (root / "models" / "prose" / "model.safetensors").stat().st_mtime_ns == before
    (root / "models" / "scenes" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(ShoalError, match=r"models/scenes/model.safetensors has 6 bytes"):
        load_pool(root)
    notices: list[str] = []
    assert build_pool(built, notice=notices.append) == pool and "rebuilding it" in notices[0]


def test_demo_pool_runs_a_tournament_over_the_pairs_and_prints_the_weight_each_parent_gets(zoo: Zoo, tmp_path: Path,
                                                                                          run_cli) -> None:
    root = tmp_path / "z"
    shutil.copytree(zoo.root, root)
    code, out, err = run_cli("demo", "--pool", "--out", tmp_path / "demo", "--budget", 20, "--zoo", root,
                             "--zoo-size", "smoke")
    assert code == 0, err
    summary = json.loads((tmp_path / "demo" / "run" / "summary.json").read_text())
    assert set(summary["parents"]) == {"base", "math", "language", "equations", "prose", "scenes"}
    # 10 pairs of 5 parents: each to 1 trial, the best three to 3, the best one to 7 (20 trials in all)
    assert [r["trials"] for r in summary["pool"]["rounds"]] == [1, 3, 7] and summary["trials"] == 20
    assert [len(r["dev"]) for r in summary["pool"]["rounds"]] == [10, 3, 1]
    winner = summary["pool"]["winner"]
    assert summary["genes"] == 2 * 2 * 3  # 2 parents x (weight, density) x (2 layers + embeddings)
    assert "weight per parent" in out and "distractor" in out
    from shoal.cli.demo import weight_mass
    from shoal.search.run_folder import read_summary

    mass = weight_mass(read_summary(tmp_path / "demo" / "run"))
    assert set(mass) == set(winner)
    for parent in mass:
        layers = summary["best"]["layers"]["weight"][parent] + [summary["best"]["embeddings"]["weight"][parent]]
        assert mass[parent] == pytest.approx(sum(layers) / len(layers))
    assert out.count("left out") == 3  # the three parents outside the winning pair
    report = (tmp_path / "demo" / "run" / "report" / "report.md").read_text()
    assert f"**{'+'.join(winner)}** won" in report


def test_demo_pool_hybrid_prints_the_weights_of_its_ps_stage(zoo: Zoo, tmp_path: Path, run_cli) -> None:
    root = tmp_path / "z"
    shutil.copytree(zoo.root, root)
    code, out, err = run_cli("demo", "--pool", "--space", "hybrid", "--out", tmp_path / "demo", "--budget", 20,
                             "--zoo", root, "--zoo-size", "smoke")
    assert code == 0, err
    summary = json.loads((tmp_path / "demo" / "run" / "summary.json").read_text())
    assert summary["space"] == "hybrid" and summary["trials"] == 20 + 20
    assert out.count("left out") == 3  # the winning pair's weights are shown (the DFS stage's best has none)
    from shoal.cli.demo import weight_mass
    from shoal.search.run_folder import read_summary

    mass = weight_mass(read_summary(tmp_path / "demo" / "run" / "ps"))
    assert set(mass) == set(summary["pool"]["winner"])
    assert all(f"{mass[p]:.2f}" in out for p in mass)
    code, _, err = run_cli("demo", "--pool", "--space", "dfs", "--out", tmp_path / "dfs", "--zoo", root,
                           "--zoo-size", "smoke")
    assert code == 2 and "--pool is a tournament of merges" in err
