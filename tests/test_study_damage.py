"""A damaged study.log: `shoal evolve` drops damaged lines of a run folder's own journal, keeping every intact
trial and a copy of the damaged file, and scores the lost trials again; a torn last line is cut silently; damage it
cannot drop safely, or in a journal the user named (maybe shared), is refused with one line naming the line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
from conftest import one_error_line, zoo_search

from shoal.errors import ShoalWarning
from shoal.report.load import load_run
from shoal.search.evolve import evolve
from shoal.search.spec import load_search
from shoal.search.storage import open_storage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUDGET = 6


@pytest.fixture(scope="module")
def finished(zoo, tmp_path_factory) -> Path:
    """A finished run of BUDGET trials: study.log holds the study (line 1), its search hash (2), a trial a line."""
    folder = tmp_path_factory.mktemp("finished")
    evolve(load_search(zoo_search(zoo, folder, budget=BUDGET)), folder / "run")
    return folder


def _copy(finished: Path, to: Path) -> tuple[Path, Path]:
    """The finished run as one killed after its last trial, before its summary: the next session opens its study (a
    finished run's is not opened again)."""
    shutil.copytree(finished, to, dirs_exist_ok=True)
    (to / "run" / "summary.json").unlink()
    return to / "search.yaml", to / "run"


def _trials(log: Path) -> dict[int, tuple]:
    study = optuna.load_study(study_name="shoal", storage=open_storage(str(log)))
    indices = [t.user_attrs["index"] for t in study.trials]
    assert len(set(indices)) == len(indices), "a trial is stored twice"
    return {t.user_attrs["index"]: (t.params, t.value) for t in study.trials}


def _damage(log: Path, line: int, how) -> bytes:
    lines = log.read_bytes().split(b"\n")
    lines[line - 1] = how(lines[line - 1])
    log.write_bytes(b"\n".join(lines))
    return log.read_bytes()


CUT_SHORT = lambda line: line[:60]  # a record cut off, the next one on the following line
NOT_JSON = lambda line: b"\x00\x00\x00 not a record"


@pytest.mark.parametrize("line,how", [(5, CUT_SHORT), (5, NOT_JSON), (BUDGET + 2, CUT_SHORT)],
                         ids=["middle-cut-short", "middle-not-json", "last-cut-short"])
def test_a_damaged_line_is_dropped_and_its_trial_scored_again(finished, run_cli, tmp_path, line, how) -> None:
    search, run = _copy(finished, tmp_path)
    whole = _trials(run / "study.log")
    damaged = _damage(run / "study.log", line, how)
    code, _, err = run_cli("evolve", search, run, "--threads", 1)
    assert code == 0, err
    notice = f"{run / 'study.log'}: dropped 1 damaged line (line {line}) and kept every intact record; the damaged " \
             "file is saved as study.log.damaged; a trial lost with it is scored again"
    assert notice in err.splitlines()
    assert (run / "study.log.damaged").read_bytes() == damaged
    assert _trials(run / "study.log") == whole  # the lost trial, scored again, is the trial it was
    assert json.loads((run / "summary.json").read_text())["trials"] == BUDGET


def test_a_torn_last_line_is_cut_and_the_search_goes_on(finished, run_cli, tmp_path) -> None:
    search, run = _copy(finished, tmp_path)
    whole = _trials(run / "study.log")
    with open(run / "study.log", "ab") as log:
        log.write(b'{"op_code":4,"worker_id":"x","study_id":0,"datetime_st')  # a write cut off by a crash
    code, _, err = run_cli("evolve", search, run, "--threads", 1, "--budget", BUDGET + 2)
    assert code == 0, err
    assert "damaged" not in err and not (run / "study.log.damaged").exists()
    after = _trials(run / "study.log")
    assert len(after) == BUDGET + 2 and {i: after[i] for i in whole} == whole
    assert b'"worker_id":"x"' not in (run / "study.log").read_bytes()


def test_damage_that_later_records_may_depend_on_is_refused_naming_the_line(finished, run_cli, tmp_path) -> None:
    search, run = _copy(finished, tmp_path)
    damaged = _damage(run / "study.log", 1, CUT_SHORT)  # the study's creation: every trial refers to it
    record = (run / "run.json").read_bytes()
    code, _, err = run_cli("evolve", search, run, "--threads", 1)
    one_error_line(code, err, f"{run / 'study.log'}: line 1 is not an Optuna journal record (damaged)",
                   "restore the file from a backup")
    assert (run / "study.log").read_bytes() == damaged and (run / "run.json").read_bytes() == record
    assert not (run / "study.log.damaged").exists()


def test_a_damaged_journal_the_user_named_is_refused_naming_the_line(finished, run_cli, tmp_path) -> None:
    search, run = _copy(finished, tmp_path)
    shared = tmp_path / "shared.log"  # a journal other processes may be reading: not rewritten
    shutil.copy(run / "study.log", shared)
    damaged = _damage(shared, 5, NOT_JSON)
    code, _, err = run_cli("evolve", search, tmp_path / "other", "--threads", 1, "--storage", shared)
    one_error_line(code, err, f"{shared}: line 5 is not an Optuna journal record (damaged)",
                   "delete that line or restore the file from a backup")
    assert shared.read_bytes() == damaged and not (tmp_path / "shared.log.damaged").exists()


def test_a_report_reads_the_intact_records_of_a_damaged_journal_and_names_the_line(finished, run_cli, tmp_path
                                                                                    ) -> None:
    _, run = _copy(finished, tmp_path)
    assert not (run / "report").exists()
    damaged = _damage(run / "study.log", 5, NOT_JSON)  # a trial's line, as a crash may leave it
    with open(run / "study.log", "ab") as log:
        log.write(b'{"op_code":4,"worker_id":"x"')  # and a torn last one
    code, out, err = run_cli("report", run)
    assert code == 0, err
    assert err.strip() == (f"warning: {run / 'study.log'}: line 5 is not an Optuna journal record (damaged); no "
                           "stored trial depends on it, and the report reads the intact records")
    assert (run / "report" / "report.md").is_file()
    with pytest.warns(ShoalWarning, match="line 5"):
        trials = load_run(run).trials
    assert len(trials) == BUDGET - 1  # line 5 held one of them; the torn line none
    assert (run / "study.log").read_bytes() == damaged + b'{"op_code":4,"worker_id":"x"'  # read, never written


def test_a_report_refuses_damage_that_later_records_may_depend_on(finished, run_cli, tmp_path) -> None:
    _, run = _copy(finished, tmp_path)
    _damage(run / "study.log", 1, CUT_SHORT)  # the study's creation: every trial refers to it
    code, _, err = run_cli("report", run)
    one_error_line(code, err, f"{run / 'study.log'}: line 1 is not an Optuna journal record (damaged)")
