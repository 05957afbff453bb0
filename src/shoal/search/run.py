"""`shoal evolve`: a search file and a run folder -> stored trials, the best model merged to disk, and summary.json."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.trial import TrialState

from shoal import layout
from shoal.checkpoint.reader import open_checkpoint
from shoal.errors import ShoalError
from shoal.evaluate.runner import load_model
from shoal.evaluate.task import load_task
from shoal.merge.engine import run_merge
from shoal.merge.resident import ResidentMerger
from shoal.recipe import Recipe
from shoal.search.fitness import DevFitness, WeightedTask, scores, weighted
from shoal.search.genome import Genome
from shoal.search.loop import STUDY_NAME, Progress, open_study, run_trials, stored_trials
from shoal.search.optimizer import CmaEs
from shoal.search.spec import SearchSpec

RUN_FILE, SUMMARY_FILE, BEST_DIR = "run.json", "summary.json", "best"


@dataclass
class Stage:
    """What the run is doing, for a progress display: 'trials' (with a Progress) or a final step's name."""

    name: str
    progress: Progress | None = None


def default_storage(run_dir: Path) -> str:
    return f"sqlite:///{run_dir.resolve() / 'study.db'}"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _genome(spec: SearchSpec) -> Genome:
    base = open_checkpoint(spec.base)
    if base.num_layers is None:
        raise ShoalError(f"{spec.base}: config.json does not say how many layers the model has")
    outer = [name for name in base.names if layout.part(name) != "layer"]
    return Genome(spec, base.num_layers, outer)


def _open_run(spec: SearchSpec, run_dir: Path, storage: str | None) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record and record.get("search_hash") != spec.search_hash():
        raise ShoalError(f"{run_dir} holds a run of a different search; use a new RUN_DIR (or the search it was made with)")
    record |= {
        "storage": storage or record.get("storage") or spec.storage or default_storage(run_dir),
        "study": STUDY_NAME,
        "search_hash": spec.search_hash(),
        "target": spec.tasks[0].path.rstrip("/").split("/")[-1],
        "method": spec.method,
        "search": spec.model_dump(),
    }
    record.setdefault("sessions", [])
    _write_json(path, record)
    return record


def untuned_recipes(spec: SearchSpec, genome: Genome) -> dict[str, dict[str, Any]]:
    """Merges a user would try without a search: each method with common default settings, and the search's start."""
    models = lambda params: [{"model": p, "parameters": dict(params)} for p in spec.parents.values()]
    equal = 1 / len(spec.parents)
    recipes: dict[str, dict[str, Any]] = {
        "linear": {"merge_method": "linear", "models": models({"weight": equal})},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": spec.base, "models": models({"weight": 1.0})},
        "ties": {"merge_method": "ties", "base_model": spec.base, "models": models({"weight": 1.0, "density": 0.5})},
        "dare_ties": {"merge_method": "dare_ties", "base_model": spec.base, "models": models({"weight": 1.0, "density": 0.5}),
                      "seed": spec.seed},
    }
    recipes["start"] = genome.recipe(genome.values([0.5] * len(genome)), spec.seed)
    for recipe in recipes.values():
        if spec.dtype:
            recipe["dtype"] = spec.dtype
    return recipes


