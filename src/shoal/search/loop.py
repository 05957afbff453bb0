"""The trial loop: ask the optimizer, score each candidate, store every trial in an Optuna study as it finishes.

Resuming is replaying: the optimizer is rebuilt from its seed and told the stored fitnesses generation by
generation, so a run continued after a crash asks exactly what the uninterrupted run would have asked, and
the trials already stored are reused, not re-run.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from shoal.errors import ShoalError
from shoal.search.genome import Genome
from shoal.search.optimizer import Optimizer

STUDY_NAME = "shoal"


@dataclass
class Evaluation:
    """A candidate's fitness (the weighted sum of its dev scores) and what it cost."""

    fitness: float
    scores: dict[str, float]
    merge_seconds: float
    """Time the trial waited for its merge (less than merge_compute_seconds when it was merged ahead)."""
    eval_seconds: float
    merge_compute_seconds: float = 0.0


class TrialFailed(Exception):
    """A candidate that could not be scored (NaN weights, a crash in the model); the search goes on."""


Candidate = tuple[dict[str, float], int]
"""Gene values and the trial's seed (for DARE's drops)."""


class Objective(Protocol):
    def __call__(self, values: dict[str, float], seed: int, upcoming: Candidate | None = None) -> Evaluation:
        """Score one candidate (or raise TrialFailed); `upcoming`, if given, is scored next and may be prepared now."""
        ...


@dataclass
class Progress:
    done: int
    budget: int
    best: float | None
    last: FrozenTrial
    evaluated: int = 0
    """Trials scored by this process (the rest were replayed from storage)."""
    started: float = field(default_factory=time.perf_counter)


def trial_seed(seed: int, index: int) -> int:
    return zlib.crc32(f"{seed}/trial/{index}".encode())


def open_study(storage: str, search_hash: str, name: str = STUDY_NAME) -> optuna.Study:
    """The run's study (created if new); refuses one made by a different search."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    except Exception as exc:  # SQLAlchemy / driver errors name the storage problem
        raise ShoalError(f"cannot open the study at {storage}: {exc}") from exc
    stored = study.user_attrs.get("search_hash")
    if stored is None:
        study.set_user_attr("search_hash", search_hash)
    elif stored != search_hash:
        raise ShoalError(
            f"the study at {storage} was made by a different search (hash {stored}, this one {search_hash}); "
            "use a new RUN_DIR or --storage"
        )
    return study


def _store(study: optuna.Study, genome: Genome, index: int, generation: int, values: dict[str, float], seed: int,
           outcome: Evaluation | str) -> FrozenTrial:
    attrs: dict[str, object] = {"index": index, "generation": generation, "seed": seed}
    if isinstance(outcome, Evaluation):
        attrs |= {"dev_scores": outcome.scores, "merge_seconds": outcome.merge_seconds,
                  "eval_seconds": outcome.eval_seconds, "merge_compute_seconds": outcome.merge_compute_seconds}
        state, value = TrialState.COMPLETE, outcome.fitness
    else:
        attrs |= {"error": outcome, "dev_scores": {}}
        state, value = TrialState.FAIL, None
    trial = optuna.trial.create_trial(
        state=state,
        value=value,
        params=values,
        distributions={g.name: FloatDistribution(g.low, g.high) for g in genome.genes},
        user_attrs=attrs,
    )
    study.add_trial(trial)
    return trial


def stored_trials(study: optuna.Study) -> dict[int, FrozenTrial]:
    """Finished trials by their index in the search (trials still running when a process died are not kept)."""
    states = (TrialState.COMPLETE, TrialState.FAIL)
    return {t.user_attrs["index"]: t for t in study.get_trials(deepcopy=False, states=states)}


def run_trials(
    study: optuna.Study,
    genome: Genome,
    optimizer: Optimizer,
    objective: Objective,
    *,
    budget: int,
    seed: int,
    failure_fitness: float,
    on_trial: Callable[[Progress], None] | None = None,
) -> None:
    """Run the search until `budget` trials are stored. A failed trial is told to the optimizer as failure_fitness."""
    stored = stored_trials(study)
    progress: Progress | None = None
    best: float | None = None
    index = 0
    while index < budget:
        generation = index // optimizer.population
        xs = [optimizer.ask() for _ in range(min(optimizer.population, budget - index))]
        candidates = [(genome.values(x), trial_seed(seed, index + j)) for j, x in enumerate(xs)]
        told: list[tuple[np.ndarray, float]] = []
        for j, (x, (values, trial_seed_)) in enumerate(zip(xs, candidates)):
            trial = stored.get(index)
            fresh = trial is None
            if trial is None:
                upcoming = candidates[j + 1] if j + 1 < len(xs) and index + 1 not in stored else None
                trial = _evaluate(study, genome, objective, index, generation, values, trial_seed_, upcoming)
            elif trial.params != values:
                raise ShoalError(
                    f"stored trial {index} has other parameters than this search asks for; the run was "
                    "made with different code or settings: use a new RUN_DIR"
                )
            fitness = trial.value if trial.state == TrialState.COMPLETE else failure_fitness
            assert fitness is not None
            told.append((x, fitness))
            if trial.state == TrialState.COMPLETE and (best is None or fitness > best):
                best = fitness
            index += 1
            if progress is None:
                progress = Progress(index, budget, best, trial)
            progress.done, progress.best, progress.last = index, best, trial
            progress.evaluated += int(fresh)
            if on_trial:
                on_trial(progress)
        if len(told) == optimizer.population:
            optimizer.tell(told)


def _evaluate(study: optuna.Study, genome: Genome, objective: Objective, index: int, generation: int,
              values: dict[str, float], seed: int, upcoming: Candidate | None) -> FrozenTrial:
    try:
        outcome: Evaluation | str = objective(values, seed, upcoming)
        assert isinstance(outcome, Evaluation)
        if not math.isfinite(outcome.fitness):
            outcome = f"fitness is {outcome.fitness}"
    except (TrialFailed, ShoalError) as exc:
        outcome = str(exc)
    except (RuntimeError, ValueError, IndexError, FloatingPointError) as exc:  # a model that crashes on this candidate
        outcome = f"{type(exc).__name__}: {exc}"
    return _store(study, genome, index, generation, values, seed, outcome)
