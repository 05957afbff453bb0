"""The devices shoal runs on, named as torch names them: checked before anything is loaded."""

from __future__ import annotations

import re

from shoal.errors import ShoalError

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
