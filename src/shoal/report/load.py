"""Read an evolution run folder (run.json, its Optuna study, summary.json) into plain records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from shoal.errors import ShoalError


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SecondsPerTrial(_Lenient):
    merge: float | None = None
    eval: float | None = None
    total: float | None = None


class Best(_Lenient):
    trial: int | None = None
    dev: float | None = None
    test: float | None = None
    recipe: dict[str, Any] | None = None
    layers: dict[str, dict[str, list[float | None]]] = {}
    embeddings: dict[str, dict[str, float | None]] | None = None


class Summary(_Lenient):
    """summary.json, written by `shoal evolve` once the run has finished."""

    target: str | None = None
    method: str | None = None
    best: Best = Best()
    parents: dict[str, float | None] = {}
    untuned: dict[str, float | None] = {}
    trials: int | None = None
    failed_trials: int | None = None
    budget: int | None = None
    wall_seconds: float | None = None
    seconds_per_trial: SecondsPerTrial = SecondsPerTrial()


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


def load_run(folder: Path, storage: str | None = None) -> Run:
    """Read run.json, the finished trials of its study (at `storage` if given) and summary.json if present."""
    folder = Path(folder)
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
    url = storage or meta.get("storage")
    name = meta.get("study")
    if not isinstance(url, str) or not url:
        raise ShoalError(f"{run_json} has no \"storage\" URL; pass --storage URL")
    if not isinstance(name, str) or not name:
        raise ShoalError(f"{run_json} has no \"study\" name")

    summary = None
    summary_json = folder / "summary.json"
    if summary_json.is_file():
        try:
            summary = Summary.model_validate(_read_json(summary_json))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "top level"
            raise ShoalError(f"{summary_json} is not a valid run summary: {where}: {first['msg']}") from None

    trials, running = _read_trials(url, name)
    if not trials:
        more = f" ({running} running)" if running else ""
        raise ShoalError(f"study {name!r} at {url} has no trials yet{more}; wait for `shoal evolve` to finish one")
    target = (summary.target if summary else None) or _str_or_none(meta.get("target"))
    method = (summary.method if summary else None) or _str_or_none(meta.get("method"))
    return Run(folder, url, name, trials, running, summary, target, method)


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

    if url.startswith("sqlite:///"):
        # SQLAlchemy would quietly create an empty database here; a missing file is a wrong URL.
        path = url[len("sqlite:///"):].split("?", 1)[0]
        if path and path != ":memory:" and not Path(path).exists():
            raise ShoalError(f"cannot open the study at {url}: {path} does not exist; check run.json or --storage")
    try:
        rdb = optuna.storages.RDBStorage(url)
    except (SQLAlchemyError, ImportError, ValueError) as exc:  # bad URL, missing driver, not a database
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShoalError(f"cannot open the Optuna storage {url}: {reason}") from None
    try:
        study = optuna.load_study(study_name=name, storage=rdb)
    except KeyError:
        names = optuna.get_all_study_names(rdb)
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
