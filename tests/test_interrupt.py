"""Ctrl-C (SIGINT) stops `shoal merge` and `shoal evolve` with exit code 130 and one line saying what was kept:
no half-written model, and for a search the stored trials that a rerun continues from. SIGTERM (`kill`, `timeout`,
a batch scheduler) does the same with exit code 143."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import SLOW_MERGE, finished_trials, wait_for, write_recipe, zoo_search


def _default_sigint() -> None:
    """In the child: Ctrl-C's default disposition. A child inherits an ignored SIGINT (earlier tests in this process
    may leave it ignored, e.g. Ray's), and Python then never turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(("overwrite", "stop", "code"), [
    (False, signal.SIGINT, 130), (True, signal.SIGINT, 130), (False, signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_during_merge_exits_130_or_143_and_leaves_nothing_half_written(parents, tmp_path, overwrite, stop, code
                                                                       ) -> None:
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(parents[n]), "parameters": {"weight": 1.0}} for n in ("a", "b")]})
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()  # an earlier merge's folder
        (out / "config.json").write_text("{}")
        (out / "old").write_text("kept")
    args = [sys.executable, "-c", SLOW_MERGE, "merge", str(recipe), str(out)] + (["--overwrite"] if overwrite else [])
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    wait_for(lambda: any(p.name.startswith(".out.tmp-") and any(p.glob("*.safetensors"))
                          for p in tmp_path.iterdir()))
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    line = _last_line(err)
    assert line.startswith(f"interrupted: {out}: ") and "no half-written model is left" in line
    assert ("earlier OUT_DIR is unchanged" if overwrite else "nothing was written") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out", "recipe.yaml"] if overwrite else ["recipe.yaml"])
    if overwrite:
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "old"]


@pytest.mark.parametrize(("stop", "code", "space"), [(signal.SIGINT, 130, "ps"), (signal.SIGTERM, 143, "ps"),
                                                     (signal.SIGINT, 130, "hybrid")])
def test_ctrl_c_or_sigterm_during_evolve_exits_130_or_143_and_says_how_many_trials_are_kept(zoo, tmp_path, stop, code,
                                                                                            space) -> None:
    search = zoo_search(zoo, tmp_path, budget=400, space=space, dfs={"parents": ["math"], "budget": 50})
    run = tmp_path / "run"
    command = [sys.executable, "-m", "shoal", "evolve", str(search), str(run), "--threads", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    stage = run / "ps" if space == "hybrid" else run
    wait_for(lambda: finished_trials(stage / "study.log", "shoal-ps" if space == "hybrid" else "shoal") >= 3)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    line = _last_line(err)
    stored = (" of 400 trials of the PS stage and 0 of 50 of the DFS stage are stored" if space == "hybrid" else
              " of 400 trials are stored") + f" for {run}; run the same command again to continue"
    assert line.startswith("interrupted: ") and stored in line
    assert int(line.split("interrupted: ")[1].split(" of ")[0]) >= 3
    assert not (run / "summary.json").exists() and not (run / "best").exists()
    assert json.loads((stage / "run.json").read_text())["sessions"][-1]["finished"] is False


def test_a_reader_that_goes_away_stops_a_merge_as_sigpipe_would(parents, tmp_path) -> None:
    """`shoal merge ... 2>&1 | head -n 1`: exit 141 without a traceback, and nothing half-written."""
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(parents[n]), "parameters": {"weight": 1.0}} for n in ("a", "b")]})
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    proc = subprocess.Popen([sys.executable, "-m", "shoal", "merge", str(recipe), str(tmp_path / "out")],
                            stdout=write, stderr=write)
    os.close(write)
    assert proc.wait(timeout=120) == 141
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
