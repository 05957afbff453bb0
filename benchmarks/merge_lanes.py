"""How many lanes the compiled merge pass (merge/fused.py) gets for parents of a 16-bit float type, and what that
costs: the chunks of one tensor merged from its parents' own bf16 (or fp16) entries and their base's, as a search
merges them with its inputs streamed and as a large `shoal merge` does (each task vector formed inside the pass),
with the 0-dim zero its sums start from in the inputs' type (fused.in_lanes: TorchInductor then gives the loop the
16-bit type's lane count and loads each input whole) against float32 (the loop gets float32's lane count and loads
each 16-bit input half a vector at a time, as before fused.in_lanes). Each task vector's mask and rescale are
prepared once; then the chunks (methods.COMPILED_CHUNK entries each) are merged by both forms in turns, in this
process on one torch thread, under the heap rules the `shoal` command sets. Prints nanoseconds an entry (medians),
the ratio, the lanes of each form's loop (read from Inductor's generated C++), and whether both give the same bits.

    python benchmarks/merge_lanes.py [--entries 16777216] [--repeats 5] [--methods dare_ties,ties] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

from shoal.allocator import tune_for_merging

tune_for_merging()

import torch  # noqa: E402

from shoal.merge import draws, fused, methods  # noqa: E402
from shoal.merge.registry import METHODS, MergeCall  # noqa: E402

WEIGHTS, DENSITIES = (0.5, 0.3, 0.4), tuple(draws.on_grid(d) for d in (0.5, 0.6, 0.4))


@contextmanager
def zero_in(dtype: torch.dtype | None):
    """The compiled pass's zero in dtype (None: fused.in_lanes's choice) for the merges prepared meanwhile."""
    chosen = fused.in_lanes
    if dtype is not None:
        fused.in_lanes = lambda base, tensors: dtype
    try:
        yield
    finally:
        fused.in_lanes = chosen


def prepared(method: str, base: torch.Tensor, parents: list[torch.Tensor]) -> Callable:
    spec = METHODS[method]
    per_model = [{"weight": w, "density": d} if spec.sparsify else {"weight": w} for w, d in zip(WEIGHTS, DENSITIES)]
    call = MergeCall(base=base, tensors=parents, per_model=per_model, shared=dict(spec.shared),
                     work_dtype=base.dtype, seeds=[1, 2, 3], norms=[None] * len(parents), fused=True)
    assert call.compiled, "the compiled pass is not available here"
    return spec.pieces(call)


def lanes_of(code: str) -> str:
    """The step of the main loop of the merge's kernel in Inductor's generated C++."""
    steps = re.findall(r"x0\+=static_cast<int64_t>\((\d+)L\)", code)
    return "/".join(sorted(set(steps))) or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1 << 24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default="dare_ties,ties")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(args.entries, generator=generator)
    base = wide.to(dtype)
    parents = [(wide + 0.01 * torch.randn(args.entries, generator=generator)).to(dtype) for _ in WEIGHTS]
    print(f"one tensor of {args.entries} {args.dtype} entries, three parents and a base, chunks of "
          f"{methods.COMPILED_CHUNK}, 1 torch thread, torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()})")
    from torch._inductor import codecache

    for method in args.methods.split(","):
        forms: dict[str, Callable] = {}
        lanes: dict[str, str] = {}
        outputs: dict[str, torch.Tensor] = {}
        for name, zero in ((f"zero in {args.dtype}", None), ("zero in float32", torch.float32)):
            with zero_in(zero):
                forms[name] = prepared(method, base, parents)
            written: list[str] = []
            load = codecache.CppWrapperCodeCache.load_pybinding
            codecache.CppWrapperCodeCache.load_pybinding = lambda *a, **k: written.append(str(a) + str(k)) or load(
                *a, **k)
            try:
                outputs[name] = torch.cat([forms[name](piece) for piece in methods.chunks(
                    args.entries, methods.COMPILED_CHUNK)])  # compiles this form's kernel, if not cached
            finally:
                codecache.CppWrapperCodeCache.load_pybinding = load
            lanes[name] = lanes_of("".join(written))
        seconds: dict[str, list[float]] = {name: [] for name in forms}
        for _ in range(args.repeats):
            for name, form in forms.items():
                start = time.perf_counter()
                for piece in methods.chunks(args.entries, methods.COMPILED_CHUNK):
                    form(piece)
                seconds[name].append(time.perf_counter() - start)
        ns = {name: statistics.median(s) / args.entries * 1e9 for name, s in seconds.items()}
        for name in forms:
            print(f"{method:<10} {name:<17} {ns[name]:5.2f} ns an entry (median), loop of {lanes[name]} lanes")
        same = torch.equal(*(o.view(torch.int32) for o in outputs.values()))
        names = list(forms)
        print(f"{method:<10} {ns[names[1]] / ns[names[0]]:.2f}x faster with the zero in {args.dtype}, "
              f"{'the same' if same else 'OTHER'} bits")


if __name__ == "__main__":
    main()
