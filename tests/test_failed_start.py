"""A search refused at its start records nothing, so the corrected search runs in the same RUN_DIR; a folder that
a search left before storing any trial (killed, or made by an older shoal) is taken over, saying so."""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import optuna
import pytest
from conftest import one_error_line, zoo_search

from shoal.checkpoint.digest import WINDOW_BYTES, model_digest, sampled_digest
from shoal.folder_lock import lock_file
from shoal.search import run_folder
from shoal.errors import ShoalError
from shoal.search.spec import SearchSpec, load_search
from shoal.search.storage import default_storage, open_storage
from shoal.search.trials import open_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")


_search = functools.partial(zoo_search, budget=2)


def _trials(run: Path) -> int:
    return len(optuna.load_study(study_name="shoal", storage=open_storage(str(run / "study.log"))).trials)


def test_a_search_refused_after_its_checks_leaves_nothing_and_the_corrected_one_runs(zoo, run_cli, tmp_path) -> None:
    missing = tmp_path / "no-such-parent"
    bad = _search(zoo, tmp_path, "bad.yaml", parents={"math": str(zoo.parents["math"]), "language": str(missing)})
    run = tmp_path / "run"
    code, _, err = run_cli("evolve", bad, run, "--threads", 1)
    one_error_line(code, err, str(missing), "not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no run folder, no lock file
    code, _, err = run_cli("evolve", _search(zoo, tmp_path), run, "--threads", 1)
    assert code == 0, err
    assert "takes it over" not in err and _trials(run) == 2
    assert not lock_file(run).exists()


@pytest.mark.parametrize("named", ["a folder", "foo://bar", "another search's study"])
def test_a_start_refused_for_its_storage_records_nothing_and_the_corrected_one_runs(zoo, run_cli, tmp_path, named
                                                                                     ) -> None:
    run = tmp_path / "run"
    storage, message = {"a folder": (tmp_path, "cannot open the study at"),
                        "foo://bar": ("foo://bar", "sharing a study needs PostgreSQL, SQLite or a journal file, not foo"),
                        "another search's study": (tmp_path / "other.log", "was made by a different search")}[named]
    if named == "another search's study":
        open_study(str(storage), load_search(_search(zoo, tmp_path, "other.yaml", seed=6)).search_hash())
    code, _, err = run_cli("evolve", _search(zoo, tmp_path), run, "--threads", 1, "--storage", storage)
    one_error_line(code, err, message)
    assert not run.exists()  # no run.json naming that storage, which a rerun without --storage would go back to
    code, _, err = run_cli("evolve", _search(zoo, tmp_path), run, "--threads", 1)
    assert code == 0, err
    assert _trials(run) == 2


def test_a_folder_whose_search_stored_no_trial_is_taken_over(zoo, run_cli, tmp_path) -> None:
    run = tmp_path / "run"
    other = load_search(_search(zoo, tmp_path, "other.yaml", seed=6))
    run_folder.open_run(other, run, None, None, "shoal", lambda _: None).write(run)  # what a start that got no
    # further left
    open_study(default_storage(run), other.search_hash())
    code, _, err = run_cli("evolve", _search(zoo, tmp_path), run, "--threads", 1)
    assert code == 0, err
    line = f"{run} held another search (hash {other.search_hash()}) that stored no trial; this search takes it over"
    assert line in err.splitlines()
    record = json.loads((run / "run.json").read_text())
    assert record["search_hash"] != other.search_hash() and len(record["sessions"]) == 1
    assert _trials(run) == 2


def test_a_folder_whose_search_stored_a_trial_is_refused_as_it_was(zoo, run_cli, tmp_path) -> None:
    run = tmp_path / "run"
    other = load_search(_search(zoo, tmp_path, "other.yaml", seed=6))
    run_folder.open_run(other, run, None, None, "shoal", lambda _: None).write(run)
    study = open_study(default_storage(run), other.search_hash())
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"index": 0, "generation": 0, "seed": 1}))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, _, err = run_cli("evolve", _search(zoo, tmp_path), run, "--threads", 1)
    one_error_line(code, err, f"{run} holds a run of a different search; use a new RUN_DIR")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_run_folder_that_is_a_file_or_a_missing_gpu_is_refused_before_the_parents_load(zoo, run_cli, tmp_path
                                                                                          ) -> None:
    import torch

    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, _, err = run_cli("evolve", _search(zoo, tmp_path), afile, "--threads", 1)
    assert one_error_line(code, err, f"{afile} is a file; give a folder") == err.strip()  # no 'loading parents'
    assert afile.read_text() == "mine"
    if not torch.cuda.is_available():
        code, _, err = run_cli("evolve", _search(zoo, tmp_path, "gpu.yaml", device="cuda"), tmp_path / "run",
                               "--threads", 1)
        assert one_error_line(code, err, "the search file's device: cuda: no CUDA GPU is available here") == err.strip()
        assert not (tmp_path / "run").exists()


def test_a_storage_named_inside_a_new_run_folder_opens(zoo, run_cli, tmp_path) -> None:
    run = tmp_path / "runs" / "a"
    code, _, err = run_cli("evolve", _search(zoo, tmp_path), run, "--threads", 1, "--storage", run / "shared.log")
    assert code == 0, err
    assert len(optuna.load_study(study_name="shoal", storage=open_storage(str(run / "shared.log"))).trials) == 2


