"""Shared fixtures: tiny random parents on disk, the smoke-size demo zoo and an in-process `shoal` runner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shoal.synthetic import make_parents


@pytest.fixture(scope="session")
def parents(tmp_path_factory) -> dict[str, Path]:
    """A random fp32 base and three parents = base + noise, 4 layers, hidden 64."""
    return make_parents(tmp_path_factory.mktemp("parents"), seed=0)


@pytest.fixture(scope="session")
def bf16_parents(tmp_path_factory) -> dict[str, Path]:
    import torch

    return make_parents(tmp_path_factory.mktemp("parents_bf16"), dtype=torch.bfloat16, seed=1)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """The demo zoo at its smoke size (seconds to build), built once: tests read it and never change it."""
    from shoal.zoo.build import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"), seed=0, size="smoke", threads=1)


def own_output_task(zoo, folder: Path, every: int = 1) -> Path:
    """The zoo's xx-easy task with the language parent's own greedy outputs as the answers of every `every`-th
    item ("nope" elsewhere), so that scores are neither a vacuous 0 nor all alike across candidates."""
    import json

    from shoal.evaluate import evaluate, load_task

    spec = {"name": "own", "metric": "exact_match", "max_new_tokens": 12, "stop": ["\n"],
            "normalize": {"lowercase": False, "collapse_whitespace": False, "strip": True},
            "splits": {"dev": "dev.jsonl", "test": "test.jsonl"}}
    (folder / "task.yaml").write_text(yaml.safe_dump(spec))
    for split in ("dev", "test"):
        (folder / f"{split}.jsonl").write_text((zoo.tasks["xx-easy"] / f"{split}.jsonl").read_text())
    for split in ("dev", "test"):
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
        own = evaluate(zoo.parents["language"], load_task(folder), split, return_outputs=True).outputs
        rows = [r | {"answer": o.strip() if i % every == 0 else "nope"} for i, (r, o) in enumerate(zip(rows, own))]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


SLOW_MERGE = """
import sys, time
import shoal.merge.engine as engine
real = engine.merge_tensor
def slow(*args, **kwargs):
    time.sleep(0.1)
    return real(*args, **kwargs)
engine.merge_tensor = slow
from shoal.cli import main
sys.argv = ["shoal", *sys.argv[1:]]
main()
"""
"""`python -c SLOW_MERGE merge ...`: `shoal merge` taking 0.1 s a tensor, long enough to act while it writes."""


def wait_for(condition, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def kill_once_stored(command: list[str], run_dir: Path, trials: int) -> None:
    """Start `command` (a `shoal evolve` into run_dir) and SIGKILL it once run_dir holds `trials` stored trials;
    fails if it stops by itself first."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: proc.poll() is not None or finished_trials(run_dir / "study.log") >= trials, 600)
        assert proc.poll() is None, "the search stopped before it was killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def finished_trials(log: Path, name: str = "shoal") -> int:
    """Trials stored in a run's journal so far (by another process, say); a hybrid stage's study is shoal-STAGE."""
    import optuna

    from shoal.search.storage import open_storage

    if not log.exists():
        return 0
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(str(log)))
    except KeyError:  # the study is not made yet
        return 0
    return sum(t.state.is_finished() for t in study.trials)


def base_and_language_task(zoo, folder: Path) -> Path:
    """own_output_task answered as the base answers on a quarter of the items, as the language parent does on half
    and by neither on the rest, so that models near the base, near the language parent and elsewhere score
    differently (0.25, 0.5, other) even where the smoke zoo's models answer every item alike."""
    import json

    from shoal.evaluate import evaluate, load_task

    own_output_task(zoo, folder)
    scored = load_task(folder)
    for split in ("dev", "test"):
        base = evaluate(zoo.base, scored, split, return_outputs=True).outputs
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
        rows = [r | {"answer": b.strip()} if i % 4 == 0 else r | {"answer": "nope"} if i % 4 == 3 else r
                for i, (r, b) in enumerate(zip(rows, base))]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def offline_hub(monkeypatch, root: Path, repos: dict[str, dict[str, Path]]) -> dict[str, dict[str, Path]]:
    """hub_mirror(root, repos) as huggingface_hub's own cache, offline. Returns each snapshot's folder, by Hub id
    and ref."""
    from huggingface_hub import constants

    snapshots = hub_mirror(root, repos)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshots


def hub_mirror(root: Path, repos: dict[str, dict[str, Path]]) -> dict[str, dict[str, Path]]:
    """A Hugging Face cache folder at root: per Hub id, per ref (a branch or tag) a snapshot copied from a folder, at
    commits 000..., 111..., ... in order. Returns each snapshot's folder, by Hub id and ref."""
    import shutil

    snapshots: dict[str, dict[str, Path]] = {}
    for repo_id, refs in repos.items():
        repo = root / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        for i, (ref, folder) in enumerate(refs.items()):
            commit = str(i) * 40
            shutil.copytree(folder, repo / "snapshots" / commit)
            (repo / "refs" / ref).write_text(commit)
            snapshots.setdefault(repo_id, {})[ref] = repo / "snapshots" / commit
    return snapshots


def write_recipe(folder: Path, recipe: dict | str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run `shoal ARGS` in this process; return (exit code, stdout, stderr)."""
    from shoal.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["shoal", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def one_torch_thread():
    """Scores must not depend on thread scheduling where runs are compared exactly (resumed vs whole, parallel vs
    serial); one thread also keeps tiny models fast on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def one_error_line(code: int, err: str, *needles: str) -> str:
    """A refusal: exit code 2, no traceback, and the last line of stderr is `error: ...` holding every needle (a
    progress bar may come before it); return that line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err
    for needle in needles:
        assert needle in line, err
    return line


def write_two_split_task(folder: Path) -> Path:
    """A valid task with a dev and a test split (different prompts): what a search file needs to get past its tasks."""
    import json

    folder.mkdir(parents=True)
    (folder / "task.yaml").write_text(yaml.safe_dump({"name": "t", "metric": "exact_match",
                                                      "splits": {"dev": "dev.jsonl", "test": "test.jsonl"}}))
    (folder / "dev.jsonl").write_text(json.dumps({"prompt": "a b", "answer": "c"}) + "\n")
    (folder / "test.jsonl").write_text(json.dumps({"prompt": "d e", "answer": "f"}) + "\n")
    return folder


def read_tensors(folder: Path) -> dict:
    """Every tensor of a model folder's safetensors files (one or many shards), by name."""
    from safetensors import safe_open

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def zoo_search(zoo, folder: Path, name: str = "search.yaml", **extra: object) -> Path:
    """A search file over the zoo's math and language parents for its target (DARE-TIES, a gene per parent for all
    layers, seed 5), with `extra` keys replacing or adding to it; written to folder/name."""
    import yaml

    spec = {"base": str(zoo.base), "parents": {n: str(p) for n, p in zoo.parents.items()}, "method": "dare_ties",
            "genome": {"layers_per_group": 0}, "tasks": [{"path": str(zoo.tasks["xx-math"])}], "seed": 5} | extra
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder / name
