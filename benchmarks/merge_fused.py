"""What merging each chunk in one compiled pass (merge/fused.py) buys over the eager steps, per entry, and what
compiling costs: one tensor of --entries bf16 entries (a base and three parents = base + noise), merged a chunk at a
time as engine.merge_into merges it (each task vector's mask and rescale prepared, then every chunk merged, checked
and rounded to bf16), in this process on one torch thread, eager and compiled alternating after the compiled pass's
first call (its compile, timed apart). Prints the preparation's and the chunks' seconds, nanoseconds per entry of
the tensor, and the ratio of the medians.

    python benchmarks/merge_fused.py [--entries 16777216] [--repeats 3] [--methods dare_ties,ties,task_arithmetic]

Set TORCHINDUCTOR_CACHE_DIR to an empty folder to time a first compile on a machine (Inductor caches kernels on
disk, by default under /tmp).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from shoal.merge import methods
from shoal.merge.registry import METHODS, MergeCall

WEIGHTS, DENSITIES = (0.5, 0.3, 0.4), (0.5, 0.6, 0.4)


def inputs(entries: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(entries, generator=generator).bfloat16()
    return base, [(base.float() + 0.01 * torch.randn(entries, generator=generator)).bfloat16() for _ in WEIGHTS]


def merge(method: str, base: torch.Tensor, parents: list[torch.Tensor], fused: bool
          ) -> tuple[torch.Tensor, float, float]:
    """One merge of the tensor: its bf16 output, and the seconds of its preparation (masks, rescale) and of its
    chunks."""
    spec = METHODS[method]
    per_model = [{"weight": w, "density": d} if spec.sparsify else {"weight": w} for w, d in zip(WEIGHTS, DENSITIES)]
    call = MergeCall(base=base, tensors=parents, per_model=per_model, shared=dict(spec.shared),
                     work_dtype=torch.bfloat16, seeds=[1, 2, 3],
                     fused=fused)
    out = torch.empty_like(base)
    start = time.perf_counter()
    values_of = spec.pieces(call)
    prepared = time.perf_counter()
    for piece in methods.chunks(base.numel(), methods.chunk_size(base)):
        values = values_of(piece)
        torch.aminmax(values)  # the finite check
        out[piece].copy_(values.to(torch.bfloat16))
    return out, prepared - start, time.perf_counter() - prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1 << 24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="dare_ties,ties,task_arithmetic")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, parents = inputs(args.entries)
    print(f"one tensor of {args.entries} bf16 entries, three parents and a base, chunks of {methods.CHUNK}, "
          f"1 torch thread, torch {torch.__version__}")
    for method in args.methods.split(","):
        start = time.perf_counter()
        merge(method, base, parents, fused=True)
        first = time.perf_counter() - start
        runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        outputs = {}
        for _ in range(args.repeats):
            for fused in (False, True):
                outputs[fused], *seconds = merge(method, base, parents, fused)
                runs[fused].append(tuple(seconds))
        total = {fused: statistics.median(a + b for a, b in rows) for fused, rows in runs.items()}
        for fused, rows in runs.items():
            prepare, chunks = (statistics.median(r[i] for r in rows) for i in (0, 1))
            print(f"{method:<16} {'compiled' if fused else 'eager':<8} prepare {prepare:6.3f} s  chunks {chunks:6.3f} s"
                  f"  {total[fused] / args.entries * 1e9:5.1f} ns an entry (medians)")
        same = torch.equal(outputs[False].view(torch.int16), outputs[True].view(torch.int16))
        print(f"{method:<16} compiled {total[False] / total[True]:.2f}x faster, {'the same' if same else 'OTHER'} "
              f"bits; its first merge {first:.1f} s (compiling what it needs beyond the methods before it)")


if __name__ == "__main__":
    main()
