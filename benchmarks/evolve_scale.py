"""Seconds per trial's merge and peak RSS of the resident merger under each memory plan, on three random parents.

    python benchmarks/evolve_scale.py [--size 50m|small] [--trials 3] [--work /tmp/shoal-evolve-scale]

Each (method, plan) runs in its own process, so its peak RSS (ru_maxrss) is its own: the parents are loaded as the
plan keeps them, then `--trials` recipes with other weights and densities are merged into one live model (slots=1,
as with overlap: false). Prints a table: load seconds, median merge seconds per trial, peak RSS as a multiple of one
parent's file size, and the bytes the plan says it needs (merge/memory.py). Then projects those bytes to three 7B
Llama-2 parents (bf16, 32 layers of hidden 4096 / MLP 11008, vocabulary 32000) from shapes alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZES = {
    # ~53M parameters: 6 layers of hidden 512 / MLP 1536, vocabulary 32000, untied head; bf16 = 106 MB
    "50m": dict(vocab_size=32000, hidden_size=512, num_hidden_layers=6, intermediate_size=1536),
    "small": dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, intermediate_size=512),
}
PLANS = {
    "device": {},
    "device, keep parents": {"keep": "parents"},
    "device, ranks recomputed": {"ranks": "recomputed"},
    "device, parents, recomputed": {"keep": "parents", "ranks": "recomputed"},
    "stream": {"inputs": "stream"},
}
METHODS = ("dare_ties", "ties")


def recipe(parents: dict[str, str], method: str, trial: int) -> dict:
    rng = torch.Generator().manual_seed(trial)
    weights, densities = torch.rand(3, generator=rng).tolist(), (0.2 + 0.7 * torch.rand(3, generator=rng)).tolist()
    return {"merge_method": method, "base_model": parents["base"], "seed": trial, "models": [
        {"model": parents[n], "parameters": {"weight": w, "density": d}} for n, w, d in zip("abc", weights, densities)]}


def one(parents: dict[str, str], method: str, plan: dict, trials: int) -> dict:
    """In this process: load, then merge `trials` recipes; seconds and peak RSS."""
    from shoal.merge.memory import MemoryPlan
    from shoal.merge.resident import ResidentMerger
    from shoal.recipe import Recipe

    start = time.perf_counter()
    merger = ResidentMerger(Recipe.model_validate(recipe(parents, method, 0)), memory=MemoryPlan(**plan))
    load = time.perf_counter() - start
    seconds = []
    for trial in range(1, trials + 1):
        candidate = Recipe.model_validate(recipe(parents, method, trial))
        start = time.perf_counter()
        merger.apply(candidate)
        seconds.append(time.perf_counter() - start)
    return {"load": load, "merge": statistics.median(seconds), "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            * 1024, "need": merger.need.device}


def build_parents(work: Path, size: str) -> dict[str, str]:
    from shoal.synthetic import make_parents, tiny_config

    folder = work / f"parents-{size}"
    names = ("base", "a", "b", "c")
    if not all((folder / n / "config.json").exists() for n in names):
        shutil.rmtree(folder, ignore_errors=True)
        make_parents(folder, names, config=tiny_config(**SIZES[size]), dtype=torch.bfloat16, noise=0.01)
    return {n: str(folder / n) for n in names}


def projection() -> list[tuple[str, str, int, int]]:
    """(method, plan, slots, device bytes) for three 7B Llama-2 bf16 parents, from shapes alone."""
    from shoal.merge.memory import MemoryPlan, TensorSize, memory_need
    from shoal.merge.methods import index_dtype

    hidden, mlp, vocab, layers = 4096, 11008, 32000, 32
    shapes = [(vocab, hidden)] + layers * ([(hidden, hidden)] * 4 + [(mlp, hidden)] * 2 + [(hidden, mlp)]
                                           + [(hidden,)] * 2) + [(hidden,), (vocab, hidden)]
    rows = []
    for method, ranked in (("dare_ties", False), ("ties", True)):
        sizes = [TensorSize(numel=torch.Size(s).numel(), out=2, merged=True, base=2, inputs=(2, 2, 2), compute=4,
                            rank=index_dtype(torch.Size(s).numel()).itemsize if ranked else 0, task_vectors=True)
                 for s in shapes]
        for name, plan in PLANS.items():
            for slots in (2, 1):
                need = memory_need(sizes, MemoryPlan(**plan), slots=slots, on_cpu=False)
                rows.append((method, name, slots, need.device))
        need = memory_need(sizes, MemoryPlan(inputs="host"), slots=1, on_cpu=False)
        rows.append((method, f"host (+{need.host / 1e9:.0f} GB pinned host memory)", 1, need.device))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="50m")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/shoal-evolve-scale"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one (method, plan) measurement, as JSON
    args = parser.parse_args()
    if args.one:
        task = json.loads(args.one)
        print(json.dumps(one(task["parents"], task["method"], task["plan"], args.trials)))
        return
    from shoal.merge.memory import format_bytes

    torch.set_num_threads(max(1, torch.get_num_threads()))
    parents = build_parents(args.work, args.size)
    parent_bytes = sum(f.stat().st_size for f in Path(parents["a"]).glob("*.safetensors"))
    print(f"three {args.size} bf16 parents and a base, {format_bytes(parent_bytes)} each; {args.trials} trials; "
          f"{torch.get_num_threads()} threads")
    print(f"{'method':<10} {'plan':<28} {'load s':>7} {'merge s/trial':>13} {'peak RSS':>9} {'x parent':>8} "
          f"{'plan needs':>10}")
    for method in METHODS:
        for name, plan in PLANS.items():
            task = json.dumps({"parents": parents, "method": method, "plan": plan})
            out = subprocess.run([sys.executable, __file__, "--one", task, "--trials", str(args.trials)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{method:<10} {name:<28} {r['load']:7.2f} {r['merge']:13.2f} {format_bytes(r['rss']):>9} "
                  f"{r['rss'] / parent_bytes:8.1f} {format_bytes(r['need']):>10}", flush=True)
    print("\nprojected device memory, three 7B bf16 parents (Llama-2 shapes), from shapes alone:")
    for method, name, slots, device in projection():
        print(f"{method:<10} {name:<45} {slots} live model{'s' if slots > 1 else ' '} {format_bytes(device):>9}")


if __name__ == "__main__":
    main()
