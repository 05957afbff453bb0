"""Fitness modes and honest selection: a subset per generation replays exactly, the final model is picked by a
re-score on the whole dev split, and items and tokens add up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
import yaml

from shoal.errors import ShoalError
from shoal.evaluate import evaluate, load_task
from shoal.report import write_report
from shoal.search.evolve import evolve
from shoal.search.fitness import GenerationSubset
from shoal.search.optimizer import CmaEs
from shoal.search.run_folder import read_summary
from shoal.search.select import select
from shoal.search.spaces import ParameterSpace
from shoal.search.spec import load_search, parse_search
from shoal.search.storage import open_storage
from shoal.search.trials import Evaluation, Trial, stored_trials
from shoal.zoo.build import Zoo
from tests.conftest import own_output_task, zoo_search

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def task(zoo, tmp_path_factory) -> Path:
    """A generation task whose answers are the outputs of the search's start (the middle of the cube) on even items
    and the language parent's on odd ones, so that candidates score in between 0 and 1, and differently."""
    folder = tmp_path_factory.mktemp("own")
    own_output_task(zoo, folder)
    space = ParameterSpace(load_search(_search(zoo, folder / "search", folder)))
    start = space.build(space.genome.values(space.genome.start()), 0)
    scored = load_task(folder)
    for split in ("dev", "test"):
        outputs = evaluate(start, scored, split, tokenizer=space.tokenizer, return_outputs=True).outputs
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
        rows = [r | {"answer": o.strip()} if i % 2 == 0 else r for i, (r, o) in enumerate(zip(rows, outputs))]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _search(zoo: Zoo, folder: Path, task: Path, **extra: object) -> Path:
    spec = {
        "base": str(zoo.base),
        "parents": {name: str(path) for name, path in zoo.parents.items()},
        "method": "dare_ties",
        "genome": {"layers_per_group": 0},
        "tasks": [{"path": str(task)}],
        "budget": 10,
        "seed": 5,
        "sigma": 0.4,  # candidates far enough apart to score differently
    } | extra
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _trials(run_dir: Path) -> list[Trial]:
    study = optuna.load_study(study_name="shoal", storage=open_storage(str(run_dir / "study.log")))
    return sorted(stored_trials(study).values(), key=lambda t: t.index)


def _kept(trials: list[Trial]) -> list[tuple]:
    """What decides the trajectory and the results: everything but the timings."""
    return [(t.index, t.params, t.value, t.dev_scores, t.error, t.items, t.tokens) for t in trials]


def test_selection_picks_the_best_rescore_not_the_luckiest_search_score() -> None:
    trials = [Trial(i, 0, i, {}, value) for i, value in enumerate([0.9, 0.5, 0.8, None, 0.7, 0.6])]
    whole = {0: 0.4, 2: 0.6, 4: 0.65, 5: 0.99}  # trial 5 is not in the top 3 by search fitness: never looked at
    asked: list[int] = []

    def rescore(trial: Trial) -> Evaluation:
        asked.append(trial.index)
        return Evaluation(whole[trial.index], {}, 0.0, 0.0, items=7)

    selection = select(trials, 3, rescore)
    assert asked == [0, 2, 4]  # the top 3 by search fitness, best first
    assert selection.pick.trial.index == 4 and selection.pick.evaluation.fitness == 0.65


def test_a_subset_is_drawn_afresh_per_generation_and_again_alike() -> None:
    class Sized:
        name = "t"

        def items(self, split: str) -> list[int]:
            return list(range(50))

    draws = GenerationSubset(8, seed=3)
    first = draws.indices(Sized(), 0)  # type: ignore[arg-type]
    assert len(first) == 8 == len(set(first)) and first == sorted(first)
    assert first == GenerationSubset(8, seed=3).indices(Sized(), 0)  # type: ignore[arg-type]
    assert first != draws.indices(Sized(), 1)  # type: ignore[arg-type]
    assert first != GenerationSubset(8, seed=4).indices(Sized(), 0)  # type: ignore[arg-type]
    assert GenerationSubset(80, seed=3).indices(Sized(), 0) == list(range(50))  # type: ignore[arg-type]


