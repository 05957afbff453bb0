"""What merging each chunk in one compiled pass (merge/fused.py) buys over the eager steps, per entry, and what
compiling costs: one tensor of --entries bf16 entries (a base and three parents = base + noise), merged a chunk at a
time as engine.merge_into merges it (each task vector's mask and rescale prepared, then every chunk merged, checked
and rounded to bf16), in this process on one torch thread, eager and compiled alternating after the compiled pass's
first call (its compile, timed apart). Prints the preparation's and the chunks' seconds, nanoseconds per entry of
the tensor, and the ratio of the medians; "search" is the compiled pass with each task vector's norms kept between
merges, as the resident merger keeps them (merge.norms: |τ|_1, and for DARE at densities on the draws' grid a table
of |τ · keep|_1 by draw, so a later trial finds neither); "search, no table" keeps |τ|_1 alone (a later trial finds
|τ · keep|_1 in a pass, as before the tables); "search, a chunk a call" is that with the compiled pass called for
each chunk of methods.CHUNK, norms and merge, as it was before its larger pieces (methods.COMPILED_CHUNK,
fused.NORMS_PIECE).

    python benchmarks/merge_fused.py [--entries 16777216] [--repeats 3] [--methods dare_ties,ties,task_arithmetic]

Set TORCHINDUCTOR_CACHE_DIR to an empty folder to time a first compile on a machine (Inductor caches kernels on
disk, by default under /tmp).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

from shoal.allocator import tune_for_merging

tune_for_merging()  # as the `shoal` command does, before torch loads: huge pages and reused blocks for tensors

import torch  # noqa: E402

from shoal.merge import draws, fused, methods, norms  # noqa: E402
from shoal.merge.registry import METHODS, MergeCall  # noqa: E402

WEIGHTS, DENSITIES = (0.5, 0.3, 0.4), tuple(draws.on_grid(d) for d in (0.5, 0.6, 0.4))


def inputs(entries: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(entries, generator=generator).bfloat16()
    return base, [(base.float() + 0.01 * torch.randn(entries, generator=generator)).bfloat16() for _ in WEIGHTS]


def merge(method: str, base: torch.Tensor, parents: list[torch.Tensor], compiled: bool, norms: list | None = None
          ) -> tuple[torch.Tensor, float, float]:
    """One merge of the tensor: its bf16 output, and the seconds of its preparation (masks, rescale) and of its
    chunks. norms: the task vectors' norms as a resident merger keeps them between merges (a search's)."""
    spec = METHODS[method]
    per_model = [{"weight": w, "density": d} if spec.sparsify else {"weight": w} for w, d in zip(WEIGHTS, DENSITIES)]
    call = MergeCall(base=base, tensors=parents, per_model=per_model, shared=dict(spec.shared),
                     work_dtype=torch.bfloat16, seeds=[1, 2, 3], norms=norms, fused=compiled)
    out = torch.empty_like(base)
    start = time.perf_counter()
    values_of = spec.pieces(call)
    prepared = time.perf_counter()
    for piece in methods.chunks(base.numel(), methods.chunk_size(base, call.compiled)):
        values = values_of(piece)
        if not bool(torch.isfinite(values.sum())):  # the finite check
            raise RuntimeError(f"{method}: a merged value is not finite")
        out[piece].copy_(values)  # rounded to bf16 in the copy
    return out, prepared - start, time.perf_counter() - prepared


@contextmanager
def as_before(small: bool, table: bool) -> Iterator[None]:
    """With small, the compiled pass called for each chunk of methods.CHUNK, norms and merge (as before its larger
    pieces: methods.COMPILED_CHUNK, fused.NORMS_PIECE); without table, no task vector keeps a table of its draws
    (as before norms.Drawn)."""
    sizes = methods.COMPILED_CHUNK, fused.NORMS_PIECE, norms.TABLE_MIN
    if small:
        methods.COMPILED_CHUNK = fused.NORMS_PIECE = methods.CHUNK
    if not table:
        norms.TABLE_MIN = 1 << 62
    try:
        yield
    finally:
        methods.COMPILED_CHUNK, fused.NORMS_PIECE, norms.TABLE_MIN = sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1 << 24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="dare_ties,ties,task_arithmetic")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, parents = inputs(args.entries)
    print(f"one tensor of {args.entries} bf16 entries, three parents and a base, chunks of {methods.CHUNK} "
          f"(compiled: {methods.COMPILED_CHUNK}, norms {fused.NORMS_PIECE}), "
          f"1 torch thread, torch {torch.__version__}")
    for method in args.methods.split(","):
        start = time.perf_counter()
        merge(method, base, parents, compiled=True)
        first = time.perf_counter() - start
        kept: list = [None] * len(WEIGHTS)
        plain: list = [None] * len(WEIGHTS)
        # a search's first merge (its norms found and kept), then later ones
        modes = {"eager": (False, None, False, False), "compiled": (True, None, False, False),
                 "search": (True, kept, False, True), "search, no table": (True, plain, False, False),
                 "search, a chunk a call": (True, plain, True, False)}
        for mode in ("search", "search, no table", "search, a chunk a call"):
            for _ in range(2):
                with as_before(*modes[mode][2:]):
                    merge(method, base, parents, True, modes[mode][1])
        runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
        outputs = {}
        for _ in range(args.repeats):
            for mode, (compiled, kept_norms, small, table) in modes.items():
                with as_before(small, table):
                    outputs[mode], *seconds = merge(method, base, parents, compiled, kept_norms)
                runs[mode].append(tuple(seconds))
        total = {mode: statistics.median(a + b for a, b in rows) for mode, rows in runs.items()}
        for mode, rows in runs.items():
            prepare, chunks = (statistics.median(r[i] for r in rows) for i in (0, 1))
            print(f"{method:<16} {mode:<22} prepare {prepare:6.3f} s  chunks {chunks:6.3f} s"
                  f"  {total[mode] / args.entries * 1e9:5.1f} ns an entry (medians)")
        same = all(torch.equal(outputs["eager"].view(torch.int16), outputs[mode].view(torch.int16)) for mode in modes)
        print(f"{method:<16} compiled {total['eager'] / total['compiled']:.2f}x faster, a search's later merges "
              f"{total['eager'] / total['search']:.2f}x, {'the same' if same else 'OTHER'} bits; its first merge "
              f"{first:.1f} s (compiling what it needs beyond the methods before it); a later merge without tables "
              f"takes {total['search, no table'] / total['search']:.2f}x its time, a chunk a call "
              f"{total['search, a chunk a call'] / total['search']:.2f}x")


if __name__ == "__main__":
    main()
