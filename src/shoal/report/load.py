"""Read an evolution run folder (run.json, its Optuna study or its stage folders, summary.json) into plain records."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.errors import ShoalError, ShoalWarning
from shoal.search.run_folder import (
    RUN_FILE, SUBSETS_DIR, SUMMARY_FILE, RunRecord, read_run, read_summary, study_storage,
)
from shoal.search.summary import Summary
from shoal.search.trials import Trial, running_trials, stored_trials

STAGE_SPACES = ("ps", "dfs")


class NoTrialsYet(ShoalError):
    """The study exists but no trial has finished: the run has only just started."""


@dataclass(frozen=True)
class Run:
    folder: Path
    storage: str
    study: str
    trials: list[Trial]  # finished trials, by index in the search
    running: int  # trials started but not finished
    summary: Summary | None  # None while the run has not finished
    target: str
    method: str
    space: str  # "ps" or "dfs"; a hybrid folder is a HybridRun


@dataclass(frozen=True)
class Stage:
    """One stage of a hybrid run: `status` is "finished", "unfinished" or "not started"; `run` None if no trials."""

    name: str
    folder: Path
    status: str
    run: Run | None


@dataclass(frozen=True)
class HybridRun:
    folder: Path
    stages: list[Stage]  # in the order they run
    summary: Summary | None  # None while the run has not finished
    target: str
    method: str


def run_space(folder: Path) -> str:
    """The search space of the run in `folder` ("ps", "dfs" or "hybrid")."""
    return _read_record(Path(folder)).space


def load_run(folder: Path, storage: str | None = None) -> Run:
    """Read run.json, the finished trials of its study (at `storage` if given) and summary.json if present."""
    folder = Path(folder)
    record = _read_record(folder)
    if record.space == "hybrid":
        raise ShoalError(f"{folder} is a hybrid run (no study of its own); load its stages with load_hybrid")
    if record.rounds is not None:
        return _load_pool(folder, record, storage)
    url = storage or study_storage(folder, record)
    name = record.study
    if not url:
        raise ShoalError(f"{folder / RUN_FILE} has no \"storage\" URL; pass --storage URL")
    if not name:
        raise ShoalError(f"{folder / RUN_FILE} has no \"study\" name")

    summary = _read_summary(folder, record.space)
    trials, running = _read_trials(url, name)
    if not trials:
        more = f" ({running} running)" if running else ""
        raise NoTrialsYet(f"study {name!r} at {url} has no trials yet{more}; wait for `shoal evolve` to finish one")
    target, method = (summary.target, summary.method) if summary else (record.target, record.method)
    return Run(folder, url, name, trials, running, summary, target, method, record.space)


def _load_pool(folder: Path, record: RunRecord, storage: str | None) -> Run:
    """A pool tournament: the winning subset's trials with the pool's summary (which records the rounds); while it
    runs, the trials so far of the subset leading the latest round scored (else of the first subset started; its
    study is named after it)."""
    summary = _read_summary(folder, record.space)
    if summary is not None and summary.pool is not None:
        shown = folder / SUBSETS_DIR / "+".join(summary.pool.winner)
    else:
        scored = [r.dev for r in record.rounds or [] if any(v is not None for v in r.dev.values())]
        latest = scored[-1] if scored else {}
        leader = max(latest, key=lambda s: float("-inf") if latest[s] is None else latest[s]) if latest else None
        started = [folder / s for s in record.stages or [] if (folder / s / RUN_FILE).is_file()]
        if leader is None and not started:
            raise NoTrialsYet(f"pool tournament {folder} has not finished a trial yet; wait for `shoal evolve`")
        shown = folder / SUBSETS_DIR / leader if leader is not None else started[0]
    run = load_run(shown, storage)
    target, method = (summary.target, summary.method) if summary else (record.target, record.method)
    return Run(folder, run.storage, run.study, run.trials, run.running, summary, target, method, record.space)


def load_hybrid(folder: Path) -> HybridRun:
    """Read a hybrid run: its run.json, each stage folder (RUN_DIR/<stage>) that exists, and summary.json if present.

    A finished hybrid run needs every stage with its trials; an unfinished one reports what exists so far.
    """
    folder = Path(folder)
    record = _read_record(folder)
    run_json = folder / RUN_FILE
    if record.space != "hybrid":
        raise ShoalError(f"{folder} is a {record.space!r} run, not a hybrid one")
    names = record.stages
    if not names or not all(names):
        raise ShoalError(f"{run_json}: \"stages\" must be a non-empty list of stage folder names, like [\"ps\", \"dfs\"]")
    for name in names:
        if name in (".", "..") or "/" in name or "\\" in name:
            raise ShoalError(f"{run_json}: stage {name!r} is not a folder name inside the run folder")
    summary = _read_summary(folder, record.space)

    stages = []
    for name in names:
        sub = folder / name
        if not (sub / RUN_FILE).is_file():
            if summary is not None:
                raise ShoalError(f"{folder} has a summary.json but its stage {name!r} is missing ({sub}/run.json)")
            stages.append(Stage(name, sub, "not started", None))
            continue
        stage_space = run_space(sub)
        if stage_space not in STAGE_SPACES:
            raise ShoalError(f"{sub}: a hybrid stage must be a \"ps\" or \"dfs\" run, not {stage_space!r}")
        status = "finished" if (sub / SUMMARY_FILE).is_file() else "unfinished"
        try:
            stages.append(Stage(name, sub, status, load_run(sub)))
        except NoTrialsYet:
            if summary is not None:
                raise
            stages.append(Stage(name, sub, status, None))
    if summary is None and all(s.run is None for s in stages):
        raise NoTrialsYet(f"hybrid run {folder} has no stage with finished trials yet; wait for `shoal evolve`")
    target, method = (summary.target, summary.method) if summary else (record.target, record.method)
    return HybridRun(folder, stages, summary, target, method)


def _read_record(folder: Path) -> RunRecord:
    if not folder.exists():
        raise ShoalError(f"run folder {folder} does not exist")
    if not folder.is_dir():
        raise ShoalError(f"{folder} is a file, not a `shoal evolve` run folder")
    if not (folder / RUN_FILE).is_file():
        raise ShoalError(f"{folder} is not a `shoal evolve` run folder (no run.json)")
    return read_run(folder)


def _read_summary(folder: Path, space: str) -> Summary | None:
    path = folder / SUMMARY_FILE
    if not path.is_file():
        return None
    summary = read_summary(folder)
    if summary.space != space:
        raise ShoalError(f"{path} says space {summary.space!r} but run.json says {space!r}")
    return summary


def _read_trials(url: str, name: str) -> tuple[list[Trial], int]:
    from sqlalchemy.exc import SQLAlchemyError

    from shoal.search.storage import is_journal, open_storage

    # Optuna would quietly create an empty database or journal here; a missing file is a wrong URL.
    path = url
    if not is_journal(url):
        path = url[len("sqlite:///"):].split("?", 1)[0] if url.startswith("sqlite:///") else ""
    if path and path != ":memory:" and not Path(path).exists():
        raise ShoalError(f"cannot open the study at {url}: {path} does not exist; check run.json or --storage")
    if is_journal(url):
        return _read_journal(Path(url), name)
    try:
        store = open_storage(url)
    except (SQLAlchemyError, ImportError, ValueError) as exc:  # bad URL, missing driver, not a database
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShoalError(f"cannot open the Optuna storage {url}: {reason}") from None
    return _trials_of(store, name, url)


def _read_journal(path: Path, name: str) -> tuple[list[Trial], int]:
    """The trials of a journal as its intact lines hold them: a report only reads, so a damaged line that no record
    after it depends on (as `shoal evolve` drops from its own journal), or a torn last one, is skipped, with a
    warning naming it; other damage is refused, naming the line."""
    import tempfile

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from shoal.search.journal import intact, named_lines

    lines, damaged = intact(path)
    if damaged:
        warnings.warn(ShoalWarning(f"{path}: line {named_lines(damaged)} is not an Optuna journal record (damaged); "
                                   "no stored trial depends on it, and the report reads the intact records"),
                      stacklevel=2)
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / path.name
        copy.write_bytes(lines)
        return _trials_of(JournalStorage(JournalFileBackend(str(copy))), name, str(path))


def _trials_of(store: Any, name: str, url: str) -> tuple[list[Trial], int]:
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = optuna.get_all_study_names(store)
        there = f"studies there: {', '.join(names)}" if names else "it holds no studies"
        raise ShoalError(f"no study named {name!r} at {url} ({there})") from None
    return sorted(stored_trials(study).values(), key=lambda t: t.index), running_trials(study)
