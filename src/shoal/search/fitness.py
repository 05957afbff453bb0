"""Fitness of a candidate: build it into a live model of its search space, score the dev splits, weight the scores."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shoal.errors import ShoalError
from shoal.evaluate.lm_eval_task import LmEvalTask
from shoal.evaluate.runner import Generator, evaluate
from shoal.evaluate.task import GENERATION_METRICS, Task, load_task
from shoal.search.loop import Candidate, Evaluation
from shoal.search.spaces import Space
from shoal.search.spec import SearchSpec

if TYPE_CHECKING:
    from shoal.evaluate.vllm_engine import VllmEngine


@dataclass
class WeightedTask:
    task: Task | LmEvalTask
    weight: float


def load_tasks(spec: SearchSpec) -> list[WeightedTask]:
    """The search's tasks; shoal tasks are checked for both splits now, not after the search."""
    tasks = []
    for t in spec.tasks:
        if t.lm_eval is not None:
            ref = t.lm_eval
            tasks.append(WeightedTask(LmEvalTask(ref.task, ref.include, ref.metric, dict(ref.splits)), t.weight))
        else:
            task = load_task(str(t.path))
            task.items("dev"), task.items("test")
            tasks.append(WeightedTask(task, t.weight))
    return tasks


def score(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task | LmEvalTask, split: str,
          batch_size: int, generator: Generator | None = None) -> float:
    if isinstance(task, LmEvalTask):
        return task.score(model, tokenizer, split, batch_size)
    return evaluate(model, task, split, tokenizer=tokenizer, batch_size=batch_size, generator=generator).score


def scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: list[WeightedTask], split: str, batch_size: int,
    generator: Generator | None = None,
) -> dict[str, float]:
    return {t.task.name: score(model, tokenizer, t.task, split, batch_size, generator) for t in tasks}


def weighted(tasks: list[WeightedTask], by_task: dict[str, float]) -> float:
    return sum(t.weight * by_task[t.task.name] for t in tasks)


@dataclass
class _Pending:
    candidate: Candidate
    slot: int
    merged: Future[float]


class DevFitness:
    """The search's objective: gene values and a seed -> the candidate's weighted dev score (an Evaluation).

    With a two-slot space, the next candidate is built in a background thread into the other model while this
    one is scored, so a trial waits for its merge only when it was not known in advance (a generation's first).
    With a vLLM engine, the built model's weights are loaded into it (counted as waiting for the merge) and it
    generates the outputs of generation tasks.
    """

    def __init__(self, space: Space, tasks: list[WeightedTask], batch_size: int,
                 engine: VllmEngine | None = None) -> None:
        self.space = space
        self.tasks = tasks
        self.batch_size = batch_size
        self.engine = engine
        threads = torch.get_num_threads()  # torch's thread count is per thread: the merging thread gets this one's
        self._pool = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(threads,)) \
            if space.slots > 1 else None
        self._pending: _Pending | None = None
        self._models: dict[int, PreTrainedModel] = {}

    def _merge(self, candidate: Candidate, slot: int) -> float:
        start = time.perf_counter()
        self._models[slot] = self.space.build(*candidate, slot)
        return time.perf_counter() - start

    def __call__(self, values: dict[str, float], seed: int, upcoming: Candidate | None = None) -> Evaluation:
        start = time.perf_counter()
        pending, self._pending = self._pending, None
        if pending is not None and pending.candidate == (values, seed):
            slot, compute = pending.slot, pending.merged.result()  # a failed merge raises here, for its own trial
        else:
            if pending is not None:
                wait([pending.merged])  # never two merges into one slot at once
            slot, compute = 0, self._merge((values, seed), 0)
        if self.engine is not None:
            self.engine.load(self._models[slot])
        waited = time.perf_counter() - start
        if upcoming is not None and self._pool is not None:
            other = 1 - slot
            self._pending = _Pending(upcoming, other, self._pool.submit(self._merge, upcoming, other))
        scored = time.perf_counter()
        by_task = scores(self._models[slot], self.space.tokenizer, self.tasks, "dev", self.batch_size, self.engine)
        return Evaluation(
            weighted(self.tasks, by_task), by_task, waited, time.perf_counter() - scored, merge_compute_seconds=compute
        )


def search_fitness(spec: SearchSpec, space: Space, tasks: list[WeightedTask]) -> DevFitness:
    """The search's DevFitness, with the engine the search names."""
    engine = None
    if spec.engine == "vllm":
        from shoal.evaluate.vllm_engine import VllmEngine
        from shoal.search.spaces import ParameterSpace

        assert isinstance(space, ParameterSpace)  # the search file refuses engine: vllm elsewhere
        if not any(isinstance(t.task, Task) and t.task.metric in GENERATION_METRICS for t in tasks):
            raise ShoalError("engine: vllm generates the outputs of generation tasks, and this search has none "
                             "(log-likelihood and lm-eval tasks are scored with transformers)")
        engine = VllmEngine(spec.base, dtype=space.merger.model.dtype, seed=spec.seed, **spec.vllm)
    return DevFitness(space, tasks, spec.batch_size, engine)
