"""run.json records each `shoal evolve` session as it starts and notes its time as each trial is stored, so
summary.json counts sessions ended by kill -9 and adds their time to wall_seconds."""

from __future__ import annotations

import json
import sys

import optuna
import pytest
from conftest import finished_trials, kill_once_stored, zoo_search

from shoal.search.evolve import evolve
from shoal.search.spec import load_search
from shoal.search.storage import open_storage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sessions_ended_by_kill_9_are_counted_with_their_time(zoo, tmp_path) -> None:
    search = zoo_search(zoo, tmp_path, budget=10_000)  # killed sessions never reach their budget, however fast
    run = tmp_path / "run"
    command = [sys.executable, "-m", "shoal", "evolve", str(search), str(run), "--threads", "1"]
    bounds = [0]
    for _ in range(2):
        kill_once_stored(command, run, bounds[-1] + 8)
        bounds.append(finished_trials(run / "study.log"))
    final = bounds[-1] + 8  # the last session, given a budget a few trials beyond what the killed ones stored
    evolve(load_search(zoo_search(zoo, tmp_path, budget=final)), run)
    bounds.append(final)

    study = optuna.load_study(study_name="shoal", storage=open_storage(str(run / "study.log")))
    stored_at = {t.user_attrs["index"]: t.datetime_complete.timestamp() for t in study.trials}
    spans = [stored_at[high - 1] - stored_at[low] for low, high in zip(bounds, bounds[1:])]
    """Each session's time from its first to its last stored trial: a lower bound on its time."""
    sessions = json.loads((run / "run.json").read_text())["sessions"]
    summary = json.loads((run / "summary.json").read_text())
    assert [s["finished"] for s in sessions] == [False, False, True] and summary["sessions"] == 3
    assert all(s["seconds"] >= span for s, span in zip(sessions, spans))
    assert summary["wall_seconds"] == pytest.approx(sum(s["seconds"] for s in sessions))
    assert summary["wall_seconds"] >= sum(spans)
