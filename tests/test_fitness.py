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
from shoal.search.evolve import evolve
from shoal.search.fitness import GenerationSubset
from shoal.search.run_folder import read_summary
from shoal.search.select import select
from shoal.search.spaces import ParameterSpace
from shoal.search.spec import load_search, parse_search
from shoal.search.storage import open_storage
from shoal.search.trials import Evaluation, Trial, stored_trials
from shoal.zoo.build import Zoo
from tests.conftest import own_output_task

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
    base = "base: b\nparents: {a: a}\ntasks: [{path: t}]\n"
    with pytest.raises(ShoalError, match="items"):
        parse_search(base + "fitness: {mode: subset}\n", "s.yaml", Path("."))
    with pytest.raises(ShoalError, match="items"):
        parse_search(base + "fitness: {items: 4}\n", "s.yaml", Path("."))
    spec = parse_search(base + "fitness: {mode: subset, items: 4}\nselect: {top: 3}\n", "s.yaml", Path("."))
    plain = parse_search(base, "s.yaml", Path("."))
    assert spec.select.top == 3 and plain.fitness.mode == "full" and plain.select.top == 5
    assert spec.search_hash() != plain.search_hash()  # the fitness decides the trajectory...
    assert parse_search(base + "select: {top: 2}\n", "s.yaml", Path(".")).search_hash() == plain.search_hash()


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


def test_a_task_whose_dev_items_are_test_items_is_refused(zoo, tmp_path, task) -> None:
    leaky = tmp_path / "leaky"
    shutil.copytree(task, leaky)
    test = (leaky / "test.jsonl").read_text().splitlines()
    (leaky / "dev.jsonl").write_text((leaky / "dev.jsonl").read_text() + "\n".join(test[:3]) + "\n")
    spec = load_search(_search(zoo, tmp_path, leaky))
    with pytest.raises(ShoalError, match=r"task own .*3 of its \d+ dev items share a prompt with its test split"):
        evolve(spec, tmp_path / "run")
    assert not (tmp_path / "run").exists()
