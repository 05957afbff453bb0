"""What TIES' trim costs a merge in a CPU's compiled pass when no ranks are kept (the streamed plan, `ranks:
recomputed`, a large `shoal merge`): one tensor's merge from three bf16 parents and their base, its trims found
again inside the pass (methods.magnitude_cut: each piece's |τ| formed by a compiled pass and its bit patterns
counted, the threshold's piece searched for the k-th tie; then the pass compares each entry) against held (each
parent's τ formed whole in bf16, methods.top_mask's mask, read by the pass as bytes), alternating in one process
on one torch thread, under the heap rules the `shoal` command sets. Prints nanoseconds an entry (medians) of the
preparation (the trims) and of the merge of every chunk, and whether both give the same bits.

    python benchmarks/ties_trim.py [--entries 16777216] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from shoal.allocator import tune_for_merging

tune_for_merging()

import torch  # noqa: E402

from shoal.merge import methods  # noqa: E402
from shoal.merge.registry import METHODS, MergeCall  # noqa: E402

WEIGHTS, DENSITIES = (0.5, 0.3, 0.4), (0.5, 0.6, 0.4)


def prepared(base: torch.Tensor, parents: list[torch.Tensor], held: bool) -> Callable:
    """The merge of any piece, its trims held (the form before) or found again inside the pass."""
    spec = METHODS["ties"]
    per_model = [{"weight": w, "density": d} for w, d in zip(WEIGHTS, DENSITIES)]
    call = MergeCall(base=base, tensors=parents, per_model=per_model, shared=dict(spec.shared),
                     work_dtype=base.dtype, seeds=[1, 2, 3], fused=True)
    assert call.compiled, "the compiled pass is not available here"
    cuts = methods.cuts
    if held:
        methods.cuts = lambda tensor, dtype, compiled=False: False
    try:
        return spec.pieces(call)
    finally:
        methods.cuts = cuts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1 << 24)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(args.entries, generator=generator)
    base = wide.bfloat16()
    parents = [(wide + 0.01 * torch.randn(args.entries, generator=generator)).bfloat16() for _ in WEIGHTS]
    pieces = list(methods.chunks(args.entries, methods.COMPILED_CHUNK))
    print(f"one tensor of {args.entries} bfloat16 entries, three parents and a base, densities {DENSITIES}, chunks "
          f"of {methods.COMPILED_CHUNK}, 1 torch thread, torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()})")
    forms = {"held": True, "found inside": False}
    outputs = {name: torch.cat([prepared(base, parents, held)(piece) for piece in pieces])  # compiles, if not cached
               for name, held in forms.items()}
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in forms}
    for _ in range(args.repeats):
        for name, held in forms.items():
            start = time.perf_counter()
            merge = prepared(base, parents, held)
            ready = time.perf_counter()
            for piece in pieces:
                merge(piece)
            times[name][0].append(ready - start)
            times[name][1].append(time.perf_counter() - ready)
    ns = lambda seconds: statistics.median(seconds) / args.entries * 1e9
    for name, (trims, merges) in times.items():
        print(f"trims {name:<13} {ns(trims):6.2f} ns an entry, merge {ns(merges):6.2f}, both "
              f"{ns([a + b for a, b in zip(trims, merges)]):6.2f} (medians)")
    both = {name: ns([a + b for a, b in zip(*seconds)]) for name, seconds in times.items()}
    same = torch.equal(*(o.view(torch.int32) for o in outputs.values()))
    print(f"{both['held'] / both['found inside']:.2f}x faster found inside, {'the same' if same else 'OTHER'} bits")


if __name__ == "__main__":
    main()
