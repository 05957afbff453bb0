"""`shoal evolve`: a search file and a run folder -> stored trials, the best model written to disk, and summary.json.

A hybrid search runs in stages, each a complete run folder: RUN_DIR/ps (parameter space), then RUN_DIR/dfs
(data flow, with the PS result as parent A); RUN_DIR/summary.json and RUN_DIR/best are the final stage's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from shoal.checkpoint.reader import open_checkpoint
from shoal.errors import ShoalError
from shoal.checkpoint.live import load_live
from shoal.merge.resident import ResidentMerger
from shoal.recipe import Recipe
from shoal.search.fitness import (
    WeightedTask,
    load_tasks,
    scores,
    search_fitness,
    weighted,
)
from shoal.search.loop import (
    STUDY_NAME,
    Evaluator,
    Progress,
    SerialEvaluator,
    open_study,
    run_trials,
    stored_trials,
)
from shoal.search.optimizer import CmaEs
from shoal.search.spaces import Space, genome_of, make_space
from shoal.search.spec import SearchSpec
from shoal.search.storage import default_storage

RUN_FILE, SUMMARY_FILE, BEST_DIR = "run.json", "summary.json", "best"


@dataclass
class Stage:
    """What the run is doing, for a progress display: 'trials' (with a Progress) or a final step's name."""

    name: str
    progress: Progress | None = None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _run_record(spec: SearchSpec, run_dir: Path) -> dict[str, Any]:
    """run_dir's run.json (empty if new), refused if another search made it."""
    path = run_dir / RUN_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get("search_hash") not in (None, spec.search_hash(), spec.search_hash(as_before=True)):
        raise ShoalError(f"{run_dir} holds a run of a different search; use a new RUN_DIR (or that run's search)")
    return record


def _open_run(spec: SearchSpec, run_dir: Path, storage: str | None, study: str) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_FILE
    record = _run_record(spec, run_dir)
    named = storage or (None if record.get("default_storage", True) else record.get("storage")) or spec.storage
    record |= {
        "storage": named or default_storage(run_dir),  # the default follows the folder if it is moved
        "default_storage": named is None,
        "study": record.get("study", study),
        "search_hash": spec.search_hash(),
        "target": _target(spec),
        "method": _method(spec),
        "space": spec.space,
        "search": spec.model_dump(),
    }
    record.setdefault("sessions", [])
    _write_json(path, record)
    return record


def _method(spec: SearchSpec) -> str:
    """What builds a candidate: the merge method (PS), or the layer path (DFS: no merge method is used)."""
    return spec.method if spec.space != "dfs" else f"layer path ({spec.dfs.scaling} scaling)"


def _target(spec: SearchSpec) -> str:
    return spec.tasks[0].name


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


