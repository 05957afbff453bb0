"""Read an evolution run folder (run.json, its Optuna study or its stage folders, summary.json) into plain records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from shoal.errors import ShoalError

SPACES = ("ps", "dfs", "hybrid")
STAGE_SPACES = ("ps", "dfs")


class NoTrialsYet(ShoalError):
    """The study exists but no trial has finished: the run has only just started."""


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SecondsPerTrial(_Lenient):
    merge: float | None = None
    eval: float | None = None
    total: float | None = None


class PathStep(_Lenient):
    """One layer on a data-flow path: layer `layer` of parent `parent`, its input multiplied by `scale`."""

    parent: str
    layer: int
    scale: float = 1.0


class Best(_Lenient):
    trial: int | None = None
    dev: float | None = None
    test: float | None = None
    recipe: dict[str, Any] | None = None
    layers: dict[str, dict[str, list[float | None]]] | None = {}
    embeddings: dict[str, dict[str, float | None]] | None = None
    path: list[PathStep] | None = None  # dfs runs: the layers the token goes through, in order
    parents_order: list[str] | None = None  # dfs runs: the first supplies the embeddings and the head


class StageResult(_Lenient):
    """A hybrid run's summary of one stage."""

    dev: float | None = None
    test: float | None = None
    trials: int | None = None
    best_trial: int | None = None


class Summary(_Lenient):
    """summary.json, written by `shoal evolve` once the run has finished."""

    target: str | None = None
    method: str | None = None
    space: str | None = None
    best: Best = Best()
    parents: dict[str, float | None] = {}
    untuned: dict[str, float | None] = {}
    trials: int | None = None
    failed_trials: int | None = None
    budget: int | None = None
    wall_seconds: float | None = None
    seconds_per_trial: SecondsPerTrial = SecondsPerTrial()
    stages: dict[str, StageResult] = {}  # hybrid runs only


@dataclass(frozen=True)
class Trial:
    """One finished trial: `value` is the dev fitness, None when the trial failed."""

    number: int
    value: float | None
    generation: int | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.value is None


@dataclass(frozen=True)
class Run:
    folder: Path
    storage: str
    study: str
    trials: list[Trial]  # finished trials only (COMPLETE or FAIL), in search order
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
    """The search space of the run in `folder` ("ps", "dfs" or "hybrid"); a run.json without "space" is "ps"."""
    return _space(Path(folder) / "run.json", _read_meta(Path(folder)))


def load_run(folder: Path, storage: str | None = None) -> Run:
    """Read run.json, the finished trials of its study (at `storage` if given) and summary.json if present."""
    folder = Path(folder)
    meta = _read_meta(folder)
    run_json = folder / "run.json"
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
    run_json = folder / "run.json"
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
        if not (sub / "run.json").is_file():
            if summary is not None:
                raise ShoalError(f"{folder} has a summary.json but its stage {name!r} is missing ({sub}/run.json)")
            stages.append(Stage(name, sub, "not started", None))
            continue
        stage_space = run_space(sub)
        if stage_space not in STAGE_SPACES:
            raise ShoalError(f"{sub}: a hybrid stage must be a \"ps\" or \"dfs\" run, not {stage_space!r}")
        status = "finished" if (sub / "summary.json").is_file() else "running"
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
    run_json = folder / "run.json"
    if not run_json.is_file():
        raise ShoalError(f"{folder} is not a `shoal evolve` run folder (no run.json)")
    meta = _read_json(run_json)
    if not isinstance(meta, dict):
        raise ShoalError(f"{run_json} must hold a JSON object")
    return meta


def _space(where: Path, record: dict[str, Any]) -> str:
    space = record.get("space", "ps")
    if space not in SPACES:
        raise ShoalError(f"{where}: unknown search space {space!r}; expected one of {', '.join(SPACES)}")
    return space


def _read_summary(folder: Path, space: str) -> Summary | None:
    summary_json = folder / "summary.json"
    if not summary_json.is_file():
        return None
    raw = _read_json(summary_json)
    if isinstance(raw, dict) and "space" in raw and _space(summary_json, raw) != space:
        raise ShoalError(f"{summary_json} says space {raw['space']!r} but run.json says {space!r}")
    try:
        return Summary.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        raise ShoalError(f"{summary_json} is not a valid run summary: {where}: {first['msg']}") from None


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

    finished, running = [], 0
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state == optuna.trial.TrialState.COMPLETE:
            value = float(t.value) if t.value is not None else None
        elif t.state == optuna.trial.TrialState.FAIL:
            value = None
        else:  # RUNNING / WAITING (a run in progress) or PRUNED (not used by `shoal evolve`)
            running += t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
            continue
        generation = t.user_attrs.get("generation")
        error = t.user_attrs.get("error")
        finished.append(
            Trial(
                number=t.number,
                value=value,
                generation=generation if isinstance(generation, int) else None,
                error=str(error) if error is not None else None,
            )
        )
    return finished, running
