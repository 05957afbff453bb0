"""Peak memory of one task-vector merge against what merge/memory.py counts for it.

    python benchmarks/merge_peak.py [--entries 10000000] [--parents 2,3,4] [--redraw]

For each method and parent count, one merge of a tensor of --entries bf16 entries (a base and parents = base +
noise), run in its own process twice: in chunks, as a CPU merges a tensor this large (each task vector's mask found
over the whole tensor, then merged and written a chunk at a time into a bf16 output, as engine.merge_into does), and
in one piece (chunking switched off, as a tensor within one chunk of its device is merged). Prints the rise of the
process's peak resident set (VmHWM, after resetting it) over its resident set before the merge, in bytes per entry,
beside memory.py's count for the same case (mask_bytes and CHUNK_TEMPORARIES in chunks,
ARITHMETIC_COPIES_TASK_VECTORS_WHOLE in one piece), without stored ranks; DARE's masks drawn once and held, as a
CPU's eager steps hold them (off a CPU, and in a CPU's compiled pass, they are drawn again where used and held
nowhere). With --redraw, TIES only, its trims found again (methods.MagnitudeCut) where they are used, as off a CPU,
against the count off a CPU. Each process tunes the allocator as the `shoal` command does
(shoal.allocator: huge pages, freed blocks up to 32 MB kept in the heap for reuse).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from shoal.allocator import tune_for_merging

tune_for_merging()  # as the `shoal` command does, before torch allocates: what a merge holds depends on the heap

METHODS = ("ties", "dare_ties", "dare_linear", "della", "breadcrumbs_ties")


def proc_bytes(path: str, key: str) -> int:
    """A `key: N kB` line of a /proc file (/proc/self/status, /proc/meminfo), in bytes."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in {path}")


def one(method: str, count: int, whole: bool, entries: int, redraw: bool = False) -> float:
    """In this process: the peak's rise during one merge, in bytes an entry."""
    import torch

    from shoal.merge import methods
    from shoal.merge.registry import METHODS as REGISTRY, MergeCall

    torch.set_num_threads(1)
    if whole:
        methods.in_chunks = lambda tensor: False
    if redraw:
        methods.cuts = lambda tensor, rank_dtype: methods.in_chunks(tensor)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(entries, generator=g).to(torch.bfloat16)
    tensors = [(base.float() + 0.01 * torch.randn(entries, generator=g)).to(torch.bfloat16) for _ in range(count)]
    method = REGISTRY[method]
    per = [{"weight": 0.3 + 0.2 * i, "density": 0.5, "epsilon": 0.1, "gamma": 0.01} for i in range(count)]
    per = [{k: v for k, v in p.items() if k in method.per_model} for p in per]
    out = torch.ones(entries, dtype=torch.bfloat16)  # the live model's tensor, resident before the merge
    call = MergeCall(base=base, tensors=tensors, per_model=per, shared=dict(method.shared), work_dtype=torch.bfloat16,
                     compute_dtype=torch.float32, seeds=list(range(count)))
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from the resident set now
    before = proc_bytes("/proc/self/status", "VmRSS")
    if whole:
        out.copy_(method.merge(call))
    else:
        values_of = method.pieces(call)
        for piece in methods.chunks(entries, methods.CHUNK):
            out[piece] = values_of(piece)
    return (proc_bytes("/proc/self/status", "VmHWM") - before) / entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=10_000_000)
    parser.add_argument("--parents", default="2,3,4")
    parser.add_argument("--redraw", action="store_true",
                        help="TIES' trims found again where used, as off a CPU")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # internal: method, parents, whole
    args = parser.parse_args()
    if args.child:
        method, count, whole = args.child
        print(one(method, int(count), whole == "whole", args.entries, args.redraw))
        return
    from shoal.merge import methods
    from shoal.merge.memory import ARITHMETIC_COPIES_TASK_VECTORS_WHOLE, CHUNK_TEMPORARIES, mask_bytes
    from shoal.merge.registry import METHODS as REGISTRY

    print(f"one merge of {args.entries:,} bf16 entries; peak rise in bytes an entry (counted by memory.py)")
    print(f"{'method':<18} {'parents':>7} {'in chunks':>14} {'in one piece':>14}")
    for method in [m for m in METHODS if not args.redraw or REGISTRY[m].sparsify == "magnitude"]:
        for count in map(int, args.parents.split(",")):
            held, forming = mask_bytes(REGISTRY[method].sparsify, 2, ranks_kept=False, on_cpu=not args.redraw)
            per, extra = CHUNK_TEMPORARIES
            chunks = held * count + forming + methods.CHUNK * 4 * (per * count + extra) / args.entries
            per, extra = ARITHMETIC_COPIES_TASK_VECTORS_WHOLE
            counted = {"chunks": chunks, "whole": 4 * (per * count + extra)}
            cells = []
            for mode in ("chunks", "whole"):
                out = subprocess.run([sys.executable, __file__, "--entries", str(args.entries), "--child", method,
                                      str(count), mode] + (["--redraw"] if args.redraw else []),
                                     capture_output=True, text=True, check=True).stdout
                cells.append(f"{float(out):5.1f} ({counted[mode]:4.1f})")
            print(f"{method:<18} {count:7d} {cells[0]:>14} {cells[1]:>14}", flush=True)

if __name__ == "__main__":
    main()
