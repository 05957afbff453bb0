"""A task-vector merge of one chunk in one compiled pass (torch.compile), where it repays the compiler's start-up.

methods.combine_task_vectors runs each step of the formula as its own eager operation: on a CPU, a chunk of three
parents goes through about fifty of them (conversions, differences, masks, the sign vote, the disjoint mean), each
reading and writing the chunk. Here the same formula is traced once and compiled (TorchInductor's C++ backend) into
one loop that reads each input once and writes the result once, with every intermediate rounded where the eager
steps round it (`emulate_precision_casts`): the same values, bit for bit (tests/test_fused.py). DARE's keep masks
are drawn inside the pass from the entries' indices (merge.draws), and TIES' trims of 16-bit magnitudes compared
there with a threshold and a tie position counted first (methods.magnitude_cut, its |τ| formed by a compiled pass
too), so no mask is held. The L1 rescale's
norms (merge.norms: exact integer sums, so in any order) are found in one such pass too, a piece of NORMS_PIECE
entries at a time, and a search's table of them by draw (norms.Drawn) from one that forms each entry's q and bin;
the merge takes chunks of methods.COMPILED_CHUNK.

Compiling takes seconds (more the first time on a machine, before Inductor's on-disk cache holds the kernel), so a
process uses it only when it will merge at least FUSED_MIN entries in chunks (`worth`). It runs on a CPU only: the
GPU path (Triton) was never measured. Without a working C++ compiler, or with SHOAL_FUSED=0, the eager steps run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from shoal.merge import draws, methods, norms

FUSED_MIN = 1 << 31
"""Entries a process must merge in chunks of task-vector methods (summed over its merges) for the compiled pass:
about 2 billion, where what the eager steps take beyond it (4-20 ns an entry on one CPU thread: least for task
arithmetic, most for TIES and DARE-TIES) passes the compiler's start-up, about 12 s the first time on a machine and
2-3 s once Inductor's cache holds the kernels, and its few hundred MB (measured on this project's 2-core CPU, before
the kernels went through Inductor's C++ wrapper, which adds about 2-3 s to a first compile from an empty cache and
nothing from the cache: a DARE-TIES merge's first, 19.3-20.2 s against 15.9-18.1, and 4.3 s against 4.4 from the
cache, benchmarks/merge_fused.py on 4M entries). One `shoal merge` of 0.55B parents gained too little for that
(BENCHMARKS.md); a search over them, or one merge of 3B parents, passes it."""
SEARCH_MERGES = 8
"""The merges a resident merger is counted for: a search merges one a trial, and at least a generation of them."""

NORMS_PIECE = 1 << 24
"""Entries of a task vector whose L1 norms (merge.norms) the compiled pass finds in one call (methods.rescaled's
pieces). The pass keeps nothing of a piece but its blocks' sums, so the piece need not fit a cache: a search's
DARE-TIES merge of three 0.55B parents makes 354 such calls a trial at this size, 6,312 at methods.CHUNK, each with
about 0.2 ms of overhead beyond the kernel (profiled; what this and methods.COMPILED_CHUNK saved together is in
BENCHMARKS.md)."""

_log = logging.getLogger(__name__)
_broken: list[str] = []
"""Why compiling failed in this process, once it has (the eager steps run from then on)."""


def enabled(device: torch.device | str) -> bool:
    """Whether a merge on device may use the compiled pass: a CPU, SHOAL_FUSED not 0, no failed compile yet."""
    return torch.device(device).type == "cpu" and os.environ.get("SHOAL_FUSED", "1") != "0" and not _broken


def worth(entries: int, device: torch.device | str, merges: int = 1) -> bool:
    """Whether `merges` merges of `entries` entries each in chunks of task-vector methods use the compiled pass."""
    return entries * merges >= FUSED_MIN and enabled(device)


class Drawn(NamedTuple):
    """DARE's draws as the compiled pass makes them from the entries' indices (merge.draws): the hash's top 24 bits
    below limit are kept."""

    key: Tensor
    """The seed's offset (0-dim int64)."""
    limit: Tensor
    """The density's threshold over 2^8 (0-dim int32)."""


class Cut(NamedTuple):
    """TIES' trim (methods.MagnitudeCut) as the compiled pass compares it: the entries whose |τ|, rounded to the
    threshold's 16-bit dtype, is above it, and those equal to it before entry until."""

    threshold: Tensor
    """0-dim, in the ranking's 16-bit float dtype."""
    until: Tensor
    """0-dim int64."""


