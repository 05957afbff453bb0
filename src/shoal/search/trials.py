"""A run's trials in its Optuna study: the one record of a trial, which the search writes and the search, shared
studies and the report read.

A trial is numbered by its index in the search (the order CMA-ES asked for it), not by Optuna's trial number:
parallel workers and shared studies store trials out of order, and a claim abandoned by a dead process (marked
`abandoned`) is no trial at all: another process scores that index again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from shoal.checkpoint.digest import MODEL_FILES, first_changed
from shoal.errors import ShoalError
from shoal.search.storage import existing_storage, open_storage

STUDY_NAME = "shoal"
HUB_COMMITS = "hub_commits"
"""A study's user attr: the commits its Hub ids are read at (open_study)."""
TASK_DIGESTS = "task_digests"
"""A study's user attr: its tasks' portable digests, by name (open_study)."""
MODEL_DIGESTS = "model_digests"
"""A study's user attr: the portable digests of its models' local folders, by key in the search file (open_study)."""
TASK_FILES = "its task.yaml, a split or a picture it names; an lm-eval task's files under include, or lm-eval's version"
"""What a task's digest covers, for a message."""


@dataclass(frozen=True)
class Job:
    """One candidate to score: its index in the search, its generation, gene values and the seed it is merged
    under (the search's, loop.run_trials)."""

    index: int
    generation: int
    values: dict[str, float]
    seed: int


@dataclass
class Evaluation:
    """A candidate's fitness (the weighted sum of its dev scores) and what it cost."""

    fitness: float
    scores: dict[str, float]
    merge_seconds: float
    """Time the trial waited for its merge (less than merge_compute_seconds when it was merged ahead)."""
    eval_seconds: float
    merge_compute_seconds: float = 0.0
    items: int = 0
    """Dev items scored (over all tasks)."""
    tokens: int = 0
    """Tokens generated while scoring them."""


Outcome = Evaluation | str
"""An Evaluation, or the one-line reason the trial failed."""


@dataclass(frozen=True)
class Trial:
    """A finished trial as the study stores it: `value` is the dev fitness, None when the trial failed (`error`)."""

    index: int
    generation: int
    seed: int
    params: dict[str, float]
    value: float | None
    dev_scores: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    merge_seconds: float = 0.0
    merge_compute_seconds: float = 0.0
    eval_seconds: float = 0.0
    items: int = 0
    """Dev items scored (0 for a failed trial)."""
    tokens: int = 0
    """Tokens generated while scoring them."""

    @property
    def failed(self) -> bool:
        return self.value is None

    @classmethod
    def of(cls, job: Job, outcome: Outcome) -> Trial:
        if isinstance(outcome, str):
            return cls(job.index, job.generation, job.seed, job.values, None, error=outcome)
        return cls(job.index, job.generation, job.seed, job.values, outcome.fitness, outcome.scores,
                   merge_seconds=outcome.merge_seconds, merge_compute_seconds=outcome.merge_compute_seconds,
                   eval_seconds=outcome.eval_seconds, items=outcome.items, tokens=outcome.tokens)

    @classmethod
    def read(cls, stored: FrozenTrial) -> Trial:
        attrs = stored.user_attrs
        return cls(
            index=attrs["index"], generation=attrs["generation"], seed=attrs["seed"], params=stored.params,
            value=stored.value if stored.state == TrialState.COMPLETE else None,
            dev_scores=attrs.get("dev_scores", {}), error=attrs.get("error"),
            merge_seconds=attrs.get("merge_seconds", 0.0),
            merge_compute_seconds=attrs.get("merge_compute_seconds", 0.0),
            eval_seconds=attrs.get("eval_seconds", 0.0),
            items=attrs.get("items", 0), tokens=attrs.get("tokens", 0),
        )

    @property
    def state(self) -> TrialState:
        return TrialState.FAIL if self.failed else TrialState.COMPLETE

    def attrs(self) -> dict[str, object]:
        """What the study stores as the trial's user attributes, besides its job's (`job_attrs`)."""
        if self.failed:
            return {"error": self.error, "dev_scores": {}}
        return {"dev_scores": self.dev_scores, "merge_seconds": self.merge_seconds,
                "eval_seconds": self.eval_seconds, "merge_compute_seconds": self.merge_compute_seconds,
                "items": self.items, "tokens": self.tokens}


def job_trial(job: Job, distributions: dict[str, FloatDistribution], state: TrialState, value: float | None = None,
              attrs: dict[str, object] | None = None) -> FrozenTrial:
    """The Optuna trial of a job: its genes as parameters, its index, generation and seed (and attrs) as attributes."""
    return optuna.trial.create_trial(
        state=state, value=value, params=job.values, distributions=distributions,
        user_attrs={"index": job.index, "generation": job.generation, "seed": job.seed} | (attrs or {}),
    )


def finished_trial(job: Job, outcome: Outcome, distributions: dict[str, FloatDistribution],
                   attrs: dict[str, object] | None = None) -> FrozenTrial:
    """The Optuna trial that stores a finished job (with further attrs, e.g. its owner in a shared study)."""
    trial = Trial.of(job, outcome)
    return job_trial(job, distributions, trial.state, trial.value, (attrs or {}) | trial.attrs())


ABANDONED = "abandoned"
"""The attribute that marks a claim whose process died (search.shared): no trial, its index is scored again."""


def counted(stored: FrozenTrial) -> bool:
    """Whether a stored trial is one of the search's (not an abandoned claim)."""
    return not stored.user_attrs.get(ABANDONED)


