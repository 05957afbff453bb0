"""The end of a search: the picked trial's model (search.select) scored on the test split beside the base, the
parents, merges made without a search, and the search's start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.checkpoint.reader import open_checkpoint
from shoal.evaluate.runner import load_model
from shoal.merge.resident import ResidentMerger
from shoal.recipe import Recipe
from shoal.search.fitness import WeightedTask, scores, weighted
from shoal.search.spaces import Space
from shoal.search.spec import SearchSpec


@dataclass
class FinalScores:
    best: dict[str, float]
    """The best model's score on each task."""
    parents: dict[str, float]
    """Weighted test score of the base and each parent."""
    untuned: dict[str, float]
    """Weighted test score of each untuned merge and of the search's start."""


def untuned_recipes(spec: SearchSpec) -> dict[str, dict[str, Any]]:
    """Merges a user would try without a search: each method with its common default settings."""
    models = lambda params: [{"model": p, "parameters": dict(params)} for p in spec.parents.values()]
    equal = 1 / len(spec.parents)
    recipes: dict[str, dict[str, Any]] = {
        "linear": {"merge_method": "linear", "models": models({"weight": equal})},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": spec.base,
                            "models": models({"weight": 1.0})},
        "ties": {"merge_method": "ties", "base_model": spec.base, "models": models({"weight": 1.0, "density": 0.5})},
        "dare_ties": {"merge_method": "dare_ties", "base_model": spec.base,
                      "models": models({"weight": 1.0, "density": 0.5}),
                      "seed": spec.seed},
    }
    for recipe in recipes.values():
        if spec.dtype:
            recipe["dtype"] = spec.dtype
    return recipes


def score_on_test(spec: SearchSpec, space: Space, tasks: list[WeightedTask], best_dir: Path) -> FinalScores:
    """Score the model in best_dir, the base and parents, the untuned merges and the search's start on test."""
    split, batch = "test", spec.batch_size
    model, tokenizer = load_model(best_dir, spec.device)
    best = scores(model, tokenizer, tasks, split, batch)
    parents: dict[str, float] = {}
    for name, path in {"base": spec.base, **spec.parents}.items():
        model, tokenizer = load_model(open_checkpoint(path).path, spec.device)
        parents[name] = weighted(tasks, scores(model, tokenizer, tasks, split, batch))
    del model
    untuned: dict[str, float] = {}
    for name, raw in untuned_recipes(spec).items():
        merger = ResidentMerger(Recipe.model_validate(raw), spec.device)
        merger.apply(Recipe.model_validate(raw))
        untuned[name] = weighted(tasks, scores(merger.model, merger.tokenizer, tasks, split, batch))
    start = space.build(space.genome.values(space.genome.start()), spec.seed)
    untuned["start"] = weighted(tasks, scores(start, space.tokenizer, tasks, split, batch))
    return FinalScores(best, parents, untuned)