Keep = Tensor | Drawn | Cut
"""A keep mask as the compiled pass takes it: a uint8 view of a held mask, or one found inside the pass (Drawn, Cut),
so that none is held."""


def _keep(keep: Keep, delta: Tensor, start: Tensor) -> Tensor:
    """The keep mask, float32, of a piece of τ (delta: float32, before any drop) whose first entry is `start` (0-dim
    int64)."""
    if isinstance(keep, Drawn):
        return (draws.top_bits(draws.hashed_int32(delta.numel(), start, keep.key), 24) < keep.limit).float().view(
            delta.shape)
    if isinstance(keep, Cut):
        # compared as 16-bit floats, not as methods._compared's int16 bit patterns, which Inductor's C++ backend does
        # not vectorise: the same mask but for a NaN |τ| (kept there, not here), whose merged entry is NaN either way
        magnitude = delta.abs().to(keep.threshold.dtype)
        index = start + torch.arange(delta.numel(), device=delta.device).view(delta.shape)
        return ((magnitude > keep.threshold) | ((magnitude == keep.threshold) & (index < keep.until))).float()
    return keep.float()


def _merged(
    base: Tensor,
    tensors: list[Tensor],
    from_base: bool,
    keeps: list[Keep],
    start: Tensor,
    scales: list[Tensor],
    weights: list[Tensor],
    votes_in: torch.dtype | None,
    vote_weights: list[Tensor],
    consensus: bool,
    normalize: bool,
    total: Tensor | None,
    lam: Tensor | None,
    zero: Tensor,
) -> Tensor:
    """methods._combine of TaskVector.part's pieces, as one traceable function of one chunk, float32.

    tensors are the parents' pieces (from_base: τ = tensor - base) or kept task vectors; keeps their keep masks
    (Keep), start the piece's first entry (0-dim int64); scales the rescale's factors (1 where there is none);
    weights float32 0-dim tensors; vote_weights the election's weights in votes_in (None: the election is in
    float32, with weights); zero a 0-dim 0 (in_lanes), where the sums start. The steps are methods._combine's, each
    rounded as it rounds. (The sum starts from an input, not from zeros made here, which the compiler would drop as
    adding nothing: 0.0 + -0.0 is 0.0, and a merged zero would keep the wrong sign.)"""
    wide = base.float()
    formed = [tensor.float() - wide if from_base else tensor.float() for tensor in tensors]
    deltas = [delta * _keep(keep, delta, start) * scale for delta, keep, scale in zip(formed, keeps, scales)]
    zeros = zero.float().expand(wide.shape)
    mixed = zeros
    if not consensus:
        for delta, weight in zip(deltas, weights):
            mixed = mixed + delta * weight
        if total is not None:
            mixed = mixed / total
    else:
        votes = zeros
        for delta, weight, vote_weight in zip(deltas, weights, vote_weights):
            votes = votes + (delta * weight if votes_in is None else delta.to(votes_in) * vote_weight)
        majority = (votes >= 0).float() * 2 - 1
        divisor = zeros
        for delta, weight in zip(deltas, weights):
            weighted = delta * weight
            agree = (weighted.sign() == majority).float()
            mixed = mixed + weighted * agree
            divisor = divisor + agree * weight
        if normalize:
            mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    if lam is not None:
        mixed = mixed * lam
    return mixed + wide