def test_fitness_subset_needs_its_size() -> None:
    base = "base: org/b\nparents: {a: org/a}\ntasks: [{path: t}]\n"
    with pytest.raises(ShoalError, match="items"):
        parse_search(base + "fitness: {mode: subset}\n", "s.yaml", Path("."))
    with pytest.raises(ShoalError, match="items"):
        parse_search(base + "fitness: {items: 4}\n", "s.yaml", Path("."))
    spec = parse_search(base + "fitness: {mode: subset, items: 4}\nselect: {top: 3}\n", "s.yaml", Path("."))
    plain = parse_search(base, "s.yaml", Path("."))
    assert spec.select.top == 3 and plain.fitness.mode == "full" and plain.select.top == 5
    assert spec.search_hash() != plain.search_hash()  # the fitness decides the trajectory...
    assert parse_search(base + "select: {top: 2}\n", "s.yaml", Path(".")).search_hash() == plain.search_hash()


def test_select_on_takes_the_key_as_written_unquoted() -> None:
    """YAML 1.1 reads an unquoted `on` key as true; the README writes `select: {top: 5, on: dev}`."""
    base = "base: org/b\nparents: {a: org/a}\ntasks: [{path: t}]\n"
    for written in ("select: {top: 2, on: dev}\n", "select: {top: 2, 'on': dev}\n", "select:\n  top: 2\n  on: dev\n"):
        select = parse_search(base + written, "s.yaml", Path(".")).select
        assert (select.top, select.on) == (2, "dev"), written
    with pytest.raises(ShoalError, match="s.yaml:4: select.on: Input should be 'dev'"):
        parse_search(base + "select: {top: 2, on: test}\n", "s.yaml", Path("."))


def test_full_fitness_counts_every_dev_item_of_every_trial(zoo, tmp_path, task) -> None:
    dev = len(load_task(task).items("dev"))
    summary = evolve(load_search(_search(zoo, tmp_path, task, budget=6)), tmp_path / "run")
    trials = _trials(tmp_path / "run")
    assert [t.items for t in trials] == [dev] * 6
    assert all(t.tokens > 0 for t in trials)  # a generation task
    assert summary.compute is not None and summary.compute.items == 6 * dev
    assert summary.compute.tokens == sum(t.tokens for t in trials)
    assert summary.fitness == "full" and summary.best.search == summary.best.dev  # nothing to re-score
    assert summary.selection is not None and summary.selection.cost.items == 0
    assert read_summary(tmp_path / "run") == summary


def test_subset_run_is_picked_by_a_rescore_on_the_whole_dev_split(zoo, tmp_path, task) -> None:
    dev = len(load_task(task).items("dev"))
    run = tmp_path / "run"
    spec = load_search(_search(zoo, tmp_path, task, budget=12, fitness={"mode": "subset", "items": 6},
                               select={"top": 3}))
    summary = evolve(spec, run)
    trials = _trials(run)
    assert [t.items for t in trials] == [6] * 12 and dev > 6
    space, scored = ParameterSpace(spec), load_task(task)
    for trial in (trials[3], trials[11]):  # generations 0 and 1: each scored on its generation's draw
        drawn = GenerationSubset(6, spec.seed).of(scored, trial.generation)
        model = space.build(trial.params, trial.seed)
        assert trial.value == evaluate(model, drawn, "dev", tokenizer=space.tokenizer).score
    leaders = sorted((t for t in trials if t.value is not None), key=lambda t: (-t.value, t.index))[:3]
    selection = summary.selection
    assert selection is not None and [r.trial for r in selection.rescored] == [t.index for t in leaders]
    assert [r.search for r in selection.rescored] == [t.value for t in leaders]
    assert selection.cost.items == 3 * dev
    best = summary.best
    assert best.dev == max(r.dev for r in selection.rescored)
    assert best.search == trials[best.trial].value
    assert best.dev == evaluate(run / "best", scored, "dev").score  # the re-score is the exported model's
    assert best.test == evaluate(run / "best", scored, "test").score
    assert summary.compute is not None and summary.compute.items == 72
    assert any(r.dev != r.search for r in selection.rescored)  # a subset's score is not the whole split's


