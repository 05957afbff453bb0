"""Run folders keep their study in an Optuna journal file; one torn by a crash is mended."""

from __future__ import annotations

import contextlib

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from shoal.errors import ShoalError
from shoal.search.journal import drop_torn_line
from shoal.search.storage import default_storage, open_storage
from shoal.search.trials import open_study


def _add(study: optuna.Study, value: float) -> None:
    study.add_trial(create_trial(params={"g": value}, distributions={"g": FloatDistribution(0, 1)}, value=value,
                                 state=TrialState.COMPLETE))


def test_a_journal_torn_by_a_crash_keeps_its_trials_and_takes_new_ones(tmp_path) -> None:
    log = tmp_path / "study.log"
    study = open_study(str(log), "h")
    for value in (0.25, 0.5):
        _add(study, value)
    whole = log.read_bytes()
    torn = whole + b'{"op_code":5,"worker_id":"x","trial_id":'  # a write cut off mid-line
    log.write_bytes(torn)
    (tmp_path / "plain.log").write_bytes(torn)
    study = open_study(str(log), "h")  # a process appending (here: reopening the study) mends it first
    assert b'"worker_id":"x"' not in log.read_bytes() and [t.value for t in study.trials] == [0.25, 0.5]
    _add(study, 0.75)
    reread = optuna.load_study(study_name="shoal", storage=open_storage(str(log)))
    assert [t.value for t in reread.trials] == [0.25, 0.5, 0.75]
    plain = JournalStorage(JournalFileBackend(str(tmp_path / "plain.log")))  # Optuna's own: the trial is lost
    with contextlib.suppress(Exception):  # (this Optuna also raises, not finding the trial it wrote)
        _add(optuna.load_study(study_name="shoal", storage=plain), 0.75)
    assert [t.value for t in optuna.load_study(study_name="shoal", storage=plain).trials] == [0.25, 0.5]


def test_a_run_folder_keeps_its_study_in_a_journal_whatever_else_it_holds(tmp_path) -> None:
    assert default_storage(tmp_path) == str(tmp_path.resolve() / "study.log")
    (tmp_path / "study.db").touch()  # e.g. someone opened sqlite:///RUN_DIR/study.db
    assert default_storage(tmp_path) == str(tmp_path.resolve() / "study.log")


def test_only_a_journal_is_mended(tmp_path) -> None:
    other = tmp_path / "notes.log"
    other.write_bytes(b"first line\nsecond line, no newline")
    assert not drop_torn_line(other) and other.read_bytes() == b"first line\nsecond line, no newline"
    with pytest.raises(ShoalError, match="notes.log: line 1 is not an Optuna journal record"):
        open_study(str(other), "h")
    assert other.read_bytes() == b"first line\nsecond line, no newline"