def evolve(
    spec: SearchSpec,
    run_dir: str | Path,
    *,
    storage: str | None = None,
    on_stage: Callable[[Stage], None] | None = None,
    study: str = STUDY_NAME,
    workers: int = 1,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) the search of `spec` in run_dir; return the summary also written to run_dir/summary.json.

    storage: an Optuna storage URL or journal file (default: the search file's, else run_dir/study.log); study: its
    study name.
    workers > 1 (or a ray_address) scores each generation on that many Ray actors; the trials are the same."""
    if spec.space == "hybrid":
        return _evolve_hybrid(spec, Path(run_dir), storage, on_stage, workers, ray_address)
    run_dir = Path(run_dir)
    start = time.perf_counter()
    record = _open_run(spec, run_dir, storage, study)
    stage = on_stage or (lambda s: None)
    tasks = load_tasks(spec)
    stage(Stage("loading parents"))
    parallel = workers > 1 or ray_address is not None
    space = None if parallel else make_space(spec)  # workers hold their own; this process needs one at the end
    genome = space.genome if space is not None else genome_of(spec)
    shared_storage = not record["default_storage"]  # a storage the user named may be shared with other processes
    if shared_storage:
        from shoal.search.shared import SharedTrials, StorageLock
    # with a shared storage, the first process creates the schema while the others wait
    with StorageLock(record["storage"], record["study"]).held() if shared_storage else nullcontext():
        study = open_study(record["storage"], spec.search_hash(), record["study"], spec.search_hash(as_before=True))
    optimizer = CmaEs(len(genome), sigma=spec.sigma, population=spec.population, seed=spec.seed, mean=genome.start())
    evaluator: Evaluator
    if parallel:
        from shoal.search.workers import RayEvaluator

        evaluator = RayEvaluator(spec, workers, address=ray_address, threads=max(1, torch.get_num_threads() // workers))
    else:
        assert space is not None
        evaluator = SerialEvaluator(search_fitness(spec, space, tasks))
    shared = SharedTrials(record["storage"], record["study"], genome) if shared_storage else None
    try:
        run_trials(
            study,
            genome,
            optimizer,
            evaluator,
            budget=spec.budget,
            seed=spec.seed,
            failure_fitness=sum(min(t.weight, 0.0) for t in tasks),
            on_trial=lambda p: stage(Stage("trials", p)),
            shared=shared,
        )
    finally:
        if shared is not None:
            shared.close()
        if parallel:
            evaluator.close()  # type: ignore[attr-defined]
        record["sessions"].append({"seconds": time.perf_counter() - start, "finished": False})
        _write_json(run_dir / RUN_FILE, record)
    summary = _finish(spec, run_dir, study, space or make_space(spec), optimizer.population, tasks, stage)
    record["sessions"][-1] = {"seconds": time.perf_counter() - start, "finished": True}
    _write_json(run_dir / RUN_FILE, record)
    summary["wall_seconds"] = sum(s["seconds"] for s in record["sessions"])
    summary["sessions"] = len(record["sessions"])
    _write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def _evolve_hybrid(
    spec: SearchSpec, run_dir: Path, storage: str | None, on_stage: Callable[[Stage], None] | None, workers: int,
    ray_address: str | None,
) -> dict[str, Any]:
    """PS first, then DFS over the PS result (parent A) and the data-flow parents."""
    run_dir.mkdir(parents=True, exist_ok=True)
    top = {"space": "hybrid", "stages": ["ps", "dfs"], "target": _target(spec), "method": spec.method,
           "search_hash": spec.search_hash()}
    _run_record(spec, run_dir)
    _write_json(run_dir / RUN_FILE, top)
    stage = on_stage or (lambda s: None)
    stage_study = lambda name: f"{STUDY_NAME}-{name}"  # two names: both stages may live in one storage
    stage(Stage("hybrid stage 1/2: parameter space"))
    ps_spec = spec.model_copy(update={"space": "ps"})
    ps = evolve(ps_spec, run_dir / "ps", storage=storage, on_stage=on_stage, study=stage_study("ps"),
                workers=workers, ray_address=ray_address)
    ps_best = str((run_dir / "ps" / BEST_DIR).resolve())
    flow_parents = {"ps": ps_best, **spec.flow_parents}
    dfs_spec = spec.model_copy(update={
        "space": "dfs",
        "parents": flow_parents,
        "dfs": spec.dfs.model_copy(update={"parents": list(flow_parents)}),
        "budget": spec.dfs.budget or spec.budget,
    }).naming(ps_best, f"trial {ps['best']['trial']} of the PS stage {ps_spec.search_hash()}")
    dfs_record = run_dir / "dfs" / RUN_FILE
    made_from = json.loads(dfs_record.read_text()).get("ps_best_trial") if dfs_record.is_file() else None
    if made_from is not None and made_from != ps["best"]["trial"]:
        raise ShoalError(
            f"the PS stage's best trial is now #{ps['best']['trial']}, but the stored DFS trials were scored over "
            f"#{made_from} (was the budget raised?); move {run_dir / 'dfs'} away to search DFS over the new one"
        )
    dfs_record.parent.mkdir(parents=True, exist_ok=True)
    _write_json(dfs_record, (json.loads(dfs_record.read_text()) if dfs_record.is_file() else {})
                | {"ps_best_trial": ps["best"]["trial"]})
    stage(Stage("hybrid stage 2/2: data-flow space over the PS result"))
    dfs = evolve(dfs_spec, run_dir / "dfs", storage=storage, on_stage=on_stage, study=stage_study("dfs"),
                 workers=workers, ray_address=ray_address)
    shutil.rmtree(run_dir / BEST_DIR, ignore_errors=True)
    shutil.copytree(run_dir / "dfs" / BEST_DIR, run_dir / BEST_DIR)
    summary = {
        **{k: v for k, v in dfs.items() if k not in ("parents", "untuned")},
        "space": "hybrid",
        "parents": {k: v for k, v in ps["parents"].items()},
        "untuned": ps["untuned"],
        "stages": {
            name: {"dev": s["best"]["dev"], "test": s["best"]["test"], "trials": s["trials"],
                   "best_trial": s["best"]["trial"]}
            for name, s in (("ps", ps), ("dfs", dfs))
        },
        "trials": ps["trials"] + dfs["trials"],
        "failed_trials": ps["failed_trials"] + dfs["failed_trials"],
        "budget": ps["budget"] + dfs["budget"],
        "wall_seconds": ps["wall_seconds"] + dfs["wall_seconds"],
    }
    _write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def _finish(
    spec: SearchSpec,
    run_dir: Path,
    study: optuna.Study,
    space: Space,
    population: int,
    tasks: list[WeightedTask],
    stage: Callable[[Stage], None],
) -> dict[str, Any]:
    trials = sorted(stored_trials(study).values(), key=lambda t: t.user_attrs["index"])[: spec.budget]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise ShoalError(f"every trial failed; the first (trial {trials[0].user_attrs['index']}): "
                         f"{trials[0].user_attrs.get('error', '?')}")
    best = max(complete, key=lambda t: (t.value, -t.user_attrs["index"]))  # the earliest of equal bests
    seed = best.user_attrs["seed"]
    stage(Stage("writing the best model"))
    space.export(best.params, seed, run_dir / BEST_DIR)

    stage(Stage("scoring on the test split"))
    model, tokenizer = load_live(run_dir / BEST_DIR, spec.device)
    best_test = scores(model, tokenizer, tasks, "test", spec.batch_size)
    parents: dict[str, float] = {}
    for name, path in {"base": spec.base, **spec.parents}.items():
        model, tokenizer = load_live(open_checkpoint(path).path, spec.device)
        parents[name] = weighted(tasks, scores(model, tokenizer, tasks, "test", spec.batch_size))
    del model
    untuned: dict[str, float] = {}
    for name, raw in untuned_recipes(spec).items():
        merger = ResidentMerger(Recipe.model_validate(raw), spec.device)
        merger.apply(Recipe.model_validate(raw))
        untuned[name] = weighted(tasks, scores(merger.model, merger.tokenizer, tasks, "test", spec.batch_size))
    start = space.build(space.genome.values(space.genome.start()), spec.seed)
    untuned["start"] = weighted(tasks, scores(start, space.tokenizer, tasks, "test", spec.batch_size))

    mean = lambda key: sum(t.user_attrs.get(key, 0.0) for t in complete) / len(complete)
    return {
        "target": _target(spec),
        "method": _method(spec),
        "space": spec.space,
        "best": {
            "trial": best.user_attrs["index"],
            "dev": best.value,
            "test": weighted(tasks, best_test),
            "dev_scores": best.user_attrs["dev_scores"],
            "test_scores": best_test,
            **space.describe(best.params, seed),
        },
        "parents": parents,
        "untuned": untuned,
        "trials": len(trials),
        "failed_trials": len(trials) - len(complete),
        "budget": spec.budget,
        "genes": len(space.genome),
        "population": population,
        "seconds_per_trial": {
            "merge": mean("merge_seconds"),
            "merge_compute": mean("merge_compute_seconds"),
            "eval": mean("eval_seconds"),
            "total": mean("merge_seconds") + mean("eval_seconds"),
        },
        "threads": torch.get_num_threads(),
    }
