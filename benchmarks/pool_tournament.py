"""Does a tournament over pairs find the pair of a pool that matters? `shoal evolve`'s pool tournament (spec.pool,
search/tournament.py) on the zoo's pool, seed by seed.

For each pre-registered seed: reuse the zoo of that seed and its pool (built by benchmarks/pool_seeds.py: math,
language, equations and the distractors prose and scenes), then run `shoal demo --pool`'s search: `shoal demo`'s
PS search over each pair of the five parents, in three rounds that together spend the budget B: every pair to
B / (2 x pairs) trials (half of B); the three best by dev (the best trial re-scored on the whole dev split, as every
run picks) continue to 3/10 of B more between them; the best of those takes the rest. The winner's model is scored
once on test and compared, in the same table, with the keep-gene pool search (`--against`, pool_seeds.py's JSON on
the same zoos: its parents, untuned merges and two-parent search).

    python benchmarks/pool_tournament.py --seeds 1 2 4 12 13 --zoo-cache runs/zoo-cache --against \
        benchmarks/results/pool_seeds_keep.json --json benchmarks/results/pool_tournament.json

(results/pool_tournament.json was measured with this script's first form, which ran the rounds itself over one
folder per pair; on seed 1's zoo, every pair's first 10 trials under the library's tournament equal the first
form's in parameters and scores.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import seed_record
import torch
import yaml

from shoal.cli.demo import demo_search
from shoal.search.evolve import evolve
from shoal.search.spec import load_search
from shoal.zoo import build_zoo
from shoal.zoo.pool import build_pool


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    zoo = build_zoo(args.zoo_cache / f"seed{seed}", seed=seed, size=args.size, threads=1)
    pool = build_pool(zoo, threads=1)
    folder = args.out / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    search = folder / "search.yaml"
    spec = demo_search(pool.parents, pool.base, pool.target, args.budget, seed, "ps", tournament=True)
    spec["pool"]["subset"] = args.subset
    search.write_text(yaml.safe_dump(spec, sort_keys=False))
    summary = evolve(load_search(search), folder / "run",
                     on_step=lambda step: print(f"seed {seed}: {step}", flush=True))
    assert summary.pool is not None
    history = [{"trials": r.trials, "dev": {name: 100 * score for name, score in r.dev.items()}}
               for r in summary.pool.rounds]
    return {"seed": seed, "winner": "+".join(summary.pool.winner), "rounds": history,
            "evolved_dev": 100 * summary.best.dev, "evolved_test": 100 * summary.best.test}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 4, 12, 13])
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--subset", type=int, default=2, help="parents in each subset (2: pairs, 3: triples)")
    parser.add_argument("--size", default="default", help="zoo size (smoke: a check of this script in seconds)")
    parser.add_argument("--zoo-cache", type=Path, default=Path("runs/zoo-cache"))
    parser.add_argument("--out", type=Path, default=Path("runs/pool-tournament"))
    parser.add_argument("--against", type=Path, nargs="*", default=[],
                        help="JSON files of benchmarks/pool_seeds.py on the same zoos (the keep-gene search)")
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="JSON files of other runs of this script to add")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep = {r["seed"]: r for path in args.against for r in json.loads(path.read_text())["rows"]}
    rows = seed_record.gathered([run_seed(seed, args) for seed in args.seeds], args.merge)
    print("\n| seed | winner | tournament (dev) | best parent of five | best untuned of five | keep genes | "
          "two-parent | vs best parent | vs best untuned | vs keep genes | vs two-parent |")
    print("|---" * 11 + "|")
    for r in rows:
        k = keep.get(r["seed"], {})
        versus = lambda key: f"{r['evolved_test'] - k[key]:+.1f}" if key in k else "-"  # noqa: E731
        shown = lambda key: f"{k[key]:.1f}" if key in k else "-"  # noqa: E731
        print(f"| {r['seed']} | {r['winner']} | **{r['evolved_test']:.1f}** ({r['evolved_dev']:.1f}) | "
              f"{shown('best_parent_test')} | {shown('best_untuned_test')} | {shown('evolved_test')} | "
              f"{shown('two_parent_test')} | {versus('best_parent_test')} | {versus('best_untuned_test')} | "
              f"{versus('evolved_test')} | {versus('two_parent_test')} |")
    print(f"| mean ± std | | **{seed_record.mean_std([r['evolved_test'] for r in rows])}** | | | | | | | | |")
    if args.json:
        seed_record.write(args.json, rows)


if __name__ == "__main__":
    main()
