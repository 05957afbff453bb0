"""What a DARE keep mask and a DELLA uniform cost to draw on one CPU thread: shoal's hash of each entry's index
(merge/draws.py, numpy's uint32 arithmetic) against torch's seeded generator (mt19937, what shoal drew from
before), a CPU chunk (262,144 entries) at a time, in one process, alternating, under the heap rules the `shoal`
command sets. Prints nanoseconds an entry (medians) and the ratio. Then the keep mask as the compiled merge pass
draws it (merge.fused: torch.compile of the hash of each entry's index below a threshold, 2^22 entries a call), in
int64 arithmetic (`draws.hashed`, the pass's form before) against int32 lanes (`draws.hashed_int32`, its form now),
with torch's CPU capability: int64 products have a vector instruction only with AVX512.

    python benchmarks/draws_speed.py [--entries 16777216] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from shoal.allocator import tune_for_merging

tune_for_merging()

import torch  # noqa: E402

from shoal.merge import draws, methods  # noqa: E402


def timed(function, entries: int) -> float:
    start = time.perf_counter()
    for piece in methods.chunks(entries, methods.CHUNK):
        function(piece.start, min(piece.stop, entries) - piece.start)
    return (time.perf_counter() - start) / entries * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1 << 24)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(7)
    cases = {
        "keep mask": (lambda start, count: draws.kept(7, 0.3, start, count),
                      lambda start, count: torch.rand(count, generator=generator) < 0.3),
        "uniforms": (lambda start, count: draws.uniforms(7, start, count),
                     lambda start, count: torch.rand(count, generator=generator)),
    }
    print(f"{args.entries:,} entries in chunks of {methods.CHUNK:,}, 1 torch thread, torch {torch.__version__}")
    for name, (ours, theirs) in cases.items():
        times: dict[str, list[float]] = {"hash": [], "mt19937": []}
        for _ in range(args.repeats):
            times["hash"].append(timed(ours, args.entries))
            times["mt19937"].append(timed(theirs, args.entries))
        hashed, generated = statistics.median(times["hash"]), statistics.median(times["mt19937"])
        print(f"{name:<10} hash {hashed:5.2f} ns an entry | torch.Generator (mt19937) {generated:5.2f} ns an entry | "
              f"{generated / hashed:.2f}x")
    compiled_keep(args.repeats)


def compiled_keep(repeats: int, entries: int = 1 << 22) -> None:
    """The compiled pass's keep mask in int64 and in int32 arithmetic: ns an entry (medians, alternating), the same
    mask checked."""
    start, key = torch.tensor(123_456_789), torch.tensor(draws.offset(7))
    limit = draws.threshold(0.3)
    wide, narrow = torch.tensor(limit), torch.tensor(limit >> 8, dtype=torch.int32)

    def in_int64(first: torch.Tensor, offset: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
        return (draws.hashed(torch.arange(entries) + first, offset) < below).float()

    def in_int32(first: torch.Tensor, offset: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
        return (draws.top_bits(draws.hashed_int32(entries, first, offset), 24) < below).float()

    forms = {"int64": (torch.compile(in_int64, dynamic=False), wide),
             "int32": (torch.compile(in_int32, dynamic=False), narrow)}
    masks = [form(start, key, below) for form, below in forms.values()]  # compiles each
    assert torch.equal(masks[0], masks[1])
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(repeats):
        for name, (form, below) in forms.items():
            began = time.perf_counter()
            form(start, key, below)
            times[name].append((time.perf_counter() - began) / entries * 1e9)
    wide_ns, narrow_ns = (statistics.median(times[name]) for name in forms)
    print(f"compiled keep mask ({torch.backends.cpu.get_cpu_capability()}) int64 {wide_ns:5.2f} ns an entry | "
          f"int32 {narrow_ns:5.2f} ns an entry | {wide_ns / narrow_ns:.2f}x")


if __name__ == "__main__":
    main()
