"""What ordering 16-bit magnitudes costs: methods.stable_order (numpy's stable argsort, a radix sort, on a CPU)
against torch's stable sort, which shoal used before, on the bfloat16 magnitude keys of one matrix of the merge
benchmark's shape: by rows (DELLA's places) and whole (TIES' stored ranks, descending), on one torch thread and on
all of them, alternating, in one process. Checks that both give the same order; prints nanoseconds an entry
(medians) and the ratio.

    python benchmarks/rank_sort.py [--rows 4096] [--columns 1536] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from shoal.merge import methods


def timed(function: Callable[[], torch.Tensor], entries: int) -> float:
    start = time.perf_counter()
    function()
    return (time.perf_counter() - start) / entries * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--columns", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(7)
    delta = (torch.randn(args.rows, args.columns, generator=generator) * 0.01).bfloat16()  # a parent's task vector
    keys = methods.magnitude_keys(delta)
    entries = delta.numel()
    cases = {
        "rows (DELLA)": (lambda: methods.stable_order(keys, 1),
                         lambda: torch.sort(keys, dim=1, stable=True).indices),
        "whole, descending (TIES)": (lambda: methods.stable_order(keys.reshape(-1), 0, descending=True),
                                     lambda: torch.sort(keys.reshape(-1), descending=True, stable=True).indices),
    }
    threads = torch.get_num_threads()
    print(f"{args.rows} x {args.columns} bfloat16, torch {torch.__version__}, "
          f"ns an entry (median of {args.repeats}), shoal's order vs torch.sort's")
    for name, (ours, theirs) in cases.items():
        assert torch.equal(ours(), theirs()), name
        for count in sorted({1, threads}):
            torch.set_num_threads(count)
            pairs = [(timed(ours, entries), timed(theirs, entries)) for _ in range(args.repeats)]
            shoal, peer = (statistics.median(side) for side in zip(*pairs))
            print(f"{name:26s} {count} thread(s): shoal {shoal:6.1f}  torch.sort {peer:6.1f}  "
                  f"torch/shoal {peer / shoal:5.2f}x")
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
