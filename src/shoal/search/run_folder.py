"""A run folder's JSON files, read and written through one model each, for `shoal evolve` and the report alike.

run.json (RunRecord) says which search made the folder, where its study lives and its sessions; summary.json
(search.summary.Summary) is written once the run has finished, with best/. A hybrid run holds one such folder per
stage (RUN_DIR/ps, RUN_DIR/dfs) and a run.json that names them; a pool's tournament one per subset of parents
(RUN_DIR/subsets/math+language, ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from shoal.checkpoint.digest import MODEL_FILES, first_changed
from shoal.errors import ShoalError
from shoal.search.spec import SearchSpec
from shoal.search.storage import default_storage, open_storage
from shoal.search.summary import PoolRound, Summary
from shoal.search.trials import TASK_FILES

RUN_FILE, SUMMARY_FILE, BEST_DIR, SUBSETS_DIR = "run.json", "summary.json", "best", "subsets"

Notice = Callable[[str], None]
"""Told, in one line, what was done to the folder that the user did not ask for (a take-over)."""


class Session(BaseModel):
    """One run of `shoal evolve` on the folder, recorded as it starts."""

    model_config = ConfigDict(extra="forbid")
    seconds: float
    """Its time so far: updated as each of its trials is stored, and as it ends."""
    finished: bool


class RunRecord(BaseModel):
    """run.json: the search that made the folder and, for one space, where its study lives; for a hybrid run or a
    pool's tournament, the folders of the searches it runs."""

    model_config = ConfigDict(extra="forbid")
    space: Literal["ps", "dfs", "hybrid"]
    target: str
    method: str
    search_hash: str
    storage: str | None = None
    """One space: the study's Optuna storage URL or journal file."""
    default_storage: bool = True
    """One space: the storage is the folder's own journal (not named by the user: not shared)."""
    study: str | None = None
    search: dict[str, Any] | None = None
    """One space: the search as run."""
    task_digests: dict[str, str] | None = None
    """One space: each task's digest (its digest()) when the run started; a later session whose task differs is
    refused (its stored trials were scored on the old one)."""
    parent_digests: dict[str, str] | None = None
    """One space: each model's digest (checkpoint.digest.model_digest) when the run started, by its key in the search
    file (base, parents.NAME); a later session whose model differs is refused, as for a task."""
    hub_commits: dict[str, str] | None = None
    """Each Hub id the search file names at a branch (main by default) or tag, as it names it, by the commit the run
    read it at when it started: later sessions read that commit, though the branch has moved on since."""
    sessions: list[Session] = []
    stages: list[str] | None = None
    """Hybrid: the stage folders, in the order they run; pool: every subset's folder."""
    ps_best_trial: int | None = None
    """Hybrid: the PS trial whose model is parent A of the DFS stage's trials."""
    rounds: list[PoolRound] | None = None
    """Pool: the tournament's rounds so far, each subset's score written as its search ends (a resumed tournament
    reads a score here rather than load that subset's parents again)."""
    select: dict[str, Any] | None = None
    """Pool: the final selection (outside the search hash) the rounds' scores were measured with; another one
    measures them again."""

    def write(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / RUN_FILE, self.model_dump(mode="json", exclude_none=True))


Record = TypeVar("Record", bound=BaseModel)


def read_record(model: type[Record], path: Path, what: str) -> Record:
    """A JSON file of the run folder as its model; errors say which file and which field."""
    try:
        raw = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise ShoalError(f"{path} is not valid JSON: line {exc.lineno}: {exc.msg}") from None
    except (UnicodeDecodeError, RecursionError) as exc:
        why = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else "nested too deeply"
        raise ShoalError(f"{path} is not valid JSON ({why})") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        raise ShoalError(f"{path} is not a valid {what}: {where}: {first['msg']}") from None


def read_run(run_dir: Path) -> RunRecord:
    return read_record(RunRecord, run_dir / RUN_FILE, "run record")


def study_storage(run_dir: Path, record: RunRecord) -> str | None:
    """Where a one-space run's study is: the folder's own journal where the folder is now (run.json keeps where it
    was written, and the folder may have been moved since), else the storage the user named."""
    return default_storage(run_dir) if record.default_storage else record.storage


