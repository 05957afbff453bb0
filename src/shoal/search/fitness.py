"""Fitness of a candidate: build it into a live model of its search space, score the dev items its generation is
scored on, weight the scores."""

from __future__ import annotations

import random
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

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
    """The search's tasks; shoal tasks are checked for both splits now, not after the search, and for dev items that
    are test items too."""
    tasks = []
    for t in spec.tasks:
        if t.lm_eval is not None:
            ref = t.lm_eval
            tasks.append(WeightedTask(LmEvalTask(ref.task, ref.include, ref.metric, dict(ref.splits)), t.weight))
        else:
            task = load_task(str(t.path))
            refuse_test_overlap(task)
            tasks.append(WeightedTask(task, t.weight))
    names = [t.task.name for t in tasks]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        first, second = [i for i, name in enumerate(names) if name == twice][:2]
        raise ShoalError(f"tasks[{first}] and tasks[{second}] are both named {twice!r} (their own name, in task.yaml "
                         "or lm-eval); the run keeps each task's scores under it, so give each task its own name")
    return tasks


def refuse_test_overlap(task: Task) -> None:
    """Refuse a task whose dev items (what the search tunes on) ask what a test item asks: the same prompt (and
    image), so the test score would not be held out. Checks that both splits exist too."""
    asked = lambda item: (item.prompt, item.image)
    test = {asked(item) for item in task.items("test")}
    dev = task.items("dev")
    shared = [item for item in dev if asked(item) in test]
    if shared:
        raise ShoalError(
            f"task {task.name} ({task.folder}): {len(shared)} of its {len(dev)} dev items share a prompt with its test "
            f"split (e.g. {shared[0].prompt!r}), so the search would tune on test data; take them out of one split"
        )


@dataclass
class Scored:
    """A task's score on a split and what it cost: items scored, tokens generated (not counted for lm-eval tasks)."""

    score: float
    items: int = 0
    tokens: int = 0


def score(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task | LmEvalTask, split: str,
          batch_size: int, generator: Generator | None = None) -> Scored:
    if isinstance(task, LmEvalTask):
        return Scored(task.score(model, tokenizer, split, batch_size))
    result = evaluate(model, task, split, tokenizer=tokenizer, batch_size=batch_size, generator=generator)
    return Scored(result.score, result.n, result.tokens)


def scored(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: list[WeightedTask], split: str, batch_size: int,
    generator: Generator | None = None,
) -> dict[str, Scored]:
    return {t.task.name: score(model, tokenizer, t.task, split, batch_size, generator) for t in tasks}


def scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: list[WeightedTask], split: str, batch_size: int,
    generator: Generator | None = None,
) -> dict[str, float]:
    return {name: s.score for name, s in scored(model, tokenizer, tasks, split, batch_size, generator).items()}


def weighted(tasks: list[WeightedTask], by_task: dict[str, float]) -> float:
    return sum(t.weight * by_task[t.task.name] for t in tasks)


class DevItems(Protocol):
    """Which dev items the candidates of a generation are scored on: the one thing a fitness mode decides."""

    def of(self, task: Task | LmEvalTask, generation: int | None) -> Task | LmEvalTask:
        """The task as `generation` scores it (its dev split possibly cut down); None: the whole dev split."""
        ...


class AllItems:
    """`full`: every candidate on every dev item."""

    def of(self, task: Task | LmEvalTask, generation: int | None) -> Task | LmEvalTask:
        return task


class GenerationSubset:
    """`subset`: n dev items per task drawn for each generation from the search's seed and the generation's index,
    the same for all its candidates (common random numbers) and the same again when a run is resumed."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._drawn: dict[tuple[str, int], Task] = {}

    def indices(self, task: Task, generation: int) -> list[int]:
        """The dev items (by position) `generation` scores `task` on, in order."""
        size = len(task.items("dev"))
        if size <= self.n:
            return list(range(size))
        rng = random.Random(zlib.crc32(f"{self.seed}/subset/{generation}/{task.name}".encode()))
        return sorted(rng.sample(range(size), self.n))

    def of(self, task: Task | LmEvalTask, generation: int | None) -> Task | LmEvalTask:
        if generation is None or isinstance(task, LmEvalTask):  # search_fitness refuses lm-eval tasks here
            return task
        key = (task.name, generation)
        if key not in self._drawn:
            self._drawn = {k: v for k, v in self._drawn.items() if k[1] >= generation - 1}  # the ones still asked for
            dev = task.items("dev")
            self._drawn[key] = Task(task.spec, task.folder,
                                    task.splits | {"dev": [dev[i] for i in self.indices(task, generation)]})
        return self._drawn[key]


def dev_items(spec: SearchSpec) -> DevItems:
    """The search file's fitness mode."""
    if spec.fitness.mode == "subset":
        assert spec.fitness.items is not None  # the search file requires it
        return GenerationSubset(spec.fitness.items, spec.seed)
    return AllItems()


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
                 engine: VllmEngine | None = None, items: DevItems | None = None) -> None:
        self.space = space
        self.tasks = tasks
        self.batch_size = batch_size
        self.engine = engine
        self.items = items or AllItems()
        threads = torch.get_num_threads()  # torch's thread count is per thread: the merging thread gets this one's
        self._pool = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(threads,)) \
            if space.slots > 1 else None
        self._pending: _Pending | None = None
        self._models: dict[int, PreTrainedModel] = {}

    def _merge(self, candidate: Candidate, slot: int) -> float:
        start = time.perf_counter()
        self._models[slot] = self.space.build(*candidate, slot)
        return time.perf_counter() - start

    def __call__(self, values: dict[str, float], seed: int, upcoming: Candidate | None = None,
                 generation: int | None = None) -> Evaluation:
        """The candidate's Evaluation on the dev items of its generation (None: the whole dev split)."""
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
        scored_at = time.perf_counter()
        tasks = [WeightedTask(self.items.of(t.task, generation), t.weight) for t in self.tasks]
        found = scored(self._models[slot], self.space.tokenizer, tasks, "dev", self.batch_size, self.engine)
        by_task = {name: s.score for name, s in found.items()}
        return Evaluation(
            weighted(self.tasks, by_task), by_task, waited, time.perf_counter() - scored_at,
            merge_compute_seconds=compute, items=sum(s.items for s in found.values()),
            tokens=sum(s.tokens for s in found.values()),
        )


def search_fitness(spec: SearchSpec, space: Space, tasks: list[WeightedTask]) -> DevFitness:
    """The search's DevFitness, with the engine and the fitness mode the search names."""
    lm_eval = next((t.task.name for t in tasks if isinstance(t.task, LmEvalTask)), None)
    if spec.fitness.mode != "full" and lm_eval is not None:
        raise ShoalError(f"fitness: {spec.fitness.mode} scores shoal task folders item by item; lm-eval task {lm_eval} "
                         "is scored by lm-eval on its whole split (use fitness mode full)")
    engine = None
    if spec.engine == "vllm":
        from shoal.evaluate.vllm_engine import VllmEngine
        from shoal.search.spaces import ParameterSpace

        assert isinstance(space, ParameterSpace)  # the search file refuses engine: vllm elsewhere
        if not any(isinstance(t.task, Task) and t.task.metric in GENERATION_METRICS for t in tasks):
            raise ShoalError("engine: vllm generates the outputs of generation tasks, and this search has none "
                             "(log-likelihood and lm-eval tasks are scored with transformers)")
        engine = VllmEngine(spec.base, dtype=space.merger.model.dtype, seed=spec.seed, **spec.vllm)
    return DevFitness(space, tasks, spec.batch_size, engine, dev_items(spec))
