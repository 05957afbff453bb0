"""The trial loop: ask the optimizer, score each candidate, store every trial in the run's study as it finishes.

Resuming is replaying: the optimizer is rebuilt from its seed and told the stored fitnesses generation by
generation, so a run continued after a crash asks exactly what the uninterrupted run would have asked, and
the trials already stored are reused, not re-run.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import optuna
from optuna.distributions import FloatDistribution

from shoal.errors import ShoalError
from shoal.search.genome import GeneSpace
from shoal.search.optimizer import Optimizer
from shoal.search.trials import Evaluation, Job, Outcome, Trial, finished_trial, stored_trials

Candidate = tuple[dict[str, float], int]
"""Gene values and the trial's seed (for DARE's drops)."""


class Objective(Protocol):
    def __call__(self, values: dict[str, float], seed: int, upcoming: Candidate | None = None) -> Evaluation:
        """Score one candidate (a ShoalError or a crash fails the trial); `upcoming`, if given, is scored next and
        may be prepared now."""
        ...


@dataclass
class Progress:
    done: int
    budget: int
    best: float | None
    evaluated: int = 0
    """Trials scored by this run (the rest were replayed from storage)."""

    def record(self, trial: Trial, *, fresh: bool, on_trial: Callable[[Progress], None] | None) -> None:
        self.done += 1
        self.evaluated += int(fresh)
        if trial.value is not None and (self.best is None or trial.value > self.best):
            self.best = trial.value
        if on_trial:
            on_trial(self)


def trial_seed(seed: int, index: int) -> int:
    return zlib.crc32(f"{seed}/trial/{index}".encode())


def _store(study: optuna.Study, distributions: dict[str, FloatDistribution], job: Job, outcome: Outcome) -> Trial:
    study.add_trial(finished_trial(job, outcome, distributions))
    return Trial.of(job, outcome)


class Evaluator(Protocol):
    width: int
    """How many jobs it scores at once."""

    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, Outcome]]:
        """Score the jobs (of one generation), yielding each with its outcome as it finishes, in any order."""
        ...

    def close(self) -> None:
        """Let go of what it holds (worker processes, threads)."""
        ...


class SharedStudy(Protocol):
    """Trials of a study that other processes share (search.shared.SharedTrials)."""

    def finished(self) -> dict[int, Trial]: ...

    def claim(self, job: Job) -> object | None: ...

    def finish(self, claim: object, job: Job, outcome: Outcome) -> Trial: ...

    def release_abandoned(self) -> int: ...


def _run_shared(jobs: list[Job], stored: dict[int, Trial], evaluator: Evaluator, shared: SharedStudy,
                progress: Progress, on_trial: Callable[[Progress], None] | None, poll_seconds: float) -> None:
    """Score the generation's jobs that no other process has taken; wait for the ones they have."""
    while True:
        for index, trial in shared.finished().items():
            if index not in stored and any(job.index == index for job in jobs):
                stored[index] = trial
                progress.record(trial, fresh=False, on_trial=on_trial)
        pending = [job for job in jobs if job.index not in stored]
        if not pending:
            return
        claims: dict[int, object] = {}
        for job in pending:
            if len(claims) == evaluator.width:
                break
            claim = shared.claim(job)
            if claim is not None:
                claims[job.index] = claim
        if not claims:
            if not shared.release_abandoned():
                time.sleep(poll_seconds)
            continue
        for job, outcome in evaluator.run([job for job in pending if job.index in claims]):
            stored[job.index] = shared.finish(claims[job.index], job, outcome)
            progress.record(stored[job.index], fresh=True, on_trial=on_trial)


def attempt(objective: Objective, values: dict[str, float], seed: int, upcoming: Candidate | None = None) -> Outcome:
    """The objective's Evaluation, or why it failed (NaN weights, a crash in the model, a non-finite fitness)."""
    try:
        outcome = objective(values, seed, upcoming)
    except ShoalError as exc:
        return str(exc)
    except (RuntimeError, ValueError, IndexError, FloatingPointError) as exc:  # a model that crashes on this candidate
        return f"{type(exc).__name__}: {exc}"
    return outcome if math.isfinite(outcome.fitness) else f"fitness is {outcome.fitness}"


class SerialEvaluator:
    """Scores jobs one after another in this process, telling the objective which one comes next."""

    width = 1

    def __init__(self, objective: Objective) -> None:
        self.objective = objective

    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, Outcome]]:
        for k, job in enumerate(jobs):
            upcoming = (jobs[k + 1].values, jobs[k + 1].seed) if k + 1 < len(jobs) else None
            yield job, attempt(self.objective, job.values, job.seed, upcoming)

    def close(self) -> None:
        pass


def run_trials(
    study: optuna.Study,
    genome: GeneSpace,
    optimizer: Optimizer,
    evaluator: Evaluator,
    *,
    budget: int,
    seed: int,
    failure_fitness: float,
    on_trial: Callable[[Progress], None] | None = None,
    shared: SharedStudy | None = None,
    poll_seconds: float = 0.5,
) -> None:
    """Run the search until `budget` trials are stored.

    A failed trial is told to the optimizer as worse than anything scored so far: one below the lower of
    failure_fitness (the fitness's floor, e.g. 0 for accuracies) and the worst fitness of the trials up to its
    generation (so metrics without a floor, like log-likelihoods, rank failures last too). It depends only on
    stored trials, so a resumed search tells the same values.

    Each generation's candidates that are not stored yet go to the evaluator together (so parallel workers can
    share them); each is stored as it finishes, and the generation is told in index order once all are in.
    With `shared`, other processes work on the same study: each trial is claimed first, and a generation is
    told once every process's trials of it are in.
    """
    stored = stored_trials(study)
    progress = Progress(0, budget, None)
    distributions = genome.distributions()
    worst = failure_fitness
    index = 0
    while index < budget:
        generation = index // optimizer.population
        xs = [optimizer.ask() for _ in range(min(optimizer.population, budget - index))]
        jobs = [Job(index + j, generation, genome.values(x), trial_seed(seed, index + j)) for j, x in enumerate(xs)]
        for job in jobs:
            trial = stored.get(job.index)
            if trial is not None and trial.params != job.values:
                raise ShoalError(
                    f"stored trial {job.index} has other parameters than this search asks for; the run was "
                    "made with different code or settings: use a new RUN_DIR"
                )
        for job in jobs:
            if job.index in stored:
                progress.record(stored[job.index], fresh=False, on_trial=on_trial)
        todo = [job for job in jobs if job.index not in stored]
        if shared is None:
            for job, outcome in evaluator.run(todo):
                stored[job.index] = _store(study, distributions, job, outcome)
                progress.record(stored[job.index], fresh=True, on_trial=on_trial)
        else:
            _run_shared(jobs, stored, evaluator, shared, progress, on_trial, poll_seconds)
        fresh = [stored[job.index] for job in todo] if shared is None else []
        errors = {t.error for t in fresh}
        if len(fresh) == len(jobs) > 1 and all(t.failed for t in fresh) and len(errors) == 1:
            raise ShoalError(f"every trial of generation {generation} failed the same way, so the search stops: "
                             f"{errors.pop()}")
        scored = [t.value for t in (stored[job.index] for job in jobs) if t.value is not None]
        worst = min([worst, *scored])
        told = []
        for x, job in zip(xs, jobs):
            trial = stored[job.index]
            told.append((x, worst - 1.0 if trial.value is None else trial.value))
        if len(told) == optimizer.population:
            optimizer.tell(told)
        index += len(xs)
