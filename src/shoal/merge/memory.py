"""The resident merger's memory plan: where its inputs live and what it keeps, and the bytes a plan needs.

The bytes come from the checkpoints' headers (shapes and dtypes) before anything is read, so a search that does
not fit is refused with the figure at its start rather than failing mid-run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from shoal.checkpoint.reader import Checkpoint
from shoal.errors import ShoalError
from shoal.merge import methods, norms
from shoal.merge.plan import DTYPE_OF_TAG, MergePlan, TensorInput, input_bytes
from shoal.merge.registry import MergeMethod

Placement = Literal["device", "host", "stream"]

CHUNK_TEMPORARIES = (2, 6)
"""A task-vector merge of a tensor in chunks (methods.in_chunks) forms its task vectors, dropped vectors, sign votes
and sums a chunk at a time: at most about 2 n + 6 compute-dtype chunks at once, besides each parent's keep mask
(mask_bytes)."""
ARITHMETIC_COPIES_TASK_VECTORS_WHOLE = (3, 8)
"""A task-vector merge of a tensor in one piece, where the dropped vectors, the sum, the sign votes, the elected
signs, the divisor, a weighted vector and its agreement mask are whole: 3 n + 8 compute-dtype tensors of its size
(benchmarks/merge_peak.py measured 5.3-16.4 over 2-4 parents)."""
ARITHMETIC_COPIES_OTHER = (1, 2)
"""Any other method: about n + 2 (its inputs widened, the result and one temporary)."""
TABLE_BYTES = 48
"""Bytes an entry of a piece that making a search's table of DARE's draws (merge.norms.Drawn, at a task vector's
first merge, before its chunks are merged) holds at most: τ, its magnitudes and q (float32), the hashes' three int64
tensors off a CPU, each entry's bin and slot (int64), q in float64 for the sums."""
READ_AHEAD_LIMIT = 512 * 2**20
"""The streamed plan reads the next tensor's inputs while this one merges when they are at most this many bytes (as
read from the files); a larger one (a large vocabulary's embedding or head) is read once this one is merged and let
go, so two of them are never held at once."""


def mask_bytes(sparsify: str | None, work: int, ranks_kept: bool, on_cpu: bool = True, compiled: bool = False
               ) -> tuple[int, int]:
    """Bytes per entry that a task-vector merge in chunks holds besides its inputs and chunks: each parent's keep
    mask (bool, held until the tensor is merged; DARE's is held only in a CPU's eager steps, drawn again where it is
    used off a CPU and in a CPU's compiled pass (compiled), and so is TIES' trim in a 16-bit dtype found again from
    its threshold), and the most held
    at once while one mask is formed (the task vector whole in the recipe's dtype of `work` bytes, its magnitudes, a
    threshold's mask or a row sort's keys, indices and places). Counted from methods.py, plus what
    benchmarks/merge_peak.py measured beyond that count on a CPU in two runs (up to 1.6 bytes an entry for DARE, 2
    for TIES: freed blocks the allocator had not yet returned), rounded up to 2."""
    if sparsify is None or (sparsify == "magnitude" and ranks_kept):
        return 0, 0  # no mask, or the stored ranks compared a chunk at a time
    if sparsify == "random":  # else drawn again where it is used (methods.RandomDraws)
        return (1, 2) if methods.holds_draws(on_cpu, compiled) else (0, 2)
    if sparsify == "magnitude" and (not on_cpu or compiled) and work == 2:  # found again where used (MagnitudeCut)
        return 0, 2
    if sparsify == "magnitude":
        return 1, 2 * work + 4 + (work if work >= 4 else 0)  # kthvalue copies a 32-bit tensor
    if sparsify == "outliers":
        return 1, 3 * work + 6
    if sparsify == "magprune":
        return 1, 4 if ranks_kept else 3 * work + 16
    raise ValueError(f"unknown sparsify {sparsify!r}")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$")


