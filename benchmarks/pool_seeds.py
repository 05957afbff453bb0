"""Does the search find which parents matter? `shoal demo --pool`'s search over every parent of the pool, per seed.

For each pre-registered seed: reuse (or build) the default zoo of that seed and its pool (one more useful parent,
`equations`, and two distractors, `prose` and `scenes`, each fine-tuned from the base), run the search `shoal demo
--pool` runs (PS, DARE-TIES, a weight and a density per parent and layer and a keep gene per parent, CMA-ES;
fitness = the target's dev split)
over all five parents, and compare its model on the target's test split with the best of the five parents, the
best untuned merge of all five and, when given (`--two-parent`, the JSON of benchmarks/zoo_seeds.py on the same
zoos), the two-parent search's model. Also prints the weight mass the evolved recipe puts on each parent (the mean
weight over layers, as `shoal demo --pool` prints it), summed over the distractors.

    python benchmarks/pool_seeds.py --seeds 0 1 2 3 4 --zoo-cache runs/zoo-cache --two-parent benchmarks/results/zoo_seeds.json \\
        --json benchmarks/results/pool_seeds.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import seed_record
import torch

from shoal.cli.demo import weight_mass
from shoal.zoo import build_zoo
from shoal.zoo.pool import build_pool



def run_seed(seed: int, args: argparse.Namespace, two_parent: dict[int, float]) -> dict:
    start = time.perf_counter()
    zoo = build_zoo(args.zoo_cache / f"seed{seed}", seed=seed, size=args.size, threads=1)
    pool = build_pool(zoo, threads=1)
    built = time.perf_counter() - start
    folder = args.out / (f"seed{seed}" if args.choose_parents else f"seed{seed}-weights-only")
    summary = seed_record.search(folder, pool.parents, pool.base, pool.target, args.budget, seed,
                                 choose_parents=args.choose_parents)
    mass = weight_mass(summary)
    row = {
        "seed": seed,
        "choose_parents": args.choose_parents,
        "build_seconds": built,
        "roles": pool.roles,
        "parents": {name: 100 * score for name, score in summary.parents.items()},
        **seed_record.outcome(summary),
        "weight_mass": mass,
        "distractor_mass": sum(w for name, w in mass.items() if pool.roles[name] == "distractor"),
    }
    if seed in two_parent:
        row["two_parent_test"] = two_parent[seed]
        row["margin_two_parent"] = row["evolved_test"] - two_parent[seed]
    return row



def print_tables(rows: list[dict]) -> None:
    names = list(rows[0]["parents"])
    print(f"\n| seed | {' | '.join(names)} | best untuned merge | two-parent evolved | pool evolved (dev) | vs best parent "
          f"| vs best untuned | vs two-parent | distractor weight |")
    print("|---" * (len(names) + 8) + "|")
    for r in rows:
        two = f"{r['two_parent_test']:.1f}" if "two_parent_test" in r else "-"
        vs_two = f"{r['margin_two_parent']:+.1f}" if "margin_two_parent" in r else "-"
        scores = " | ".join(f"{r['parents'][n]:.1f}" for n in names)
        print(f"| {r['seed']} | {scores} | "
              f"{r['best_untuned_test']:.1f} ({r['best_untuned']}) | {two} | **{r['evolved_test']:.1f}** "
              f"({r['evolved_dev']:.1f}) | {r['margin_parent']:+.1f} | {r['margin_untuned']:+.1f} | {vs_two} | "
              f"{r['distractor_mass']:.2f} |")
    col = lambda key: seed_record.mean_std([r[key] for r in rows if key in r])  # noqa: E731
    print(f"| mean ± std | {' | '.join(seed_record.mean_std([r['parents'][n] for r in rows]) for n in names)} | "
          f"{col('best_untuned_test')} | {col('two_parent_test')} | **{col('evolved_test')}** ({col('evolved_dev')}) | "
          f"{col('margin_parent')} | {col('margin_untuned')} | {col('margin_two_parent')} | {col('distractor_mass')} |")
    print("\nweight per parent (mean over layers): | seed | " + " | ".join(names) + " |")
    for r in rows:
        print(f"| {r['seed']} | " + " | ".join(f"{r['weight_mass'].get(n, 0.0):.2f}" for n in names) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--size", default="default", help="zoo size (smoke: a check of this script in seconds)")
    parser.add_argument("--zoo-cache", type=Path, default=Path("runs/zoo-cache"))
    parser.add_argument("--out", type=Path, default=Path("runs/pool-seeds"))
    parser.add_argument("--two-parent", type=Path, nargs="*", default=[],
                        help="JSON files of benchmarks/zoo_seeds.py on the same zoos (the two-parent search to compare with)")
    parser.add_argument("--choose-parents", action=argparse.BooleanOptionalAction, default=True,
                        help="a keep gene per parent, as `shoal demo --pool` (--no-choose-parents: weights alone)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="JSON files of other runs of this script to add")
    args = parser.parse_args()
    torch.set_num_threads(1)
    two_parent = {r["seed"]: r["evolved_test"] for path in args.two_parent for r in json.loads(path.read_text())["rows"]
                  if r.get("search_seed", r["seed"]) == r["seed"]}  # `shoal demo`'s search, not another seed's
    rows = [run_seed(seed, args, two_parent) for seed in args.seeds]
    rows = seed_record.gathered(rows, args.merge)
    print_tables(rows)
    if args.json:
        seed_record.write(args.json, rows)


if __name__ == "__main__":
    main()