def test_subset_search_resumed_mid_generation_stores_the_uninterrupted_trials(zoo, tmp_path, task) -> None:
    spec = load_search(_search(zoo, tmp_path, task, budget=24, fitness={"mode": "subset", "items": 5},
                               select={"top": 2}))
    evolve(spec.model_copy(update={"budget": 13}), tmp_path / "twice")  # stops inside the second generation
    summary = evolve(spec, tmp_path / "twice")
    evolve(spec, tmp_path / "once")
    twice, once = _trials(tmp_path / "twice"), _trials(tmp_path / "once")
    assert len(once) == 24 and _kept(twice) == _kept(once)
    assert len({tuple(sorted(t.dev_scores.items())) for t in once}) > 1  # scores that can tell candidates apart
    assert summary == read_summary(tmp_path / "twice") and summary.sessions == 2


def test_a_compute_budget_ends_with_the_generation_that_spends_it_and_a_larger_one_continues_alike(
        zoo, tmp_path, task, run_cli) -> None:
    spec = load_search(_search(zoo, tmp_path, task, budget=100, fitness={"mode": "subset", "items": 5},
                               select={"top": 2}))
    assert spec.search_hash() == spec.model_copy(update={"budget_items": 7}).search_hash()  # a budget, not a setting
    within = lambda items: spec.model_copy(update={"budget_items": items})
    population = CmaEs(len(ParameterSpace(spec).genome), sigma=spec.sigma, seed=spec.seed).population
    generation = 5 * population  # dev items a generation scores
    summary = evolve(within(generation + 1), tmp_path / "run")  # one more item than a generation: a second one
    assert (summary.trials, summary.budget_items, summary.population) == (2 * population, generation + 1, population)
    assert summary.compute is not None and summary.compute.items == 2 * generation
    more = evolve(within(3 * generation), tmp_path / "run")
    evolve(within(3 * generation), tmp_path / "once")
    once = _trials(tmp_path / "once")
    assert more.trials == len(once) == 3 * population and _kept(_trials(tmp_path / "run")) == _kept(once)
    fewer = evolve(within(generation), tmp_path / "run")  # the stored trials past a smaller budget are not this run's
    assert fewer.trials == population and fewer.compute is not None and fewer.compute.items == generation
    assert fewer.best.trial < population
    first_generation = sum(t.tokens for t in once[:population])
    by_tokens = evolve(spec.model_copy(update={"budget_tokens": first_generation + 1}), tmp_path / "once")
    assert by_tokens.trials == 2 * population and by_tokens.budget_tokens == first_generation + 1
    code, _, err = run_cli("evolve", tmp_path / "search.yaml", tmp_path / "run", "--budget-items", generation + 1)
    assert code == 0, err
    assert read_summary(tmp_path / "run").trials == 2 * population
    report = write_report(tmp_path / "run")[0].read_text()
    assert f"budget 100 trials or {generation + 1:,} dev items, whichever came first" in report


