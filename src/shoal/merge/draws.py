"""DARE's and DELLA's random draws: a keyed hash of each entry's index, so a seed gives the same draws on any device,
for any piece of a tensor, in any order.

Entry i (of a tensor's flattened entries) drawn under a 32-bit seed s has the 32-bit value

    h = mix((i + mix(s)) mod 2^32),   mix(x): x ^= x >> 16; x *= 0x21f0aaad; x ^= x >> 15; x *= 0x735a2d97; x ^= x >> 15

(mod 2^32 after each product): a bijective xor-shift-multiply hash from Wellons' hash-prospector, the one listed
there as [16 21f0aaad 15 735a2d97 15], chosen because both multipliers are below 2^31, so a product of a 32-bit value
and either fits in a signed 64-bit integer and every step is exact in int64 tensor arithmetic on any device. The
entry's uniform draw is u = (h >> 8) / 2^24, a float32 in [0, 1); a density d keeps the entries with u < d (d
rounded to float32), the same as h < threshold(d).

A seeded torch.Generator could not promise this: a CPU draws from mt19937 and a GPU from Philox, so a recipe searched
on one would merge to another model on the other, and its draws come in sequence, so a piece can only be drawn after
every piece before it. The hash also costs less: on a CPU thread about 1.4 ns an entry in numpy's uint32 arithmetic,
where torch's mt19937 takes 2.4-2.9, and a few integer operations inside a compiled merge pass (merge.fused),
there in int32 lanes whose products wrap (hashed_int32: the same bits).
A tensor of more than 2^32 entries is refused (its draws would repeat).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

MASK = 0xFFFFFFFF
LIMIT = 1 << 32
"""Entries a tensor drawn this way may have: past it the index, taken mod 2^32, would repeat the draws."""
_M1, _M2 = 0x21F0AAAD, 0x735A2D97


def mix(x: int) -> int:
    """The hash of one 32-bit value (Python integers: the reference for the tensor forms below)."""
    x ^= x >> 16
    x = (x * _M1) & MASK
    x ^= x >> 15
    x = (x * _M2) & MASK
    return x ^ (x >> 15)


def offset(seed: int) -> int:
    """Where a seed's draws start: mix(seed), the seed taken mod 2^32."""
    return mix(seed & MASK)


def threshold(density: float) -> int:
    """The hashes below which an entry is kept at this density: u < float32(density) exactly when
    h < threshold(density) (between 0 and 2^32)."""
    scaled = float(np.float32(density)) * (1 << 24)  # exact: a float32 times a power of two
    return min(max(math.ceil(scaled), 0), 1 << 24) << 8


GRID_BITS = 10
"""A density that is a multiple of 2^-GRID_BITS keeps the entries whose hash's top GRID_BITS bits are below density ·
2^GRID_BITS: a DARE search's densities are rounded to this grid (on_grid), so its rescale's norms at any of them
can be summed by those bits once (merge.norms.Drawn)."""


def on_grid(density: float) -> float:
    """The nearest multiple of 2^-GRID_BITS to a density in (0, 1], at least 2^-GRID_BITS."""
    steps = 1 << GRID_BITS
    return min(max(round(density * steps), 1), steps) / steps


def grid_step(density: float) -> int | None:
    """m when a density keeps the entries whose hash's top GRID_BITS bits are below m (0 < m < 2^GRID_BITS: a
    multiple of 2^-GRID_BITS below 1), else None."""
    limit = threshold(density)
    low = 32 - GRID_BITS
    return limit >> low if limit % (1 << low) == 0 and 0 < limit < LIMIT else None


def hashed(index: Tensor, key: Tensor | int) -> Tensor:
    """h of each entry, as int64, for int64 entry indices and a seed's offset (an int, or a 0-dim int64 tensor, as
    a compiled pass takes it): exact on any device, and traceable. Two tensors of index's size live at once."""
    x = (index + key).bitwise_and_(MASK)
    shifted = torch.empty_like(x)
    for multiplier, shift in ((_M1, 16), (_M2, 15)):
        x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=shifted)).mul_(multiplier).bitwise_and_(MASK)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=shifted))


