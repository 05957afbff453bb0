"""A pool's tournament (search.tournament): its schedule, the spec's checks, and whole tournaments on the smoke zoo
(which subsets go on, what is scored on test, resuming, the report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import own_output_task, zoo_search
from shoal.errors import ShoalError
from shoal.search.evolve import evolve
from shoal.search.spec import PoolSpec, load_search
from shoal.search.tournament import Round, schedule


def test_the_schedule_spends_each_rounds_share_evenly_and_the_whole_budget() -> None:
    # the benchmark's tournament: 10 pairs of 5 parents, 1000 trials
    assert schedule(1000, 10, PoolSpec()) == [Round(50, 10), Round(150, 3), Round(350, 1)]  # 500 + 300 + 200
    # floors: round 1 int(0.5 x 13) // 3 = 2 each (6), round 2 int(3.9) // 2 = 1 each (2), round 3 the other 5
    assert schedule(13, 3, PoolSpec(survivors=[2, 1])) == [Round(2, 3), Round(3, 2), Round(8, 1)]
    # survivors above the subsets left keep them all
    assert schedule(40, 2, PoolSpec()) == [Round(10, 2), Round(16, 2), Round(24, 1)]
    assert schedule(10, 3, PoolSpec(survivors=[], shares=[1.0])) == [Round(3, 3)]


def test_a_budget_too_small_for_a_round_is_refused_with_the_numbers() -> None:
    with pytest.raises(ShoalError, match="budget of 19 trials gives round 1 less than one trial for each of its 10"):
        schedule(19, 10, PoolSpec())
    with pytest.raises(ShoalError, match="round 2 less than one trial for each of its 3 subsets"):
        schedule(100, 50, PoolSpec(shares=[0.98, 0.01, 0.01]))


@pytest.mark.parametrize(("pool", "extra", "message"), [
    ({"shares": [0.5, 0.5]}, {}, "one share per round, one more than survivors"),
    ({"shares": [0.5, 0.3, 0.1]}, {}, "sum to 1"),
    ({"survivors": [1, 2]}, {}, "never grow"),
    ({"subset": 3}, {}, "subset \\(3\\) must be smaller than the number of parents \\(3\\)"),
    ({}, {"space": "dfs"}, "tournament of parameter-space searches"),
    ({}, {"space": "hybrid"}, "name dfs.parents"),
    ({}, {"genome": {"choose_parents": True}}, "two ways to search a pool"),
    ({}, {"tokenizer_source": "math"}, "tokenizer_source cannot name a parent"),
])
def test_a_pool_the_tournament_cannot_run_is_refused_on_loading(zoo, tmp_path, pool, extra, message) -> None:
    parents = {"math": str(zoo.parents["math"]), "language": str(zoo.parents["language"]), "plain": str(zoo.base)}
    with pytest.raises(ShoalError, match=message):
        load_search(zoo_search(zoo, tmp_path, parents=parents, pool=pool, **extra))


def _pool_search(zoo, folder: Path, budget: int, **extra: object) -> Path:
    """Three parents (the zoo's two and a copy of the base: a parent with nothing to give), pairs of them, scored on
    the language parent's own outputs so that the subsets with it score higher."""
    (folder / "own").mkdir(parents=True)
    task = own_output_task(zoo, folder / "own", every=1)
    parents = {"math": str(zoo.parents["math"]), "language": str(zoo.parents["language"]), "plain": str(zoo.base)}
    return zoo_search(zoo, folder, parents=parents, tasks=[{"path": str(task)}], budget=budget,
                      pool={"subset": 2, "survivors": [2, 1]}, **extra)


def _stored(folder: Path, study: str) -> int:
    """Trials in a subset's journal, each under its own study name."""
    import optuna

    from shoal.search.storage import open_storage

    return len(optuna.load_study(study_name=study, storage=open_storage(str(folder / "study.log"))).trials)


def test_a_tournament_runs_its_rounds_and_scores_only_the_winner_on_test(zoo, tmp_path) -> None:
    spec = load_search(_pool_search(zoo, tmp_path, budget=13))
    run = tmp_path / "run"
    steps: list[str] = []
    summary = evolve(spec, run, on_step=steps.append)
    pool = summary.pool
    assert pool is not None and pool.subset == 2
    # schedule(13, 3, survivors [2, 1]): every pair to 2 trials, the best two to 3, the best one to 8
    assert [r.trials for r in pool.rounds] == [2, 3, 8]
    first, second, third = (list(r.dev) for r in pool.rounds)
    assert sorted(first) == ["language+plain", "math+language", "math+plain"]
    assert [r.dev[n] for r in pool.rounds for n in r.dev] == sorted(pool.rounds[0].dev.values(), reverse=True) + \
        sorted(pool.rounds[1].dev.values(), reverse=True) + list(pool.rounds[2].dev.values())
    assert set(second) == set(first[:2]) and third == second[:1] and pool.winner == third[0].split("+")
    assert "math+plain" not in second  # the only pair without the language parent scores lowest
    stored = {name: _stored(run / "subsets" / name, f"shoal-{name}") for name in first}
    assert stored == {first[0]: 8 if first[0] == third[0] else 3, first[1]: 8 if first[1] == third[0] else 3,
                      first[2]: 2}
    assert summary.trials == sum(stored.values()) == 13 and summary.budget == 13
    # the winner's pick is RUN_DIR/best, its dev score the last round's; it alone is scored on test
    assert summary.best.dev == pool.rounds[2].dev[third[0]]
    assert (run / "best" / "config.json").is_file() and (run / "summary.json").is_file()
    assert not any((run / "subsets" / name / "best").exists() for name in first)
    assert set(summary.parents) == {"base", "math", "language", "plain"}  # the whole pool, not the winner's two
    assert len(summary.best.recipe["models"]) == 2
    from shoal.evaluate import evaluate, load_task

    test = evaluate(run / "best", load_task(tmp_path / "own"), split="test").score
    assert summary.best.test == pytest.approx(test)
    assert [s for s in steps if s.startswith("pool round")] == [
        f"pool round 1/3: {n} ({i}/3), to 2 trials" for i, n in enumerate(["math+language", "math+plain",
                                                                            "language+plain"], 1)
    ] + [f"pool round 2/3: {n} ({i}/2), to 3 trials" for i, n in enumerate(first[:2], 1)] + [
        f"pool round 3/3: {third[0]} (1/1), to 8 trials"]
    # each search of a round loads its parents once; the last round's one subset is scored on test in the same go
    assert steps.count("loading parents") == 3 + 2 + 1 and steps[-1] == "scoring on the test split"
    # the report shows the rounds and the winner's trials
    from shoal.report import write_report

    report = write_report(run)[0].read_text()
    assert "## Pool tournament" in report and f"**{third[0]}** won" in report
    assert f"| **{third[0]}** | {pool.rounds[0].dev[third[0]]:.4f} |" in report


def test_an_interrupted_tournament_resumes_without_searching_a_finished_subset_again(zoo, tmp_path) -> None:
    spec = load_search(_pool_search(zoo, tmp_path, budget=13))
    whole = evolve(spec, tmp_path / "whole")

    def stop_in_round_2(step: str) -> None:
        if step.startswith("pool round 2/3"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evolve(spec, tmp_path / "cut", on_step=stop_in_round_2)
    record = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert [r["trials"] for r in record["rounds"]] == [2] and len(record["rounds"][0]["dev"]) == 3
    steps: list[str] = []
    resumed = evolve(spec, tmp_path / "cut", on_step=steps.append)
    assert not any(s.startswith("pool round 1/3") for s in steps)  # read from run.json, not loaded again
    assert "loading parents" in steps
    assert resumed.pool == whole.pool and resumed.trials == whole.trials == 13
    picked = lambda s: (s.best.trial, s.best.dev, s.best.test)  # noqa: E731
    assert picked(resumed) == picked(whole)
    assert resumed.sessions == 2
    # run again once finished: nothing is searched, the same summary
    again = evolve(spec, tmp_path / "cut")
    assert again.pool == whole.pool and again.best.test == whole.best.test


def test_a_raised_budget_continues_the_tournament_to_the_new_schedule(zoo, tmp_path) -> None:
    spec = load_search(_pool_search(zoo, tmp_path, budget=13))
    evolve(spec, tmp_path / "run")
    raised = evolve(spec.model_copy(update={"budget": 20}), tmp_path / "run")
    fresh = evolve(spec.model_copy(update={"budget": 20}), tmp_path / "fresh")
    # schedule(20, 3): every pair to 3 trials, the best two to 6, the best one to 11
    assert [r.trials for r in raised.pool.rounds] == [3, 6, 11]
    assert raised.pool == fresh.pool and raised.best.test == fresh.best.test and raised.trials == 20


def test_a_hybrid_search_runs_the_tournament_as_its_ps_stage_then_dfs_over_the_winner(zoo, tmp_path) -> None:
    path = _pool_search(zoo, tmp_path, budget=13)
    raw = yaml.safe_load(path.read_text()) | {"space": "hybrid", "dfs": {"parents": ["math"], "budget": 4}}
    path.write_text(yaml.safe_dump(raw))
    summary = evolve(load_search(path), tmp_path / "run")
    ps = json.loads((tmp_path / "run" / "ps" / "summary.json").read_text())
    assert summary.space == "hybrid" and summary.pool is not None and summary.pool.model_dump() == ps["pool"]
    assert summary.trials == 13 + 4 and summary.stages["ps"].test == ps["best"]["test"]
    assert set(summary.parents) == {"base", "math", "language", "plain"}
    dfs = json.loads((tmp_path / "run" / "dfs" / "run.json").read_text())
    assert list(dfs["search"]["parents"]) == ["ps", "math"] and dfs["search"]["pool"] is None
    from shoal.report import write_report

    combined = write_report(tmp_path / "run")[-1].read_text()
    assert "## Pool tournament" in combined and f"**{'+'.join(summary.pool.winner)}** won" in combined
    assert dfs["search"]["parents"]["ps"] == str((tmp_path / "run" / "ps" / "best").resolve())


def test_a_kill_inside_a_subsets_search_keeps_that_sessions_time_and_the_progress_never_goes_back(zoo,
                                                                                                tmp_path) -> None:
    spec = load_search(_pool_search(zoo, tmp_path, budget=13))
    run = tmp_path / "run"

    def kill_after_two(p) -> None:
        if p.done == 2:  # the first subset's second trial is stored
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evolve(spec, run, on_trial=kill_after_two)
    first = json.loads((run / "subsets" / "math+language" / "run.json").read_text())["sessions"][-1]["seconds"]
    pool = json.loads((run / "run.json").read_text())["sessions"][-1]["seconds"]
    assert 0 < first <= pool
    done: list[int] = []
    summary = evolve(spec, run, on_trial=lambda p: done.append(p.done))  # continued subsets replay their trials
    assert done == sorted(done) and done[-1] == 13 and summary.trials == 13
    assert summary.wall_seconds >= first and summary.sessions == 2


def test_a_pool_run_moved_after_a_kill_resumes_from_its_subsets_own_journals(zoo, tmp_path) -> None:
    """Each subset's run.json keeps where its journal was written; a moved pool reads them where they are now."""
    spec = load_search(_pool_search(zoo, tmp_path, budget=13))

    def kill_after_five(p) -> None:
        if p.done == 5:  # subsets finished in this session, and one inside its search
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evolve(spec, tmp_path / "run", on_trial=kill_after_five)
    (tmp_path / "run").rename(tmp_path / "moved")
    resumed, fresh = evolve(spec, tmp_path / "moved"), evolve(spec, tmp_path / "fresh")
    assert resumed.pool == fresh.pool and resumed.trials == fresh.trials == 13
    assert resumed.best.test == fresh.best.test and not (tmp_path / "run").exists()


def test_a_pool_with_ray_workers_starts_ray_once_for_every_subsets_search(zoo, tmp_path, monkeypatch) -> None:
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    starts: list[object] = []
    real = ray.init
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: starts.append(kwargs) or real(*args, **kwargs, num_cpus=2))
    path = _pool_search(zoo, tmp_path, budget=6)  # one round: two trials for each pair, one a worker
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {
        "pool": {"subset": 2, "survivors": [], "shares": [1.0]}}))
    spec = load_search(path)
    parallel, serial = evolve(spec, tmp_path / "parallel", workers=2), evolve(spec, tmp_path / "serial")
    assert [r.trials for r in parallel.pool.rounds] == [2] and len(parallel.pool.rounds[0].dev) == 3
    assert len(starts) == 1 and not ray.is_initialized()  # one Ray for every subset search, shut down after
    assert parallel.pool == serial.pool and parallel.best.test == serial.best.test


