"""The `race` fitness mode: a CMA-ES generation's candidates scored together in rounds (search/race.py decides who
stops), as an Evaluator of the trial loop.

Each task's dev items are scored in one order per generation, drawn from the search's seed and the generation's
index, so a generation raced again (after a kill) scores the same items in the same order and tells the same
values. A candidate's model is built again for each round it runs (the merge is cheap beside the scoring; keeping
a generation's models resident would not fit at real sizes).
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Iterator

from transformers import PreTrainedModel

from shoal.errors import ShoalError
from shoal.evaluate.lm_eval_task import LmEvalTask
from shoal.evaluate.runner import evaluate
from shoal.evaluate.task import Task
from shoal.search.fitness import WeightedTask
from shoal.search.race import race
from shoal.search.spaces import Space
from shoal.search.trials import Evaluation, Job, Outcome

DEFAULT_FIRST = 16
DEFAULT_DELTA = 0.05
BOUNDED_METRICS = ("exact_match", "rouge_l", "token_f1", "multiple_choice")
"""Metrics whose item scores lie in [0, 1], which the race's bound needs."""


def check_raceable(tasks: list[WeightedTask]) -> None:
    """Refuse tasks the race cannot bound: lm-eval tasks (scored by lm-eval on a whole split) and metrics whose
    item scores are not in [0, 1] (log-likelihoods)."""
    for t in tasks:
        if isinstance(t.task, LmEvalTask):
            raise ShoalError(f"fitness: race scores shoal task folders item by item; lm-eval task {t.task.name} is "
                             "scored by lm-eval on its whole split (use fitness mode full)")
        if t.task.metric not in BOUNDED_METRICS:
            raise ShoalError(f"fitness: race needs item scores in [0, 1] and task {t.task.name}'s metric "
                             f"{t.task.metric} has none (use {', '.join(BOUNDED_METRICS)}, or fitness mode full)")


def item_order(task: Task, seed: int, generation: int) -> list[int]:
    """The order in which `generation` scores the task's dev items."""
    order = list(range(len(task.items("dev"))))
    random.Random(zlib.crc32(f"{seed}/race/{generation}/{task.name}".encode())).shuffle(order)
    return order


class RaceEvaluator:
    """Scores a whole generation at once by racing it; each job's Evaluation tells CMA-ES the candidate's fitness
    on every dev item, or, for one that stopped early, its upper bound (see search/race.py for why the selected
    set and its order are those of a full evaluation)."""

    width = 1
    whole_generation = True

    def __init__(self, space: Space, tasks: list[WeightedTask], batch_size: int, mu: int, seed: int, *,
                 first: int = DEFAULT_FIRST, delta: float = DEFAULT_DELTA) -> None:
        check_raceable(tasks)
        self.space, self.tasks, self.batch_size = space, tasks, batch_size
        self.mu, self.seed, self.first, self.delta = mu, seed, first, delta

    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, Outcome]]:
        outcomes: dict[int, Outcome] = {}
        models: dict[int, PreTrainedModel] = {}
        merge_seconds = {job.index: 0.0 for job in jobs}
        eval_seconds = {job.index: 0.0 for job in jobs}
        tokens = {job.index: 0 for job in jobs}
        racing = []
        for job in jobs:  # a candidate that cannot be built (NaN weights) fails before the race, alone
            try:
                self.space.build(job.values, job.seed)
                racing.append(job)
            except ShoalError as exc:
                outcomes[job.index] = str(exc)
        if racing:
            generation = racing[0].generation
            tasks = [t.task for t in self.tasks]
            assert all(isinstance(t, Task) for t in tasks)  # check_raceable
            orders = [item_order(t, self.seed, generation) for t in tasks]  # type: ignore[arg-type]
            built: int | None = None

            def score(c: int, t: int, start: int, stop: int) -> list[float]:
                nonlocal built
                job, task = racing[c], tasks[t]
                assert isinstance(task, Task)
                if built != c:  # each candidate is built once per round, before its first task
                    began = time.perf_counter()
                    models[0] = self.space.build(job.values, job.seed)
                    merge_seconds[job.index] += time.perf_counter() - began
                    built = c
                dev = task.items("dev")
                part = Task(task.spec, task.folder, task.splits | {"dev": [dev[i] for i in orders[t][start:stop]]})
                began = time.perf_counter()
                result = evaluate(models[0], part, "dev", tokenizer=self.space.tokenizer, batch_size=self.batch_size)
                eval_seconds[job.index] += time.perf_counter() - began
                tokens[job.index] += result.tokens
                return result.item_scores

            entrants = race(len(racing), [len(t.items("dev")) for t in tasks],  # type: ignore[union-attr]
                            [t.weight for t in self.tasks], min(self.mu, len(racing)), score,
                            first=self.first, delta=self.delta)
            for job, entrant in zip(racing, entrants):
                by_task = {t.name: sum(s) / len(s) for t, s in zip(tasks, entrant.scores)}
                outcomes[job.index] = Evaluation(
                    entrant.told, by_task, merge_seconds[job.index], eval_seconds[job.index],
                    merge_compute_seconds=merge_seconds[job.index], items=entrant.items, tokens=tokens[job.index])
        for job in jobs:
            yield job, outcomes[job.index]

    def close(self) -> None:
        pass