def test_a_run_whose_task_changed_is_refused_and_goes_on_once_it_is_restored(zoo, run_cli, tmp_path) -> None:
    import shutil

    task = tmp_path / "task"
    shutil.copytree(zoo.tasks["xx-math"], task)
    search, run = _search(zoo, tmp_path, tasks=[{"path": str(task)}]), tmp_path / "run"
    code, _, err = run_cli("evolve", search, run, "--threads", 1)
    assert code == 0, err
    dev = task / "dev.jsonl"
    kept = dev.read_text()
    dev.write_text(kept.replace("ra", "ro", 1))  # one dev item changed: the stored trials were scored without it
    code, _, err = run_cli("evolve", search, run, "--threads", 1, "--budget", 4)
    one_error_line(code, err, "task xx-math has changed since this run started", "restore it, or use a new RUN_DIR")
    assert _trials(run) == 2
    dev.write_text(kept)
    record = json.loads((run / "run.json").read_text())
    del record["task_digests"]  # a run made before digests were kept goes on, and keeps them from then on
    (run / "run.json").write_text(json.dumps(record))
    code, _, err = run_cli("evolve", search, run, "--threads", 1, "--budget", 4)
    assert code == 0, err
    assert _trials(run) == 4 and list(json.loads((run / "run.json").read_text())["task_digests"]) == ["xx-math"]


def test_a_task_recorded_without_a_digest_is_compared_from_then_on() -> None:
    """An lm-eval task's run started before shoal kept lm-eval digests goes on; a recorded one is compared."""
    spec = SearchSpec.model_validate({"base": "b", "parents": {"m": "x"}, "tasks": [{"path": "t"}, {"path": "u"}]})
    record = run_folder.RunRecord(space="ps", target="t", method="dare_ties", search_hash=spec.search_hash(),
                                  task_digests={"t": "a"})
    run_folder.check_tasks(spec, record, {"t": "a", "u": "b"})
    with pytest.raises(ShoalError, match="task t has changed since this run started"):
        run_folder.check_tasks(spec, record, {"t": "c", "u": "b"})


def test_a_run_whose_journal_is_gone_is_refused_rather_than_searched_again(zoo, run_cli, tmp_path) -> None:
    search, run = _search(zoo, tmp_path), tmp_path / "run"
    code, _, err = run_cli("evolve", search, run, "--threads", 1)
    assert code == 0, err
    (run / "study.log").rename(tmp_path / "study.log")
    code, _, err = run_cli("evolve", search, run, "--threads", 1, "--budget", 3)
    one_error_line(code, err, f"{run / 'study.log'} is missing, but run.json records 1 session(s) of this search",
                   f"restore it, or delete {run / 'run.json'} to start the search again")
    assert not (run / "study.log").exists()
    (tmp_path / "study.log").rename(run / "study.log")  # restored: the search goes on from its 2 trials
    code, _, err = run_cli("evolve", search, run, "--threads", 1, "--budget", 3)
    assert code == 0, err
    assert _trials(run) == 3


def test_a_run_whose_parent_changed_is_refused_and_goes_on_once_it_is_restored(zoo, run_cli, tmp_path) -> None:
    math = shutil.copytree(zoo.parents["math"], tmp_path / "math")
    search = _search(zoo, tmp_path, parents={"math": str(math), "language": str(zoo.parents["language"])})
    run = tmp_path / "run"
    code, _, err = run_cli("evolve", search, run, "--threads", 1)
    assert code == 0, err
    [weights] = math.glob("*.safetensors")
    kept = weights.read_bytes()
    shutil.copyfile(next(zoo.joint.glob("*.safetensors")), weights)  # another fine-tune of the same shapes
    code, _, err = run_cli("evolve", search, run, "--threads", 1, "--budget", 4)
    one_error_line(code, err,
                   "parents.math has changed since this run started (its config.json or weights, or an adapter",
                   "restore it, or use a new RUN_DIR")
    assert _trials(run) == 2
    weights.write_bytes(kept)  # the same bytes, written anew: the same model
    code, _, err = run_cli("evolve", search, run, "--threads", 1, "--budget", 4)
    assert code == 0, err
    assert _trials(run) == 4 and set(json.loads((run / "run.json").read_text())["parent_digests"]) == {
        "base", "parents.math", "parents.language"}


def test_a_sampled_digest_reads_windows_of_a_file_and_a_hub_blob_by_its_name(tmp_path) -> None:
    data = bytearray(os.urandom(64 * WINDOW_BYTES))
    file = tmp_path / "model.safetensors"
    file.write_bytes(data)
    first = sampled_digest(file)
    data[4 * WINDOW_BYTES] ^= 1  # the start of the 2nd of 16 windows (one each 4 x 64 KiB)
    file.write_bytes(data)
    assert sampled_digest(file) != first
    data[4 * WINDOW_BYTES] ^= 1
    data[5 * WINDOW_BYTES] ^= 1  # between windows: a change a sample does not see
    file.write_bytes(data)
    assert sampled_digest(file) == first
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"x")
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "model.safetensors").symlink_to(blob)
    assert sampled_digest(tmp_path / "snapshot" / "model.safetensors") == f"blob:{'ab' * 32}"
    (tmp_path / "config.json").write_text("{}")
    folder = model_digest(tmp_path)
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert model_digest(tmp_path) != folder
