"""Read an evolution run folder (run.json, its Optuna study or its stage folders, summary.json) into plain records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.errors import ShoalError
from shoal.search.run_folder import RUN_FILE, SUMMARY_FILE
from shoal.search.summary import Summary
from shoal.search.trials import Trial, running_trials, stored_trials

SPACES = ("ps", "dfs", "hybrid")
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
    target: str | None = None
    method: str | None = None
    space: str = "ps"  # "ps" or "dfs"; a hybrid folder is a HybridRun


@dataclass(frozen=True)
class Stage:
    """One stage of a hybrid run: `status` is "finished", "running" or "not started"; `run` None if no trials."""

    name: str
    folder: Path
    status: str
    run: Run | None


@dataclass(frozen=True)
class HybridRun:
    folder: Path
    stages: list[Stage]  # in the order they run
    summary: Summary | None  # None while the run has not finished
    target: str | None = None
    method: str | None = None


def run_space(folder: Path) -> str:
    """The search space of the run in `folder` ("ps", "dfs" or "hybrid")."""
    return _space(Path(folder) / "run.json", _read_meta(Path(folder)))


def load_run(folder: Path, storage: str | None = None) -> Run:
    """Read run.json, the finished trials of its study (at `storage` if given) and summary.json if present."""
    folder = Path(folder)
    meta = _read_meta(folder)
    run_json = folder / RUN_FILE
    space = _space(run_json, meta)
    if space == "hybrid":
        raise ShoalError(f"{folder} is a hybrid run (no study of its own); load its stages with load_hybrid")
    url = storage or meta.get("storage")
    name = meta.get("study")
    if not isinstance(url, str) or not url:
        raise ShoalError(f"{run_json} has no \"storage\" URL; pass --storage URL")
    if not isinstance(name, str) or not name:
        raise ShoalError(f"{run_json} has no \"study\" name")

    summary = _read_summary(folder, space)
    trials, running = _read_trials(url, name)
    if not trials:
        more = f" ({running} running)" if running else ""
        raise NoTrialsYet(f"study {name!r} at {url} has no trials yet{more}; wait for `shoal evolve` to finish one")
    target = (summary.target if summary else None) or _str_or_none(meta.get("target"))
    method = (summary.method if summary else None) or _str_or_none(meta.get("method"))
    return Run(folder, url, name, trials, running, summary, target, method, space)


def load_hybrid(folder: Path) -> HybridRun:
    """Read a hybrid run: its run.json, each stage folder (RUN_DIR/<stage>) that exists, and summary.json if present.

    A finished hybrid run needs every stage with its trials; an unfinished one reports what exists so far.
    """
    folder = Path(folder)
    meta = _read_meta(folder)
    run_json = folder / RUN_FILE
    space = _space(run_json, meta)
    if space != "hybrid":
        raise ShoalError(f"{folder} is a {space!r} run, not a hybrid one")
    names = meta.get("stages", list(STAGE_SPACES))
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ShoalError(f"{run_json}: \"stages\" must be a non-empty list of stage folder names, like [\"ps\", \"dfs\"]")
    for name in names:
        if name in (".", "..") or "/" in name or "\\" in name:
            raise ShoalError(f"{run_json}: stage {name!r} is not a folder name inside the run folder")
    summary = _read_summary(folder, space)

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
        status = "finished" if (sub / SUMMARY_FILE).is_file() else "running"
        try:
            stages.append(Stage(name, sub, status, load_run(sub)))
        except NoTrialsYet:
            if summary is not None:
                raise
            stages.append(Stage(name, sub, status, None))
    if summary is None and all(s.run is None for s in stages):
        raise NoTrialsYet(f"hybrid run {folder} has no stage with finished trials yet; wait for `shoal evolve`")
    target = (summary.target if summary else None) or _str_or_none(meta.get("target"))
    method = (summary.method if summary else None) or _str_or_none(meta.get("method"))
    return HybridRun(folder, stages, summary, target, method)


def _read_meta(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise ShoalError(f"run folder {folder} does not exist")
    if not folder.is_dir():
        raise ShoalError(f"{folder} is a file, not a `shoal evolve` run folder")
    run_json = folder / RUN_FILE
    if not run_json.is_file():
        raise ShoalError(f"{folder} is not a `shoal evolve` run folder (no run.json)")
    meta = _read_json(run_json)
    if not isinstance(meta, dict):
        raise ShoalError(f"{run_json} must hold a JSON object")
    return meta


def _space(where: Path, record: dict[str, Any]) -> str:
    space = record.get("space")
    if space not in SPACES:
        raise ShoalError(f"{where}: unknown search space {space!r}; expected one of {', '.join(SPACES)}")
    return space


def _read_summary(folder: Path, space: str) -> Summary | None:
    path = folder / SUMMARY_FILE
    if not path.is_file():
        return None
    summary = Summary.read(path)
    if summary.space != space:
        raise ShoalError(f"{path} says space {summary.space!r} but run.json says {space!r}")
    return summary


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShoalError(f"{path} is not valid JSON: line {exc.lineno}: {exc.msg}") from None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _read_trials(url: str, name: str) -> tuple[list[Trial], int]:
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    from shoal.search.storage import is_journal, open_storage

    # Optuna would quietly create an empty database or journal here; a missing file is a wrong URL.
    path = url
    if not is_journal(url):
        path = url[len("sqlite:///"):].split("?", 1)[0] if url.startswith("sqlite:///") else ""
    if path and path != ":memory:" and not Path(path).exists():
        raise ShoalError(f"cannot open the study at {url}: {path} does not exist; check run.json or --storage")
    try:
        store = open_storage(url)
    except (SQLAlchemyError, ImportError, ValueError) as exc:  # bad URL, missing driver, not a database
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShoalError(f"cannot open the Optuna storage {url}: {reason}") from None
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = optuna.get_all_study_names(store)
        there = f"studies there: {', '.join(names)}" if names else "it holds no studies"
        raise ShoalError(f"no study named {name!r} at {url} ({there})") from None

    return sorted(stored_trials(study).values(), key=lambda t: t.index), running_trials(study)
