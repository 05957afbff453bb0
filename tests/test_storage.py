"""Run folders keep their study in an Optuna journal file; one torn by a crash is mended, an older SQLite kept."""

from __future__ import annotations

import contextlib
import json

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

import shoal.search.run as run_module
from shoal.errors import ShoalError
from shoal.search.loop import open_study
from shoal.search.run import evolve
from shoal.search.spec import load_search
from shoal.search.storage import default_storage, drop_torn_line, open_storage
from shoal.zoo.build import build_zoo

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_a_stray_sqlite_file_does_not_take_over_a_journal_run(tmp_path) -> None:
    assert default_storage(tmp_path) == str(tmp_path.resolve() / "study.log")
    (tmp_path / "study.db").touch()  # a folder an earlier shoal made
    assert default_storage(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'study.db'}"
    (tmp_path / "study.log").touch()  # a journal run on which someone opened sqlite:///RUN_DIR/study.db
    assert default_storage(tmp_path) == str(tmp_path.resolve() / "study.log")


def test_only_a_journal_is_mended(tmp_path) -> None:
    other = tmp_path / "notes.log"
    other.write_bytes(b"first line\nsecond line, no newline")
    assert not drop_torn_line(other) and other.read_bytes() == b"first line\nsecond line, no newline"
    with pytest.raises(ShoalError, match="cannot open the study"):
        open_study(str(other), "h")
    assert other.read_bytes() == b"first line\nsecond line, no newline"


def test_a_run_folder_an_earlier_shoal_made_goes_on_in_its_sqlite_study(tmp_path, monkeypatch) -> None:
    """Earlier versions kept the study in RUN_DIR/study.db and fingerprinted searches by resolved paths."""
    zoo = build_zoo(tmp_path / "zoo", seed=0, size="smoke", threads=1)
    local = lambda path: str(path.relative_to(tmp_path))
    (tmp_path / "search.yaml").write_text(
        f"base: {local(zoo.base)}\nparents: {{{', '.join(f'{k}: {local(v)}' for k, v in zoo.parents.items())}}}\n"
        f"genome: {{layers_per_group: 0}}\ntasks: [{{path: {local(zoo.tasks['xx-math'])}}}]\nbudget: 6\n")
    spec = load_search(tmp_path / "search.yaml")
    earlier = spec.search_hash(as_before=True)
    assert earlier != spec.search_hash()
    run = tmp_path / "run"
    with monkeypatch.context() as m:  # as an earlier shoal made it
        m.setattr(run_module, "default_storage", lambda folder: f"sqlite:///{folder.resolve() / 'study.db'}")
        evolve(spec, run)
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(record | {"search_hash": earlier}))
    study = optuna.load_study(study_name="shoal", storage=f"sqlite:///{run / 'study.db'}")
    study.set_user_attr("search_hash", earlier)
    summary = evolve(spec.model_copy(update={"budget": 9}), run)
    trials = optuna.load_study(study_name="shoal", storage=f"sqlite:///{run / 'study.db'}").trials
    assert summary["trials"] == 9 and len(trials) == 9 and not (run / "study.log").exists()
    assert json.loads((run / "run.json").read_text())["search_hash"] == spec.search_hash()
    assert study.user_attrs["search_hash"] == spec.search_hash()