def parse_bytes(text: str | int) -> int:
    """A size as bytes: a number with an optional unit, decimal (kB, MB, GB, TB) or binary (KiB, MiB, GiB, TiB)."""
    match = _SIZE.match(str(text).lower())
    if match is None or match.group(2) not in _UNITS:
        raise ShoalError(f"memory limit {text!r}: give a size such as 24GB, 24GiB, 512MB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(count: int) -> str:
    """bytes in decimal units with three significant digits: 812 MB, 1.23 GB, 170 GB."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            value = count / size
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{count} B"


class MemoryPlan(BaseModel):
    """Where the resident merger keeps the inputs of every trial's merge, and which of them it keeps.

    inputs: `device` keeps them on the search device (fastest); `host` in CPU memory (pinned when the device is a
    CUDA GPU), each tensor's moved to the device as it is merged; `stream` keeps none: each trial reads them again
    from the memory-mapped parent files, tensor by tensor, and forms task vectors and ranks anew (keep and ranks
    do not apply). On a CPU device, host is the same memory as device.
    keep: for task-vector methods, `deltas` keeps the task vectors (parent - base, in the float32 arithmetic's
    dtype: rounded to the parents' bfloat16 they would change the merge) instead of the parents; `parents` keeps the
    parents in their own dtype and forms the task vectors each trial (half the bytes for 16-bit parents).
    ranks: TIES' and DELLA's magnitude ranks, `stored` (in the smallest integer dtype that holds them) or
    `recomputed` each trial.
    limit: refuse a plan needing more device memory than this (e.g. 24GB); on a CUDA GPU the default is its free
    memory at the start.
    Every plan gives the same weights as `shoal merge`, bit for bit.
    """

    model_config = ConfigDict(extra="forbid")

    inputs: Placement = "device"
    keep: Literal["deltas", "parents"] = "deltas"
    ranks: Literal["stored", "recomputed"] = "stored"
    limit: str | None = None

    @field_validator("limit", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(int(value))
        if isinstance(value, str):
            try:
                parse_bytes(value)
            except ShoalError as error:
                raise ValueError(str(error)) from None
        return value

    @property
    def limit_bytes(self) -> int | None:
        return None if self.limit is None else parse_bytes(self.limit)

    def describe(self) -> str:
        if self.inputs == "stream":
            return "inputs streamed from the parent files"
        return f"inputs on {self.inputs}, keep {self.keep}, ranks {self.ranks}"


def storage_dtype(own: torch.dtype, work: torch.dtype) -> torch.dtype:
    """The dtype an input is kept in: the recipe's working dtype when it is no wider than the input's own (rounding
    once is what every trial would do), else the input's own (never widened for storage)."""
    return work if work.itemsize <= own.itemsize else own


@dataclass(frozen=True)
class TensorSize:
    """What the byte count needs of one output tensor, from the checkpoints' headers."""

    numel: int
    out: int
    """Bytes per element in the live model."""
    merged: bool
    """False for a tensor copied unchanged (a VLM's vision tower): it lives in the live model only."""
    base: int = 0
    """Bytes per element of the kept base (0: the method uses none)."""
    inputs: tuple[int, ...] = ()
    """Bytes per element of each kept parent tensor (storage_dtype)."""
    compute: int = 4
    """Bytes per element of the arithmetic (and of a kept task vector): 4, or 8 for float64."""
    rank: int = 0
    """Bytes per element of a stored magnitude rank (0: the method ranks nothing)."""
    task_vectors: bool = False
    """The method merges task vectors, which can be kept instead of the parents."""
    sparsify: str | None = None
    """The task-vector method's drop step (registry.Sparsify)."""
    work: int = 4
    """Bytes per element of the recipe's dtype, in which task vectors are ranked."""
    scratch: bool = False
    """The method writes its result into the live model's scratch buffer (an elementwise one: a chunk at most)."""
    pieces: bool = False
    """The task-vector method merges a tensor a piece at a time (registry.MergeMethod.pieces); one without (SCE,
    RAM) holds its task vectors whole."""
    read: int = 0
    """Bytes of the tensor's inputs as read from the parents' files (plan.input_bytes), as the streamed plan reads
    them."""


@dataclass(frozen=True)
class MemoryNeed:
    """The bytes a plan needs: on the search device, in host memory beside it, and what they are made of."""

    device: int
    host: int
    inputs: int
    """Kept base, parents or task vectors (on the device or the host, as the plan says)."""
    ranks: int
    models: int
    """The live models (two with merge-ahead)."""
    working: int
    """Per-model scratch buffers, and one tensor's merge at a time: its inputs moved or read, its temporaries."""


def _held(t: TensorSize) -> int:
    """The bytes a streamed tensor's inputs take once read: as read from the files, or as kept in the working dtype
    (a vocabulary job's rows aligned onto the output vocabulary), whichever is more."""
    return max(t.read, t.numel * (t.base + sum(t.inputs)))


def memory_need(sizes: Sequence[TensorSize], plan: MemoryPlan, *, slots: int, on_cpu: bool, compiled: bool = False
                ) -> MemoryNeed:
    """The bytes `plan` needs for tensors of these sizes and `slots` live models (on_cpu: the device is the host;
    compiled: the task-vector merges take merge.fused's compiled pass)."""
    kept = ranks = models = scratch = step = 0
    chunk = methods.chunk_entries(on_cpu)
    merged = [t for t in sizes if t.merged]
    for t in sizes:
        models += slots * t.numel * t.out
    for i, t in enumerate(merged):
        if t.scratch:
            scratch = max(scratch, min(t.numel, chunk) * t.compute)
        parents = t.numel * (t.base + sum(t.inputs))
        tensor_kept = tensor_ranks = 0
        ranks_kept = plan.inputs != "stream" and plan.ranks == "stored" and t.rank > 0
        if plan.inputs != "stream":
            deltas = t.task_vectors and plan.keep == "deltas"
            tensor_kept = t.numel * (t.base + t.compute * len(t.inputs)) if deltas else parents
            tensor_ranks = t.numel * t.rank * len(t.inputs) if ranks_kept else 0
        kept += tensor_kept
        ranks += tensor_ranks
        n = len(t.inputs)
        if t.task_vectors and t.pieces and t.numel > chunk:  # in chunks, as methods.in_chunks decides
            held, forming = mask_bytes(t.sparsify, t.work, ranks_kept, on_cpu, compiled)
            per, extra = CHUNK_TEMPORARIES
            temporaries = chunk * t.compute * (per * n + extra)
            if compiled and on_cpu:  # merge.fused's larger chunks: a result, its rounded copy, masks from ranks
                temporaries = max(temporaries, min(t.numel, methods.COMPILED_CHUNK) * (t.compute + t.out + n))
            if t.sparsify == "random" and t.numel >= norms.TABLE_MIN:  # its table of DARE's draws, made first
                piece = methods.bins_piece(on_cpu, compiled and on_cpu)
                temporaries = max(temporaries, min(t.numel, piece) * TABLE_BYTES)
            arithmetic = t.numel * (held * n + forming) + temporaries
        else:  # in one piece, or whole anyway (a task-vector method without pieces)
            per, extra = ARITHMETIC_COPIES_TASK_VECTORS_WHOLE if t.task_vectors else ARITHMETIC_COPIES_OTHER
            arithmetic = t.numel * t.compute * (per * n + extra)
        if plan.inputs == "stream":  # read from the files; the next tensor's read while this one merges
            following = merged[i + 1] if i + 1 < len(merged) else None
            ahead = 0 if following is None or following.read > READ_AHEAD_LIMIT else _held(following)
            moved = _held(t) + ahead
        else:
            moved = 0 if on_cpu or plan.inputs == "device" else tensor_kept + tensor_ranks
        step = max(step, arithmetic + moved)
    working = slots * scratch + step
    on_host = plan.inputs == "host" and not on_cpu
    device = models + working + (0 if on_host else kept + ranks)
    return MemoryNeed(device=device, host=kept + ranks if on_host else 0, inputs=kept, ranks=ranks, models=models,
                      working=working)


def tensor_sizes(plan: MergePlan, parents: dict[str, Checkpoint], method: MergeMethod) -> list[TensorSize]:
    """Each output tensor's TensorSize, from the parents' headers (no tensor is read)."""
    sizes = []
    for job in plan.jobs:
        numel = math.prod(job.spec.shape)
        out = job.spec.dtype.itemsize
        if job.verbatim:
            sizes.append(TensorSize(numel=numel, out=out, merged=False))
            continue
        def kept(tin: TensorInput) -> int:
            if job.rows is not None:  # aligned onto the output vocabulary in the working dtype (engine.aligned)
                return job.work_dtype.itemsize
            return storage_dtype(DTYPE_OF_TAG[parents[tin.parent].dtype(tin.name)], job.work_dtype).itemsize

        floating = job.work_dtype.is_floating_point
        task_vectors = method.task_vectors and job.base is not None and floating
        rank = 0
        if task_vectors and method.sparsify == "magnitude":
            rank = methods.index_dtype(numel).itemsize
        elif task_vectors and method.sparsify == "magprune":
            row = job.spec.shape[1] if len(job.spec.shape) >= 2 else numel
            rank = methods.index_dtype(row).itemsize
        sizes.append(TensorSize(
            numel=numel, out=out, merged=True, base=kept(job.base) if job.base else 0,
            inputs=tuple(kept(tin) for tin in job.inputs), compute=8 if job.work_dtype == torch.float64 else 4,
            rank=rank, task_vectors=task_vectors, sparsify=method.sparsify if task_vectors else None,
            work=job.work_dtype.itemsize, scratch=method.elementwise, pieces=method.pieces is not None,
            read=input_bytes(job, parents),
        ))
    return sizes


def default_limit(device: str) -> tuple[int | None, str]:
    """The limit when the plan sets none, and where it comes from: a CUDA GPU's free memory now; else none."""
    if not device.startswith("cuda"):
        return None, ""
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return free, f"the free memory of {device}"


def check_fits(need: MemoryNeed, plan: MemoryPlan, device: str, slots: int) -> None:
    """A ShoalError naming the figure when the plan needs more device memory than its limit (or the GPU has free)."""
    limit, source = (plan.limit_bytes, "the memory limit") if plan.limit is not None else default_limit(device)
    if limit is None or need.device <= limit:
        return
    leaner = [] if plan.inputs == "stream" else ["memory: {inputs: stream}"]
    if plan.inputs == "device" and not device == "cpu":
        leaner.append("memory: {inputs: host}")
    if plan.inputs != "stream" and plan.keep == "deltas":
        leaner.append("memory: {keep: parents}")
    if plan.inputs != "stream" and plan.ranks == "stored" and need.ranks:
        leaner.append("memory: {ranks: recomputed}")
    if slots > 1:
        leaner.append("overlap: false (one live model)")
    hint = f"; try {', '.join(leaner)} in the search file" if leaner else ""
    raise ShoalError(
        f"the memory plan ({plan.describe()}) needs {format_bytes(need.device)} on {device}, more than "
        f"{format_bytes(limit)}, {source}{hint}"
    )


def describe_need(need: MemoryNeed, plan: MemoryPlan, device: str, slots: int) -> str:
    """The one line a search prints at its start."""
    parts = [f"inputs {format_bytes(need.inputs)}"] + ([f"ranks {format_bytes(need.ranks)}"] if need.ranks else [])
    parts += [f"{slots} live model{'s' if slots > 1 else ''} {format_bytes(need.models)}",
              f"working {format_bytes(need.working)}"]
    host = f"; host {format_bytes(need.host)}" if need.host else ""
    return f"memory plan: {plan.describe()}: {format_bytes(need.device)} on {device} ({', '.join(parts)}){host}"
