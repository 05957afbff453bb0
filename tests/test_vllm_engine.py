"""`engine: vllm`: generation tasks scored on a resident vLLM engine whose weights follow each candidate.

vLLM cannot run on this project's test machine (no GPU; its CPU build needs sources from GitHub), so these tests
drive shoal's engine through `vllm_standin`, which keeps vLLM's contract for the calls shoal makes. The last test
runs the real vLLM where it is installed and a GPU is present.
"""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
import torch
import vllm_standin
import yaml
from conftest import base_and_language_task

from shoal.errors import ShoalError
from shoal.evaluate import evaluate, load_task
from shoal.search.evolve import evolve
from shoal.search.fitness import DevFitness, WeightedTask, search_fitness
from shoal.search.spaces import ParameterSpace
from shoal.search.spec import SearchSpec, load_search
from shoal.search.storage import open_storage
from shoal.zoo.build import Zoo

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def own_task(zoo, tmp_path_factory) -> Path:
    return base_and_language_task(zoo, tmp_path_factory.mktemp("task"))


@pytest.fixture
def standin(monkeypatch) -> type[vllm_standin.LLM]:
    for name, module in vllm_standin.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.setattr(vllm_standin.LLM, "instances", [])
    return vllm_standin.LLM


def _search(zoo: Zoo, task: Path, folder: Path, **extra: object) -> Path:
    spec = {"base": str(zoo.base), "parents": {name: str(path) for name, path in zoo.parents.items()},
            "genome": {"layers_per_group": 0}, "tasks": [{"path": str(task)}], "budget": 10, "seed": 3} | extra
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "search.yaml").write_text(yaml.safe_dump(spec))
    return folder / "search.yaml"


def _weights(space: ParameterSpace, language: float, math: float) -> dict[str, float]:
    """Gene values with the language and math parents' weights as given, every density 1."""
    return {g.name: ({"language": language, "math": math}[g.parent] if g.param == "weight" else 1.0)
            for g in space.genome.genes}


def test_every_candidate_is_scored_on_its_own_weights_as_transformers_scores_it(zoo, own_task, tmp_path, standin) -> None:
    spec = load_search(_search(zoo, own_task, tmp_path, engine="vllm", overlap=False))
    space = ParameterSpace(spec)
    task = load_task(own_task)
    fitness = search_fitness(spec, space, [WeightedTask(task, 1.0)])
    [engine] = standin.instances
    points = [_weights(space, 0.0, 0.0), _weights(space, 1.0, 0.0), _weights(space, 1.0, 1.0), _weights(space, 1.0, 0.5),
              _weights(space, 0.5, 0.5)]
    through_vllm, through_hf = [], []
    for i, values in enumerate(points):
        through_vllm.append(fitness(values, seed=i).fitness)
        through_hf.append(evaluate(space.build(values, i), task, "dev", tokenizer=space.tokenizer).score)
    assert through_vllm == through_hf
    # neighbours differ (the smoke zoo's merges answer like the base or like the language parent), so an engine
    # that kept the previous candidate's weights would score one of them wrong
    assert all(a != b for a, b in zip(through_hf, through_hf[1:]))
    assert engine.reloads == len(points)


def test_a_search_on_the_vllm_engine_stores_the_trials_of_one_on_transformers(zoo, own_task, tmp_path, standin) -> None:
    hf = evolve(load_search(_search(zoo, own_task, tmp_path / "hf")), tmp_path / "hf" / "run")
    on_vllm = evolve(load_search(_search(zoo, own_task, tmp_path / "vllm", engine="vllm")), tmp_path / "vllm" / "run")
    trials = lambda run: [(t.params, t.value) for t in optuna.load_study(
        study_name="shoal", storage=open_storage(str(run / 'study.log'))).trials]
    assert trials(tmp_path / "vllm" / "run") == trials(tmp_path / "hf" / "run")
    assert on_vllm.best == hf.best and standin.instances[0].reloads == 10


