"""Run folders keep their study in an Optuna journal file; one torn by a crash is mended, an older SQLite kept."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

import shoal.search.run as run_module
from shoal.errors import ShoalError
from shoal.search.loop import open_study
from shoal.search.run import evolve
from shoal.search.spec import load_search
from shoal.search.storage import drop_torn_line, open_storage
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
    log.write_bytes(whole + b'{"op_code":5,"worker_id":"x","trial_id":')  # a write cut off mid-line
    torn = tmp_path / "unmended.log"
    torn.write_bytes(log.read_bytes())
    study = open_study(str(log), "h")
    mended = log.read_bytes()
    assert mended.startswith(whole) and b'"worker_id":"x"' not in mended
    assert [t.value for t in study.trials] == [0.25, 0.5]
    _add(study, 0.75)
    reread = optuna.load_study(study_name="shoal", storage=open_storage(str(log)))
    assert [t.value for t in reread.trials] == [0.25, 0.5, 0.75]
    unmended = optuna.load_study(study_name="shoal", storage=open_storage(str(torn)))  # what mending avoids: the
    with pytest.raises(AttributeError):  # next record is joined to the torn line, so Optuna cannot find its trial
        _add(unmended, 0.75)
    assert [t.value for t in optuna.load_study(study_name="shoal", storage=open_storage(str(torn))).trials] == [
        0.25, 0.5]  # and the trial is lost


def test_only_a_journal_is_mended(tmp_path) -> None:
    other = tmp_path / "notes.log"
    other.write_bytes(b"first line\nsecond line, no newline")
    assert not drop_torn_line(other) and other.read_bytes() == b"first line\nsecond line, no newline"
    with pytest.raises(ShoalError, match="cannot open the study"):
        open_study(str(other), "h")
    assert other.read_bytes() == b"first line\nsecond line, no newline"


def test_a_run_folder_made_with_sqlite_goes_on_in_it(tmp_path, monkeypatch) -> None:
    zoo = build_zoo(tmp_path / "zoo", seed=0, size="smoke", threads=1)
    (tmp_path / "search.yaml").write_text(
        f"base: {zoo.base}\nparents: {{{', '.join(f'{k}: {v}' for k, v in zoo.parents.items())}}}\n"
        f"genome: {{layers_per_group: 0}}\ntasks: [{{path: {zoo.tasks['xx-math']}}}]\nbudget: 6\n")
    spec = load_search(tmp_path / "search.yaml")
    run = tmp_path / "run"
    with monkeypatch.context() as m:  # as an earlier shoal made it
        m.setattr(run_module, "default_storage", lambda folder: f"sqlite:///{folder.resolve() / 'study.db'}")
        evolve(spec, run)
    summary = evolve(spec.model_copy(update={"budget": 9}), run)
    trials = optuna.load_study(study_name="shoal", storage=f"sqlite:///{run / 'study.db'}").trials
    assert summary["trials"] == 9 and len(trials) == 9 and not (run / "study.log").exists()