def in_lanes(base: Tensor, tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype of the 0-dim zero a compiled merge's sums start from: the inputs' 16-bit float type, where they
    have one, else float32.

    TorchInductor's C++ backend gives a loop as many lanes as a vector holds of its 16-bit float type when every
    step of the loop loads one, else of float32. The vote's and the divisor's steps of a TIES merge load nothing but
    their start, so with a float32 start a merge of bfloat16 parents runs 8 lanes on AVX2 and loads each input half
    a vector at a time, through a copy; with the parents' type, 16 lanes and whole loads: a TIES merge of three
    bfloat16 parents and their base took 5.9 ns an entry against 10.9 on an AVX2 CPU thread, of float16 ones 3.6
    against 8.8 (benchmarks/merge_lanes.py in BENCHMARKS.md; DARE-TIES' election in the parents' type had its loop
    at 16 lanes already). The same sums, bit for bit: 0 is exact in any type."""
    narrow = {t.dtype for t in (base, *tensors)} & {torch.bfloat16, torch.float16}
    return narrow.pop() if len(narrow) == 1 else torch.float32


def _delta(tensor: Tensor, base: Tensor | None) -> Tensor:
    """τ of a piece, float32, from the parent's piece and the base's (or a kept τ's: base None), as the norms', the
    trims' and the draws' table's passes form it."""
    return tensor.float() if base is None else tensor.float() - base.float()


def _norms(tensor: Tensor, base: Tensor | None, keep: Keep, start: Tensor, exponents: Tensor | None) -> norms.Sums:
    """norms.block_norms of a piece laid out a block a row (start: its first entry, 0-dim int64), from the parent's
    rows and the base's (or a kept τ's: base None), float32."""
    delta = _delta(tensor, base)
    return norms.block_norms(delta.abs(), _keep(keep, delta, start), exponents)


def _magnitudes(tensor: Tensor, base: Tensor | None, dtype: torch.dtype) -> Tensor:
    """|τ| of a piece rounded to dtype (|τ| rounds as τ does: to nearest, ties to even), from the parent's piece and
    the base's (or a kept τ's: base None)."""
    return _delta(tensor, base).abs().to(dtype)


def _slotted(tensor: Tensor, base: Tensor | None, key: Tensor, start: Tensor, exponents: Tensor | None
             ) -> tuple[Tensor, Tensor, Tensor]:
    """norms.counted of a piece laid out a block a row (as _norms takes it), its q in float64, and each entry's slot
    (norms.slots) for its bin under the draws of key (a seed's offset, 0-dim int64), for norms.by_step."""
    magnitude = _delta(tensor, base).abs()
    exponents, q = norms.counted(magnitude, exponents)
    bins = draws.top_bits(draws.hashed_int32(q.numel(), start, key), draws.GRID_BITS).view(q.shape)
    return exponents, q.double(), norms.slots(bins)


_compiled: dict[tuple[Callable, bool], Callable] = {}
_unwrapped: list[str] = []
"""Why Inductor's C++ wrapper could not be built in this process, once it could not (kernels are then called
through the default binding)."""


def _kernel(function: Callable) -> Callable:
    """function compiled (wrapped on first use: importing torch's compiler takes seconds that a merge which never
    compiles should not pay), shapes dynamic, rounding as eager, called through Inductor's C++ wrapper, which lets go
    of Python's GIL while the kernel runs, unless that wrapper could not be built here. The default binding holds
    the GIL: a search's scoring thread, beside the merge-ahead thread, then waits out every kernel (scoring a trial
    of 0.55B parents took 2.65-2.86 s beside the merge where it takes 1.28-1.37 through the wrapper: two runs of
    benchmarks/evolve_scale.py, BENCHMARKS.md), and so do `shoal merge`'s reading and writing threads."""
    wrapped = not _unwrapped
    if (function, wrapped) not in _compiled:
        _compiled[(function, wrapped)] = torch.compile(
            function, dynamic=True, options={"emulate_precision_casts": True, "cpp_wrapper": wrapped})
    return _compiled[(function, wrapped)]


def _run(function: Callable, eager: Callable[[], object], *args, then: Callable | None = None):
    """function compiled (its result given to then, if any), or, once compiling has failed in this process (said
    once, in the log), eager(): the same values in the eager steps, a chunk at a time (_eager_chunks), so that the
    compiled pass's larger pieces do not become the eager steps' temporaries (a failed compiler changes the speed,
    not the merge nor its memory)."""
    while not _broken:
        wrapped = not _unwrapped
        try:
            found = _kernel(function)(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - any compiler failure; a fault of the formula re-raises below
            why = f"{type(error).__name__}: {error}"
            if wrapped:  # once more, through the default binding
                _unwrapped.append(why)
                _log.warning("the fused merge pass's C++ wrapper could not be built (%s); its kernels hold the GIL",
                             why.splitlines()[0])
                continue
            _broken.append(why)
            _log.warning("the fused merge pass could not be compiled (%s); merging with eager steps",
                         _broken[0].splitlines()[0])
        else:
            return found if then is None else then(*found)
    return eager()


def _eager_chunks(piece: slice, numel: int) -> list[slice]:
    """A piece of a tensor of numel entries as the eager steps' chunks (methods.CHUNK, rounded up to whole blocks of
    merge.norms, as a norm's pieces must start at one)."""
    size = norms.whole_blocks(methods.CHUNK)
    stop = min(piece.stop, numel)
    return [slice(start, min(start + size, stop)) for start in range(piece.start, stop, size)]


def _in_eager_chunks(sums_of: Callable[[slice, Tensor | None], tuple], whole: slice, blocks: Tensor | None,
                     numel: int) -> tuple:
    """sums_of(chunk, its blocks' exponents or None) of each of the eager steps' chunks of a piece that starts at a
    block (whole; blocks: its exponents, or None), joined: a compiled pass's piece after a failed compile."""
    return norms.joined([sums_of(chunk, None if blocks is None else norms.blocks_of(
        blocks, slice(chunk.start - whole.start, chunk.stop - whole.start))) for chunk in _eager_chunks(whole, numel)])


def _int(value: int, device: torch.device) -> Tensor:
    return torch.tensor(value, dtype=torch.int64, device=device)


def _drawn(mask: object, device: torch.device) -> Drawn:
    """DARE's draws (a RandomDraws mask) as the compiled pass takes them (None: every entry kept, as draws below
    2^32)."""
    if not isinstance(mask, methods.RandomDraws | None):
        raise TypeError(f"a recipe's masks are all drawn or none is: got {type(mask).__name__} among draws")
    limit = draws.LIMIT if mask is None else draws.threshold(mask.density)  # a multiple of 2^8, up to 2^32
    top = torch.tensor(limit >> 8, dtype=torch.int32, device=device)
    return Drawn(_int(0 if mask is None else draws.offset(mask.seed), device), top)


def _cut(mask: object, dtype: torch.dtype, device: torch.device) -> Cut:
    """TIES' trim found again (a MagnitudeCut) as the compiled pass takes it (None: every entry kept, as above the
    least bit pattern, 0, or at it before the end)."""
    if isinstance(mask, methods.MagnitudeCut):
        return Cut(mask.threshold, _int(mask.until, device))
    if mask is not None:
        raise TypeError(f"a recipe's trims are all found again or none is: got {type(mask).__name__} among cuts")
    return Cut(torch.zeros((), dtype=dtype, device=device), _int(torch.iinfo(torch.int64).max, device))


def _found(vector: methods.TaskVector) -> Keep | None:
    """A vector's mask as the compiled pass finds it inside (Drawn, Cut), or None where it is held."""
    if isinstance(vector.mask, methods.RandomDraws):
        return _drawn(vector.mask, vector.tensor.device)
    if isinstance(vector.mask, methods.MagnitudeCut):
        return _cut(vector.mask, vector.mask.threshold.dtype, vector.tensor.device)
    return None


def piece_norms(vector: methods.TaskVector, piece: slice, exponents: Tensor | None) -> norms.Sums:
    """methods.piece_norms in one compiled pass (a float32 task vector)."""
    tensor = methods.flat_piece(vector.tensor, piece)
    base = None if vector.base is None else methods.flat_piece(vector.base, piece)
    found = _found(vector)
    keep = found if found is not None else vector.keep(piece).view(torch.uint8)

    def sums_of(first: int, rows: Tensor, blocks: Tensor | None) -> norms.Sums:
        part = slice(first, first + rows.numel())
        whole = slice(piece.start + first, piece.start + first + rows.numel())
        eager = lambda: _in_eager_chunks(lambda chunk, of_chunk: methods.piece_norms(vector, chunk, of_chunk), whole,
                                         blocks, vector.tensor.numel())
        return _run(_norms, eager, rows, None if base is None else base[part].view(rows.shape),
                    keep if found is not None else keep[part].view(rows.shape), _int(whole.start, tensor.device),
                    blocks)

    return norms.by_rows(tensor, exponents, sums_of)


def piece_magnitudes(vector: methods.TaskVector, piece: slice, dtype: torch.dtype) -> Tensor:
    """methods.piece_magnitudes in one compiled pass (a float32 task vector): 0.40-0.54 ns an entry against 1.37-1.40
    in eager steps on an AVX2 CPU thread, a piece of methods.COMPILED_CHUNK bf16 entries (benchmarks/mask_ops.py). It
    returns the 16-bit floats, not their int16 bits: Inductor's C++ backend does not vectorise that bitcast. A NaN
    comes out of AVX2's rounding to bfloat16 as 0xFFFF, its sign set after abs cleared it; its sign is cleared here,
    as the eager steps' abs after the rounding clears it (the bit counts take no negative pattern)."""
    tensor = methods.flat_piece(vector.tensor, piece)
    base = None if vector.base is None else methods.flat_piece(vector.base, piece)
    found = _run(_magnitudes, lambda: methods.piece_magnitudes(vector, piece, dtype), tensor, base, dtype)
    bits = found.view(torch.int16)
    if int(bits.min()) < 0:
        bits.bitwise_and_(0x7FFF)
    return found


def piece_bins(vector: methods.TaskVector, seed: int, piece: slice, exponents: Tensor | None
               ) -> tuple[Tensor, Tensor]:
    """methods.piece_bins with each block's q and each entry's slot formed in one compiled pass, a piece of
    methods.BINS_PIECE entries a call (float64 and int64: 16 bytes an entry); their sums stay eager (norms.by_step:
    torch's scatter_add takes 0.8 ns an entry on a CPU thread here, the same sums compiled took 8)."""
    tensor = methods.flat_piece(vector.tensor, piece)
    base = None if vector.base is None else methods.flat_piece(vector.base, piece)
    key = _int(draws.offset(seed), tensor.device)

    def sums_of(first: int, rows: Tensor, blocks: Tensor | None) -> tuple[Tensor, Tensor]:
        whole = slice(piece.start + first, piece.start + first + rows.numel())
        eager = lambda: _in_eager_chunks(lambda chunk, of_chunk: methods.piece_bins(vector, seed, chunk, of_chunk),
                                         whole, blocks, vector.tensor.numel())
        part = slice(first, first + rows.numel())
        return _run(_slotted, eager, rows, None if base is None else base[part].view(rows.shape), key,
                    _int(whole.start, tensor.device), blocks,
                    then=lambda exponents, q, slots: (exponents, norms.by_step(q, slots)))

    return norms.by_rows(tensor, exponents, sums_of)


def combiner(
    base: Tensor,
    vectors: Sequence[methods.TaskVector],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float = 1.0,
    elect_dtype: torch.dtype | None = None,
) -> Callable[[slice | None], Tensor]:
    """methods.combine_task_vectors of any piece, in one compiled pass: float32 task vectors of a float32 merge."""
    device = base.device
    scalar = lambda value, dtype=torch.float32: torch.tensor(value, dtype=dtype, device=device)
    from_base = vectors[0].base is not None
    votes_in = None if elect_dtype is None or elect_dtype == torch.float32 else elect_dtype
    weight_tensors = [scalar(float(w)) for w in weights]
    vote_weights = [scalar(float(w), votes_in) for w in weights] if votes_in is not None else weight_tensors
    total = float(sum(weights))
    divisor = scalar(total) if not consensus and normalize and abs(total) >= 1e-8 else None
    factor = scalar(lam) if lam != 1 else None
    # a vector with nothing dropped is kept whole and scaled by 1 (the same values): one compiled pass serves a
    # recipe whether or not some density is 1, where dynamo would compile each pattern of absent masks anew (each
    # vector its own ones, as dynamo also tells inputs that are one tensor from inputs that are not)
    scales = [scalar(1.0) if v.scale is None else v.scale for v in vectors]
    all_kept: dict[tuple[int, torch.Size], Tensor] = {}
    zero = scalar(0.0, in_lanes(base, [v.tensor for v in vectors]))
    # DARE's draws and TIES' trims found again are made inside the pass; where one parent's density is 1 its draws
    # are below 2^32 and its cut at 0 (all kept), so every density of a recipe takes the one compiled pass
    drawn = any(isinstance(v.mask, methods.RandomDraws) for v in vectors)
    cut = next((v.mask for v in vectors if isinstance(v.mask, methods.MagnitudeCut)), None)
    inside = [_drawn(v.mask, device) for v in vectors] if drawn else \
        [_cut(v.mask, cut.threshold.dtype, device) for v in vectors] if cut is not None else []

    def keep_of(i: int, piece: slice | None, shape: torch.Size) -> Keep:
        if inside:
            return inside[i]
        keep = vectors[i].keep(piece)
        if keep is None:
            keep = all_kept.get((i, shape))
            if keep is None:
                keep = all_kept[(i, shape)] = torch.ones(shape, dtype=torch.bool, device=device)
        return keep.view(torch.uint8)

    def eager(piece: slice | None) -> Tensor:
        combine = lambda part: methods.combine_task_vectors(
            base, vectors, weights, consensus=consensus, normalize=normalize, lam=lam, elect_dtype=elect_dtype,
            piece=part)
        return combine(None) if piece is None else torch.cat(
            [combine(chunk) for chunk in _eager_chunks(piece, base.numel())])

    def piece_of(piece: slice | None) -> Tensor:
        base_piece = methods.flat_piece(base, piece)
        return _run(
            _merged, lambda: eager(piece), base_piece, [methods.flat_piece(v.tensor, piece) for v in vectors],
            from_base, [keep_of(i, piece, base_piece.shape) for i in range(len(vectors))],
            _int(0 if piece is None else piece.start, device), scales, weight_tensors, votes_in,
            vote_weights, consensus, normalize, divisor, factor, zero,
        )

    return piece_of
