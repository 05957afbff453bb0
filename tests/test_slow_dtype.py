"""A search whose live models are bfloat16 or float16 on a CPU that runs that dtype slowly says so, and what to set."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import zoo_search
from shoal.devices import cpu_linear_slowdown
from shoal.search import spaces
from shoal.search.evolve import evolve
from shoal.search.spec import load_search

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_float32_against_itself_is_one() -> None:
    assert cpu_linear_slowdown(torch.float32) == 1.0


@pytest.mark.parametrize("slow", [torch.bfloat16, torch.float32])
def test_the_slowdown_is_the_dtype_s_time_over_float32_s(monkeypatch, slow) -> None:
    real = torch.nn.functional.linear

    def linear(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if rows.dtype == slow:
            time.sleep(0.1)
        return real(rows, weight)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    ratio = cpu_linear_slowdown(torch.bfloat16, repeats=2)
    assert ratio > 5 if slow == torch.bfloat16 else ratio < 0.5


@pytest.mark.parametrize(("dtype", "slowdown", "told"), [
    ("bfloat16", 6.0, True), ("bfloat16", 1.5, False), ("float16", 2.0, True), (None, 9.0, False)])
def test_a_search_says_when_its_live_models_dtype_is_slow_on_this_cpu(zoo, tmp_path, monkeypatch, dtype, slowdown,
                                                                       told) -> None:
    timed: list[torch.dtype] = []
    monkeypatch.setattr(spaces, "cpu_linear_slowdown", lambda d: timed.append(d) or slowdown)
    search = load_search(zoo_search(zoo, tmp_path, budget=2, **({"dtype": dtype} if dtype else {})))
    notices: list[str] = []
    evolve(search, tmp_path / "run", notice=notices.append)
    slow = [n for n in notices if "linear layer" in n]
    # the zoo's parents are float32: with no dtype the live models are too, and nothing is timed
    assert timed == ([] if dtype is None else [getattr(torch, dtype)])
    assert slow == ([f"the live models are {dtype}, and a {dtype} linear layer took {slowdown:.1f}x as long as a "
                     f"float32 one on this CPU: a search with dtype: float32 may score faster here, at twice the "
                     f"live models' memory"] if told else [])


def test_a_pool_tournament_times_the_dtype_and_says_so_once(zoo, tmp_path, monkeypatch) -> None:
    """A tournament's subsets each load live models of the search's one dtype on the same CPU: the first search
    times it and says so; the others (three more, over two rounds) neither time nor repeat it."""
    timed: list[torch.dtype] = []
    monkeypatch.setattr(spaces, "cpu_linear_slowdown", lambda d: timed.append(d) or 6.0)
    parents = {"math": str(zoo.parents["math"]), "language": str(zoo.parents["language"]), "plain": str(zoo.base)}
    search = load_search(zoo_search(zoo, tmp_path, parents=parents, budget=6, dtype="bfloat16",
                                    pool={"subset": 2, "survivors": [1], "shares": [0.5, 0.5]}))
    notices: list[str] = []
    steps: list[str] = []
    summary = evolve(search, tmp_path / "run", notice=notices.append, on_step=steps.append)
    assert summary.pool is not None and [r.trials for r in summary.pool.rounds] == [1, 4]
    assert steps.count("loading parents") == 3 + 1  # four searches, each with its live models
    assert timed == [torch.bfloat16]
    assert len([n for n in notices if "bfloat16 linear layer took 6.0x" in n]) == 1