def test_a_refused_search_leaves_no_pool_folder_behind(zoo, tmp_path) -> None:
    spec = load_search(_pool_search(zoo, tmp_path, budget=13, fitness={"mode": "race"}))
    with pytest.raises(ShoalError, match="race scores a generation"):
        evolve(spec, tmp_path / "run", workers=2)
    assert not (tmp_path / "run").exists()


def test_a_changed_selection_measures_the_rounds_again_as_a_fresh_run_does(zoo, tmp_path) -> None:
    """select is outside the search hash (a rerun picks again with new settings), so the scores run.json keeps
    are measured again when it changes."""
    spec = load_search(_pool_search(zoo, tmp_path, budget=13, fitness={"mode": "subset", "items": 2},
                                    select={"top": 1}))
    evolve(spec, tmp_path / "run")
    top5 = spec.model_copy(update={"select": spec.select.model_copy(update={"top": 5})})
    steps: list[str] = []
    rerun, fresh = evolve(top5, tmp_path / "run", on_step=steps.append), evolve(top5, tmp_path / "fresh")
    assert rerun.pool == fresh.pool and rerun.best.test == fresh.best.test and rerun.trials == 13
    # each subset's pick in each round (3 + 2 + 1) measured again under the new selection, none taken from run.json
    assert steps.count("re-scoring the top 5 trials on the whole dev split") == 6


