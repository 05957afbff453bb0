"""How many torch threads `shoal merge` takes beside other work, and libgomp's spin count: a merge's thousands of
short parallel steps wait for a thread whose core is busy elsewhere (BENCHMARKS.md: 211 s against 26)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import write_recipe

from shoal import threads
from shoal.threads import CpuSample, busy_cores, free_threads

HZ = 100


def _sample(busy: int, total: int, own: float, wall: float) -> CpuSample:
    return CpuSample(busy=busy, total=total, own=own, wall=wall)


def test_busy_cores_leave_out_this_process_and_need_a_long_enough_span() -> None:
    start = _sample(busy=1000, total=5000, own=3.0, wall=10.0)
    # one second on 2 cores: 200 ticks; 100 of them busy, all this process's own
    assert busy_cores(start, _sample(1100, 5200, own=4.0, wall=11.0), HZ) == (0.0, 2.0)
    # the same ticks busy, none of them ours: another process held a core
    assert busy_cores(start, _sample(1100, 5200, own=3.0, wall=11.0), HZ) == (1.0, 2.0)
    # 4 cores over half a second, 1.5 cores' worth busy beside 0.25 s of ours
    assert busy_cores(start, _sample(1100, 5200, own=3.25, wall=10.5), HZ) == (1.5, 4.0)
    assert busy_cores(start, _sample(1010, 5040, own=3.0, wall=10.1), HZ) is None  # under MIN_SPAN
    assert busy_cores(start, _sample(1000, 5000, own=3.0, wall=11.0), HZ) is None  # no ticks counted


@pytest.mark.parametrize(("others", "most", "expected"), [
    (0.0, 2, (2, None)),
    (0.3, 2, (2, None)),  # a little background work leaves both cores to the merge
    (1.0, 2, (1, "merging on 1 torch thread: other work keeps 1.0 of this machine's 2 cores busy")),
    (2.0, 2, (1, "merging on 1 torch thread: other work keeps 2.0 of this machine's 2 cores busy")),
    (2.0, 1, (1, None)),
    (3.0, 8, (5, "merging on 5 torch threads: other work keeps 3.0 of this machine's 8 cores busy")),
])
def test_free_threads_are_the_cores_other_work_leaves(monkeypatch, others, most, expected) -> None:
    cores = max(most, 2)
    start = _sample(busy=0, total=0, own=0.0, wall=0.0)
    now = _sample(busy=round(others * HZ), total=cores * HZ, own=0.0, wall=1.0)
    monkeypatch.setattr(threads, "cpu_sample", lambda: now)
    monkeypatch.setattr(os, "sysconf", lambda name: HZ)
    assert free_threads(start, most) == expected
    assert free_threads(None, most) == (most, None)  # nothing sampled: torch's default


def test_shoal_merge_says_when_it_takes_fewer_threads_and_j_overrides(monkeypatch, run_cli, parents, tmp_path) -> None:
    import torch

    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(parents[n]), "parameters": {"weight": 1.0}} for n in ("a", "b")]})
    busy = iter([_sample(0, 0, 0.0, 0.0), _sample(200, 400, 0.0, 1.0)] * 2)  # 2 of 4 cores busy: 2 threads
    monkeypatch.setattr(threads, "cpu_sample", lambda: next(busy))
    monkeypatch.setattr("shoal.cli.merge.cpu_sample", lambda: next(busy))
    monkeypatch.setattr(os, "sysconf", lambda name: HZ)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    seen: list[int] = []
    real = threads.torch_threads
    monkeypatch.setattr("shoal.cli.merge.torch_threads", lambda n: (seen.append(n), real(n))[1])
    code, _, err = run_cli("merge", recipe, tmp_path / "out")
    assert code == 0, err
    assert err.splitlines()[0] == ("merging on 2 torch threads: other work keeps 2.0 of this machine's 4 cores busy "
                                   "(-j N sets the count)")
    code, _, err = run_cli("merge", recipe, tmp_path / "out3", "-j", "3")
    assert code == 0 and "torch thread" not in err
    assert seen == [2, 3]


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "10000"), ({"GOMP_SPINCOUNT": "5"}, "5"), ({"OMP_WAIT_POLICY": "PASSIVE"}, "unset")])
def test_the_spin_count_is_set_before_torch_loads_unless_the_user_chose(env, expected) -> None:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import shoal.cli, os, sys; print(os.environ.get('GOMP_SPINCOUNT', 'unset'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [expected, "False"]


def test_shoal_evolve_takes_the_free_cores_too(monkeypatch, run_cli, zoo, tmp_path) -> None:
    import torch

    from conftest import zoo_search

    search = zoo_search(zoo, tmp_path, tasks=[{"path": str(tmp_path / "no-such-task")}])
    busy = iter([_sample(0, 0, 0.0, 0.0), _sample(100, 200, 0.0, 1.0)])  # 1 of 2 cores busy
    monkeypatch.setattr(threads, "cpu_sample", lambda: next(busy))
    monkeypatch.setattr("shoal.cli.evolve.cpu_sample", lambda: next(busy))
    monkeypatch.setattr(os, "sysconf", lambda name: HZ)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    set_to: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    code, _, err = run_cli("evolve", search, tmp_path / "run")
    assert code == 2 and set_to == [1]
    assert err.splitlines()[0] == ("searching on 1 torch thread: other work keeps 1.0 of this machine's 2 cores busy "
                                   "(--threads N sets the count)")
    assert "no-such-task not found" in err.splitlines()[-1]
