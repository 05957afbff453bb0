"""Does the demo zoo show the paper's phenomenon on every seed? The zoo and `shoal demo`'s search, per seed.

For each pre-registered seed: build (or reuse) the default zoo of that seed (1 thread), score the base, the parents
and the joint fine-tune on the test split of every task, run the search `shoal demo` runs (PS, DARE-TIES, a weight
and a density per parent and layer, 1000 trials, CMA-ES; fitness = the target's dev split) and read its summary:
the evolved model is the best dev trial, scored once on test. Prints per-seed rows, mean ± std and the smallest
margins, and writes every number to a JSON file (`shoal demo` reads the margins' range from it).

    python benchmarks/zoo_seeds.py --seeds 0 1 2 3 4 --out runs/zoo-seeds --json benchmarks/results/zoo_seeds.json

`--search-seed` runs another search over the same zoos (is an outcome the zoo's or the search's?).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import seed_record
import torch

from shoal.evaluate import evaluate, load_task
from shoal.zoo import build_zoo

TASKS = ("xx-math", "en-math", "xx-easy")


def skills(model: Path, tasks: dict[str, Path]) -> dict[str, float]:
    out = {}
    for name in TASKS:
        result = evaluate(model, load_task(tasks[name]), split="test", batch_size=250)
        out[name] = 100 * result.score
        if name == "xx-math":
            out["not_xx"] = 100 * result.constraint_failures.get("form", 0) / result.n
    return out


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    zoo = build_zoo(args.zoo_cache / f"seed{seed}", seed=seed, size="default", threads=1)
    built = time.perf_counter() - start
    zoo_json = json.loads((zoo.root / "zoo.json").read_text())
    models = {"base": zoo.base, **zoo.parents, "joint": zoo.joint}
    row: dict = {"seed": seed, "build_seconds": built, "steps": {"base": zoo_json["base_steps"], **{n: p["steps"] for n, p in zoo_json["parents"].items()}},
                 "models": {name: skills(path, zoo.tasks) for name, path in models.items()}}
    search_seed = seed if args.search_seed is None else args.search_seed
    folder = args.out / (f"seed{seed}" if args.search_seed is None else f"seed{seed}-search{search_seed}")
    summary = seed_record.search(folder, zoo.parents, zoo.base, zoo.target, args.budget, search_seed)
    row["search_seed"] = search_seed
    joint = row["models"]["joint"]["xx-math"]
    row |= seed_record.outcome(summary)
    row |= {
        "joint_test": joint,
        "margin_joint": row["evolved_test"] - joint,
        "dev_test_gap": 100 * (summary.best.dev - summary.best.test),
    }
    return row



def label(row: dict) -> str:
    """The zoo's seed, and the search's where it is not the zoo's."""
    search_seed = row.get("search_seed", row["seed"])
    return str(row["seed"]) if search_seed == row["seed"] else f"{row['seed']} (search {search_seed})"


def print_tables(rows: list[dict]) -> None:
    print("\n| seed | base | math | language | joint fine-tune | best untuned merge | evolved (dev) | vs best parent | vs best untuned | vs joint |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["models"]
        print(f"| {label(r)} | {m['base']['xx-math']:.1f} | {m['math']['xx-math']:.1f} ({m['math']['not_xx']:.0f}) | "
              f"{m['language']['xx-math']:.1f} | {r['joint_test']:.1f} | {r['best_untuned_test']:.1f} ({r['best_untuned']}) | "
              f"**{r['evolved_test']:.1f}** ({r['evolved_dev']:.1f}) | {r['margin_parent']:+.1f} | {r['margin_untuned']:+.1f} | "
              f"{r['margin_joint']:+.1f} |")
    col = lambda f: seed_record.mean_std([f(r) for r in rows])  # noqa: E731
    print(f"| mean ± std | {col(lambda r: r['models']['base']['xx-math'])} | {col(lambda r: r['models']['math']['xx-math'])} | "
          f"{col(lambda r: r['models']['language']['xx-math'])} | {col(lambda r: r['joint_test'])} | "
          f"{col(lambda r: r['best_untuned_test'])} | **{col(lambda r: r['evolved_test'])}** ({col(lambda r: r['evolved_dev'])}) | "
          f"{col(lambda r: r['margin_parent'])} | {col(lambda r: r['margin_untuned'])} | {col(lambda r: r['margin_joint'])} |")
    print("\nskills (test): | seed | model | xx-math | en-math | xx-easy |")
    for r in rows:
        for name, s in r["models"].items():
            print(f"| {label(r)} | {name} | {s['xx-math']:.1f} | {s['en-math']:.1f} | {s['xx-easy']:.1f} |")
    print(f"\nsmallest margins: vs best parent {min(r['margin_parent'] for r in rows):+.1f}, vs best untuned "
          f"{min(r['margin_untuned'] for r in rows):+.1f}, vs joint {min(r['margin_joint'] for r in rows):+.1f}; "
          f"dev-test gap {seed_record.mean_std([r['dev_test_gap'] for r in rows])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budget", type=int, default=1000,
                        help="trials; a larger budget over an earlier run's --out continues that search")
    parser.add_argument("--search-seed", type=int, default=None,
                        help="the search's seed, for every zoo seed (default: the zoo's seed, as `shoal demo`)")
    parser.add_argument("--zoo-cache", type=Path, default=Path("runs/zoo-cache"))
    parser.add_argument("--out", type=Path, default=Path("runs/zoo-seeds"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="JSON files of other runs of this script to add")
    parser.add_argument("--reference", type=Path, default=None,
                        help="also write the per-seed rows `shoal demo` compares itself with (src/shoal/zoo/measured.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [run_seed(seed, args) for seed in args.seeds]
    rows = seed_record.gathered(rows, args.merge)
    print_tables(rows)
    if args.json:
        seed_record.write(args.json, rows)
    if args.reference:
        keep = ("seed", "evolved_test", "evolved_dev", "best_parent_test", "best_untuned_test", "joint_test", "margin_parent",
                "margin_untuned", "margin_joint")
        reference = {"rows": [{k: r[k] for k in keep} for r in rows], "versions": seed_record.versions(),
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
        args.reference.write_text(json.dumps(reference, indent=1) + "\n")


if __name__ == "__main__":
    main()
