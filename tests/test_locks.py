"""Two processes writing one output or run folder at once: the second is refused with one line (exit 2) and writes
nothing, the first finishes as if alone; a holder killed with kill -9 leaves no lock behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import SLOW_MERGE, finished_trials, one_error_line, wait_for, write_recipe, zoo_search

from shoal.errors import ShoalError
from shoal.folder_lock import folder_lock, lock_file
from shoal.search.run_folder import own_journal
from shoal.search.spec import load_search
from shoal.search.storage import open_storage

BUSY = "another shoal process"


def _linear(parents, weight: float) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(parents[n]), "parameters": {"weight": weight}}
                                                 for n in ("a", "b")]}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_second_merge_into_the_same_folder_is_refused_while_the_first_writes(run_cli, parents, tmp_path) -> None:
    first, second = (write_recipe(tmp_path, _linear(parents, w), f"r{w}.yaml") for w in (1.0, 2.0))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, "merge", str(first), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(p.name.startswith(".out.tmp-") and any(p.glob("*.safetensors")) for p in tmp_path.iterdir()))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert ".out.lock" in names
    for extra in ((), ("--overwrite",)):
        code, _, err = run_cli("merge", second, out, *extra)
        one_error_line(code, err, f"error: {out} is being written by {BUSY}")
        assert sorted(p.name for p in tmp_path.iterdir()) == names  # nothing written, nothing taken away
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert (out / "recipe.yaml").read_text() == first.read_text()  # the first's model, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r1.0.yaml", "r2.0.yaml"]  # no lock file left


def test_a_second_evolve_on_the_same_run_folder_is_refused_and_kill_9_frees_it(zoo, run_cli, tmp_path) -> None:
    search = zoo_search(zoo, tmp_path, budget=5000)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "shoal", "evolve", str(search), str(run), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: finished_trials(run / "study.log") >= 2)
        code, _, err = run_cli("evolve", search, run, "--threads", 1)
        one_error_line(code, err, f"error: {run} is being written by {BUSY}")
        assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock", "run", "search.yaml"]
        assert len(json.loads((run / "run.json").read_text())["sessions"]) == 1  # no session of the second
        assert proc.poll() is None  # the first goes on
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    stored = finished_trials(run / "study.log")
    code, _, err = run_cli("evolve", search, run, "--threads", 1, "--budget", stored + 2)
    assert code == 0, err  # the killed process's lock went with it
    study = optuna.load_study(study_name="shoal", storage=open_storage(str(run / "study.log")))
    indices = [t.user_attrs["index"] for t in study.trials]
    assert sorted(indices) == list(range(stored + 2))  # every index stored once
    assert not lock_file(run).exists()


def test_the_lock_refuses_a_second_holder_until_the_first_lets_go(tmp_path) -> None:
    folder = tmp_path / "out"
    refused = pytest.raises(ShoalError, match=f"^{re.escape(str(folder))} is being written by {BUSY}")
    with folder_lock(folder):
        with refused, folder_lock(folder):
            pass
        assert _listing(tmp_path) == [".out.lock"]  # the refused one removed nothing
    assert _listing(tmp_path) == []
    (tmp_path / "link").symlink_to(tmp_path)
    with folder_lock(tmp_path / "link" / "out"):  # another spelling of the same folder
        with refused, folder_lock(folder):
            pass


def test_only_a_run_folders_own_journal_is_locked(zoo, tmp_path) -> None:
    """A storage the user names (here, in the search file or before) may be shared by processes on purpose."""
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"base": str(zoo.base), "parents": {"math": str(zoo.parents["math"])},
                                    "tasks": [{"path": str(zoo.tasks["xx-math"])}]}))
    spec = load_search(path)
    assert own_journal(spec, tmp_path / "run", None)
    assert not own_journal(spec, tmp_path / "run", f"sqlite:///{tmp_path / 'shared.db'}")
    assert not own_journal(spec.model_copy(update={"storage": str(tmp_path / "shared.log")}), tmp_path / "run", None)
