"""What the eager steps' choices about masks and exact sums cost, per entry, on one CPU thread: a bool mask converted
to float32 or multiplied into one as bool against as its bytes (uint8: the same values; methods.as_numbers), TIES'
trim of bf16 magnitudes (methods.top_mask: above and at the threshold) compared as floats against as their int16
bits (the same masks), where the trim's ties stop (the n-th True entry of a bool mask with torch.nonzero and
bool.sum against methods._nth_true and count_nonzero), and the float64 row sums of the L1 norms (merge.norms) a
chunk at a time, a row of 2^16 entries at a time, and by numpy.
One chunk of 2^18 entries (methods.CHUNK) laid out in rows of a block, alternating the variants in one process;
then a trim found again in a CPU's compiled pass (methods.magnitude_cut with merge.fused.piece_magnitudes): |τ|
of a piece of methods.COMPILED_CHUNK bf16 entries in eager steps against compiled (the same bits), and
torch.bincount of their bit patterns.

    python benchmarks/mask_ops.py [--repeats 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

from shoal.allocator import tune_for_merging

tune_for_merging()  # as the `shoal` command does, before torch loads

import torch  # noqa: E402

from shoal.merge import fused, methods, norms  # noqa: E402


def per_entry(function, entries: int, repeats: int) -> float:
    """Median nanoseconds an entry over batches of 50 calls."""
    function()
    batches = []
    for _ in range(max(1, repeats // 50)):
        start = time.perf_counter()
        for _ in range(50):
            function()
        batches.append((time.perf_counter() - start) / 50)
    return statistics.median(batches) / entries * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(methods.CHUNK, generator=generator)
    mask = torch.rand(methods.CHUNK, generator=generator) < 0.4
    q = torch.floor(torch.rand(methods.CHUNK, generator=generator) * 2**30).view(-1, norms.BLOCK)
    n = methods.CHUNK
    rows = {
        "bool -> float32": (lambda: mask.to(torch.float32), lambda: methods.as_numbers(mask, torch.float32)),
        "float32 x mask": (lambda: values * mask, lambda: values * mask.view(torch.uint8)),
    }
    print(f"one chunk of {n:,} entries, 1 torch thread, torch {torch.__version__}")
    for name, (as_bool, as_bytes) in rows.items():
        slow, fast = per_entry(as_bool, n, args.repeats), per_entry(as_bytes, n, args.repeats)
        print(f"{name:<18} as bool {slow:6.3f} ns an entry | as bytes {fast:6.3f} | {slow / fast:.2f}x")
    sums = {
        "chunk at once": lambda: q.sum(dim=1, dtype=torch.float64),
        "a row at a time": lambda: torch.stack([row.sum(dtype=torch.float64) for row in q]),
        "numpy": lambda: torch.from_numpy(q.numpy().sum(axis=1, dtype="float64")),
    }
    magnitudes = values.abs().bfloat16()
    threshold = magnitudes.float().quantile(0.6).bfloat16()
    bits, bar = magnitudes.view(torch.int16), threshold.view(torch.int16)
    assert torch.equal(magnitudes > threshold, bits > bar) and torch.equal(magnitudes == threshold, bits == bar)
    as_floats = per_entry(lambda: (magnitudes > threshold, magnitudes == threshold), n, args.repeats)
    as_bits = per_entry(lambda: (bits > bar, bits == bar), n, args.repeats)
    print(f"bf16 > and == threshold as floats {as_floats:6.3f} ns an entry | as int16 bits {as_bits:6.3f} | "
          f"{as_floats / as_bits:.2f}x")
    for share in (0.004, 0.22):  # tied at a bf16 threshold: few, or as many as bf16 task vectors often have
        ties = torch.rand(n, generator=generator) < share
        nth = int(ties.sum()) // 2
        assert methods._nth_true(ties, nth) == int(torch.nonzero(ties)[nth - 1])
        plain = per_entry(lambda: (int(ties.sum()), int(torch.nonzero(ties)[nth - 1])), n, args.repeats)
        rows = per_entry(lambda: (int(torch.count_nonzero(ties)), methods._nth_true(ties, nth)), n, args.repeats)
        alone = per_entry(lambda: methods._nth_true(ties, nth), n, args.repeats)
        print(f"n-th True of {share:.1%} and their count: nonzero, bool.sum {plain:6.3f} ns an entry | _nth_true, "
              f"count_nonzero {rows:6.3f} | {plain / rows:.2f}x (_nth_true alone {alone:6.3f})")
    for name, function in sums.items():
        print(f"float64 row sums, {name:<16} {per_entry(function, n, args.repeats):6.3f} ns an entry")
    piece = slice(0, methods.COMPILED_CHUNK)
    wide = torch.randn(methods.COMPILED_CHUNK, generator=generator)
    vector = methods.TaskVector((wide + 0.01 * torch.randn(wide.shape, generator=generator)).bfloat16(),
                                wide.bfloat16())
    eager = methods.piece_magnitudes(vector, piece, torch.bfloat16)
    assert torch.equal(fused.piece_magnitudes(vector, piece, torch.bfloat16).view(torch.int16),
                       eager.view(torch.int16)) and not fused._broken
    repeats = max(50, args.repeats // 8)
    steps = per_entry(lambda: methods.piece_magnitudes(vector, piece, torch.bfloat16), piece.stop, repeats)
    one_pass = per_entry(lambda: fused.piece_magnitudes(vector, piece, torch.bfloat16), piece.stop, repeats)
    counts = per_entry(lambda: methods._bit_counts(eager), piece.stop, repeats)
    print(f"|tau| of {piece.stop:,} bf16 entries in bf16: eager {steps:6.3f} ns an entry | compiled {one_pass:6.3f} | "
          f"{steps / one_pass:.2f}x; their bincount {counts:6.3f}")


if __name__ == "__main__":
    main()