def evolve(
    spec: SearchSpec,
    run_dir: str | Path,
    *,
    storage: str | None = None,
    on_stage: Callable[[Stage], None] | None = None,
) -> dict[str, Any]:
    """Run (or continue) the search of `spec` in run_dir; return the summary also written to run_dir/summary.json."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    record = _open_run(spec, run_dir, storage)
    stage = on_stage or (lambda s: None)
    tasks = [WeightedTask(load_task(t.path), t.weight) for t in spec.tasks]
    for t in tasks:
        t.task.items("dev"), t.task.items("test")  # a task without both splits fails now, not after the search
    genome = _genome(spec)
    stage(Stage("loading parents"))
    middle = Recipe.model_validate(genome.recipe(genome.values([0.5] * len(genome)), spec.seed))
    merger = ResidentMerger(middle, spec.device, slots=2 if spec.overlap else 1)
    study = open_study(record["storage"], spec.search_hash())
    optimizer = CmaEs(len(genome), sigma=spec.sigma, population=spec.population, seed=spec.seed)
    try:
        run_trials(
            study,
            genome,
            optimizer,
            DevFitness(merger, genome, tasks, spec.batch_size),
            budget=spec.budget,
            seed=spec.seed,
            failure_fitness=sum(min(t.weight, 0.0) for t in tasks),
            on_trial=lambda p: stage(Stage("trials", p)),
        )
    finally:
        record["sessions"].append({"seconds": time.perf_counter() - start, "finished": False})
        _write_json(run_dir / RUN_FILE, record)
    summary = _finish(spec, run_dir, study, genome, tasks, merger, stage)
    record["sessions"][-1] = {"seconds": time.perf_counter() - start, "finished": True}
    _write_json(run_dir / RUN_FILE, record)
    summary["wall_seconds"] = sum(s["seconds"] for s in record["sessions"])
    summary["sessions"] = len(record["sessions"])
    _write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def _finish(
    spec: SearchSpec,
    run_dir: Path,
    study: optuna.Study,
    genome: Genome,
    tasks: list[WeightedTask],
    merger: ResidentMerger,
    stage: Callable[[Stage], None],
) -> dict[str, Any]:
    trials = sorted(stored_trials(study).values(), key=lambda t: t.user_attrs["index"])[: spec.budget]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        reasons = sorted({t.user_attrs.get("error", "?") for t in trials})
        raise ShoalError(f"every trial failed; first reason: {reasons[0]}")
    best = max(complete, key=lambda t: (t.value, -t.user_attrs["index"]))  # the earliest of equal bests
    recipe = genome.recipe(best.params, best.user_attrs["seed"])
    stage(Stage("merging the best recipe"))
    text = yaml.safe_dump(recipe, sort_keys=False)
    run_merge(Recipe.model_validate(recipe), run_dir / BEST_DIR, recipe_text=text, device=spec.device, overwrite=True)

    stage(Stage("scoring on the test split"))
    model, tokenizer = load_model(run_dir / BEST_DIR, spec.device)
    best_test = scores(model, tokenizer, tasks, "test", spec.batch_size)
    parents: dict[str, float] = {}
    for name, path in {"base": spec.base, **spec.parents}.items():
        model, tokenizer = load_model(open_checkpoint(path).path, spec.device)
        parents[name] = weighted(tasks, scores(model, tokenizer, tasks, "test", spec.batch_size))
    del model
    untuned: dict[str, float] = {}
    for name, raw in untuned_recipes(spec, genome).items():
        recipe_obj = Recipe.model_validate(raw)
        resident = merger if recipe_obj.merge_method == spec.method else ResidentMerger(recipe_obj, spec.device)
        resident.apply(recipe_obj)
        untuned[name] = weighted(tasks, scores(resident.model, resident.tokenizer, tasks, "test", spec.batch_size))

    mean = lambda key: sum(t.user_attrs[key] for t in complete) / len(complete)
    return {
        "target": spec.tasks[0].path.rstrip("/").split("/")[-1],
        "method": spec.method,
        "best": {
            "trial": best.user_attrs["index"],
            "dev": best.value,
            "test": weighted(tasks, best_test),
            "dev_scores": best.user_attrs["dev_scores"],
            "test_scores": best_test,
            "recipe": recipe,
            **genome.table(best.params),
        },
        "parents": parents,
        "untuned": untuned,
        "trials": len(trials),
        "failed_trials": len(trials) - len(complete),
        "budget": spec.budget,
        "genes": len(genome),
        "population": spec.population or CmaEs(len(genome)).population,
        "seconds_per_trial": {
            "merge": mean("merge_seconds"),
            "merge_compute": mean("merge_compute_seconds"),
            "eval": mean("eval_seconds"),
            "total": mean("merge_seconds") + mean("eval_seconds"),
        },
        "threads": torch.get_num_threads(),
    }
