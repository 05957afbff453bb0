"""Merge formulas as pure tensor functions: tensors and numbers in, one tensor out, no I/O.

Each function follows its paper and mergekit's conventions, so a mergekit recipe gives the same model:
- linear (Wortsman et al. 2022, model soups): sum_i w_i θ_i / sum_i w_i.
- task arithmetic (Ilharco et al. 2023): θ_0 + λ sum_i w_i τ_i, with τ_i = θ_i - θ_0.
- TIES (Yadav et al. 2023): trim each τ_i to its top-density magnitudes, elect a sign per entry
  from the sum of the weighted vectors, keep the entries that agree, average them.
- DARE (Yu et al. 2024): drop entries of τ_i at random with keep-probability = density and rescale
  (mergekit's L1 rescale: the kept entries are scaled so |τ_i|_1 is unchanged).
- Model Breadcrumbs (Davari & Belilovsky 2023): drop the top-gamma fraction of magnitudes (outliers)
  and the smallest, keeping a density fraction.
- DELLA (Deep et al. 2024, MagPrune): drop entries of τ_i at random with a keep-probability that grows
  with the entry's magnitude rank in its row, from density - ε (smallest) to density + ε (largest), then
  rescale as DARE does (mergekit's L1 rule, not the paper's 1/p).
- SCE (Wan et al. 2024, FuseChat): select the entries where the task vectors vary most, calculate each
  model's coefficient from its mean squared task vector, erase the entries whose sign is the minority's.
- RAM (Reinforced Agent Merging, 2026): per entry, the mean of the task vectors that change it (|τ_i| > ε),
  so an entry only one model changes keeps its full value; RAM+ also scales each model's own entries up by
  how much of its change it shares with others.
- NearSwap: move from the base toward the other model by t / |θ_1 - θ_0|, all the way where they are within t.
- Arcee Fusion: take the other model's value only where its importance, |Δ| times the KL divergence of the
  rows' softmaxes, is an upper outlier (above median + 1.5 IQR).
- SLERP: spherical interpolation of the whole tensor, linear where the two are nearly parallel.
- Model Stock (Jang et al. 2024): interpolate between θ_0 and the average of the fine-tunes with
  t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from shoal.merge import draws, norms

Tensor = torch.Tensor


def linear(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
    out: Tensor | None = None,
) -> Tensor:
    """Weighted sum of the tensors, divided by the sum of weights when normalize, computed in dtype.

    Inputs may be in a lower precision; each is promoted as it is accumulated (no upcast copies).
    `out`, a dtype tensor of the inputs' shape, receives the result (saves allocating one).
    """
    total = float(sum(weights)) if normalize else 1.0
    scale = 1.0 / total if total else math.nan  # weights summing to 0 cannot be normalised
    result = out if out is not None else torch.empty(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    result.copy_(tensors[0]).mul_(float(weights[0]) * scale)
    for tensor, weight in zip(tensors[1:], weights[1:]):
        result.add_(tensor, alpha=float(weight) * scale)
    return result


def _kth_largest(flat: Tensor, k: int) -> tuple[Tensor, int | None]:
    """The k-th largest of flat non-negative values and, when known for free, how many values exceed it.

    16-bit floats take a histogram of their bit patterns (ordered like the values, all being >= 0): O(n).
    """
    if flat.dtype in (torch.bfloat16, torch.float16):
        return _kth_of_counts(_bit_counts(flat), k, flat.dtype)
    return torch.kthvalue(flat, flat.numel() - k + 1).values, None


def _bit_counts(magnitudes: Tensor) -> Tensor:
    """How many of these non-negative 16-bit floats have each bit pattern (0 .. 2^15 - 1: the values' order)."""
    return torch.bincount(magnitudes.reshape(-1).view(torch.int16), minlength=1 << 15)


def _kth_of_counts(counts: Tensor, k: int, dtype: torch.dtype) -> tuple[Tensor, int]:
    """The k-th largest 16-bit float of dtype counted in _bit_counts, and how many values exceed it."""
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, k))
    above = int(from_top[position - 1]) if position > 0 else 0
    return torch.tensor((1 << 15) - 1 - position, dtype=torch.int16).view(dtype), above