def read_summary(run_dir: Path) -> Summary:
    return read_record(Summary, run_dir / SUMMARY_FILE, "run summary")


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` through a temporary file, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def write_summary(run_dir: Path, summary: Summary) -> None:
    """summary.json; fields the search leaves unset (the other space's, `stages`) are left out."""
    write_json(run_dir / SUMMARY_FILE, summary.model_dump(mode="json", exclude_unset=True))


def earlier_run(spec: SearchSpec, run_dir: Path) -> RunRecord | None:
    """run_dir's run.json (None if new); refused if another search made it and stored a trial there. One that
    stored none (it failed or was stopped before its first trial) is returned, for `open_run` to take over."""
    record = read_run(run_dir) if (run_dir / RUN_FILE).is_file() else None
    if record is not None and record.search_hash != spec.search_hash() and _holds_trials(run_dir, record):
        raise ShoalError(f"{run_dir} holds a run of a different search; use a new RUN_DIR (or that run's search)")
    return record


def check_tasks(spec: SearchSpec, earlier: RunRecord | None, digests: dict[str, str]) -> None:
    """Refuse to go on with a run (earlier: `earlier_run`'s) whose tasks changed since it started: a trial scored on
    another dev split, metric or setting would be ranked beside the ones stored. Runs from before digests were kept
    go on."""
    if earlier is not None and earlier.search_hash == spec.search_hash():
        _check_task_digests(earlier.task_digests, digests)


def check_parents(spec: SearchSpec, earlier: RunRecord | None, digests: dict[str, str]) -> None:
    """Refuse to go on with a run whose models (base, parents) changed since it started, as check_tasks does for its
    tasks: a local folder's files replaced, or a Hub id without a revision whose cached snapshot moved on."""
    if earlier is not None and earlier.search_hash == spec.search_hash():
        _check_model_digests(earlier.parent_digests, digests)


def _check_task_digests(recorded: dict[str, str] | None, digests: dict[str, str]) -> None:
    changed = _changed(recorded, digests)
    if changed:
        raise ShoalError(f"task {changed} has changed since this run started ({TASK_FILES}), and the run's stored "
                         "trials were scored on it as it was: restore it, or use a new RUN_DIR")


def _check_model_digests(recorded: dict[str, str] | None, digests: dict[str, str]) -> None:
    changed = _changed(recorded, digests)
    if changed:
        raise ShoalError(f"{changed} has changed since this run started ({MODEL_FILES}), and the "
                         "run's stored trials were scored with it as it was: restore it, or use a new RUN_DIR")


def _changed(recorded: dict[str, str] | None, digests: dict[str, str]) -> str | None:
    """The first name recorded (None: a run from before digests were kept) whose digest is not the one now. A name
    not recorded is not compared: it is kept from then on (an lm-eval task from before shoal kept theirs)."""
    return first_changed(recorded or {}, digests, missing_counts=True)


def check_journal(spec: SearchSpec, run_dir: Path, earlier: RunRecord | None) -> None:
    """Refuse to go on with a run of spec whose own journal is gone: a new one would score every trial again,
    silently, where the earlier sessions' trials may only have been moved."""
    journal = Path(default_storage(run_dir))
    if (earlier is not None and earlier.search_hash == spec.search_hash() and earlier.default_storage
            and earlier.sessions and not journal.exists()):
        raise ShoalError(f"{journal} is missing, but run.json records {len(earlier.sessions)} session(s) of this "
                         f"search that stored their trials there: restore it, or delete {run_dir / RUN_FILE} to start "
                         "the search again")


def finished_summary(spec: SearchSpec, run_dir: Path, digests: Callable[[], tuple[dict[str, str], dict[str, str]]]
                     ) -> Summary | None:
    """The summary of run_dir when it is a finished run of spec that ended at the budgets and selection spec gives
    (another session would only write best/ and score test again); None otherwise, or where the summary cannot be
    read. digests: the tasks' and the models' digests now, asked for only then; a task or model changed since is
    refused (check_tasks, check_parents; not a hybrid DFS stage's parent A, the PS result)."""
    if not ((run_dir / RUN_FILE).is_file() and (run_dir / SUMMARY_FILE).is_file() and (run_dir / BEST_DIR).is_dir()):
        return None
    try:
        record = read_run(run_dir)
        stages = [read_run(run_dir / s) for s in record.stages or []]
        summary = read_summary(run_dir)
    except (ShoalError, OSError):  # e.g. a hybrid's DFS stage moved aside, and its new one not started
        return None
    ended = [record] if record.sessions else stages  # a hybrid's sessions are its stages'
    if record.search_hash != spec.search_hash() or not ended or not all(r.sessions and r.sessions[-1].finished
                                                                         for r in ended):
        return None
    budget = spec.budget + (spec.dfs.budget or spec.budget) if spec.space == "hybrid" else spec.budget
    selection = (summary.selection.top, summary.selection.on) if summary.selection else None
    if (summary.budget, summary.budget_items, summary.budget_tokens, selection) != (
            budget, spec.budget_items, spec.budget_tokens, (spec.select.top, spec.select.on)):
        return None
    tasks, models = digests()
    for r in [record, *stages]:
        _check_task_digests(r.task_digests, tasks)
        _check_model_digests(r.parent_digests, models)
    return summary


def _holds_trials(run_dir: Path, record: RunRecord) -> bool:
    """Whether the run stored a trial; a study the folder does not own (a storage the user named) counts as
    holding some, as does one that cannot be read: neither is cleared by a take-over."""
    if record.stages is not None:
        return any(_holds_trials(run_dir / s, read_run(run_dir / s)) for s in record.stages
                   if (run_dir / s / RUN_FILE).is_file())
    if not record.default_storage or record.study is None:
        return True
    journal = Path(default_storage(run_dir))
    if not journal.is_file():
        return False
    try:
        storage = open_storage(str(journal))
        return bool(storage.get_all_trials(storage.get_study_id_from_name(record.study), deepcopy=False))
    except KeyError:  # no study in it yet
        return False
    except (ShoalError, ValueError):
        return True


def _take_over(run_dir: Path, earlier: RunRecord | None, spec: SearchSpec, notice: Notice) -> RunRecord | None:
    """The earlier record, or None once the folder of another search that stored no trial is cleared for this one."""
    if earlier is None or earlier.search_hash == spec.search_hash():
        return earlier
    if earlier.stages is None:
        Path(default_storage(run_dir)).unlink(missing_ok=True)  # its empty study names the other search
    notice(f"{run_dir} held another search (hash {earlier.search_hash}) that stored no trial; this search takes "
           "it over")
    return None


def own_journal(spec: SearchSpec, run_dir: Path, storage: str | None) -> bool:
    """Whether a one-space run's study is the folder's own journal: no storage named here, in the search file or
    by an earlier session. Only then does one process at a time own the study (a named storage may be shared)."""
    earlier = read_run(run_dir) if (run_dir / RUN_FILE).is_file() else None
    return named_storage(spec, earlier, storage) is None


def named_storage(spec: SearchSpec, earlier: RunRecord | None, storage: str | None) -> str | None:
    """The storage named here, else the one named before, else the search file's; None: the folder's journal."""
    return storage or (earlier.storage if earlier and not earlier.default_storage else None) or spec.storage


def study_name(earlier: RunRecord | None, study: str) -> str:
    """A one-space run's study name: the one it started with (earlier: its run.json), else `study`."""
    return earlier.study if earlier is not None and earlier.study is not None else study


def open_run(spec: SearchSpec, run_dir: Path, earlier: RunRecord | None, storage: str | None, study: str,
             notice: Notice, digests: dict[str, str] | None = None, parent_digests: dict[str, str] | None = None
             ) -> RunRecord:
    """The record of a one-space run (earlier: `earlier_run`'s), made or taken over, with a new session started. The
    caller writes it once its study has opened, so that a start refused for its storage (a bad URL, another
    search's study) leaves the folder as it was, and then at once, so that the session counts even if the process
    is killed. The folder is made here (a storage named inside it may need it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    earlier = _take_over(run_dir, earlier, spec, notice)
    named = named_storage(spec, earlier, storage)
    record = RunRecord(
        space=spec.space, target=target(spec), method=method(spec), search_hash=spec.search_hash(),
        storage=named or default_storage(run_dir),  # the default follows the folder if it is moved
        default_storage=named is None,
        study=study_name(earlier, study),
        search=spec.model_dump(),
        task_digests=digests,
        parent_digests=parent_digests,
        hub_commits=spec.hub_commits or None,
        sessions=(earlier.sessions if earlier else []) + [Session(seconds=0.0, finished=False)],
    )
    return record


def open_hybrid(spec: SearchSpec, run_dir: Path, stages: list[str], notice: Notice) -> RunRecord:
    """run.json of a hybrid run, made or taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    earlier = _take_over(run_dir, earlier_run(spec, run_dir), spec, notice)
    record = RunRecord(space="hybrid", target=target(spec), method=spec.method, search_hash=spec.search_hash(),
                       stages=stages, ps_best_trial=earlier.ps_best_trial if earlier else None,
                       hub_commits=spec.hub_commits or None)
    record.write(run_dir)
    return record


def open_pool(spec: SearchSpec, run_dir: Path, subsets: list[str], notice: Notice) -> RunRecord:
    """run.json of a pool's tournament, made or taken over (keeping the rounds recorded so far), with a new session
    started."""
    run_dir.mkdir(parents=True, exist_ok=True)
    earlier = _take_over(run_dir, earlier_run(spec, run_dir), spec, notice)
    record = RunRecord(space="ps", target=target(spec), method=spec.method, search_hash=spec.search_hash(),
                       search=spec.model_dump(), stages=subsets, hub_commits=spec.hub_commits or None,
                       sessions=(earlier.sessions if earlier else []) + [Session(seconds=0.0, finished=False)],
                       rounds=earlier.rounds if earlier and earlier.rounds and
                       earlier.select == spec.select.model_dump() else [],
                       select=spec.select.model_dump())
    record.write(run_dir)
    return record


def pin_ps_trial(record: RunRecord, run_dir: Path, trial: int, dfs_hash: str, notice: Notice) -> None:
    """Note in a hybrid's run.json which PS trial is parent A of the DFS stage (whose search is dfs_hash). A DFS
    stage folder holding trials scored over another PS result (a raised budget found a new PS best) is moved aside,
    saying so, for a new DFS stage; refused where its study lives in a storage the user named (the new stage's
    would be the same study)."""
    stage = run_dir / "dfs"
    earlier = read_run(stage) if (stage / RUN_FILE).is_file() else None
    if earlier is not None and earlier.search_hash != dfs_hash and _holds_trials(stage, earlier):
        over = f"#{record.ps_best_trial}" if record.ps_best_trial is not None else "an earlier PS result"
        if not earlier.default_storage:
            raise ShoalError(f"the PS stage's best trial is now #{trial}, but the stored DFS trials were scored over "
                             f"{over}, in the storage you named ({earlier.storage}); use a new RUN_DIR and storage to "
                             "search DFS over the new one")
        aside = next(folder for n in range(1, 1000) if not (folder := run_dir / (
            f"dfs-over-ps-{record.ps_best_trial}" + (f"-{n}" if n > 1 else ""))).exists())
        stage.rename(aside)
        notice(f"the PS stage's best trial is now #{trial}, and the DFS trials stored were scored over {over}: they "
               f"are moved to {aside}, and the DFS stage starts again over #{trial}")
    record.ps_best_trial = trial
    record.write(run_dir)


def note_session(run_dir: Path, record: RunRecord, seconds: float, *, finished: bool) -> float:
    """Note the time of this session (the last one in run.json) so far; return the run's wall time. Called as each
    trial is stored, a killed session keeps the time up to its last stored trial."""
    record.sessions[-1] = Session(seconds=seconds, finished=finished)
    record.write(run_dir)
    return sum(s.seconds for s in record.sessions)


def method(spec: SearchSpec) -> str:
    """What builds a candidate: the merge method (PS), or the layer path (DFS: no merge method is used)."""
    return spec.method if spec.space != "dfs" else f"layer path ({spec.dfs.scaling} scaling)"


def target(spec: SearchSpec) -> str:
    return spec.tasks[0].name