def test_forgetting_the_prefix_cache_would_be_caught(zoo, own_task, tmp_path, standin, monkeypatch) -> None:
    """The stand-in's prefix cache is what makes the tests above fail if the engine kept stale prompt KV."""
    from shoal.evaluate.vllm_engine import VllmEngine

    spec = load_search(_search(zoo, own_task, tmp_path, engine="vllm", overlap=False))
    space = ParameterSpace(spec)
    task = load_task(own_task)
    monkeypatch.setattr(standin, "reset_prefix_cache", lambda self, *a, **k: True)
    engine = VllmEngine(spec.base, dtype=torch.float32)
    fitness = DevFitness(space, [WeightedTask(task, 1.0)], spec.batch_size, engine)
    language = _weights(space, 1.0, 0.0)
    scores = [fitness(values, seed=0).fitness for values in (_weights(space, 0.0, 0.0), language)]
    assert scores[0] == scores[1] != evaluate(space.build(language, 0), task, "dev", tokenizer=space.tokenizer).score


def test_the_engine_refuses_what_would_score_other_weights_or_other_outputs(zoo, own_task, tmp_path, standin) -> None:
    from shoal.evaluate.vllm_engine import VllmEngine

    engine = VllmEngine(zoo.base, dtype=torch.float32, max_model_len=40)
    [llm] = standin.instances
    assert llm.model.dtype == torch.float32  # shoal names the candidates' dtype: vLLM's "auto" would be bfloat16
    prompts = [[1, 2, 3]] * 2
    assert len(engine.generate(prompts, max_new_tokens=37, stop=[])) == 2
    with pytest.raises(ShoalError, match="exceeds vLLM's max_model_len 40"):
        engine.generate(prompts, max_new_tokens=38, stop=[])  # vLLM would stop at 40 tokens, transformers not
    llm.busy = True
    with pytest.raises(ShoalError, match="kept its prefix cache"):
        engine.load(ParameterSpace(load_search(_search(zoo, own_task, tmp_path))).merger.model)
    with pytest.raises(ShoalError, match="float32, float16 or bfloat16"):
        VllmEngine(zoo.base, dtype=torch.float64)
    spec = load_search(_search(zoo, own_task, tmp_path, engine="vllm"))
    with pytest.raises(ShoalError, match="this search has none"):
        search_fitness(spec, ParameterSpace(spec), [])  # e.g. only log-likelihood tasks: the engine would idle


def test_the_engine_says_what_it_needs(zoo, monkeypatch) -> None:
    from shoal.evaluate.vllm_engine import VllmEngine

    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    with pytest.raises(ShoalError, match="pip install vllm"):
        VllmEngine(zoo.base, dtype=torch.float32)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ShoalError, match="in shoal's process"):
        VllmEngine(zoo.base, dtype=torch.float32)
    search = {"base": "b", "parents": {"m": "m"}, "tasks": [{"path": "t"}], "engine": "vllm"}
    with pytest.raises(ValueError, match="parameter-space candidates only"):
        SearchSpec.model_validate(search | {"space": "dfs"})
    with pytest.raises(ValueError, match="dtype, seed come from the search"):
        SearchSpec.model_validate(search | {"vllm": {"seed": 1, "dtype": "half", "enforce_eager": True}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM runs on a GPU here")
def test_real_vllm_generates_what_transformers_generates(zoo, own_task, tmp_path) -> None:
    pytest.importorskip("vllm")
    spec = load_search(_search(zoo, own_task, tmp_path, engine="vllm", overlap=False, device="cuda", dtype="float32",
                               vllm={"enforce_eager": True, "gpu_memory_utilization": 0.2}))
    space = ParameterSpace(spec)
    task = load_task(own_task)
    fitness = search_fitness(spec, space, [WeightedTask(task, 1.0)])
    for i, x in enumerate((0.0, 0.5, 1.0)):
        values = space.genome.values([x] * len(space.genome))
        expected = evaluate(space.build(values, i), task, "dev", tokenizer=space.tokenizer).score
        assert fitness(values, seed=i).fitness == pytest.approx(expected, abs=0.05)
