"""The devices shoal runs on, named as torch names them: checked before anything is loaded."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from shoal.errors import ShoalError

if TYPE_CHECKING:
    import torch

ACCEPTED = "accepted: cpu, cuda, cuda:N, mps"
_NAME = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def is_device_name(device: str) -> bool:
    return bool(_NAME.match(device))


def check_device(device: str, where: str = "--device") -> str:
    """device, if it is a known name and present on this machine; else a ShoalError saying which and why."""
    if not is_device_name(device):
        raise ShoalError(f"{where} {device}: unknown device ({ACCEPTED})")
    if device == "cpu":
        return device
    import torch

    if device == "mps" and not torch.backends.mps.is_available():
        raise ShoalError(f"{where} {device}: no Apple GPU (MPS) is available here")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ShoalError(f"{where} {device}: no CUDA GPU is available here")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ShoalError(f"{where} {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered from 0")
    return device


def cpu_linear_slowdown(dtype: torch.dtype, repeats: int = 3) -> float:
    """How many times longer a linear layer's product (64 rows by a 1024 x 1024 weight, as a model computes it)
    takes in dtype than in float32 on this CPU, with the caller's torch threads: the best of `repeats` runs each,
    taken in turns (under 0.1 s in all on an AVX2 CPU, which has no bfloat16 instructions). A CPU without
    AVX512-BF16 or AMX runs bfloat16 several times slower than float32 (BENCHMARKS.md: an AVX2 CPU scored a 0.55B
    model 2.5-3.2x slower in bfloat16; cpu_dtype.py prints this call's own seconds)."""
    import time

    import torch
    from torch.nn.functional import linear

    generator = torch.Generator().manual_seed(0)
    shapes = ((64, 1024), (1024, 1024))
    inputs = {d: [torch.randn(s, generator=generator).to(d) for s in shapes] for d in (torch.float32, dtype)}
    best = dict.fromkeys(inputs, float("inf"))
    for run in range(repeats + 1):  # the first run of each warms its kernels and is not counted
        for d, (rows, weight) in inputs.items():
            start = time.perf_counter()
            linear(rows, weight)
            if run:
                best[d] = min(best[d], time.perf_counter() - start)
    return best[dtype] / best[torch.float32]