def test_a_task_whose_dev_items_are_test_items_is_refused(zoo, tmp_path, task) -> None:
    leaky = tmp_path / "leaky"
    shutil.copytree(task, leaky)
    test = (leaky / "test.jsonl").read_text().splitlines()
    (leaky / "dev.jsonl").write_text((leaky / "dev.jsonl").read_text() + "\n".join(test[:3]) + "\n")
    spec = load_search(_search(zoo, tmp_path, leaky))
    with pytest.raises(ShoalError, match=r"task own .*3 of its \d+ dev items share a prompt with its test split"):
        evolve(spec, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _race(zoo, tmp_path, task, **extra):  # noqa: ANN202
    return load_search(_search(zoo, tmp_path, task, fitness={"mode": "race", "first": 4, "delta": 0.5}, **extra))


def test_race_tells_finishers_their_whole_dev_score_and_the_rest_an_upper_bound(zoo, tmp_path, task) -> None:
    spec = _race(zoo, tmp_path, task, budget=10, select={"top": 2})  # one generation of 10; μ = 5
    summary = evolve(spec, tmp_path / "run")
    trials = _trials(tmp_path / "run")
    space, scored = ParameterSpace(spec), load_task(task)
    dev = len(scored.items("dev"))
    full = [evaluate(space.build(t.params, t.seed), scored, "dev", tokenizer=space.tokenizer).score for t in trials]
    assert sum(t.items == dev for t in trials) >= 5  # μ finish
    for trial, whole in zip(trials, full):
        if trial.items == dev:
            assert trial.value == pytest.approx(whole)  # scored on every dev item
        else:
            assert trial.value >= whole and trial.items < dev  # told its upper bound, on fewer items
    by_value = sorted(range(10), key=lambda i: -trials[i].value)[:5]
    assert sorted(by_value) == sorted(sorted(range(10), key=lambda i: -full[i])[:5])  # CMA-ES selects as in full
    assert summary.compute is not None and summary.compute.items == sum(t.items for t in trials)
    assert summary.fitness.startswith("race")


def test_race_evaluator_scores_a_generation_in_rounds_and_stops_the_hopeless(tmp_path, monkeypatch) -> None:
    """With known per-item scores (a stand-in space and evaluate): the hopeless stop early on fewer items, the
    finishers are told their mean over every item, the items come in one order per generation, and each candidate
    is built once per round it runs (and once before the race)."""
    import random

    from shoal.evaluate.runner import EvalResult
    from shoal.search import racing
    from shoal.search.fitness import WeightedTask
    from shoal.search.trials import Job

    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "task.yaml").write_text("name: many\nmetric: exact_match\nsplits: {dev: dev.jsonl, test: test.jsonl}\n")
    (folder / "dev.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "a"}) + "\n" for i in range(400)))
    (folder / "test.jsonl").write_text(json.dumps({"prompt": "t", "answer": "a"}) + "\n")
    rates = [0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 0.85, 0.9, 0.92, 0.95]
    rng = random.Random(0)
    table = [[float(rng.random() < p) for _ in range(400)] for p in rates]
    builds: list[int] = []
    asked: list[tuple[int, list[int]]] = []

    class Space:
        tokenizer = None

        def build(self, values, seed, slot=0):
            builds.append(int(values["c"]))
            return int(values["c"])

    def fake_evaluate(model, part, split, tokenizer, batch_size):
        ids = [int(item.prompt[1:]) for item in part.items(split)]
        asked.append((model, ids))
        scores = [table[model][i] for i in ids]
        return EvalResult("many", split, "exact_match", sum(scores) / len(scores), len(ids), {}, 0.0, item_scores=scores)

    monkeypatch.setattr(racing, "evaluate", fake_evaluate)
    task = load_task(folder)
    evaluator = racing.RaceEvaluator(Space(), [WeightedTask(task, 1.0)], 64, mu=3, seed=1, first=16, delta=0.05)
    jobs = [Job(10 + c, 1, {"c": float(c)}, c) for c in range(10)]
    told = {job.index - 10: outcome for job, outcome in evaluator.run(jobs)}
    assert all(told[c].items < 400 for c in range(5)) and all(told[c].items == 400 for c in (7, 8, 9))
    for c in (7, 8, 9):
        assert told[c].fitness == pytest.approx(sum(table[c]) / 400)
    assert sum(o.items for o in told.values()) < 0.7 * 4000
    order = racing.item_order(task, 1, 1)
    assert sorted(order) == list(range(400)) and order != list(range(400))
    for c in range(10):  # each candidate's items, in the generation's order, each once
        mine = [i for model, ids in asked if model == c for i in ids]
        assert mine == order[: told[c].items]
    rounds = {c: sum(1 for model, _ in asked if model == c) for c in range(10)}
    assert {c: builds.count(c) for c in range(10)} == {c: rounds[c] + 1 for c in range(10)}


def test_race_search_extended_mid_generation_stores_the_uninterrupted_trials(zoo, tmp_path, task) -> None:
    spec = _race(zoo, tmp_path, task, budget=24, select={"top": 2})
    evolve(spec.model_copy(update={"budget": 13}), tmp_path / "twice")  # the budget ends inside generation 2
    evolve(spec, tmp_path / "twice")
    evolve(spec, tmp_path / "once")
    twice, once = _trials(tmp_path / "twice"), _trials(tmp_path / "once")
    assert len(once) == 24 and _kept(twice) == _kept(once)


def test_race_search_killed_while_storing_a_generation_resumes_into_the_same_trials(zoo, tmp_path, task,
                                                                                 monkeypatch) -> None:
    """A raced generation is stored as a burst at its end; a crash inside the burst leaves part of it stored, and
    the resumed run races the whole generation again and stores the rest as one run would."""
    from shoal.search import racing

    spec = _race(zoo, tmp_path, task, budget=20, select={"top": 2})
    real = racing.RaceEvaluator.run

    def crashing(self, jobs):
        for k, pair in enumerate(real(self, jobs)):
            if jobs[0].generation == 1 and k == 4:
                raise KeyboardInterrupt
            yield pair

    monkeypatch.setattr(racing.RaceEvaluator, "run", crashing)
    with pytest.raises(KeyboardInterrupt):
        evolve(spec, tmp_path / "killed")
    assert len(_trials(tmp_path / "killed")) == 14
    monkeypatch.setattr(racing.RaceEvaluator, "run", real)
    evolve(spec, tmp_path / "killed")
    evolve(spec, tmp_path / "once")
    assert _kept(_trials(tmp_path / "killed")) == _kept(_trials(tmp_path / "once"))


def test_race_is_refused_where_it_cannot_bound_or_cannot_run(zoo, tmp_path, task) -> None:
    base = "base: b\nparents: {a: a}\ntasks: [{path: t}]\n"
    with pytest.raises(ShoalError, match="first and delta are settings of mode race"):
        parse_search(base + "fitness: {mode: full, first: 4}\n", "s.yaml", Path("."))
    with pytest.raises(ShoalError, match="delta"):
        parse_search(base + "fitness: {mode: race, delta: 1.5}\n", "s.yaml", Path("."))
    with pytest.raises(ShoalError, match="cannot be split over --workers"):
        evolve(_race(zoo, tmp_path, task), tmp_path / "run", workers=2)
    logprob = tmp_path / "logprob"
    shutil.copytree(task, logprob)
    (logprob / "task.yaml").write_text((logprob / "task.yaml").read_text().replace("exact_match", "answer_logprob"))
    with pytest.raises(ShoalError, match=r"race needs item scores in \[0, 1\]"):
        evolve(load_search(_search(zoo, tmp_path / "lp", logprob, fitness={"mode": "race"})), tmp_path / "run2")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_two_tasks_of_one_name_are_refused_before_the_parents_load(zoo: Zoo, tmp_path: Path, run_cli) -> None:
    copy = tmp_path / "copy-of-xx-math"
    shutil.copytree(zoo.tasks["xx-math"], copy)  # another folder, the same name in its task.yaml
    search = zoo_search(zoo, tmp_path, tasks=[{"path": str(zoo.tasks["xx-math"])}, {"path": str(copy)}])
    code, _, err = run_cli("evolve", search, tmp_path / "run", "--threads", 1)
    assert code == 2 and err.count("\n") == 1
    assert "error: tasks[0] and tasks[1] are both named 'xx-math'" in err and "give each task its own name" in err
    assert not (tmp_path / "run").exists()
