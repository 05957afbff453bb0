"""An lm-evaluation-harness task over the zoo's data, scored on the live model, agrees with shoal's evaluation."""

from __future__ import annotations

import os
import shutil
from importlib.metadata import version

import pytest
import torch
import yaml
from conftest import own_output_task

from shoal.evaluate import evaluate, load_task
from shoal.evaluate.lm_eval_task import LmEvalTask
from shoal.search.fitness import DevFitness, load_tasks
from shoal.search.spaces import ParameterSpace
from shoal.search.spec import load_search
from shoal.zoo.build import build_zoo

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A zoo task whose answers are half the language parent's own greedy outputs (so scores are ~0.5, not 0),
    as a shoal task folder and as an lm-eval task YAML over the same JSONL files, and a search using the latter."""
    torch.set_num_threads(1)
    zoo = build_zoo(tmp_path_factory.mktemp("zoo"), seed=0, size="smoke", threads=1)
    folder = own_output_task(zoo, tmp_path_factory.mktemp("task"), every=2)
    include = tmp_path_factory.mktemp("lm_eval_tasks")
    (include / "zoo_own.yaml").write_text(yaml.safe_dump({
        "task": "zoo_own",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(folder / "dev.jsonl"), "test": str(folder / "test.jsonl")}},
        "validation_split": "validation",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "output_type": "generate_until",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
        "filter_list": [{"name": "none", "filter": [{"function": "regex", "regex_pattern": "^\\s*(.*?)\\s*$"},
                                                    {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }))
    search = tmp_path_factory.mktemp("search") / "search.yaml"
    search.write_text(yaml.safe_dump({
        "base": str(zoo.base), "parents": {k: str(v) for k, v in zoo.parents.items()},
        "genome": {"layers_per_group": 0},
        "tasks": [{"lm_eval": {"task": "zoo_own", "include": str(include)}}], "budget": 4,
    }))
    return zoo, folder, include, search


def test_lm_eval_task_scores_the_live_model_as_shoal_eval_does(setup) -> None:
    zoo, folder, include, _ = setup
    from shoal.evaluate.runner import load_model

    model, tokenizer = load_model(zoo.parents["language"], "cpu")
    task = LmEvalTask("zoo_own", str(include))
    for split in ("dev", "test"):
        ours = evaluate(model, load_task(folder), split, tokenizer=tokenizer).score
        assert 0.3 < ours < 0.7  # half the answers are the model's own outputs
        assert task.score(model, tokenizer, split, 32) == ours


def test_an_lm_eval_task_as_fitness_equals_the_shoal_task_on_the_same_data(setup) -> None:
    zoo, folder, _, search_file = setup
    spec = load_search(search_file)
    space = ParameterSpace(spec.model_copy(update={"overlap": False}))
    values = space.genome.values([0.9] * len(space.genome))
    through_lm_eval = DevFitness(space, load_tasks(spec), 64)(values, 0)
    shoal_spec = spec.model_copy(update={"tasks": [spec.tasks[0].model_copy(update={"lm_eval": None,
                                                                                      "path": str(folder)})]})
    through_shoal = DevFitness(space, load_tasks(shoal_spec), 64)(values, 0)
    assert through_lm_eval.scores == {"zoo_own": through_shoal.scores["own"]}


def test_an_lm_eval_task_digest_follows_its_include_files_and_lm_eval(setup, tmp_path) -> None:
    """What a resumed search compares (run.json's task_digests): a task YAML edited under include changes it."""
    include = shutil.copytree(setup[2], tmp_path / "include")
    task = LmEvalTask("zoo_own", str(include))
    before = task.digest()
    assert before.startswith(f"lm_eval {version('lm_eval')} ")
    (include / "__pycache__").mkdir()
    (include / "__pycache__" / "utils.cpython-311.pyc").write_bytes(b"compiled")
    (include / ".git").mkdir()  # include is a checkout: `git status` rewrites its index
    (include / ".git" / "index").write_bytes(b"index")
    assert task.digest() == before
    yaml_file = include / "zoo_own.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("max_gen_toks: 12", "max_gen_toks: 13"))
    assert task.digest() != before
    assert LmEvalTask("zoo_own").digest() == f"lm_eval {version('lm_eval')} registry"
