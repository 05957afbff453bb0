"""Fitness that costs less: what each fitness mode buys per dev item scored, on the demo zoo, scored on test.

For each seed and mode (`full`, and `subset` with each --subset size), a PS search: `full` runs --budget trials; a
subset of n items runs --budget x N / n x --fraction trials (N: the target's dev items), so it scores --fraction
of full's dev items (1: the same compute); with --fraction below 1, `full` also runs at that fraction of its
trials, the plain way to spend less. With --race, also `race` (--first items per task in its first round)
for --budget trials, like `full`: what racing saves is read off its items against full's at the same trials. With
--fixed n, also mergekit-evolve's way to spend less (its `limit`): `full` over a copy of the task whose dev split is
its first n items, the same items for every trial, for as many trials as subset n. Each run picks its model by
re-scoring its top --top trials on its whole dev split (`select`; for fixed n, those n items); every pick is then
scored once on the task's whole dev split and on test. Per run: items and tokens spent, the pick's search fitness, whole-dev score and test
score, and the gap between the search fitness and test (how much the winner overstates itself).

    python benchmarks/fitness_cost.py --seeds 0 1 2 --budget 300 --subset 8 16 --race --out runs/fitness-cost --json fitness_cost.json
    python benchmarks/fitness_cost.py --seeds 0 1 2 --budget 300 --subset 100 --fraction 0.2 --json fitness_fifth.json
    python benchmarks/fitness_cost.py --seeds 0 1 2 --budget 300 --subset --fixed 100 --fraction 0.2 --json fitness_fixed.json
    python benchmarks/fitness_cost.py --seeds 0 1 2 --budget 300 --subset 100 --fraction 0.18 --json fitness_018.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import torch
import yaml
from seed_record import mean_std

from shoal.evaluate import evaluate, load_task
from shoal.search.evolve import evolve
from shoal.search.spec import load_search
from shoal.zoo import build_zoo


def first_items(task: Path, n: int, out: Path) -> Path:
    """A copy of the task folder whose dev split is its first n items (the test split unchanged)."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(task, out)
    lines = (task / "dev.jsonl").read_text().splitlines(keepends=True)
    (out / "dev.jsonl").write_text("".join(lines[:n]))
    return out


def run(seed: int, mode: str, n: int | None, fraction: float, args: argparse.Namespace) -> dict:
    """One search; mode `fixed` is `full` over the first n dev items."""
    zoo = build_zoo(args.zoo_cache / f"seed{seed}", seed=seed, size=args.zoo_size, threads=1)
    target = load_task(zoo.tasks[args.task])
    dev = len(target.items("dev"))
    budget = args.budget if n is None else args.budget * dev // min(n, dev)
    budget = max(1, round(budget * fraction))
    fitness = {"mode": "full" if mode == "fixed" else mode} | ({"items": n} if mode == "subset" else {})
    fitness |= {"first": args.first} if mode == "race" else {}
    name = (mode if n is None else f"{mode}{n}") + (f"-at-{fraction:g}" if fraction != 1 else "")
    folder = args.out / f"seed{seed}" / name
    folder.mkdir(parents=True, exist_ok=True)
    task = first_items(zoo.tasks[args.task], n, folder / "task") if mode == "fixed" else zoo.tasks[args.task]
    search = {
        "base": str(zoo.base),
        "parents": {name: str(path) for name, path in zoo.parents.items()},
        "method": "dare_ties",
        "genome": {"layers_per_group": args.layers_per_group},
        "tasks": [{"path": str(task)}],
        "fitness": fitness,
        "select": {"top": args.top},
        "budget": budget,
        "seed": seed,
    }
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(search, sort_keys=False))
    s = evolve(load_search(path), folder / "run")
    assert s.compute is not None and s.selection is not None and s.best.search is not None
    whole_dev = s.best.dev if mode != "fixed" else evaluate(folder / "run" / "best", target, split="dev").score
    label = f"fixed, first {n} dev items" if mode == "fixed" else s.fitness
    return {
        "seed": seed, "mode": label + (f", {fraction:g} of full's compute" if fraction != 1 else ""), "trials": s.trials, "items": s.compute.items, "tokens": s.compute.tokens,
        "select_items": s.selection.cost.items, "select_tokens": s.selection.cost.tokens, "search": 100 * s.best.search, "dev": 100 * whole_dev,
        "test": 100 * s.best.test, "overstated": 100 * (s.best.search - s.best.test),
        "top_by_search_dev": 100 * s.selection.rescored[0].dev, "wall_seconds": s.wall_seconds,
    }



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=300, help="trials of the full-fitness run")
    parser.add_argument("--subset", type=int, nargs="*", default=[8, 16], help="subset sizes (dev items per generation)")
    parser.add_argument("--fixed", type=int, nargs="*", default=[],
                        help="mergekit-evolve's limit: full fitness over the first n dev items (as many trials as subset n)")
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="run the subset modes at this fraction of full's items, and full itself at this fraction "
                             "of its trials too (0.2: the issue's one fifth of the compute)")
    parser.add_argument("--race", action="store_true", help="also the race mode, at --budget trials")
    parser.add_argument("--first", type=int, default=16, help="race: items per task in the first round")
    parser.add_argument("--top", type=int, default=5, help="trials re-scored on the whole dev split at the end")
    parser.add_argument("--task", default="xx-math")
    parser.add_argument("--layers-per-group", type=int, default=1)
    parser.add_argument("--zoo-size", choices=["default", "smoke"], default="default")
    parser.add_argument("--zoo-cache", type=Path, default=Path.home() / ".cache/shoal/zoo-bench/default")
    parser.add_argument("--out", type=Path, default=Path("runs/fitness-cost"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modes = [("full", None, 1.0)] + [("subset", n, args.fraction) for n in args.subset]
    modes += [("fixed", n, args.fraction) for n in args.fixed]
    modes += ([("race", None, 1.0)] if args.race else []) + ([("full", None, args.fraction)] if args.fraction != 1 else [])
    rows = []
    for seed in args.seeds:
        for mode, n, fraction in modes:
            rows.append(run(seed, mode, n, fraction, args))
            r = rows[-1]
            print(f"seed {seed} {r['mode']}: {r['trials']} trials, {r['items']} items | search {r['search']:.1f} "
                  f"dev {r['dev']:.1f} test {r['test']:.1f} (overstated by {r['overstated']:+.1f})", flush=True)
    print("\n| fitness | trials | dev items | search fitness | whole dev | test | search - test |")
    print("|:--|--:|--:|--:|--:|--:|--:|")
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        cells = [mean_std([r[k] for r in mine]) for k in ("search", "dev", "test", "overstated")]
        print(f"| {mode} | {statistics.mean(r['trials'] for r in mine):.0f} | "
              f"{statistics.mean(r['items'] for r in mine):.0f} | {' | '.join(cells)} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
