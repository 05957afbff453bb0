"""What running the elementwise steps of merges in cache-sized chunks buys (all of linear and task arithmetic;
TIES' and DARE's vote and sum after their whole-tensor masks): `shoal merge`'s engine in this process, on the
merge benchmark's three ~0.5B bf16 random parents, with methods.CHUNK at its value and at infinity (one pass over
memory per step of the formula, as before chunking), alternating, after one warm-up merge that puts the parents in
the page cache. Prints each time and the ratio of the medians.

    python benchmarks/merge_chunks.py [--size 0.5b|small] [--repeats 3] [--work /tmp/shoal-bench] [--methods ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml
from merge_speed import SIZES, build_parents

from shoal.merge import engine, methods
from shoal.recipe import parse_recipe

WEIGHTS = (("a", 0.5), ("b", 0.3), ("c", 0.2))


def recipe(method: str, parents: dict[str, Path]) -> dict:
    base = {} if method == "linear" else {"base_model": str(parents["base"])}
    density = {} if method in ("linear", "task_arithmetic") else {"density": 0.5}
    return {"merge_method": method, "dtype": "bfloat16", **base,
            "models": [{"model": str(parents[n]), "parameters": {"weight": w, **density}} for n, w in WEIGHTS]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.5b", choices=SIZES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/shoal-bench"))
    ap.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties")
    args = ap.parse_args()
    torch.set_num_threads(1)
    parents = build_parents(args.work, args.size)
    out = args.work / "chunks-out"
    chunk = methods.CHUNK
    for method in args.methods.split(","):
        parsed = parse_recipe(yaml.safe_dump(recipe(method, parents)))
        engine.run_merge(parsed, out, overwrite=True)  # warm-up: the parents in the page cache
        times: dict[str, list[float]] = {"one pass per step": [], f"chunks of {chunk}": []}
        for _ in range(args.repeats):
            for label, size in zip(times, (1 << 62, chunk)):
                methods.CHUNK = size
                start = time.perf_counter()
                engine.run_merge(parsed, out, overwrite=True)
                times[label].append(time.perf_counter() - start)
        methods.CHUNK = chunk
        medians = [statistics.median(v) for v in times.values()]
        cells = ", ".join(f"{label} {' / '.join(f'{t:.2f}' for t in v)} s" for label, v in times.items())
        print(f"{method}: {cells}; chunked {medians[0] / medians[1]:.2f}x faster (medians)", flush=True)


if __name__ == "__main__":
    main()
