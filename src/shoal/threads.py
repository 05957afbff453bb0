"""torch's CPU threads set for a block of work, and restored after it; how many a merge should take beside other
work."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


SPIN = "10000"
"""GOMP_SPINCOUNT: how long an OpenMP thread spins for its peers at the end of a parallel step before it sleeps
(libgomp's default, 300,000, holds a core for milliseconds). Measured on a TIES merge of three 0.55B parents on 2
threads (benchmarks/merge_threads.py, BENCHMARKS.md): 14.2 s idle against 15.6 with the default, 51.6 s beside one
busy process against 241.3."""


def spin_briefly() -> None:
    """Set SPIN for torch's OpenMP threads unless the user set GOMP_SPINCOUNT or OMP_WAIT_POLICY; call it before
    torch loads (libgomp reads them once). It bounds what other work that starts during a merge costs; the threads
    a merge starts with are spare_threads'."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads for the block set to threads (unchanged if None), and restored after it, even on error."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


MIN_SPAN = 0.2
"""Seconds two CPU samples must be apart for the other processes' load between them to be read (/proc/stat counts
in hundredths of a second)."""


@dataclass(frozen=True)
class CpuSample:
    """The CPU time so far of the cores this process may run on (from /proc/stat, in clock ticks) and its own."""

    busy: int
    """Ticks those cores spent on any process (not idle or waiting on I/O)."""
    total: int
    own: float
    """This process's CPU seconds (every thread)."""
    wall: float


def cpu_sample() -> CpuSample | None:
    """Now's CpuSample, over the cores in this process's affinity (a container's, not the whole host's); None where
    /proc/stat cannot be read (not Linux)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and len(fields) >= 8):
            continue
        if mine is not None and int(name[3:]) not in mine:
            continue
        ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    if total == 0:
        return None
    return CpuSample(busy=busy, total=total, own=time.process_time(), wall=time.monotonic())


def busy_cores(before: CpuSample, after: CpuSample, hz: float) -> tuple[float, float] | None:
    """(cores other processes kept busy, cores) on average between two samples; None if under MIN_SPAN apart."""
    span = after.wall - before.wall
    if span < MIN_SPAN or after.total <= before.total:
        return None
    cores = (after.total - before.total) / hz / span
    others = (after.busy - before.busy) / hz - (after.own - before.own)
    return min(cores, max(0.0, others / span)), cores


@dataclass(frozen=True)
class Spare:
    """What other work left of this process's cores: threads, one per idle core (at least 1, at most torch's
    default); busy, the cores it kept busy; cores, how many there are."""

    threads: int
    busy: float
    cores: float

    @property
    def load(self) -> str:
        return f"other work keeps {self.busy:.1f} of this machine's {self.cores:.0f} cores busy"


def spare_threads(since: CpuSample | None, most: int) -> Spare | None:
    """The threads other processes left idle since `since`, for CPU work that would take `most` (torch's default);
    None where that cannot be read or most is 1. A merge runs thousands of short parallel steps, and torch's OpenMP
    threads wait for each other after each: with a core taken by other work, a thread there waits for its turn every
    step (a TIES merge of three 0.55B parents took 241 s on 2 threads beside one busy process, 24 s on 1; idle, 16 s
    on 2 and 23 s on 1: benchmarks/merge_threads.py, BENCHMARKS.md)."""
    now = cpu_sample() if since is not None and most > 1 else None
    load = busy_cores(since, now, os.sysconf("SC_CLK_TCK")) if now is not None else None
    if load is None:
        return None
    busy, cores = load
    return Spare(max(1, min(most, round(cores - busy))), busy, cores)
