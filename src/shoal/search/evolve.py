"""`shoal evolve`: a search file and a run folder -> stored trials, the best model written to disk, and summary.json.

A hybrid search runs in stages, each a complete run folder: RUN_DIR/ps (parameter space), then RUN_DIR/dfs
(data flow, with the PS result as parent A); RUN_DIR/summary.json and RUN_DIR/best are the final stage's.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from shoal.checkpoint.digest import model_digest
from shoal.checkpoint.reader import hub_commit, resolve_model
from shoal.checkpoint.reference import parse_reference
from shoal.devices import check_device
from shoal.errors import ShoalError
from shoal.folder_lock import folder_lock
from shoal.search import journal, run_folder
from shoal.search.final_scores import FinalScores, score_on_test
from shoal.search.fitness import DevFitness, WeightedTask, load_tasks, search_fitness, weighted
from shoal.search.genome import GeneSpace
from shoal.search.loop import Compute, Evaluator, Progress, SerialEvaluator, attempt, run_trials
from shoal.search.optimizer import CmaEs
from shoal.search.select import Selection, select, stored_score
from shoal.search.spaces import Space, check_worker_memory, genome_of, make_space, slow_dtype_notice
from shoal.search.spec import SearchSpec
from shoal.search.storage import default_storage
from shoal.search.summary import Best, Cost, Rescored, SecondsPerTrial, StageResult, Summary
from shoal.search.summary import Selection as SelectionRecord
from shoal.search.trials import (HUB_COMMITS, MODEL_DIGESTS, STUDY_NAME, TASK_DIGESTS, Trial, check_recorded,
                                 first_trials, open_study, stored_trials, study_records)


OnStep = Callable[[str], None]
"""Told the name of each step outside the trials ("loading parents", "scoring on the test split", ...)."""
OnTrial = Callable[[Progress], None]
"""Told the search's progress after each trial is stored (or found stored)."""
Notice = run_folder.Notice


def _quiet(_: object) -> None:
    pass