def test_a_subset_whose_every_trial_fails_ranks_last_and_the_tournament_goes_on(zoo, tmp_path, monkeypatch) -> None:
    import shoal.search.evolve as evolve_module

    real = evolve_module.search_fitness

    def failing_with_plain(spec, space, tasks):  # every candidate with the copy of the base fails
        fitness = real(spec, space, tasks)
        if "plain" not in spec.parents:
            return fitness

        def fail(values, seed, upcoming=None, generation=None):
            raise ShoalError("NaN or inf in tensor model.norm.weight")
        return fail

    monkeypatch.setattr(evolve_module, "search_fitness", failing_with_plain)
    notices: list[str] = []
    summary = evolve(load_search(_pool_search(zoo, tmp_path, budget=13)), tmp_path / "run", notice=notices.append)
    first = summary.pool.rounds[0].dev
    assert list(first)[0] == "math+language" and first["math+plain"] is None and first["language+plain"] is None
    # the two pairs tie last (the pool's order decides), so math+plain goes on to round 2 and fails again
    assert summary.pool.rounds[1].dev == {"math+language": summary.pool.rounds[1].dev["math+language"],
                                          "math+plain": None}
    assert summary.pool.winner == ["math", "language"] and summary.failed_trials == 3 + 2
    assert sum("every trial" in n and "failed" in n and "ranks last" in n for n in notices) == 3
    from shoal.report import write_report

    assert "| math+plain | – |" in write_report(tmp_path / "run")[0].read_text()


def test_an_unfinished_tournament_and_a_hybrid_in_its_pool_stage_are_reported(zoo, tmp_path) -> None:
    from shoal.report import write_report

    path = _pool_search(zoo, tmp_path, budget=13)
    raw = yaml.safe_load(path.read_text()) | {"space": "hybrid", "dfs": {"parents": ["math"], "budget": 4}}
    path.write_text(yaml.safe_dump(raw))

    def stop_in_round_2(step: str) -> None:
        if step.startswith("pool round 2/3"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evolve(load_search(path), tmp_path / "run", on_step=stop_in_round_2)
    hybrid = write_report(tmp_path / "run")[-1].read_text()
    assert "ps" in hybrid and "not started" in hybrid
    stage = write_report(tmp_path / "run" / "ps")[0].read_text()
    leader = next(iter(json.loads((tmp_path / "run" / "ps" / "run.json").read_text())["rounds"][0]["dev"]))
    assert "**The run has not finished**" in stage and f"`shoal-ps-{leader}`" in stage  # round 1's best so far