def hashed_int32(count: int, first: Tensor, key: Tensor) -> Tensor:
    """h of count entries from entry first (a 0-dim int64 tensor) under a seed's offset key (0-dim int64), as the
    bits of an int32 (h - 2^32 where h >= 2^31): the form a compiled pass on a CPU draws in. Past first + key (in
    int64, then taken mod 2^32) every step is in int32 lanes: the indices as wrapping sums, products wrapping mod
    2^32, right shifts masked to be logical. A CPU without AVX512 has no vector instruction for an int64 product
    (compiled, on an AVX2 CPU thread: 0.76 ns an entry for a keep mask, against 2.15 in `hashed`'s int64;
    draws_speed.py), and torch's vectors convert 16 int64 lanes to int32 an entry at a time: with int64 indices and
    the float32 zero of before fused.in_lanes, a streamed DARE-TIES merge of bfloat16 parents (a loop of 16 lanes)
    took 1.45-1.56x as long, the zero's part of it 1.04x (resident_merge.py, merge_lanes.py; BENCHMARKS.md).
    Traceable; read its bits with top_bits."""
    x = torch.arange(count, dtype=torch.int32, device=first.device) + (first + key).to(torch.int32)
    for multiplier, shift in ((_M1, 16), (_M2, 15)):
        x = (x ^ ((x >> shift) & (MASK >> shift))) * multiplier
    return x ^ ((x >> 15) & (MASK >> 15))


def top_bits(hashes: Tensor, bits: int) -> Tensor:
    """The top `bits` bits of hashed_int32's hashes, as non-negative int32: h >> (32 - bits)."""
    return (hashes >> (32 - bits)) & ((1 << bits) - 1)


def _hashed_numpy(seed: int, start: int, count: int) -> np.ndarray:
    """h of entries start..start+count as uint32, in numpy's wrapping uint32 arithmetic (the same values as
    `hashed`, at about a third of its time on a CPU)."""
    x = np.arange(count, dtype=np.uint32)
    x += np.uint32((start + offset(seed)) & MASK)
    temporary = np.empty_like(x)
    for multiplier, shift in ((_M1, 16), (_M2, 15)):
        np.right_shift(x, shift, out=temporary)
        x ^= temporary
        x *= np.uint32(multiplier)
    np.right_shift(x, 15, out=temporary)
    x ^= temporary
    return x


def _check(start: int, count: int) -> None:
    if start < 0 or start + count > LIMIT:
        raise ValueError(f"draws are defined for entries 0 to 2^32 - 1, not {start}:{start + count}")


DEVICE_PIECE = 1 << 20
"""Entries hashed at once off a CPU: their three int64 tensors (the indices, the hashes and a shifted copy: 24 MiB)
stay within the 2 bytes an entry that a task-vector merge in chunks is counted for besides its chunks
(merge.memory.mask_bytes; a GPU's chunk has 16.8M entries, 32 MiB at 2 bytes)."""


def _on_device(seed: int, start: int, count: int, out: Tensor, finish: Callable[[Tensor, Tensor], object]) -> Tensor:
    """out (count entries on a device other than a CPU) filled DEVICE_PIECE entries at a time: finish(h, out's
    piece) for each piece's hashes."""
    key = offset(seed)
    for first in range(0, count, DEVICE_PIECE):
        size = min(DEVICE_PIECE, count - first)
        index = torch.arange(start + first, start + first + size, dtype=torch.int64, device=out.device)
        finish(hashed(index, key), out[first:first + size])
    return out


def _in_numpy(device: torch.device | str) -> bool:
    """Whether draws on device are made in numpy (a CPU) rather than in torch's int64 arithmetic."""
    return torch.device(device).type == "cpu"


def kept(seed: int, density: float, start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """The keep mask (bool) of entries start..start+count at this density: u < density."""
    _check(start, count)
    limit = threshold(density)
    if limit >= LIMIT:
        return torch.ones(count, dtype=torch.bool, device=device)
    if _in_numpy(device):
        return torch.from_numpy(_hashed_numpy(seed, start, count) < np.uint32(limit))
    out = torch.empty(count, dtype=torch.bool, device=device)
    return _on_device(seed, start, count, out, lambda h, piece: torch.lt(h, limit, out=piece))


def bins(seed: int, start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """The top GRID_BITS bits of the hashes of entries start..start+count (int64): a density of m steps of the grid
    keeps the entries whose bin is below m (grid_step)."""
    _check(start, count)
    low = 32 - GRID_BITS
    if _in_numpy(device):
        return torch.from_numpy((_hashed_numpy(seed, start, count) >> np.uint32(low)).astype(np.int64))
    out = torch.empty(count, dtype=torch.int64, device=device)
    return _on_device(seed, start, count, out, lambda h, piece: torch.bitwise_right_shift(h, low, out=piece))


def uniforms(seed: int, start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """The uniform draws (float32 in [0, 1)) of entries start..start+count."""
    _check(start, count)
    if _in_numpy(device):
        values = torch.from_numpy((_hashed_numpy(seed, start, count) >> np.uint32(8)).astype(np.float32))
    else:
        out = torch.empty(count, dtype=torch.float32, device=device)
        values = _on_device(seed, start, count, out, lambda h, piece: piece.copy_(h.bitwise_right_shift_(8)))
    return values.mul_(2.0 ** -24)
