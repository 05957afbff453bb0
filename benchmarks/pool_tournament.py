"""Does a tournament over pairs find the pair of a pool that matters? Successive halving over every pair of parents.

For each pre-registered seed: reuse the zoo of that seed and its pool (built by benchmarks/pool_seeds.py: math,
language, equations and the distractors prose and scenes), then run `shoal demo`'s PS search over each pair of
the five parents, in three rounds that together spend one search's budget B: every pair to B / (2 x pairs) trials
(half of B); the three best by dev (the best trial re-scored on the whole dev split, as every run picks) continue
to 3/10 of B more between them; the best of those takes the rest. Each round resumes the same run folders (a
raised budget continues a search). The winner's model is scored once on test and compared, in the same table,
with the keep-gene pool search (`--against`, pool_seeds.py's JSON on the same zoos: its parents, untuned merges and
two-parent search).

    python benchmarks/pool_tournament.py --seeds 1 2 4 12 13 --zoo-cache runs/zoo-cache --against \
        benchmarks/results/pool_seeds_keep.json --json benchmarks/results/pool_tournament.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import seed_record
import torch

from shoal.zoo import build_zoo
from shoal.zoo.pool import build_pool


def rounds(budget: int, pairs: int) -> list[tuple[int, int]]:
    """(trials per pair by the end of the round, pairs that go on) for each round: half of the budget over every
    pair, 3/10 over the best three, the rest on the best one."""
    first = budget // (2 * pairs)
    second = first + (3 * budget // 10) // 3
    third = second + budget - pairs * first - 3 * (second - first)
    return [(first, 3), (second, 1), (third, 1)]


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    zoo = build_zoo(args.zoo_cache / f"seed{seed}", seed=seed, size=args.size, threads=1)
    pool = build_pool(zoo, threads=1)
    alive = list(itertools.combinations(pool.parents, 2))
    history = []
    for trials, goes_on in rounds(args.budget, len(alive)):
        results = {}
        for pair in alive:
            folder = args.out / f"seed{seed}" / "+".join(pair)
            results[pair] = seed_record.search(folder, {p: pool.parents[p] for p in pair}, pool.base, pool.target,
                                               trials, seed)
        alive = sorted(alive, key=lambda p: -results[p].best.dev)
        history.append({"trials": trials, "dev": {"+".join(p): 100 * results[p].best.dev for p in alive}})
        print(f"seed {seed}, {trials} trials a pair:", ", ".join(f"{k} {v:.1f}" for k, v in history[-1]["dev"].items()),
              flush=True)
        alive = alive[:goes_on]
    winner = results[alive[0]]
    return {"seed": seed, "winner": "+".join(alive[0]), "rounds": history,
            "evolved_dev": 100 * winner.best.dev, "evolved_test": 100 * winner.best.test}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 4, 12, 13])
    parser.add_argument("--budget", type=int, default=1000)
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
    print("\n| seed | winner (pair) | tournament (dev) | best parent of five | best untuned of five | keep genes | "
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