def top_mask(values: Tensor, k: int) -> Tensor:
    """Mask of the k largest non-negative values; ties at the threshold go to the lowest indices.

    This is the order of a stable descending sort (and of torch.argsort, which mergekit uses, on
    tensors small enough to be sorted in one thread), found in linear time.
    """
    flat = values.reshape(-1)
    if k >= flat.numel():
        return torch.ones_like(values, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    threshold, above_count = _kth_largest(flat, k)
    keys, bar = _compared(flat, threshold)
    mask = keys > bar
    if above_count is None:
        above_count = int(torch.count_nonzero(mask))
    ties = keys == bar
    until = _end_of_nth(lambda piece: ties[piece], list(chunks(flat.numel(), chunk_size(flat))), k - above_count)
    mask[:until] |= ties[:until]
    return mask.reshape(values.shape)


def _compared(values: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """Non-negative values and their threshold as top_mask and MagnitudeCut compare them: 16-bit floats as their
    bit patterns read as int16, which order as the values do and a NaN above inf, as _bit_counts ranks them (so
    exactly k are kept), and compare in integer lanes: both of top_mask's comparisons of a chunk took 1.28-1.35 ns
    an entry so against 2.15-2.22 as floats on an AVX2 CPU thread (benchmarks/mask_ops.py, BENCHMARKS.md); other
    values as they are (kthvalue's float32 threshold: a NaN is never above it)."""
    if values.dtype in (torch.bfloat16, torch.float16):
        return values.view(torch.int16), threshold.view(torch.int16)
    return values, threshold


def _end_of_nth(found_in: Callable[[slice], Tensor], pieces: list[slice], n: int) -> int:
    """The index just past the n-th True entry, by index, of a flat bool tensor given a piece at a time (found_in is
    called on the pieces in order, up to the one that holds it): where ties at a threshold stop being kept. 0 for
    n <= 0; the end when there are fewer than n."""
    taken = 0
    for piece in pieces:
        if taken >= n:
            return piece.start
        found = found_in(piece)
        count = int(torch.count_nonzero(found))
        if taken + count >= n:
            return piece.start + _nth_true(found, n - taken) + 1
        taken += count
    return pieces[-1].stop if pieces else 0  # fewer than n (a NaN ranked above every threshold by kthvalue)


_ROW_WORDS = 127
"""Words of 8 entries in a row that _nth_true counts at once: each byte of the words' int64 sum then counts one of
the 8 places, at most 127 (no carry into the next byte, and the sum below 2^63)."""


def _nth_true(found: Tensor, n: int) -> int:
    """The index of the n-th True entry (n >= 1) of a bool tensor, flattened, that holds at least n: its bytes read
    as int64 words, a row of _ROW_WORDS words counted by one sum, and only the row that holds the n-th searched
    (with count_nonzero first, as _end_of_nth calls it, 0.52-0.53 ns an entry on a CPU thread with 0.4 % or 22 % of
    the entries True, where torch.nonzero and bool.sum took 1.68 and 3.98: TIES' ties at a 16-bit threshold are
    often that many; benchmarks/mask_ops.py, BENCHMARKS.md)."""
    flat = found.reshape(-1)
    if not flat.is_contiguous() or flat.storage_offset() % 8:  # an int64 view: of whole words, from a word's start
        flat = flat.clone(memory_format=torch.contiguous_format)
    span = _ROW_WORDS * 8
    rows = flat.numel() // span
    if rows:
        sums = flat[:rows * span].view(torch.int64).view(rows, _ROW_WORDS).sum(1)
        counts = sums.view(torch.uint8).view(rows, 8).sum(1).cumsum(0)
        row = int(torch.searchsorted(counts, n))
        if row < rows:
            before = int(counts[row - 1]) if row else 0
            return row * span + int(torch.nonzero(flat[row * span:(row + 1) * span])[n - before - 1])
        n -= int(counts[-1])
    return rows * span + int(torch.nonzero(flat[rows * span:])[n - 1])


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """TIES' trim: mask of the k = max(1, int(density * n)) entries of largest magnitude."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    return top_mask(delta.abs(), max(1, int(density * delta.numel())))


def index_dtype(count: int) -> torch.dtype:
    """The smallest signed integer dtype that holds every index 0 .. count - 1 (ranks stored per element)."""
    for dtype in (torch.int8, torch.int16, torch.int32):
        if count - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


SORT_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def magnitude_keys(delta: Tensor) -> Tensor:
    """|delta| as keys that sort in the magnitudes' order: the bits of a float of one sign, read as an integer of
    the same width, order as the float does (NaN after inf), and CPU sorts integers faster (a 1536 x 4096 float32
    matrix by rows: 1.26x). Ties stay ties, so a stable sort gives the very same order."""
    magnitude = delta.abs()
    bits = SORT_BITS.get(magnitude.dtype)
    return magnitude if bits is None else magnitude.view(bits)


def stable_order(keys: Tensor, dim: int, descending: bool = False) -> Tensor:
    """The indices of a stable sort of integer keys along dim: torch.sort(keys, dim, descending, stable=True).indices.

    On a CPU, 16-bit keys (bfloat16 and float16 magnitudes) go to numpy's stable argsort, a radix sort: 8.9 ns an
    entry against torch's 47.6 on one thread (rows of a 4096 x 1536 bfloat16 matrix, BENCHMARKS.md). A descending
    order is the ascending order of the keys' complement (~k = -k - 1 reverses the order and keeps ties as ties),
    so ties stay in index order either way."""
    if keys.device.type != "cpu" or keys.dtype != torch.int16:
        return torch.sort(keys, dim=dim, descending=descending, stable=True).indices
    ordered = torch.bitwise_not(keys) if descending else keys
    return torch.from_numpy(np.argsort(ordered.numpy(), axis=dim, kind="stable"))


def magnitude_ranks(delta: Tensor) -> Tensor:
    """Each entry's place (0 = largest) in a stable descending sort by magnitude, of delta's shape, in the smallest
    integer dtype that holds delta.numel() places (index_dtype).

    Computed once per tensor, it turns any density's trim into a comparison with `rank_limit`, the same mask as
    magnitude_mask.
    """
    dtype = index_dtype(delta.numel())
    order = stable_order(magnitude_keys(delta).reshape(-1), 0, descending=True)
    ranks = torch.empty(order.numel(), dtype=dtype, device=delta.device)
    ranks[order] = torch.arange(order.numel(), dtype=dtype, device=delta.device)
    return ranks.reshape(delta.shape)


@dataclass(frozen=True)
class RandomDraws:
    """DARE's keep mask: the entries whose draw (merge.draws, from the tensor's seed) is below the density, any
    piece at a time. Drawn where it is used, it is never held: a byte an entry a parent saved, for draws made again
    (inside merge.fused's compiled pass a few integer operations; in eager steps about 1.4 ns an entry on a CPU
    thread, which is why a CPU's eager steps hold it instead: holds_draws)."""

    shape: torch.Size
    device: torch.device
    density: float
    seed: int

    def keep(self, piece: slice | None) -> Tensor:
        """The mask of a piece of the tensor's flattened entries, or of the whole tensor (None: drawn a chunk at a
        time)."""
        numel = self.shape.numel()
        if piece is None:
            mask = torch.empty(self.shape, dtype=torch.bool, device=self.device)
            flat = mask.view(-1)
            for part in chunks(numel, chunk_entries(self.device.type == "cpu")):
                flat[part] = self.keep(part)
            return mask
        start, stop = piece.start, min(piece.stop, numel)
        return draws.kept(self.seed, self.density, start, stop - start, self.device)


def holds_draws(on_cpu: bool, compiled: bool) -> bool:
    """Whether DARE's mask of a tensor is drawn once and held rather than drawn where it is used (RandomDraws): in a
    CPU's eager steps, where reading a held mask is cheaper than drawing it again for the rescale and the merge."""
    return on_cpu and not compiled


@dataclass(frozen=True)
class MagnitudeCut:
    """TIES' trim of a task vector in chunks, not held but found again where it is used: the entries whose
    magnitude, rounded to the threshold's 16-bit dtype, exceeds the threshold, and those equal to it before entry
    `until` (ties go to the lowest indices, as in top_mask): magnitude_mask's mask bit for bit, with no byte an
    entry held (magnitude_cut counts it a piece at a time, then searches the one piece holding its last tie)."""

    threshold: Tensor
    until: int

    def keep(self, delta: Tensor, start: int) -> Tensor:
        """The mask of a piece of τ's flattened entries starting at entry `start` (delta: that piece of τ)."""
        magnitude, threshold = _compared(delta.to(self.threshold.dtype).abs(), self.threshold)
        mask = magnitude > threshold
        tied = min(max(self.until - start, 0), magnitude.numel())  # the piece's entries before `until`
        if tied:
            flat, magnitudes = mask.view(-1), magnitude.view(-1)
            flat[:tied] |= magnitudes[:tied] == threshold
        return mask


def cuts(tensor: Tensor, rank_dtype: torch.dtype, compiled: bool = False) -> bool:
    """Whether TIES' trim of this tensor is found again where it is used (MagnitudeCut) rather than held: in chunks,
    when magnitudes are ranked in a 16-bit float (counted in one histogram), off a CPU (where memory is short) or in
    a CPU's compiled pass (compiled: merge.fused compares them inside it, where a held mask cost the passes of
    top_mask over the whole τ)."""
    return in_chunks(tensor) and (tensor.device.type != "cpu" or compiled) and \
        rank_dtype in (torch.bfloat16, torch.float16)


def _rows(tensor: Tensor) -> Tensor:
    """A tensor as rows along dim 1 (a matrix's rows; a vector is one row)."""
    return tensor if tensor.dim() >= 2 else tensor.unsqueeze(0)


def magnitude_places(delta: Tensor) -> Tensor:
    """Each entry's place (0 = smallest) in a stable ascending sort by magnitude within its row (rows along dim 1,
    a vector is one row), of delta's shape, in the smallest integer dtype that holds a row's places (index_dtype)."""
    rows = _rows(delta)
    n = rows.shape[1]
    dtype = index_dtype(n)
    order = stable_order(magnitude_keys(rows), 1)
    places = torch.arange(n, dtype=dtype, device=delta.device).view([1, n] + [1] * (rows.dim() - 2))
    ranks = torch.empty(rows.shape, dtype=dtype, device=delta.device)
    ranks.scatter_(1, order, places.expand(rows.shape))
    return ranks.reshape(delta.shape)


def fractions_of(places: Tensor) -> Tensor:
    """magnitude_places as fractions from 0 (smallest) to 1 (largest), float32; a row of one entry has no order:
    its fraction is 1/2."""
    n = _rows(places).shape[1]
    if n < 2:
        return torch.full(places.shape, 0.5, dtype=torch.float32, device=places.device)
    return places.to(torch.float32).div_(n - 1)


def magnitude_fractions(delta: Tensor) -> Tensor:
    """Each entry's magnitude rank within its row, from 0 (smallest) to 1 (largest), as float32 of delta's shape
    (fractions_of(magnitude_places(delta))). Ties are ordered by index (a stable sort)."""
    return fractions_of(magnitude_places(delta))


def magprune_mask(fractions: Tensor, density: float, epsilon: float, seed: int) -> Tensor:
    """DELLA's drop step: keep each entry with probability p = density - ε + 2ε · fraction, its magnitude rank
    fraction (magnitude_fractions), where its uniform draw (merge.draws, from the tensor's seed) is below p; all
    kept when density >= 1. Formed a chunk at a time (chunk_size)."""
    if density >= 1:
        return torch.ones_like(fractions, dtype=torch.bool)
    mask = torch.empty(fractions.shape, dtype=torch.bool, device=fractions.device)
    flat, flat_fractions = mask.view(-1), fractions.reshape(-1)
    for piece in chunks(flat.numel(), chunk_size(fractions)):
        keep = (density - epsilon) + flat_fractions[piece] * 2 * epsilon
        uniform = draws.uniforms(seed, piece.start, keep.numel(), keep.device)
        torch.lt(uniform, keep, out=flat[piece])
    return mask


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs: drop the int(gamma * n) largest magnitudes, then the smallest, keeping int(density * n).

    Ranks are those of a stable ascending sort by magnitude, as mergekit's argsort gives on small tensors.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    n = delta.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    # the m smallest under a stable ascending sort are the complement of the n - m largest under a
    # stable descending sort with ties going to the highest indices, i.e. top_mask on the reversed tensor
    magnitude = delta.abs().reshape(-1).flip(0)
    largest_beyond = lambda m: top_mask(magnitude, n - m).flip(0)
    return (largest_beyond(bottom) & ~largest_beyond(bottom + keep)).reshape(delta.shape)


def as_numbers(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask as 0 and 1 in dtype, read as bytes: torch converts (and multiplies by) a bool tensor at a sixth
    (a half) of the speed of the same bytes as uint8 (0.51 against 0.082 ns an entry on a CPU thread:
    benchmarks/mask_ops.py)."""
    return mask.view(torch.uint8).to(dtype)


def flat_piece(tensor: Tensor, piece: slice | None) -> Tensor:
    """tensor, or a piece of its flattened entries."""
    return tensor if piece is None else tensor.reshape(-1)[piece]


@dataclass(frozen=True)
class TaskVector:
    """A task vector τ = tensor - base in the compute dtype, after an optional drop step, formed where it is used: a
    piece of its flattened entries at a time, from the parent's tensor and the base in the recipe's dtype (or from a
    kept τ: base None), so a tensor merged in chunks never has its τ, dropped vector or |τ| written out whole."""

    tensor: Tensor
    base: Tensor | None = None
    compute: torch.dtype = torch.float32
    mask: Tensor | RandomDraws | MagnitudeCut | None = None
    """The drop step's keep mask (bool), magnitude ranks when `below` is set (kept are the ranks below it), or DARE's
    draws or TIES' trim made again where they are used. None: nothing dropped."""
    below: int | None = None
    scale: Tensor | None = None
    """The L1 rescale's |τ|_1 / |τ · mask|_1 (a 0-dim tensor); None: not rescaled."""

    def formed(self, piece: slice | None = None) -> Tensor:
        """τ, or a piece of its flattened entries, in the compute dtype (a kept τ itself, not a copy)."""
        tensor = flat_piece(self.tensor, piece)
        if self.base is None:
            return tensor.to(self.compute)
        # the base widened inside the subtraction (the same values as widened first, without its copy)
        return tensor.to(self.compute, copy=True).sub_(flat_piece(self.base, piece))

    def keep(self, piece: slice | None = None, delta: Tensor | None = None) -> Tensor | None:
        """The keep mask, or a piece of it; None when nothing is dropped. delta: that piece of τ, when the caller
        has formed it already (a trim found again is found from it, not formed twice)."""
        if self.mask is None:
            return None
        if isinstance(self.mask, RandomDraws):
            return self.mask.keep(piece)
        if isinstance(self.mask, MagnitudeCut):
            formed = self.formed(piece) if delta is None else delta
            return self.mask.keep(formed, 0 if piece is None else piece.start)
        mask = flat_piece(self.mask, piece)
        return mask if self.below is None else mask < self.below

    def part(self, piece: slice | None = None) -> Tensor:
        """The dropped and rescaled τ, or a piece of its flattened entries."""
        delta = self.formed(piece)
        keep = self.keep(piece, delta)
        if keep is None:
            return delta
        dropped = delta * keep.view(torch.uint8)  # as bytes (as_numbers)
        return dropped if self.scale is None else dropped.mul_(self.scale)

    def whole_in(self, dtype: torch.dtype) -> Tensor:
        """τ (before the drop) whole in dtype, as τ.to(dtype) would round it, formed a chunk at a time."""
        if not in_chunks(self.tensor):
            return self.formed().to(dtype)
        out = torch.empty(self.tensor.shape, dtype=dtype, device=self.tensor.device)
        flat = out.view(-1)
        for piece in chunks(flat.numel(), chunk_size(self.tensor)):
            flat[piece] = self.formed(piece)
        return out


def rank_limit(ranks: Tensor, density: float) -> int | None:
    """TIES' trim from precomputed ranks (magnitude_ranks): the k = max(1, int(density * n)) entries ranked first
    are those below k; None at density >= 1 (all kept)."""
    return None if density >= 1 else max(1, int(density * ranks.numel()))


Magnitudes = Callable[[TaskVector, slice, torch.dtype], Tensor]
"""|τ| of a piece of a task vector's flattened entries, rounded to a 16-bit dtype (the trim's ranking dtype)."""


def piece_magnitudes(vector: TaskVector, piece: slice, dtype: torch.dtype) -> Tensor:
    """|τ| of a piece rounded to dtype, in eager steps (merge.fused.piece_magnitudes: in one compiled pass)."""
    return vector.formed(piece).to(dtype).abs()


def magnitude_cut(vector: TaskVector, density: float, rank_dtype: torch.dtype,
                  magnitudes_of: Magnitudes = piece_magnitudes, piece: int | None = None) -> MagnitudeCut | None:
    """magnitude_mask(vector.whole_in(rank_dtype), density) as a MagnitudeCut, found a piece (of `piece` entries,
    else chunk_size's) at a time: one pass counts each piece's magnitudes' bit patterns, whose sum gives the
    threshold and whose counts at it say which piece holds the k-th kept entry; that piece alone is searched for it.
    None when every entry is kept."""
    if rank_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"a magnitude cut counts 16-bit floats, not {rank_dtype}")
    numel = vector.tensor.numel()
    k = max(1, int(density * numel))
    if density >= 1 or k >= numel:
        return None
    pieces = list(chunks(numel, piece or chunk_size(vector.tensor)))
    counts = torch.stack([_bit_counts(magnitudes_of(vector, part, rank_dtype)) for part in pieces])
    threshold, above = _kth_of_counts(counts.sum(0), k, rank_dtype)
    ties = counts[:, int(threshold.view(torch.int16))].tolist()  # at the threshold, in each piece
    threshold = threshold.to(vector.tensor.device)
    needed, i = k - above, 0
    while i < len(pieces) - 1 and ties[i] < needed:
        needed -= ties[i]
        i += 1
    tied = lambda part: torch.eq(*_compared(magnitudes_of(vector, part, rank_dtype), threshold))
    return MagnitudeCut(threshold, _end_of_nth(tied, pieces[i:i + 1], needed))


Norms = Callable[[TaskVector, slice, Tensor | None], norms.Sums]
"""Of a piece of a task vector with a mask, starting at a block (merge.norms): its blocks' exponents (as given, or
found), their sums of q (None when the exponents were given) and of q · keep."""


def piece_norms(vector: TaskVector, piece: slice, exponents: Tensor | None) -> norms.Sums:
    """Norms of a piece, in eager steps (merge.fused.piece_norms: in one compiled pass)."""
    delta = vector.formed(piece)
    kept = vector.keep(piece, delta).view(-1).view(torch.uint8)  # as bytes (as_numbers)
    return norms.by_rows(delta.abs().view(-1), exponents, lambda first, rows, blocks: norms.block_norms(
        rows, kept[first:first + rows.numel()].view(rows.shape), blocks))


Bins = Callable[[TaskVector, int, slice, Tensor | None], tuple[Tensor, Tensor]]
"""Of a piece of a task vector starting at a block, under a seed's draws: its blocks' exponents (as given, or found)
and their sums of q below each step of the draws' grid (norms.by_step)."""


def piece_bins(vector: TaskVector, seed: int, piece: slice, exponents: Tensor | None) -> tuple[Tensor, Tensor]:
    """The sums below each step of a piece (Bins), in eager steps (merge.fused.piece_bins: its q and slots in one
    compiled pass)."""
    delta = vector.formed(piece)
    bins = draws.bins(seed, piece.start, delta.numel(), delta.device)

    def sums_of(first: int, rows: Tensor, blocks: Tensor | None) -> tuple[Tensor, Tensor]:
        found, q = norms.counted(rows, blocks)
        return found, norms.by_step(q, norms.slots(bins[first:first + rows.numel()].view(rows.shape)))

    return norms.by_rows(delta.abs().view(-1), exponents, sums_of)


BINS_PIECE = 1 << 20
"""Entries at most of a piece whose sums below each step are found at once: in merge.fused's compiled pass (its q
and slots, 16 bytes an entry), and off a CPU, where a chunk is larger (about 36 bytes an entry with the hashes'
temporaries; a CPU's eager steps take a chunk). merge.memory counts them (TABLE_BYTES)."""


def bins_piece(on_cpu: bool, compiled: bool) -> int:
    """Entries of a piece whose sums below each step are found at once, on a CPU or another device, in merge.fused's
    compiled pass or in eager steps."""
    return BINS_PIECE if compiled else min(BINS_PIECE, chunk_entries(on_cpu))


@dataclass(frozen=True)
class Tabulated:
    """A search's DARE rescale, read from its task vector's table (norms.Drawn) rather than found: its mask's draws
    (at a density on the draws' grid), and how the table's pieces' sums are found (bins_of, pieces of piece_entries)
    when the table of the draws' seed is not made yet."""

    mask: RandomDraws
    bins_of: Bins
    piece_entries: int

    @property
    def seed(self) -> int:
        return self.mask.seed

    @property
    def step(self) -> int:
        """The density's step on the draws' grid."""
        step = draws.grid_step(self.mask.density)
        if step is None:
            raise ValueError(f"density {self.mask.density} is not on the draws' grid")
        return step


def rescaled(vector: TaskVector, norms_of: Norms = piece_norms, known: norms.Norm | None = None,
             piece_entries: int | None = None, table: Tabulated | None = None
             ) -> tuple[TaskVector, norms.Norm | None]:
    """vector with mergekit's L1 rescale: the kept entries scaled so |τ|_1 is unchanged (not when either norm is
    below 1e-7, nor when τ is not finite: its merge is refused), and its |τ|_1 (known: as found before, for this
    τ). The norms are exact sums (merge.norms), found a piece of whole blocks at a time (piece_entries, rounded up
    to blocks; by default a chunk's), so no |τ| is made whole, and the scale is the same in any chunking, on any
    device. With a table (a search's DARE), |τ · keep|_1 is read from known's table of the seed's draws, which is
    made in one pass by bins_of when known has none (or one of another seed)."""
    if vector.mask is None or vector.tensor.numel() == 0:
        return vector, known
    if table is not None:
        if known is None or known.drawn is None or known.drawn.seed != table.seed:
            known = _tabulated(vector, table, known)
            if known is None:
                return vector, None
        assert known.drawn is not None
        after = known.drawn.kept(table.step)
    else:
        size = norms.whole_blocks(piece_entries or chunk_size(vector.tensor))
        parts = [norms_of(vector, piece, None if known is None else known.blocks(piece))
                 for piece in chunks(vector.tensor.numel(), size)]
        if known is None:
            exponents = torch.cat([part[0] for part in parts])
            if not norms.finite(exponents, vector.compute):
                return vector, None
            known = norms.Norm(exponents, norms.total(torch.cat([part[1] for part in parts]), exponents))
        after = norms.total(torch.cat([part[2] for part in parts]), known.exponents)
    top = known.top
    if norms.small(known.total, top) or norms.small(after, top):
        return vector, known
    scale = torch.tensor(known.total / after, dtype=vector.compute, device=vector.tensor.device)
    return replace(vector, scale=scale), known


def _tabulated(vector: TaskVector, table: Tabulated, known: norms.Norm | None) -> norms.Norm | None:
    """known (or τ's |τ|_1, found too) with the table of table.seed's draws, summed a piece at a time; None when τ
    is not finite."""
    tally, exponents = norms.Tally(), []
    for piece in chunks(vector.tensor.numel(), norms.whole_blocks(table.piece_entries)):
        found, below = table.bins_of(vector, table.seed, piece, None if known is None else known.blocks(piece))
        tally.add(below, found)
        exponents.append(found)
    if known is None:
        found = torch.cat(exponents)
        if not norms.finite(found, vector.compute):
            return None
        known = norms.Norm(found, tally.value(1 << draws.GRID_BITS))
    return replace(known, drawn=norms.Drawn(table.seed, tally))


def _vote(delta: Tensor, weight: float, elect_dtype: torch.dtype | None) -> Tensor:
    """w·τ as mergekit forms it for the election: in elect_dtype when given (τ and w rounded, then the product)."""
    if elect_dtype is None or elect_dtype == delta.dtype:
        return delta * weight
    return delta.to(elect_dtype) * torch.tensor(weight, dtype=elect_dtype)


CHUNK = 1 << 18
"""Entries per chunk of an elementwise computation on a CPU: its float32 values (1 MiB) stay in cache through every
step, so each input is read and the output written once, instead of once per step."""
DEVICE_CHUNK = 1 << 24
"""Entries per chunk on a GPU: no cache holds a chunk there, but chunks bound the temporaries of a large tensor (a
128k-token embedding has 525M entries) at a few hundred kernel launches per 7B merge, where CHUNK would take tens
of thousands."""
COMPILED_CHUNK = 1 << 21
"""Entries per chunk that merge.fused's compiled pass merges in one call on a CPU (CHUNK is for the eager steps,
whose dozens of passes must stay in cache). The pass reads its inputs and writes its result once; a larger chunk
leaves the cache only for the finiteness check and the rounding into the output, and saves the calls' overhead
(about 0.2 ms each, through dynamo; with fused.NORMS_PIECE, a search's later DARE-TIES merge took 9.6 ns an entry
against 12.7 at CHUNK: benchmarks/merge_fused.py). merge.memory counts a chunk's result (float32), its copy in the
output's dtype where the output is not that dtype, and a byte a parent for a mask compared from stored ranks."""


def chunk_entries(on_cpu: bool) -> int:
    """Entries per chunk of an elementwise computation on a CPU, or on any other device."""
    return CHUNK if on_cpu else DEVICE_CHUNK


def chunk_size(tensor: Tensor, compiled: bool = False) -> int:
    """Entries per chunk of an elementwise computation over tensor, on its device (compiled: merged by merge.fused's
    pass, on a CPU)."""
    return COMPILED_CHUNK if compiled else chunk_entries(tensor.device.type == "cpu")


def in_chunks(tensor: Tensor) -> bool:
    """Whether an elementwise computation over tensor runs in chunks: when it has more than one chunk's entries."""
    return tensor.numel() > chunk_size(tensor)


def chunks(numel: int, size: int = CHUNK) -> Iterator[slice]:
    """The pieces of `size` entries of a flattened tensor of numel entries, in order (the last may be shorter)."""
    return (slice(start, start + size) for start in range(0, numel, size))


def combine_task_vectors(
    base: Tensor,
    vectors: Sequence[TaskVector],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float = 1.0,
    elect_dtype: torch.dtype | None = None,
    piece: slice | None = None,
) -> Tensor:
    """θ_0 + λ · combine(w_i τ_i): a plain sum, or TIES' disjoint mean over sign-agreeing entries, in the task
    vectors' compute dtype; of the whole tensor, or of a piece of its flattened entries.

    TIES elects, per entry, the sign of sum_i w_i τ_i (0 counts as +) and keeps the w_i τ_i of that sign.
    With normalize the sum is divided by the sum of the weights that contributed (per entry under consensus).
    elect_dtype, if given, is the precision of the sign election (mergekit elects in the recipe's dtype;
    in bfloat16 that decides the sign of entries whose weighted sum is near zero).
    Every step is elementwise, so a large tensor is merged a piece at a time (chunk_size entries, the same values
    bit for bit), each task vector formed only for that piece.
    """
    return _combine(flat_piece(base, piece).to(vectors[0].compute), [v.part(piece) for v in vectors], weights,
                    consensus=consensus, normalize=normalize, lam=lam, elect_dtype=elect_dtype)


def _combine(
    base: Tensor,
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    elect_dtype: torch.dtype | None,
) -> Tensor:
    """combine_task_vectors of whole tensors (or of one chunk of each)."""
    mixed = torch.zeros_like(base)
    if not consensus:
        for delta, weight in zip(deltas, weights):  # each product rounded, then added (mergekit's order; no FMA)
            mixed.add_(delta * float(weight))
        total = float(sum(weights))
        if normalize and abs(total) >= 1e-8:
            mixed.div_(total)
    else:
        votes = torch.zeros_like(base)
        for delta, weight in zip(deltas, weights):
            votes.add_(_vote(delta, float(weight), elect_dtype))
        majority = as_numbers(votes >= 0, base.dtype).mul_(2).sub_(1)  # +1 or -1 per entry
        del votes
        divisor = torch.zeros_like(base) if normalize else None
        for delta, weight in zip(deltas, weights):
            weighted = delta * float(weight)
            agree = as_numbers(weighted.sign() == majority, base.dtype)  # a trimmed (zero) entry never agrees
            mixed.addcmul_(weighted, agree)
            if divisor is not None:
                divisor.add_(agree, alpha=float(weight))
        if divisor is not None:
            mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
    if lam != 1:
        mixed.mul_(lam)
    return mixed.add_(base)


def sce(base: Tensor, deltas: Sequence[Tensor], select_topk: float, *, rank_dtype: torch.dtype | None = None) -> Tensor:
    """θ_0 + SCE's merge of the task vectors τ_i (in base's dtype):

    Select: below select_topk = 1, keep only the k = int(select_topk · m) entries of largest variance across the
    τ_i, m the count of entries of nonzero variance (ties to the lowest indices). Calculate: c_i = mean(τ_i²) /
    sum_j mean(τ_j²) (equal when that sum is below 1e-6). Erase: per entry, keep the τ_i whose sign is that of
    sum_j τ_j (0 counts as +). The result is sum_i c_i τ_i over sum_i c_i, both over the kept τ_i.
    rank_dtype, if given, is the precision of the variances and of the sign election (mergekit's: the recipe's
    dtype; in bfloat16 that decides which entries are selected and the sign where the sum is near zero).
    """
    tvs = torch.stack(list(deltas))
    low = tvs if rank_dtype is None else tvs.to(rank_dtype)
    if select_topk < 1:
        variance = torch.var(low, dim=0, unbiased=False)
        k = int(torch.count_nonzero(variance) * select_topk)
        selected = top_mask(variance, k)
        tvs.mul_(selected)
        low = low * selected
    squares = tvs.square().reshape(len(tvs), -1).mean(dim=1)
    total = float(squares.sum())
    coefficients = squares / total if abs(total) >= 1e-6 else torch.full_like(squares, 1 / len(tvs))
    coefficients = coefficients.view(-1, *[1] * base.dim())
    majority = as_numbers(low.sum(dim=0) >= 0, base.dtype).mul_(2).sub_(1)
    kept = coefficients * (tvs.sign() == majority).view(torch.uint8)
    return base + (tvs * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)


def ram(
    base: Tensor,
    deltas: Sequence[Tensor],
    *,
    epsilon: float,
    r: float = 0.0,
    alpha: float = 0.0,
    rank_dtype: torch.dtype | None = None,
) -> Tensor:
    """θ_0 + RAM's merge of the task vectors τ_i: each entry is the mean of the τ_i that change it (|τ_i| > ε);
    an entry changed by one model alone takes that model's value times λ_i.

    λ_i = 1 for RAM; for RAM+ (tensor-local, r > 0) λ_i = 1 + r · clip(ρ_i, 0, α), ρ_i = the count of model i's
    changed entries that others change too over the count of those it alone changes (ε when none).
    rank_dtype, if given, is the precision of the test |τ_i| > ε (mergekit's: the recipe's dtype).
    """
    tvs = torch.stack(list(deltas)).reshape(len(deltas), -1)
    changes = (tvs if rank_dtype is None else tvs.to(rank_dtype)).abs() > epsilon
    count = changes.sum(dim=0, keepdim=True)
    alone, shared = count == 1, count > 1
    tvs = tvs * changes
    scale = torch.ones(len(deltas), 1, dtype=tvs.dtype, device=tvs.device)
    if r:
        ratio = (changes & shared).sum(dim=1) / (changes & alone).sum(dim=1).clamp(min=epsilon)
        scale = (1 + r * ratio.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (tvs * alone * scale + tvs * shared / count.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)


def nearswap(t: float, base: Tensor, other: Tensor) -> Tensor:
    """w · θ_1 + (1 - w) · θ_0 per entry, w = t / |θ_1 - θ_0| clipped to [0, 1] (|θ_1 - θ_0| at least 1e-6)."""
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * other + (1 - weight) * base


def arcee_fusion(base: Tensor, other: Tensor, *, rank_dtype: torch.dtype | None = None) -> Tensor:
    """θ_0 + Δ where Δ = θ_1 - θ_0 is important, θ_0 elsewhere.

    Importance: |Δ| · KL(softmax θ_1 ‖ softmax θ_0), the softmaxes along the last dim (1e-8 added to each), one
    KL per row. Important: at least median + 1.5 · (q3 - q1) of all importances, each quartile the sorted value at
    floor(q · (n - 1)). (mergekit estimates the quartiles of a tensor over a million entries from a random sample
    of a million; here they are always exact.) rank_dtype, if given, is the precision in which importance is
    computed and compared (mergekit's: the recipe's dtype).
    """
    low_base, low_other = (base, other) if rank_dtype is None else (base.to(rank_dtype), other.to(rank_dtype))
    p = torch.softmax(low_other, dim=-1) + 1e-8
    q = torch.softmax(low_base, dim=-1) + 1e-8
    importance = ((low_other - low_base).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)).reshape(-1)
    places = (torch.tensor([0.25, 0.5, 0.75]) * (importance.numel() - 1)).long()
    q1, median, q3 = (torch.kthvalue(importance, int(i) + 1).values for i in places)
    important = (importance >= median + 1.5 * (q3 - q1)).reshape(base.shape)
    return base + (other - base) * important


def slerp(t: float, v0: Tensor, v1: Tensor, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation from v0 (t=0) to v1 (t=1) over the whole tensor; linear when nearly parallel."""
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    norm_a = a.norm()
    norm_b = b.norm()
    norm_a = norm_a if norm_a > eps else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > eps else torch.ones_like(norm_b)
    dot = torch.dot(a / norm_a, b / norm_b).clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / sin_theta) * v0 + (torch.sin(t * theta) / sin_theta) * v1


def model_stock(base: Tensor, tensors: Sequence[Tensor], *, filter_wise: bool = False) -> Tensor:
    """Model Stock: t·mean(θ_i) + (1 - t)·θ_0 with t = N cos / (1 + (N - 1) cos); base kept where singular."""
    shape = base.shape
    if filter_wise:
        w0 = base if base.dim() > 1 else base.unsqueeze(0)
        ws = [w if w.dim() > 1 else w.unsqueeze(0) for w in tensors]
    else:
        w0 = base.reshape(-1)
        ws = [w.reshape(-1) for w in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)
