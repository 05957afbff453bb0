"""A search over a pool of parents as a tournament of smaller searches (spec.pool: successive halving).

Every subset of `pool.subset` parents gets a parameter-space search of its own in RUN_DIR/subsets/<a>+<b> (a
complete run folder, resumed like any other). Round 1 gives each subset an even part of `shares[0]` of the budget;
the subsets whose picked trial scores best on the whole dev split go on, and each later round raises the survivors'
budgets by an even part of its share (their searches continue where they stopped: a raised budget is a
continuation). The best subset of the last round wins: its pick is written to RUN_DIR/best and scored on test
beside every parent of the pool and the untuned merges of all of them. Only the winner is scored on test.

Measured on the demo zoo's pool (benchmarks/pool_tournament.py, docs/zoo.md): 52.9 ± 15.6 on test over five named
seeds, where keep genes over all five parents (genome.choose_parents) reached 44.0 ± 20.8 on the same zoos.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from shoal.errors import EveryTrialFailed, ShoalError
from shoal.folder_lock import folder_lock
from shoal.search import run_folder
from shoal.search.evolve import Done, Searched, SearchOptions, finished, refusals, search_once
from shoal.search.loop import Progress
from shoal.search.spec import PoolSpec, SearchSpec
from shoal.search.summary import Cost, PoolResult, PoolRound, Summary
from shoal.search.trials import first_trials, open_study
from shoal.search.workers import ray_session


@dataclass(frozen=True)
class Round:
    trials: int
    """Trials each subset in the round has by its end."""
    subsets: int
    """Subsets in the round."""


def schedule(budget: int, subsets: int, pool: PoolSpec) -> list[Round]:
    """The rounds of a tournament of `subsets` searches that together spend at most `budget` trials: round r adds
    floor(shares[r] x budget / its subsets) trials to each (the last round: what is left), then the best
    survivors[r] go on. Refused when a round would add no trial."""
    rounds, alive, reached, spent = [], subsets, 0, 0
    for index, share in enumerate(pool.shares):
        last = index == len(pool.shares) - 1
        more = (budget - spent) // alive if last else int(share * budget + 1e-9) // alive
        if more < 1:
            raise ShoalError(f"pool: a budget of {budget} trials gives round {index + 1} less than one trial for each "
                             f"of its {alive} subsets; raise the budget (or that round's share)")
        reached += more
        spent += more * alive
        rounds.append(Round(reached, alive))
        if not last:
            alive = min(alive, pool.survivors[index])
    return rounds


def subsets(spec: SearchSpec) -> list[tuple[str, ...]]:
    assert spec.pool is not None
    return list(itertools.combinations(spec.parents, spec.pool.subset))


def name(subset: tuple[str, ...]) -> str:
    return "+".join(subset)


def subset_spec(spec: SearchSpec, subset: tuple[str, ...], trials: int) -> SearchSpec:
    """The search of one subset: the pool's settings over its parents, to `trials` trials."""
    return spec.model_copy(update={"parents": {n: spec.parents[n] for n in subset}, "pool": None, "budget": trials})


def evolve_pool(spec: SearchSpec, run_dir: Path, options: SearchOptions) -> Summary:
    """Run (or continue) the tournament of `spec` in run_dir; return the summary also written to run_dir."""
    assert spec.pool is not None
    if spec.budget_items is not None or spec.budget_tokens is not None:
        raise ShoalError("pool: a compute budget (budget_items, budget_tokens) is not split over a tournament's "
                         "rounds; give its budget in trials")
    start = time.perf_counter()
    candidates = subsets(spec)
    rounds = schedule(spec.budget, len(candidates), spec.pool)
    own = options.storage is None and spec.storage is None
    refusals(spec, options, own)  # before the pool's run.json is written, as for one search
    with folder_lock(run_dir) if own else nullcontext(), ray_session(options.workers, options.ray_address):
        record = run_folder.open_pool(spec, run_dir, [f"{run_folder.SUBSETS_DIR}/{name(c)}" for c in candidates],
                                      options.notice)
        tournament = _Tournament(spec, run_dir, options, record, start, {name(c): 0 for c in candidates})
        alive = candidates
        for index, round_ in enumerate(rounds):
            ranks = tournament.play(index, len(rounds), round_.trials, alive)
            ranked = sorted(alive, key=lambda c: ranks[name(c)])  # a tie keeps the pool's order
            alive = ranked[:spec.pool.survivors[index] if index < len(rounds) - 1 else 1]
        return tournament.finish(alive[0], rounds[-1].trials)


