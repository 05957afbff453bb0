"""The L1 norms of DARE's and DELLA's rescale, summed exactly: the same number on any device, in chunks of any size
or whole, compiled or in eager steps.

The rescale multiplies a task vector's kept entries by |τ|_1 / |τ · keep|_1 (mergekit's L1 rule). As float sums
those norms round by the order they are summed in (torch's sum on a CPU, on a GPU, chunk by chunk, in a compiled
loop), so one recipe's scale could differ in its last bit, and its model in a few entries, between a chunked and a
whole merge or a CPU and a GPU. Here each is an integer sum. A tensor's flattened entries fall in blocks of BLOCK;
the block's largest magnitude is below 2^e (e read from its float bits: frexp's convention), and each magnitude x
of the block counts as q = floor(x · 2^k), k = min(GRID - e, 126): an integer below 2^GRID, exact for a float32 of
at least 2^-13 of the block's largest (a subnormal counts 0, whether or not a device flushes it). A block's sum of
q is below 2^53, exact in float64 (int64 off a CPU) in any order; the blocks' sums, each at its own k, are added
exactly in Python integers, and the scale is the ratio of the two integers, rounded to float64 and then to the
compute dtype. The norms are short of the true ones by less than 2^-20 of them (a block of one large magnitude
among tiny ones: far less in practice; a block whose largest magnitude is below 2^-89 is counted on a coarser
grid, k capped at 126, a norm far below the 1e-7 under which nothing is rescaled), and depend on the task vector
alone: a search keeps |τ|_1 (Norm). Its DARE masks are all drawn under the search's seed, at densities on the
draws' grid (merge.draws.GRID_BITS), so it also keeps |τ · keep|_1 for every density of that grid at once (Drawn:
the q summed by the top bits of each entry's hash, in one pass) and reads each later trial's from it, with no pass
(for task vectors of at least TABLE_MIN entries).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from shoal.merge import draws

BLOCK = 1 << 16
"""Entries of a block of a tensor's flattened entries, from the first (methods.rescaled's pieces hold whole blocks:
their sizes are rounded up to a multiple of it)."""
GRID = 37
"""Bits below a block's largest magnitude's exponent at which its magnitudes are counted: 2^16 of them sum below
2^53."""
_TOP_POWER = 126
"""The largest k: 2^k is a normal float32, and a subnormal times it is below 1 (a block whose largest magnitude is
below 2^-89 is counted on this coarser grid)."""
_FIELDS = {torch.float32: (torch.int32, 23, 126, 128), torch.float64: (torch.int64, 52, 1022, 1024)}
"""A compute dtype's bits as an integer dtype, its mantissa's bits, the bias of e (|x| < 2^e) and the largest
finite e."""
SMALL = Fraction(1e-7)
"""Below this either norm, the vector is not rescaled (mergekit's rule)."""
_LOW = (1 << 31) - 1


Sums = tuple[Tensor, Tensor | None, Tensor]
"""Blocks' exponents, sums of q (None when the exponents were given) and of q · keep."""


def block_exponents(magnitude: Tensor) -> Tensor:
    """e of each row's largest magnitude (int64), for magnitudes (non-negative floats) laid out a block a row:
    the bits of a non-negative float, read as an integer, order as its values do."""
    bits, mantissa, bias, _ = _FIELDS[magnitude.dtype]
    top = magnitude.view(bits).amax(dim=1).to(torch.int64)
    return (top >> mantissa).clamp(min=1) - bias


def _powers(exponents: Tensor) -> Tensor:
    """k of each block."""
    return (GRID - exponents).clamp(max=_TOP_POWER)


def _scaled(magnitude: Tensor, exponents: Tensor) -> Tensor:
    """q = floor(x · 2^k) of each entry of rows of a block each, in their dtype (exact: 2^k made from its bits)."""
    bits, mantissa, bias, _ = _FIELDS[magnitude.dtype]
    scale = ((_powers(exponents) + bias + 1) << mantissa).to(bits).view(magnitude.dtype)
    return torch.mul(magnitude, scale.unsqueeze(1)).floor_()


def counted(magnitude: Tensor, exponents: Tensor | None) -> tuple[Tensor, Tensor]:
    """For magnitudes laid out a block a row: each block's exponent (as given, or found) and each entry's q, in the
    magnitudes' dtype. Traceable."""
    if exponents is None:
        exponents = block_exponents(magnitude)
    return exponents, _scaled(magnitude, exponents)


def slots(bins: Tensor) -> Tensor:
    """Where each entry of rows of a block each is summed by by_step: its row's first slot plus its bin (int64, the
    top draws.GRID_BITS bits of its hash). Traceable."""
    return bins + torch.arange(bins.shape[0], device=bins.device).unsqueeze(1) * (1 << draws.GRID_BITS)


def by_step(q: Tensor, slots: Tensor) -> Tensor:
    """Each row's sums of q (rows of a block each) over the entries whose bin is below each step of the draws' grid
    (a density of m steps keeps the bins below m), from their slots: a row a block, a column a step from 0 to
    2^GRID_BITS; integers below 2^53, exact in any order (float64 on a CPU, int64 elsewhere)."""
    steps = 1 << draws.GRID_BITS
    dtype = torch.float64 if q.device.type == "cpu" else torch.int64
    sums = torch.zeros(q.shape[0] * steps, dtype=dtype, device=q.device)
    by_bin = sums.scatter_add_(0, slots.reshape(-1), q.reshape(-1).to(dtype)).view(q.shape[0], steps)
    return torch.cat([torch.zeros_like(by_bin[:, :1]), by_bin.cumsum(dim=1)], dim=1)


def block_norms(magnitude: Tensor, kept: Tensor, exponents: Tensor | None) -> Sums:
    """For magnitudes laid out a block a row and their keep mask (bool, or 0 and 1): each block's exponent (as
    given, or found), sum of q (None when the exponents were given: the caller knows the norm already) and sum of
    q · keep (integers below 2^53, in float64 or int64: exact in any order). Traceable: merge.fused compiles it."""
    found = exponents is None
    exponents, q = counted(magnitude, exponents)
    before = _row_sums(q) if found else None
    return exponents, before, _row_sums(q.mul_(kept))


def _row_sums(values: Tensor) -> Tensor:
    """Each row's sum of integers below 2^37, exactly: float64 on a CPU, int64 elsewhere (Apple's GPU has no
    float64). In a CPU's eager steps a row at a time: torch widens a sum's input whole before adding it up, and a
    row's float64 copy stays in cache (benchmarks/mask_ops.py: 0.26 ns an entry, a chunk at once 0.54, numpy's
    sum 0.36)."""
    if values.device.type != "cpu":
        return values.to(torch.int64).sum(dim=1)
    if torch.compiler.is_compiling():
        return values.sum(dim=1, dtype=torch.float64)
    return torch.stack([row.sum(dtype=torch.float64) for row in values])


def by_rows(flat: Tensor, exponents: Tensor | None,
            sums_of: Callable[[int, Tensor, Tensor | None], tuple[Tensor | None, ...]]) -> tuple[Tensor | None, ...]:
    """The sums of a piece of a tensor's flattened entries that starts at a block (its last may be the tensor's
    last block, shorter): sums_of(first entry in the piece, the piece's entries laid out a block a row, their
    blocks' exponents or None) for its whole blocks, then for the rest as one row, joined."""
    whole = flat.numel() // BLOCK * BLOCK
    laid = ([(0, flat[:whole].view(-1, BLOCK))] if whole else []) + \
        ([(whole, flat[whole:].view(1, -1))] if whole < flat.numel() else [])
    return joined([sums_of(first, rows, None if exponents is None else blocks_of(exponents, slice(
        first, first + rows.numel()))) for first, rows in laid])


def whole_blocks(entries: int) -> int:
    """entries rounded up to whole blocks (a piece of a norm's sums starts at a block)."""
    return -(-entries // BLOCK) * BLOCK


def blocks_of(exponents: Tensor, piece: slice) -> Tensor:
    """The exponents of the blocks of a piece that starts at a block, of the entries that exponents are of."""
    return exponents[piece.start // BLOCK:-(-piece.stop // BLOCK)]


def joined(parts: list[tuple[Tensor | None, ...]]) -> tuple[Tensor | None, ...]:
    """The sums of consecutive pieces (a tensor a block, or a row a block, each; or None) as those of the piece they
    make up."""
    return tuple(None if first is None else torch.cat([part[i] for part in parts]) for i, first in enumerate(parts[0]))


class Tally:
    """Rows of sums (a row a block: integers below 2^53, float64 or int64), added up exactly a piece of blocks at a
    time: within each k of the blocks, each sum split into its low 31 bits and the rest (both below 2^31 a block, so
    below 2^47 in int64 for 2^16 blocks), on a CPU; then over the ks in Python integers."""

    def __init__(self) -> None:
        self.parts: dict[int, Tensor] = {}
        """Of each k, the blocks' sums of the low bits (row 0) and of the rest (row 1), a column a column of sums."""

    def add(self, sums: Tensor, exponents: Tensor) -> None:
        """A piece's rows of sums and its blocks' exponents."""
        whole = sums.to(torch.int64)
        powers, group = torch.unique(_powers(exponents), return_inverse=True)
        halves = torch.stack([whole & _LOW, whole >> 31], dim=1)
        added = torch.zeros(len(powers), *halves.shape[1:], dtype=torch.int64, device=sums.device)
        for k, part in zip(powers.tolist(), added.index_add_(0, group, halves).cpu()):
            self.parts[k] = part if k not in self.parts else self.parts[k] + part

    @property
    def top(self) -> int:
        return max(self.parts)

    def value(self, column: int) -> int:
        """Σ sum_b · 2^(top - k_b) of a column over the blocks."""
        top = self.top
        return sum(((high << 31) + low) << (top - k)
                   for k, (low, high) in ((k, part[:, column].tolist()) for k, part in self.parts.items()))


@dataclass(frozen=True)
class Drawn:
    """|τ · keep|_1 of a task vector at every density on the draws' grid (merge.draws.GRID_BITS) under one seed,
    exactly, in the units of its Norm (count · 2^-top): a Tally of each block's q in the bins below each step (a
    column a step, 0 to 2^GRID_BITS), from by_step's rows. 16 kB for each distinct k of the tensor's blocks."""

    seed: int
    tally: Tally

    def kept(self, step: int) -> int:
        """|τ · keep|_1 · 2^top at a density of `step` steps of the grid."""
        return self.tally.value(step)


TABLE_MIN = 1 << 18
"""Entries of a task vector from which a search keeps its Drawn: a smaller one's norms cost less to find each trial
than its table's 16 kB for each distinct k of its blocks is worth."""


@dataclass(frozen=True)
class Norm:
    """A task vector's |τ|_1, exactly: total · 2^-top, top the largest k of its blocks; and, in a search, its
    |τ · keep|_1 under the search's draws."""

    exponents: Tensor
    """e of each block of the tensor (int64, on its device)."""
    total: int
    drawn: Drawn | None = None

    @property
    def top(self) -> int:
        return int(_powers(self.exponents).max())

    def blocks(self, piece: slice) -> Tensor:
        """The exponents of the blocks of a piece of the tensor that starts at a block."""
        return blocks_of(self.exponents, piece)


def total(sums: Tensor, exponents: Tensor) -> int:
    """Σ sum_b · 2^(top - k_b) over the blocks, exactly (sums: integers below 2^53, one a block)."""
    tally = Tally()
    tally.add(sums.unsqueeze(1), exponents)
    return tally.value(0)


def finite(exponents: Tensor, dtype: torch.dtype) -> bool:
    """Whether every magnitude of a dtype counted in these exponents was finite (a NaN's or an inf's exponent field
    is the largest)."""
    return int(exponents.max()) <= _FIELDS[dtype][3]


def small(count: int, top: int) -> bool:
    """Whether a norm, count · 2^-top, is below SMALL."""
    return Fraction(count) / Fraction(2) ** top < SMALL
