"""How many torch threads `shoal merge` takes beside other work, and libgomp's spin count: a merge's thousands of
short parallel steps wait for a thread whose core is busy elsewhere (BENCHMARKS.md: 241 s against 24)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import write_recipe

from shoal import threads
from shoal.threads import CpuSample, Spare, busy_cores, cpu_sample, spare_threads

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
    (0.0, 2, Spare(2, 0.0, 2.0)),
    (0.3, 2, Spare(2, 0.3, 2.0)),  # a little background work leaves both cores to the merge
    (1.0, 2, Spare(1, 1.0, 2.0)),
    (2.0, 2, Spare(1, 2.0, 2.0)),
    (2.0, 1, None),  # one thread anyway
    (3.0, 8, Spare(5, 3.0, 8.0)),
])
def test_spare_threads_are_the_cores_other_work_leaves(monkeypatch, others, most, expected) -> None:
    cores = max(most, 2)
    start = _sample(busy=0, total=0, own=0.0, wall=0.0)
    now = _sample(busy=round(others * HZ), total=cores * HZ, own=0.0, wall=1.0)
    monkeypatch.setattr(threads, "cpu_sample", lambda: now)
    monkeypatch.setattr(os, "sysconf", lambda name: HZ)
    assert spare_threads(start, most) == expected
    assert spare_threads(None, most) is None  # nothing sampled: torch's default


def test_a_sample_counts_only_the_cores_this_process_may_run_on(monkeypatch) -> None:
    stat = ("cpu  900 0 900 900 0 0 0 0 0 0\n"
            "cpu0 100 0 100 800 0 0 0 0 0 0\ncpu1 400 0 400 0 0 0 0 0 0 0\ncpu2 10 0 20 70 0 0 0 0 0 0\n"
            "intr 12345\n")
    monkeypatch.setattr(threads, "Path", lambda name: type("Stat", (), {"read_text": lambda self: stat})())
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2}, raising=False)
    sample = cpu_sample()
    assert sample is not None and (sample.busy, sample.total) == (230, 1100)


def _busy_merge(monkeypatch, samples: list[CpuSample]) -> list[int]:
    """Make `shoal merge` see `samples` (its start, then the check), 4 cores by torch's count; return the threads it
    merges on, as they are set."""
    import torch

    it = iter(samples)
    monkeypatch.setattr(threads, "cpu_sample", lambda: next(it))
    monkeypatch.setattr("shoal.cli.merge.cpu_sample", lambda: next(it))
    monkeypatch.setattr(os, "sysconf", lambda name: HZ)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    seen: list[int] = []
    real = threads.torch_threads
    monkeypatch.setattr("shoal.cli.merge.torch_threads", lambda n: (seen.append(n), real(n))[1])
    return seen


def test_shoal_merge_says_when_it_takes_fewer_threads_and_j_overrides(monkeypatch, run_cli, parents, tmp_path) -> None:
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(parents[n]), "parameters": {"weight": 1.0}} for n in ("a", "b")]})
    seen = _busy_merge(monkeypatch, [_sample(0, 0, 0.0, 0.0), _sample(200, 400, 0.0, 1.0)] * 2)  # 2 of 4 cores busy
    code, _, err = run_cli("merge", recipe, tmp_path / "out")
    assert code == 0, err
    assert err.splitlines()[0] == ("merging on 2 torch threads: other work keeps 2.0 of this machine's 4 cores busy "
                                   "(-j N sets the count)")
    code, _, err = run_cli("merge", recipe, tmp_path / "out3", "-j", "3")
    assert code == 0 and "torch thread" not in err
    assert seen == [2, 3]


def test_an_error_found_before_the_merge_comes_alone(monkeypatch, run_cli, parents, tmp_path) -> None:
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(tmp_path / "missing"), "parameters": {"weight": 1.0}}]})
    _busy_merge(monkeypatch, [_sample(0, 0, 0.0, 0.0), _sample(200, 400, 0.0, 1.0)])
    code, _, err = run_cli("merge", recipe, tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_shoal_evolve_points_out_a_busy_machine_at_its_first_trial_and_keeps_its_threads(monkeypatch, run_cli, zoo,
                                                                                          tmp_path) -> None:
    import torch

    from conftest import zoo_search

    busy = iter([_sample(0, 0, 0.0, 0.0), _sample(100, 200, 0.0, 1.0)])  # 1 of 2 cores busy
    monkeypatch.setattr(threads, "cpu_sample", lambda: next(busy))
    monkeypatch.setattr("shoal.cli.evolve.cpu_sample", lambda: next(busy))
    monkeypatch.setattr(os, "sysconf", lambda name: HZ)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    set_to: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    code, _, err = run_cli("evolve", zoo_search(zoo, tmp_path, budget=2), tmp_path / "run")
    assert code == 0, err
    hint = ("other work keeps 1.0 of this machine's 2 cores busy: --threads 1 may search faster (keep one count for "
            "a run)")
    lines = err.splitlines()
    assert hint in lines and lines.index(hint) < next(i for i, x in enumerate(lines) if x.startswith("trials"))
    assert 1 not in set_to  # not lowered (a merge inside sets torch's own count back after it)


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "10000"), ({"GOMP_SPINCOUNT": "5"}, "5"), ({"OMP_WAIT_POLICY": "PASSIVE"}, "unset")])
def test_the_spin_count_is_set_before_torch_loads_unless_the_user_chose(env, expected) -> None:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import shoal.cli, os, sys; print(os.environ.get('GOMP_SPINCOUNT', 'unset'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [expected, "False"]
