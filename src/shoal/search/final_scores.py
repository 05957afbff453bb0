"""The end of a search: the picked trial's model (search.select) scored on the test split beside the base, the
parents, merges made without a search, and the search's start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.checkpoint.reader import open_checkpoint
from shoal.evaluate.runner import is_vision_language, load_model
from shoal.merge.memory import MemoryPlan
from shoal.merge.resident import ResidentMerger
from shoal.recipe import Recipe
from shoal.search.fitness import WeightedTask, scores, weighted
from shoal.search.spaces import Space
from shoal.search.spec import SearchSpec
from shoal.search.summary import START


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
        if spec.tokenizer_ref:
            recipe["tokenizer_source"] = spec.tokenizer_ref
    return recipes


def shell_recipe(spec: SearchSpec, model: str) -> dict[str, Any] | None:
    """How a text-only model (the base or a parent) is scored in a search with a vision-language parent: its
    language model inside that VLM's vision tower and projector (a linear merge, weight 1 on the model and 0 on the
    VLM), the model a recipe that gives the VLM no say would build. None when the model is a VLM or no parent is."""
    vlm = next((path for path in spec.parents.values() if is_vision_language(open_checkpoint(path).path)), None)
    if vlm is None or is_vision_language(open_checkpoint(model).path):
        return None
    recipe = {"merge_method": "linear",
              "models": [{"model": model, "parameters": {"weight": 1.0}}, {"model": vlm, "parameters": {"weight": 0.0}}]}
    return recipe | ({"dtype": spec.dtype} if spec.dtype else {})


def score_on_test(spec: SearchSpec, space: Space, tasks: list[WeightedTask], best_dir: Path) -> FinalScores:
    """Score the model in best_dir, the base and parents, the untuned merges and the search's start on test."""
    split, batch = "test", spec.batch_size
    model, tokenizer = load_model(best_dir, spec.device)
    best = scores(model, tokenizer, tasks, split, batch)
    parents: dict[str, float] = {}
    del model
    for name, path in {"base": spec.base, **spec.parents}.items():
        shell = shell_recipe(spec, path)
        if shell is None:
            model, tokenizer = load_model(open_checkpoint(path).path, spec.device)
            parents[name] = weighted(tasks, scores(model, tokenizer, tasks, split, batch))
            del model
        else:
            parents[name] = _merged_score(shell, spec, tasks)
    untuned = {name: _merged_score(raw, spec, tasks) for name, raw in untuned_recipes(spec).items()}
    start = space.build(space.genome.values(space.genome.start()), spec.seed)
    untuned[START] = weighted(tasks, scores(start, space.tokenizer, tasks, split, batch))
    return FinalScores(best, parents, untuned)


def _merged_score(raw: dict[str, Any], spec: SearchSpec, tasks: list[WeightedTask]) -> float:
    recipe = Recipe.model_validate(raw)
    # merged once, beside the search's own resident merger: nothing is worth keeping, so its inputs are streamed
    merger = ResidentMerger(recipe, spec.device, memory=MemoryPlan(inputs="stream", limit=spec.memory.limit))
    merger.apply(recipe)
    return weighted(tasks, scores(merger.model, merger.tokenizer, tasks, "test", spec.batch_size))