def finished_trials(stored: list[FrozenTrial]) -> dict[int, Trial]:
    """The finished trials among `stored`, by index in the search (not claims abandoned by a process that died)."""
    done = (TrialState.COMPLETE, TrialState.FAIL)
    return {t.user_attrs["index"]: Trial.read(t) for t in stored if t.state in done and counted(t)}


def stored_trials(study: optuna.Study) -> dict[int, Trial]:
    """The study's finished trials, by index in the search."""
    return finished_trials(study.get_trials(deepcopy=False))


def first_trials(study: optuna.Study, count: int) -> list[Trial]:
    """The study's finished trials in the search's order, the first `count` (those within its budget)."""
    return sorted(stored_trials(study).values(), key=lambda t: t.index)[:count]


def running_trials(study: optuna.Study) -> int:
    """Trials claimed or started and not finished yet."""
    going = (TrialState.RUNNING, TrialState.WAITING)
    return sum(t.state in going and counted(t) for t in study.get_trials(deepcopy=False))


def open_study(storage: str, search_hash: str, name: str = STUDY_NAME,
               records: Mapping[str, Mapping[str, str]] | None = None) -> optuna.Study:
    """The run's study (created if new); refuses one made by a different search, or one whose user attrs record a
    key of records (by attr: HUB_COMMITS, the run's pins; TASK_DIGESTS and MODEL_DIGESTS, portable digests) with
    another value: a Hub id read at another commit, a task or a local model with other contents. A study records
    what it is opened with, so that each process sharing it reads the same files (study_records)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _named_errors(storage):
        study = optuna.create_study(storage=open_storage(storage), study_name=name,
                                    direction="maximize", load_if_exists=True)
    stored = study.user_attrs.get("search_hash")
    if stored is None:
        study.set_user_attr("search_hash", search_hash)
    elif stored != search_hash:
        raise ShoalError(
            f"the study at {storage} was made by a different search (hash {stored}, this one {search_hash}); "
            "use a new RUN_DIR or --storage"
        )
    given = records or {}
    for attr, values in given.items():  # every check before any write: a refused process records nothing
        check_recorded(storage, attr, study.user_attrs.get(attr) or {}, values)
    for attr, values in given.items():
        recorded = study.user_attrs.get(attr) or {}
        if not values.keys() <= recorded.keys():
            study.set_user_attr(attr, recorded | dict(values))
    return study


def check_recorded(storage: str, attr: str, recorded: Mapping[str, str], values: Mapping[str, str]) -> None:
    """Refuse this process where a key of values is recorded by the study (in its user attr attr) with another
    value: a Hub id at another commit, a task or a model with other contents."""
    changed = first_changed(recorded, values, missing_counts=False)
    if changed is not None:
        raise ShoalError(_REFUSALS[attr](storage, changed, values[changed], recorded[changed]))


def _other_commit(storage: str, key: str, here: str, there: str) -> str:
    return (f"the study at {storage} reads {key} at commit {there[:12]}, and this process at {here[:12]}: the branch "
            "moved on between their first starts; start this process again and it reads the study's")


def _other_task(storage: str, key: str, here: str, there: str) -> str:
    ours, theirs = here.split()[:2], there.split()[:2]
    if ours[0] == theirs[0] == "lm_eval" and ours != theirs:  # an lm-eval task's digest starts with lm-eval's version
        return (f"task {key}: this process has lm-eval {ours[1]}, and the study at {storage} was scored with lm-eval "
                f"{theirs[1]}: install lm_eval=={theirs[1]} here")
    return (f"task {key} here is not the one the study at {storage} was scored on ({TASK_FILES}): give every process "
            "that shares the study the same files")


def _other_model(storage: str, key: str, here: str, there: str) -> str:
    return (f"{key} here is not the model the study at {storage} was scored with ({MODEL_FILES}): give every process "
            "that shares the study the same files")


_REFUSALS: dict[str, Callable[[str, str, str, str], str]] = {
    HUB_COMMITS: _other_commit, TASK_DIGESTS: _other_task, MODEL_DIGESTS: _other_model}
"""The refusal of a process whose value of a key differs from the study's, by user attr: its message from the
storage, the key, this process's value and the study's."""


def study_records(storage: str, searches: dict[str, str], attrs: Iterable[str]) -> dict[str, dict[str, str]]:
    """What the studies in storage named as keys of searches, each made by the search of that hash, record in each
    user attr of attrs (open_study: HUB_COMMITS, TASK_DIGESTS, MODEL_DIGESTS), merged, by attr: what a process
    joining them is held to. The storage is read once; nothing is created."""
    with _named_errors(storage):
        opened = existing_storage(storage)
        studies = opened.get_all_studies() if opened is not None else []
    records: dict[str, dict[str, str]] = {attr: {} for attr in attrs}
    for study in studies:
        if study.study_name in searches and study.user_attrs.get("search_hash") == searches[study.study_name]:
            for attr, merged in records.items():
                merged |= study.user_attrs.get(attr) or {}
    return records


@contextmanager
def _named_errors(storage: str) -> Iterator[None]:
    """SQLAlchemy's and the database drivers' errors, which name the storage problem, as a ShoalError (a damaged
    journal is one already, named by its line)."""
    try:
        yield
    except ShoalError:
        raise
    except Exception as exc:
        raise ShoalError(f"cannot open the study at {storage}: {exc}") from exc
