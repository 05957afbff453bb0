"""`shoal evolve`: the search is stored trial by trial, resumes exactly, survives failing candidates, and reports."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file
from conftest import kill_once_stored, zoo_search

from shoal.errors import ShoalError
from shoal.evaluate import evaluate, load_task
from shoal.merge.resident import ResidentMerger
from shoal.recipe import Recipe
from shoal.search.evolve import evolve
from shoal.search.fitness import DevFitness, WeightedTask
from shoal.search.loop import SerialEvaluator, run_trials
from shoal.search.optimizer import CmaEs
from shoal.search.run_folder import read_summary
from shoal.search.spaces import ParameterSpace
from shoal.search.spec import SelectSpec, load_search
from shoal.search.storage import open_storage
from shoal.search.trials import open_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")


_search = functools.partial(zoo_search, budget=14)


def _trials(run_dir: Path) -> list[tuple[dict, float | None, str]]:
    study = optuna.load_study(study_name="shoal", storage=open_storage(str(run_dir / 'study.log')))
    return [(t.params, t.value, t.state.name) for t in sorted(study.trials, key=lambda t: t.number)]


def test_extending_the_budget_continues_the_same_trajectory(zoo, tmp_path) -> None:
    search = load_search(_search(zoo, tmp_path))
    assert CmaEs(8).population == 10  # 2 parents x (weight, density) x (layers, embeddings); 4 + floor(3 ln 8)
    evolve(search.model_copy(update={"budget": 13}), tmp_path / "twice")  # stops inside the second generation
    summary = evolve(search.model_copy(update={"budget": 24}), tmp_path / "twice")
    evolve(search.model_copy(update={"budget": 24}), tmp_path / "once")
    twice, once = _trials(tmp_path / "twice"), _trials(tmp_path / "once")
    assert len(once) == 24 and twice == once
    study = optuna.load_study(study_name="shoal", storage=open_storage(str(tmp_path / "once" / "study.log")))
    assert {t.user_attrs["seed"] for t in study.trials} == {search.seed}  # every trial drawn under the search's
    assert summary.trials == 24 and summary.sessions == 2


def test_rerunning_a_finished_run_reads_its_summary(zoo, tmp_path) -> None:
    """Nothing is loaded, written or scored again (at 7B, best/ and the test scores cost minutes); another
    selection picks again from the stored trials, and a raised budget searches on."""
    run, task = tmp_path / "run", tmp_path / "task"
    shutil.copytree(zoo.tasks["xx-math"], task)
    search = load_search(_search(zoo, tmp_path, budget=5, fitness={"mode": "subset", "items": 4},
                                 tasks=[{"path": str(task)}]))
    first = evolve(search, run)
    written = (run / "best" / "model-00001-of-00001.safetensors").stat().st_mtime_ns
    steps: list[str] = []
    say = dict(on_step=steps.append, on_trial=lambda progress: steps.append(f"evaluated {progress.evaluated}"))
    assert evolve(search, run, **say) == first == read_summary(run)
    assert steps == [f"{run} holds this search, finished at this budget and selection: its summary is as written "
                     "then (raise the budget to search on)"]
    assert (run / "best" / "model-00001-of-00001.safetensors").stat().st_mtime_ns == written
    assert len(json.loads((run / "run.json").read_text())["sessions"]) == 1
    steps.clear()
    picked = evolve(search.model_copy(update={"select": SelectSpec(top=2)}), run, **say)
    assert "re-scoring the top 2 trials on the whole dev split" in steps and "evaluated 0" in steps
    assert not any(s.startswith("evaluated 1") for s in steps) and len(_trials(run)) == 5
    assert picked.selection.top == 2 and picked.sessions == 2
    steps.clear()
    assert evolve(search.model_copy(update={"budget": 6}), run, **say).trials == 6
    assert "evaluated 1" in steps and len(_trials(run)) == 6
    notes: list[str] = []
    assert evolve(search, run, notice=notes.append).trials == 5  # a lower budget: its first 5 trials, said so
    assert notes == [f"{run} holds 6 trials; this budget reads the first 5 of them (the best model and summary are "
                     "of those; a larger --budget reads the rest)"]
    dev = task / "dev.jsonl"
    dev.write_text("".join(dev.read_text().splitlines(keepends=True)[:-1]))  # a dev item fewer
    with pytest.raises(ShoalError, match="task xx-math has changed since this run started"):
        evolve(search.model_copy(update={"budget": 6}), run)  # a finished run's, as a resumed one's


@pytest.mark.parametrize("space,population", [("ps", 10), ("dfs", 13)])
def test_resume_after_kill_keeps_every_trial_and_the_trajectory(zoo, tmp_path, space, population) -> None:
    """Killed in its second generation or later: the killed session's budget is out of its reach, so the kill
    lands inside the search however late it comes on a loaded machine. The budget is no part of the search's
    identity; the resumed and the whole run are given one a generation beyond what the killed session stored."""
    path = _search(zoo, tmp_path, budget=10_000, space=space)
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "shoal", "evolve", str(path), str(killed), "--threads", "1"]
    kill_once_stored(command, killed, population + 3)
    before = _trials(killed)
    assert len(before) >= population + 3  # killed in its second generation or later
    assert not (killed / "summary.json").exists()
    budget = len(before) + population
    resumed = subprocess.run([*command, "--budget", str(budget)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    shown = [line.split("/")[0].split()[-1] for line in resumed.stderr.splitlines() if line.startswith("trials ")]
    assert int(shown[0]) > len(before)  # the trials line starts past the stored ones (their replay is not shown)
    evolve(load_search(_search(zoo, tmp_path, budget=budget, space=space)), tmp_path / "whole")
    after, whole = _trials(killed), _trials(tmp_path / "whole")
    assert after[: len(before)] == before  # nothing stored was lost or re-run
    assert after == whole and len(whole) == budget


def test_failing_candidates_are_recorded_and_the_search_goes_on(zoo, tmp_path) -> None:
    search = load_search(_search(zoo, tmp_path))
    space = ParameterSpace(search)
    genome = space.genome
    fitness = DevFitness(space, [WeightedTask(load_task(zoo.tasks["xx-math"]), 1.0)], 64)
    poisoned = lambda values: values | {"math.weight.layers0-1": float("inf")}
    calls = []

    def objective(values, seed, upcoming=None, generation=None):
        calls.append(seed)
        if len(calls) == 1:  # trial 1 is merged in the background during trial 0, with NaN weights: refused
            upcoming = (poisoned(upcoming[0]), upcoming[1])
        if len(calls) == 2:
            values = poisoned(values)
        if len(calls) == 4:
            raise RuntimeError("the model crashed")
        return fitness(values, seed, upcoming)

    study = open_study(f"sqlite:///{tmp_path / 'study.db'}", "x")
    run_trials(study, genome, CmaEs(len(genome), seed=0), SerialEvaluator(objective), budget=12, seed=5,
               failure_fitness=0.0)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "FAIL"] + ["COMPLETE"] * 8
    assert "NaN or inf in tensor" in trials[1].user_attrs["error"]
    assert trials[3].user_attrs["error"] == "RuntimeError: the model crashed"
    assert calls == [5] * 12  # every trial merged under the search's seed


def test_merging_ahead_changes_no_result_and_hides_the_merge(zoo, tmp_path) -> None:
    search = load_search(_search(zoo, tmp_path, budget=12))
    ahead = evolve(search, tmp_path / "ahead")
    evolve(search.model_copy(update={"overlap": False}), tmp_path / "inline")
    assert _trials(tmp_path / "ahead") == _trials(tmp_path / "inline")
    study = optuna.load_study(study_name="shoal", storage=open_storage(str(tmp_path / 'ahead' / 'study.log')))
    waited = [t.user_attrs["merge_seconds"] < t.user_attrs["merge_compute_seconds"] / 2 for t in study.trials]
    assert waited[0] is False and sum(waited[1:10]) >= 7  # a generation's first waits; the others were merged ahead
    assert ahead.seconds_per_trial.merge < ahead.seconds_per_trial.merge_compute


def test_best_folder_is_the_in_memory_merge_and_summary_scores_are_real(zoo, tmp_path) -> None:
    run = tmp_path / "run"
    summary = evolve(load_search(_search(zoo, tmp_path, budget=10)), run)
    assert read_summary(run) == summary
    best = summary.best
    trial = _trials(run)[best.trial]
    assert trial[1] == best.dev == max(t[1] for t in _trials(run) if t[1] is not None)
    merger = ResidentMerger(Recipe.model_validate(best.recipe))
    merger.apply(Recipe.model_validate(best.recipe))
    on_disk = {k: v for shard in sorted((run / "best").glob("*.safetensors")) for k, v in load_file(shard).items()}
    live = dict(merger.model.named_parameters())
    for name, tensor in on_disk.items():
        assert torch.equal(live[name].detach(), tensor), name
    assert yaml.safe_load((run / "best" / "recipe.yaml").read_text()) == best.recipe
    task = load_task(zoo.tasks["xx-math"])
    assert best.test == evaluate(run / "best", task, "test").score
    assert summary.parents["math"] == evaluate(zoo.parents["math"], task, "test").score
    assert set(summary.untuned) == {"linear", "task_arithmetic", "ties", "dare_ties", "start"}
    assert summary.trials == 10 and summary.failed_trials == 0
    assert summary.seconds_per_trial.merge > 0 and summary.seconds_per_trial.eval > 0


def test_a_run_folder_of_another_search_is_refused(zoo, tmp_path) -> None:
    evolve(load_search(_search(zoo, tmp_path, budget=2)), tmp_path / "run")
    other = load_search(_search(zoo, tmp_path / "other", budget=2, seed=6))
    with pytest.raises(ShoalError, match="different search"):
        evolve(other, tmp_path / "run")


def test_demo_with_the_hybrid_space_prints_both_stages(zoo, tmp_path, run_cli) -> None:
    code, out, err = run_cli("demo", "--out", tmp_path / "demo", "--budget", 4, "--zoo", zoo.root, "--zoo-size", "smoke",
                             "--space", "hybrid")
    assert code == 0, err
    summary = json.loads((tmp_path / "demo" / "run" / "summary.json").read_text())
    assert summary["space"] == "hybrid" and summary["trials"] == 8
    assert "ps stage" in out and "dfs stage" in out and "evolved, hybrid" in out


def test_demo_builds_evolves_reports_and_prints_the_table(zoo, tmp_path, run_cli) -> None:
    code, out, err = run_cli("demo", "--out", tmp_path / "demo", "--budget", 6, "--zoo", zoo.root, "--zoo-size", "smoke")
    assert code == 0, err
    run = tmp_path / "demo" / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trials"] == 6 and (run / "best" / "config.json").is_file()
    assert {p.name for p in (run / "report").iterdir()} == {"report.md", "fitness.png", "compute.png", "recipe.png"}
    assert "untuned merge: ties" in out and f"{100 * summary['best']['test']:.1f}" in out


def test_data_flow_search_exports_the_path_it_scored(zoo, tmp_path) -> None:
    """DFS: the path starts as parent A alone, the best path is exported, and the export scores what the path did."""
    search = load_search(_search(zoo, tmp_path, space="dfs", budget=14, dfs={"parents": ["language", "math"]}))
    summary = evolve(search, tmp_path / "run")
    assert summary.space == "dfs" and summary.best.parents_order == ["language", "math"]
    assert summary.genes == 12 + 16  # T = (2 + 2 layers) x 3 repeats indicator genes, then W (4 x 4)
    from shoal.search.spaces import FlowSpace

    space = FlowSpace(search)
    start = space.genome.path(space.genome.values(space.genome.start()))
    assert [(s.parent, s.layer, s.scale) for s in start] == [("language", 0, 1.0), ("language", 1, 1.0)]
    trial = optuna.load_study(study_name="shoal", storage=open_storage(str(tmp_path / 'run' / 'study.log'))).trials[
        summary.best.trial]
    path = space.genome.path(trial.params)
    assert [step.model_dump() for step in summary.best.path] == [
        {"parent": s.parent, "layer": s.layer, "scale": s.scale} for s in path]
    config = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert config["num_hidden_layers"] == len(path)
    task = load_task(zoo.tasks["xx-math"])
    live = evaluate(space.build(trial.params, 0), task, "dev", tokenizer=space.tokenizer).score
    assert live == summary.best.dev == evaluate(tmp_path / "run" / "best", task, "dev").score


def test_hybrid_runs_ps_then_dfs_over_the_ps_result(zoo, tmp_path) -> None:
    search = load_search(_search(zoo, tmp_path, space="hybrid", budget=6, dfs={"parents": ["math"], "budget": 5,
                                                                              "scaling": "seam"}))
    summary = evolve(search, tmp_path / "run")
    ps = json.loads((tmp_path / "run" / "ps" / "summary.json").read_text())
    dfs = json.loads((tmp_path / "run" / "dfs" / "summary.json").read_text())
    assert summary.space == "hybrid" and ps["space"] == "ps" and dfs["space"] == "dfs"
    assert (ps["trials"], dfs["trials"], summary.trials) == (6, 5, 11)
    assert dfs["best"]["parents_order"] == ["ps", "math"] and "ps" in dfs["parents"]
    assert dfs["parents"]["ps"] == ps["best"]["test"]  # stage 2's parent A is stage 1's best model
    assert summary.stages["ps"].test == ps["best"]["test"] and summary.best.test == dfs["best"]["test"]
    assert summary.parents == ps["parents"] and (tmp_path / "run" / "best" / "path.yaml").is_file()
    steps: list[str] = []
    assert evolve(search, tmp_path / "run", on_step=steps.append) == summary and len(steps) == 1  # read, not rerun
    moved = tmp_path / "moved"  # stage 2's parent A is in the run folder: the DFS search survives a move
    shutil.move(tmp_path / "run", moved)
    (moved / "summary.json").unlink()  # so that each stage is opened again, and found finished
    assert evolve(search, moved).best == summary.best
    record = json.loads((moved / "run.json").read_text())
    assert record["ps_best_trial"] == ps["best"]["trial"]
    (moved / "run.json").write_text(json.dumps(record | {"ps_best_trial": 99}))
    stage = json.loads((moved / "dfs" / "run.json").read_text())  # its search names the PS trial its A is
    (moved / "dfs" / "run.json").write_text(json.dumps(stage | {"search_hash": "over trial 99"}))
    notes: list[str] = []  # as if a larger PS budget had found another best: the DFS stage is searched again
    raised = evolve(search.model_copy(update={"budget": 7}), moved, notice=notes.append)
    again = json.loads((moved / "ps" / "summary.json").read_text())["best"]["trial"]
    assert notes == [f"the PS stage's best trial is now #{again}, and the DFS trials stored were scored over #99: they "
                     f"are moved to {moved / 'dfs-over-ps-99'}, and the DFS stage starts again over #{again}"]
    assert len(json.loads((moved / "dfs-over-ps-99" / "run.json").read_text())["sessions"]) == 1
    assert raised.stages["ps"].trials == 7 and raised.stages["dfs"].trials == 5
    assert json.loads((moved / "run.json").read_text())["ps_best_trial"] == again
    notes.clear()  # another selection: the PS stage writes its best again, and the DFS stage over it goes on
    evolve(search.model_copy(update={"budget": 7, "select": SelectSpec(top=2)}), moved, notice=notes.append)
    assert notes == [] and sorted(p.name for p in moved.iterdir() if p.name.startswith("dfs")) == ["dfs", "dfs-over-ps-99"]
    assert "parents.ps" not in json.loads((moved / "dfs" / "run.json").read_text())["parent_digests"]


def test_the_study_opens_in_optuna_dashboard(zoo, tmp_path) -> None:
    """optuna-dashboard's own API (its WSGI app, no server) lists the run's trials and best trial."""
    dashboard = pytest.importorskip("optuna_dashboard")
    import io

    summary = evolve(load_search(_search(zoo, tmp_path, budget=5)), tmp_path / "run")
    app = dashboard.wsgi(open_storage(str(tmp_path / 'run' / 'study.log')))

    def get(path: str) -> dict:
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "SERVER_NAME": "x", "SERVER_PORT": "80",
                   "wsgi.input": io.BytesIO(), "wsgi.url_scheme": "http", "QUERY_STRING": ""}
        return json.loads(b"".join(app(environ, lambda status, headers, *rest: None)))

    [listed] = get("/api/studies")["study_summaries"]
    study = get(f"/api/studies/{listed['study_id']}")
    assert listed["study_name"] == "shoal" and len(study["trials"]) == 5
    assert [t["number"] for t in study["best_trials"]] == [summary.best.trial]


def test_a_search_whose_whole_generation_fails_alike_stops_with_the_reason(zoo, tmp_path) -> None:
    search = load_search(_search(zoo, tmp_path, budget=30))
    genome = ParameterSpace(search).genome

    def broken(values, seed, upcoming=None, generation=None):
        raise RuntimeError("shape mismatch in layer 3")

    study = open_study(f"sqlite:///{tmp_path / 'study.db'}", "x")
    with pytest.raises(ShoalError, match="every trial of generation 0 failed the same way.*shape mismatch in layer 3"):
        run_trials(study, genome, CmaEs(len(genome), seed=0), SerialEvaluator(broken), budget=30, seed=0,
                   failure_fitness=0.0)
    assert len(study.trials) == 10  # one generation, stored, then the stop


def test_a_failed_trial_is_told_below_every_score_even_without_a_floor(zoo, tmp_path) -> None:
    """Log-likelihood-like fitness (negative): a failure must still rank last, not at the nominal floor 0."""
    from shoal.search.trials import Evaluation

    genome = ParameterSpace(load_search(_search(zoo, tmp_path))).genome
    told: list[list[float]] = []

    class Recording(CmaEs):
        def tell(self, solutions):
            told.append([f for _, f in solutions])
            super().tell(solutions)

    calls = []

    def objective(values, seed, upcoming=None, generation=None):
        calls.append(seed)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return Evaluation(-5.0 - len(calls), {}, 0.0, 0.0)

    study = open_study(f"sqlite:///{tmp_path / 'study.db'}", "x")
    run_trials(study, genome, Recording(len(genome), seed=0), SerialEvaluator(objective), budget=10, seed=0,
               failure_fitness=0.0)
    assert told[0][2] == -16.0 and min(told[0][:2] + told[0][3:]) == -15.0  # worst score -15, failure one below