@dataclass
class _Tournament:
    spec: SearchSpec
    run_dir: Path
    options: SearchOptions
    record: run_folder.RunRecord
    start: float
    reached: dict[str, int]
    """Trials each subset's search holds so far (for the overall progress shown)."""
    scored: tuple[str, Summary] | None = None
    """The winner's summary, when a last round of one subset wrote its pick and scored it on test at once (its
    search is not opened again, nor its parents loaded a second time)."""
    searched: bool = False
    """Whether a subset's search has started in this process (only the first times the live models' dtype)."""

    def play(self, index: int, count: int, trials: int, alive: list[tuple[str, ...]]) -> dict[str, float]:
        """Each subset of the round searched to `trials` trials (or its score read from run.json); each one's rank
        key (lowest best)."""
        assert self.record.rounds is not None
        if index == len(self.record.rounds):
            self.record.rounds.append(PoolRound(trials=trials, dev={}))
        round_ = self.record.rounds[index]
        if round_.trials != trials:  # the budget changed since: this round's scores are measured again
            self.record.rounds[index:] = [PoolRound(trials=trials, dev={})]
            round_ = self.record.rounds[index]
        for number, subset in enumerate(alive, 1):
            label = name(subset)
            if label not in round_.dev:
                self.options.on_step(f"pool round {index + 1}/{count}: {label} ({number}/{len(alive)}), "
                                     f"to {trials} trials")
                last = index == count - 1 and len(alive) == 1
                try:
                    round_.dev[label] = self._search(subset, trials, self._pick_and_finish if last else _pick)
                except EveryTrialFailed as failed:
                    self.options.notice(f"pool round {index + 1}: {label}: {failed}; it ranks last")
                    round_.dev[label] = None
                self.record.write(self.run_dir)
            self.reached[label] = trials
        round_.dev = dict(sorted(round_.dev.items(), key=lambda item: _rank(item[1])))
        self.record.write(self.run_dir)
        return {label: _rank(score) for label, score in round_.dev.items()}

    def _pick_and_finish(self, searched: Searched) -> float:
        """The last round's one subset: its pick, written and scored on test at once (see finish)."""
        label = name(tuple(searched.spec.parents))
        self.scored = label, self._finished(searched, label)
        return _pick(searched)

    def _finished(self, searched: Searched, label: str) -> Summary:
        self.options.on_step(f"pool: {label} wins; its best trial is scored on test beside every parent of the pool")
        return finished(searched, self.spec, self.run_dir, self.options.on_step)

    def finish(self, winner: tuple[str, ...], trials: int) -> Summary:
        """The winner's pick written to RUN_DIR/best and scored on test beside the whole pool; summary.json."""
        spec = self.spec
        if self.scored is not None and self.scored[0] == name(winner):
            summary = self.scored[1]
        else:  # the last round kept several subsets, or its scores were read from run.json
            summary = self._search(winner, trials, lambda searched: self._finished(searched, name(winner)))
        wall = run_folder.note_session(self.run_dir, self.record, time.perf_counter() - self.start, finished=True)
        counted = [self._stored(subset, self.reached[name(subset)]) for subset in subsets(spec)]
        assert spec.pool is not None and self.record.rounds is not None
        summary = summary.model_copy(update={
            "pool": PoolResult(subset=spec.pool.subset, winner=list(winner), rounds=self.record.rounds),
            "trials": sum(c.trials for c in counted),
            "failed_trials": sum(c.failed for c in counted),
            "budget": spec.budget,
            "wall_seconds": wall,
            "sessions": len(self.record.sessions),
            "compute": Cost(items=sum(c.items for c in counted), tokens=sum(c.tokens for c in counted)),
        })
        run_folder.write_summary(self.run_dir, summary)
        return summary

    def _search(self, subset: tuple[str, ...], trials: int, finish: Callable[[Searched], Done]) -> Done:
        """One subset's search run (or continued) to `trials` trials, its picked trial handed to `finish`."""
        label = name(subset)
        offset = sum(n for other, n in self.reached.items() if other != label)
        held = self.reached[label]  # its trials replayed up to there are counted already
        on_trial = self.options.on_trial
        evaluated = 0

        def overall(p: Progress) -> None:  # the tournament's progress: every subset's trials against its budget
            nonlocal evaluated
            if p.evaluated > evaluated:  # a trial of this session: the pool's time so far, in case it is killed
                evaluated = p.evaluated
                run_folder.note_session(self.run_dir, self.record, time.perf_counter() - self.start, finished=False)
            on_trial(Progress(done=offset + max(p.done, held), budget=self.spec.budget, best=p.best,
                              evaluated=p.evaluated, items=p.items, tokens=p.tokens))

        options = replace(self.options, on_trial=overall, study=f"{self.options.study}-{label}", budget_notice=False,
                          dtype_notice=self.options.dtype_notice and not self.searched)
        self.searched = True
        folder = self.run_dir / run_folder.SUBSETS_DIR / label
        try:
            return search_once(subset_spec(self.spec, subset, trials), folder, options, finish)
        finally:  # the pool's session keeps the time of a search that is stopped, as that search's own does
            run_folder.note_session(self.run_dir, self.record, time.perf_counter() - self.start, finished=False)

    def _stored(self, subset: tuple[str, ...], trials: int) -> _Count:
        """What a subset's search spent: its first `trials` stored trials."""
        folder = self.run_dir / run_folder.SUBSETS_DIR / name(subset)
        record = run_folder.read_run(folder)
        storage = run_folder.study_storage(folder, record)
        assert storage is not None and record.study is not None
        spec = subset_spec(self.spec, subset, trials)
        stored = first_trials(open_study(storage, spec.search_hash(), record.study), trials)
        return _Count(len(stored), sum(t.failed for t in stored), sum(t.items for t in stored),
                      sum(t.tokens for t in stored))


@dataclass(frozen=True)
class _Count:
    trials: int
    failed: int
    items: int
    tokens: int


def _rank(score: float | None) -> float:
    """Sorting key, best first; a subset whose every trial failed last."""
    return float("inf") if score is None else -score


def _pick(searched: Searched) -> float:
    """A round's result for one subset: its picked trial's score on the whole dev split."""
    return searched.selection.pick.evaluation.fitness
