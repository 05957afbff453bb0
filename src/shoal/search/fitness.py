"""Fitness of a candidate: merge it into the resident model, score it on the tasks' dev splits, weight the scores."""

from __future__ import annotations

import time
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shoal.evaluate.runner import evaluate
from shoal.evaluate.task import Task
from shoal.merge.resident import ResidentMerger
from shoal.recipe import Recipe
from shoal.search.genome import Genome
from shoal.search.loop import Evaluation


@dataclass
class WeightedTask:
    task: Task
    weight: float


def scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: list[WeightedTask], split: str, batch_size: int
) -> dict[str, float]:
    return {t.task.name: evaluate(model, t.task, split, tokenizer=tokenizer, batch_size=batch_size).score for t in tasks}


def weighted(tasks: list[WeightedTask], by_task: dict[str, float]) -> float:
    return sum(t.weight * by_task[t.task.name] for t in tasks)


class DevFitness:
    """The search's objective: gene values and a seed -> the candidate's weighted dev score (an Evaluation)."""

    def __init__(self, merger: ResidentMerger, genome: Genome, tasks: list[WeightedTask], batch_size: int) -> None:
        self.merger = merger
        self.genome = genome
        self.tasks = tasks
        self.batch_size = batch_size

    def __call__(self, values: dict[str, float], seed: int) -> Evaluation:
        start = time.perf_counter()
        self.merger.apply(Recipe.model_validate(self.genome.recipe(values, seed)))
        merged = time.perf_counter()
        by_task = scores(self.merger.model, self.merger.tokenizer, self.tasks, "dev", self.batch_size)
        return Evaluation(weighted(self.tasks, by_task), by_task, merged - start, time.perf_counter() - merged)
