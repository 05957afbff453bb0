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
threads: 17.5 s idle against 17.7 by default, 52 s beside one busy process against 211 (BENCHMARKS.md)."""


def spin_briefly() -> None:
    """Set SPIN for torch's OpenMP threads unless the user set GOMP_SPINCOUNT or OMP_WAIT_POLICY; call it before
    torch loads (libgomp reads them once). It bounds what other work that starts during a merge costs; the threads
    a merge starts with are free_threads'."""
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
    """The machine's CPU time so far (from /proc/stat, in clock ticks, all cores) and this process's own."""

    busy: int
    """Ticks all cores spent on any process (not idle or waiting on I/O)."""
    total: int
    own: float
    """This process's CPU seconds (every thread)."""
    wall: float


def cpu_sample() -> CpuSample | None:
    """Now's CpuSample; None where /proc/stat cannot be read (not Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    if fields[0] != "cpu" or len(ticks) < 8:
        return None
    return CpuSample(busy=sum(ticks) - ticks[3] - ticks[4], total=sum(ticks), own=time.process_time(),
                     wall=time.monotonic())


def busy_cores(before: CpuSample, after: CpuSample, hz: float) -> tuple[float, float] | None:
    """(cores other processes kept busy, cores) on average between two samples; None if under MIN_SPAN apart."""
    span = after.wall - before.wall
    if span < MIN_SPAN or after.total <= before.total:
        return None
    cores = (after.total - before.total) / hz / span
    others = (after.busy - before.busy) / hz - (after.own - before.own)
    return min(cores, max(0.0, others / span)), cores


def free_threads(since: CpuSample | None, most: int, doing: str = "merging") -> tuple[int, str | None]:
    """torch threads for CPU work (a merge; a search, `doing` says which): one per core that other processes left
    idle since `since` (at least 1, at most `most`, torch's default), and a line saying why when that is fewer. A merge runs thousands of short
    parallel steps, and torch's OpenMP threads wait for each other after each: with a core taken by other work, a
    thread there waits for its turn every step (a TIES merge of three 0.55B parents took 211 s on 2 threads beside
    one busy process, 26 s on 1; 18 and 25 s on an idle machine, BENCHMARKS.md)."""
    now = cpu_sample()
    load = busy_cores(since, now, os.sysconf("SC_CLK_TCK")) if since is not None and now is not None else None
    if load is None or most <= 1:
        return most, None
    busy, cores = load
    threads = max(1, min(most, round(cores - busy)))
    if threads == most:
        return most, None
    return threads, (f"{doing} on {threads} torch thread{'s' if threads > 1 else ''}: other work keeps {busy:.1f} of "
                     f"this machine's {cores:.0f} cores busy")