def evolve(
    spec: SearchSpec,
    run_dir: str | Path,
    *,
    storage: str | None = None,
    on_step: OnStep = _quiet,
    on_trial: OnTrial = _quiet,
    notice: Notice = _quiet,
    study: str = STUDY_NAME,
    workers: int = 1,
    ray_address: str | None = None,
) -> Summary:
    """Run (or continue) the search of `spec` in run_dir; return the summary also written to run_dir/summary.json.

    storage: an Optuna storage URL or journal file (default: the search file's, else run_dir/study.log); study: its
    study name. on_step and on_trial are told what the run is doing, for a display; notice, what was done to the
    folder unasked (a take-over, a mended study file). With the folder's own journal, the folder is locked for the
    run: a second process on it is refused (a named storage may be shared on purpose, so is not locked).
    workers > 1 (or a ray_address) scores each generation on that many Ray actors; the trials are the same."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ShoalError(f"{run_dir} is a file; give a folder (new, or a run's) for RUN_DIR")
    check_device(spec.device, "the search file's device:")
    spec = pinned(spec, run_dir, notice, storage, study)
    done = run_folder.finished_summary(spec, run_dir, lambda: (task_digests(load_tasks(spec)), model_digests(spec)))
    if done is not None:
        on_step(f"{run_dir} holds this search, finished at this budget and selection: its summary is as written then "
                "(raise the budget to search on)")
        return done
    if spec.space == "hybrid":
        with folder_lock(run_dir) if storage is None and spec.storage is None else nullcontext():
            return _evolve_hybrid(spec, run_dir, storage, on_step, on_trial, notice, workers, ray_address)
    options = SearchOptions(storage, on_step, on_trial, notice, study, workers, ray_address)
    if spec.pool is not None:
        from shoal.search.tournament import evolve_pool

        return evolve_pool(spec, run_dir, options)

    def finish(searched: Searched) -> Summary:
        summary = finished(searched, spec, run_dir, on_step)
        run_folder.write_summary(run_dir, summary)
        return summary

    return search_once(spec, run_dir, options, finish)


def pinned(spec: SearchSpec, run_dir: Path, notice: Notice, storage: str | None = None,
           study: str = STUDY_NAME) -> SearchSpec:
    """spec with each Hub id it names at a branch (main by default) or tag read at one commit for the whole run:
    the one the run already reads (_kept_commits), else the one the branch is at now. notice is told where the
    branch has moved on since. Nothing is downloaded here."""
    places = {str(place): (place, ref) for ref in spec.models.values()
              for place in parse_reference(ref).places if place.movable}
    if not places:
        return spec
    kept = _kept_commits(spec, run_dir, storage, study)
    commits: dict[str, str] = {}
    for key, (place, ref) in places.items():
        try:
            now = hub_commit(place, ref)
        except ShoalError:
            if key not in kept:
                raise
            now = kept[key][0]  # the Hub unreachable and the cache without the branch: the kept commit will do
        commits[key], since = kept.get(key, (now, ""))
        if commits[key] != now:
            notice(f"{key} is at commit {now[:12]} now; this run reads {commits[key][:12]}, {since}")
    return spec.pinned(commits)


def _kept_commits(spec: SearchSpec, run_dir: Path, storage: str | None, study: str) -> dict[str, tuple[str, str]]:
    """The commits a run already reads, by Hub id as the search file gives it, each with where it is from, for a
    notice: those its shared study records (every process scoring it reads them; storage: as evolve's), else those
    run_dir's run.json records for this search."""
    earlier = run_folder.read_run(run_dir) if (run_dir / run_folder.RUN_FILE).is_file() else None
    if earlier is not None and earlier.search_hash != spec.search_hash():
        earlier = None
    own = (earlier.hub_commits or {}) if earlier is not None else {}
    kept = {key: (commit, "the commit it started with (a new RUN_DIR reads the new one)")
            for key, commit in own.items()}
    named = run_folder.named_storage(spec, earlier, storage)
    if named is not None:
        shared = study_records(named, _studies(spec, run_folder.study_name(earlier, study)), [HUB_COMMITS])[HUB_COMMITS]
        kept |= {key: (commit, f"the commit its study at {named} reads (another --storage reads the new one)")
                 for key, commit in shared.items() if own.get(key) != commit}
    return kept


def _studies(spec: SearchSpec, study: str) -> dict[str, str]:
    """The studies a search stores its trials in that are known before it runs, by name, each with the search hash
    it records: one per pool subset; a hybrid's PS stage's (its data-flow stage reads the same commits)."""
    if spec.space == "hybrid":
        return _studies(spec.model_copy(update={"space": "ps"}), _stage_study("ps"))
    if spec.pool is not None:
        from shoal.search.tournament import name, subset_spec, subsets

        return {f"{study}-{name(subset)}": subset_spec(spec, subset, spec.budget).search_hash()
                for subset in subsets(spec)}
    return {study: spec.search_hash()}


def _stage_study(stage: str) -> str:
    """A hybrid stage's study: two names, as both stages may live in one storage."""
    return f"{STUDY_NAME}-{stage}"


@dataclass(frozen=True)
class SearchOptions:
    """How a search is run, beside its spec: evolve()'s keyword arguments."""

    storage: str | None = None
    on_step: OnStep = _quiet
    on_trial: OnTrial = _quiet
    notice: Notice = _quiet
    study: str = STUDY_NAME
    workers: int = 1
    ray_address: str | None = None
    budget_notice: bool = True
    """Say when the folder holds more trials than the budget reads (a tournament's rounds do so on purpose)."""
    dtype_notice: bool = True
    """Time the live models' dtype on a CPU and say when it is slow there (a tournament's searches after its first
    do not: they hold live models of the same dtype, on the same CPU)."""


@dataclass
class Searched:
    """A one-space search's trials within its budget and its picked trial, with what scoring the pick needs."""

    spec: SearchSpec
    run_dir: Path
    record: run_folder.RunRecord
    space: Space
    tasks: list[WeightedTask]
    trials: list[Trial]
    selection: Selection
    population: int
    start: float
    """time.perf_counter() when the session started."""


Done = TypeVar("Done")


def search_once(spec: SearchSpec, run_dir: Path, options: SearchOptions, finish: Callable[[Searched], Done]) -> Done:
    """Run (or continue) the one-space search of `spec` in run_dir to its budget and pick its best trial; return what
    `finish` makes of that, while the folder is still locked."""
    start = time.perf_counter()
    own = run_folder.own_journal(spec, run_dir, options.storage)
    tasks = refusals(spec, options, own)
    parallel = options.workers > 1 or options.ray_address is not None
    with folder_lock(run_dir) if own else nullcontext():
        earlier = run_folder.earlier_run(spec, run_dir)  # refuses another search's folder before the parents load
        digests = task_digests(tasks)
        run_folder.check_tasks(spec, earlier, digests)
        inputs = None if own else shared_inputs(spec, tasks)
        if inputs is None:
            run_folder.check_journal(spec, run_dir, earlier)
        else:
            _check_shared_inputs(spec, earlier, options, inputs)
        mended = journal.recover(Path(default_storage(run_dir))) if own else None
        if mended:
            options.notice(mended)
        options.on_step("loading parents")
        models = model_digests(spec)
        run_folder.check_parents(spec, earlier, models)
        # workers hold their own; this process needs one at the end
        space = None if parallel else make_space(spec, options.on_step)
        if parallel and spec.space == "ps":
            check_worker_memory(spec, options.on_step)
        slow = None if space is None or not options.dtype_notice else slow_dtype_notice(space, spec.device)
        if slow:
            options.notice(slow)
        genome = space.genome if space is not None else genome_of(spec)
        fitness = None if space is None else search_fitness(spec, space, tasks)
        # nothing is recorded before its study opens, so a search refused so far leaves the folder as it was
        record = run_folder.open_run(spec, run_dir, earlier, options.storage, options.study, options.notice,
                                     digests, models)
        return finish(_search(spec, run_dir, record, space, genome, fitness, tasks, inputs, start, options))


def shared_inputs(spec: SearchSpec, tasks: list[WeightedTask]) -> dict[str, dict[str, str]]:
    """What a shared study holds every process to, beside the Hub pins, by user attr (trials.open_study): the tasks'
    portable digests, and the models' (shared_model_digests)."""
    return {TASK_DIGESTS: task_digests(tasks, portable=True), MODEL_DIGESTS: shared_model_digests(spec)}


def _check_shared_inputs(spec: SearchSpec, earlier: run_folder.RunRecord | None, options: SearchOptions,
                         inputs: dict[str, dict[str, str]]) -> None:
    """Refuse, before the parents load, a process whose copy of a task or a local model differs from the one its
    shared study was scored with (open_study refuses it too, under the storage's lock, should the study record it
    meanwhile)."""
    storage = run_folder.named_storage(spec, earlier, options.storage)
    assert storage is not None
    study = run_folder.study_name(earlier, options.study)
    recorded = study_records(storage, {study: spec.search_hash()}, inputs)
    for attr, values in inputs.items():
        check_recorded(storage, attr, recorded[attr], values)


def task_digests(tasks: list[WeightedTask], portable: bool = False) -> dict[str, str]:
    """Each task's digest by its name (portable: alike for a copy on another machine)."""
    return {t.task.name: t.task.digest(portable) for t in tasks}


def model_digests(spec: SearchSpec) -> dict[str, str]:
    """Each model the search reads by its key in the search file (base, parents.NAME): its model_digest (a Hub id's
    by the names of its cached blobs; a LoRA adapter's by the model it makes, shoal.checkpoint.lora). Not an earlier
    stage's result (a hybrid's PS best, written again when that stage ends again, in bits that may differ with the
    threads or device): the search hash pins it by trial."""
    return {key: model_digest(resolve_model(ref)) for key, ref in spec.models.items()
            if not spec.is_stage_result(ref)}


def shared_model_digests(spec: SearchSpec) -> dict[str, str]:
    """Each model the search reads from a local folder, by its key in the search file: the portable digests of its
    local places (model_digest; a LoRA adapter's folder apart from its model's), a place on the Hub as `hub` (the
    study's pins hold its commit). A model wholly on the Hub is left out, as is an earlier stage's result (pinned
    by trial in the search hash). Nothing is downloaded or made: a LoRA's merged model is not digested, as its bits
    may differ between machines where its parts do not."""
    digests = {}
    for key, ref in spec.models.items():
        places = parse_reference(ref).places
        if spec.is_stage_result(ref) or all(place.is_hub_id for place in places):
            continue
        digests[key] = " ".join("hub" if place.is_hub_id else model_digest(Path(place.path).expanduser(), portable=True)
                                for place in places)
    return digests


def refusals(spec: SearchSpec, options: SearchOptions, own: bool) -> list[WeightedTask]:
    """The search's tasks, once what refuses it before anything is written has been checked (a task; race where it
    cannot run). own: whether the study is the run folder's own journal."""
    tasks = load_tasks(spec)
    if spec.fitness.mode == "race":
        from shoal.search.racing import check_raceable

        check_raceable(tasks)
        if options.workers > 1 or options.ray_address is not None or not own:
            raise ShoalError("fitness: race scores a generation's candidates together in this process; it cannot be "
                             "split over --workers or a shared storage (use mode full or subset there)")
    return tasks


def _search(spec: SearchSpec, run_dir: Path, record: run_folder.RunRecord, space: Space | None, genome: GeneSpace,
            fitness: DevFitness | None, tasks: list[WeightedTask], inputs: dict[str, dict[str, str]] | None,
            start: float, options: SearchOptions) -> Searched:
    """The trials (each noted in run.json's session as it is stored) and the pick. inputs: what a shared study
    holds its processes to (shared_inputs; None with the folder's own journal)."""
    assert record.storage is not None and record.study is not None
    shared_storage = not record.default_storage  # a storage the user named may be shared with other processes
    if shared_storage:
        from shoal.search.shared import SharedTrials, StorageLock
    # with a shared storage, the first process creates the schema while the others wait
    try:
        with StorageLock(record.storage, record.study).held() if shared_storage else nullcontext():
            study = open_study(record.storage, spec.search_hash(), record.study,
                               {HUB_COMMITS: spec.hub_commits} | (inputs or {}))
    except BaseException:
        if not any(run_dir.iterdir()):  # the folder this start made, left empty: nothing recorded
            run_dir.rmdir()
        raise
    record.write(run_dir)  # only now: a start refused for its storage leaves no record naming it
    optimizer = CmaEs(len(genome), sigma=spec.sigma, population=spec.population, seed=spec.seed, mean=genome.start())
    evaluator: Evaluator
    if spec.fitness.mode == "race":
        from shoal.search.racing import DEFAULT_DELTA, DEFAULT_FIRST, RaceEvaluator

        assert space is not None  # race refuses workers
        evaluator = RaceEvaluator(space, tasks, spec.batch_size, optimizer.mu, spec.seed,
                                  first=spec.fitness.first or DEFAULT_FIRST, delta=spec.fitness.delta or DEFAULT_DELTA)
    elif fitness is None:
        from shoal.search.workers import RayEvaluator

        evaluator = RayEvaluator(spec, options.workers, address=options.ray_address,
                                 threads=max(1, torch.get_num_threads() // options.workers))
    else:
        evaluator = SerialEvaluator(fitness)
    evaluated = 0

    def stored(progress: Progress) -> None:
        nonlocal evaluated
        if progress.evaluated > evaluated:  # a trial of this session: its time so far, in case it is killed
            evaluated = progress.evaluated
            run_folder.note_session(run_dir, record, time.perf_counter() - start, finished=False)
        options.on_trial(progress)

    shared = SharedTrials(record.storage, record.study, genome) if shared_storage else None
    try:
        within_budget = run_trials(
            study,
            genome,
            optimizer,
            evaluator,
            budget=spec.budget,
            seed=spec.seed,
            failure_fitness=sum(min(t.weight, 0.0) for t in tasks),
            compute=Compute(spec.budget_items, spec.budget_tokens),
            on_trial=stored,
            shared=shared,
        )
    finally:
        if shared is not None:
            shared.close()
        evaluator.close()
        run_folder.note_session(run_dir, record, time.perf_counter() - start, finished=False)
    trials = first_trials(study, within_budget)
    held = len(stored_trials(study)) if options.budget_notice and len(trials) == spec.budget else 0
    if held > len(trials):  # read again only where the trial budget may have left some out
        options.notice(f"{run_dir} holds {held} trials; this budget reads the first {len(trials)} of them (the best "
                       "model and summary are of those; a larger --budget reads the rest)")
    space = space or make_space(spec)
    selection = _select(spec, space, tasks, trials, fitness, options.on_step)
    return Searched(spec, run_dir, record, space, tasks, trials, selection, optimizer.population, start)


def finished(searched: Searched, compared: SearchSpec, out_dir: Path, on_step: OnStep) -> Summary:
    """The picked trial's model written to out_dir/best and scored on test beside the base, the parents and the
    untuned merges of `compared` (the search's spec, or a pool's); the session noted as finished; the summary."""
    s = searched
    best = s.selection.pick.trial
    on_step("writing the best model")
    s.space.export(best.params, best.seed, out_dir / run_folder.BEST_DIR)
    on_step("scoring on the test split")
    test = score_on_test(compared, s.space, s.tasks, out_dir / run_folder.BEST_DIR)
    wall = run_folder.note_session(s.run_dir, s.record, time.perf_counter() - s.start, finished=True)
    return _summary(s.spec, s.space, s.tasks, s.trials, s.selection, test, s.population, wall, len(s.record.sessions))


def _select(spec: SearchSpec, space: Space, tasks: list[WeightedTask], trials: list[Trial],
            fitness: DevFitness | None, on_step: OnStep) -> Selection:
    """The trial whose model the run ends with: the best of the top trials by search fitness on the whole dev split."""
    if spec.fitness.mode == "full":  # the search fitness is the whole-dev score already
        return select(trials, spec.select.top, stored_score)
    on_step(f"re-scoring the top {spec.select.top} trials on the whole dev split")
    fitness = fitness or search_fitness(spec, space, tasks)
    return select(trials, spec.select.top, lambda t: attempt(fitness, t.params, t.seed))


def _fitness_name(spec: SearchSpec) -> str:
    if spec.fitness.mode == "subset":
        return f"subset ({spec.fitness.items} dev items per task and generation)"
    if spec.fitness.mode == "race":
        from shoal.search.racing import DEFAULT_DELTA, DEFAULT_FIRST

        return (f"race (from {spec.fitness.first or DEFAULT_FIRST} dev items per task, doubling each round; "
                f"delta {spec.fitness.delta or DEFAULT_DELTA})")
    return spec.fitness.mode


def _summary(spec: SearchSpec, space: Space, tasks: list[WeightedTask], trials: list[Trial], selection: Selection,
             test: FinalScores, population: int, wall_seconds: float, sessions: int) -> Summary:
    complete = [t for t in trials if not t.failed]
    mean = lambda seconds: sum(seconds(t) for t in complete) / len(complete)
    merge, eval_ = mean(lambda t: t.merge_seconds), mean(lambda t: t.eval_seconds)
    best, whole = selection.pick.trial, selection.pick.evaluation
    assert best.value is not None
    rescored = [Rescored(trial=r.trial.index, search=r.trial.value, dev=r.evaluation.fitness)
                for r in selection.rescored if r.trial.value is not None]
    return Summary(
        target=run_folder.target(spec),
        method=run_folder.method(spec),
        space=spec.space,
        best=Best(trial=best.index, dev=whole.fitness, test=weighted(tasks, test.best), search=best.value,
                  dev_scores=whole.scores, test_scores=test.best, **space.describe(best.params, best.seed)),
        parents=test.parents,
        untuned=test.untuned,
        trials=len(trials),
        failed_trials=len(trials) - len(complete),
        budget=spec.budget,
        budget_items=spec.budget_items,
        budget_tokens=spec.budget_tokens,
        genes=len(space.genome),
        population=population,
        seconds_per_trial=SecondsPerTrial(merge=merge, merge_compute=mean(lambda t: t.merge_compute_seconds),
                                          eval=eval_, total=merge + eval_),
        threads=torch.get_num_threads(),
        wall_seconds=wall_seconds,
        sessions=sessions,
        fitness=_fitness_name(spec),
        compute=Cost(items=sum(t.items for t in trials), tokens=sum(t.tokens for t in trials)),
        selection=SelectionRecord(
            top=spec.select.top, on=spec.select.on, rescored=rescored,
            cost=Cost(items=sum(r.evaluation.items for r in selection.rescored),
                      tokens=sum(r.evaluation.tokens for r in selection.rescored)),
        ),
    )


def _added(a: Cost | None, b: Cost | None) -> Cost | None:
    return None if a is None or b is None else Cost(items=a.items + b.items, tokens=a.tokens + b.tokens)


def _of_subset(ps: Summary) -> str:
    """A pool's PS stage: which subset's trial it is (trial numbers repeat across the subsets' searches)."""
    return f" of {'+'.join(ps.pool.winner)}" if ps.pool is not None else ""


def _evolve_hybrid(
    spec: SearchSpec, run_dir: Path, storage: str | None, on_step: OnStep, on_trial: OnTrial, notice: Notice,
    workers: int, ray_address: str | None,
) -> Summary:
    """PS first, then DFS over the PS result (parent A) and the data-flow parents."""
    record = run_folder.open_hybrid(spec, run_dir, ["ps", "dfs"], notice)
    on_step("hybrid stage 1/2: parameter space")
    ps_spec = spec.model_copy(update={"space": "ps"})
    ps = evolve(ps_spec, run_dir / "ps", storage=storage, on_step=on_step, on_trial=on_trial, notice=notice,
                study=_stage_study("ps"), workers=workers, ray_address=ray_address)
    ps_best = str((run_dir / "ps" / run_folder.BEST_DIR).resolve())
    flow_parents = {"ps": ps_best, **spec.flow_parents}
    dfs_spec = spec.model_copy(update={
        "space": "dfs",
        "parents": flow_parents,
        "dfs": spec.dfs.model_copy(update={"parents": list(flow_parents)}),
        "budget": spec.dfs.budget or spec.budget,
        "pool": None,
    }).naming(ps_best, f"trial {ps.best.trial}{_of_subset(ps)} of the PS stage {ps_spec.search_hash()}")
    run_folder.pin_ps_trial(record, run_dir, ps.best.trial, dfs_spec.search_hash(), notice)
    on_step("hybrid stage 2/2: data-flow space over the PS result")
    dfs = evolve(dfs_spec, run_dir / "dfs", storage=storage, on_step=on_step, on_trial=on_trial, notice=notice,
                 study=_stage_study("dfs"), workers=workers, ray_address=ray_address)
    shutil.rmtree(run_dir / run_folder.BEST_DIR, ignore_errors=True)
    shutil.copytree(run_dir / "dfs" / run_folder.BEST_DIR, run_dir / run_folder.BEST_DIR)
    summary = dfs.model_copy(update={
        "space": "hybrid",
        "parents": ps.parents,
        "untuned": ps.untuned,
        "stages": {name: StageResult(dev=s.best.dev, test=s.best.test, trials=s.trials, best_trial=s.best.trial)
                   for name, s in (("ps", ps), ("dfs", dfs))},
        "trials": ps.trials + dfs.trials,
        "failed_trials": ps.failed_trials + dfs.failed_trials,
        "budget": ps.budget + dfs.budget,
        "wall_seconds": ps.wall_seconds + dfs.wall_seconds,
        "compute": _added(ps.compute, dfs.compute),
    } | ({"pool": ps.pool} if ps.pool is not None else {}))
    run_folder.write_summary(run_dir, summary)
    return summary
