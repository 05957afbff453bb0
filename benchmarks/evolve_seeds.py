"""Does evolution beat the parents and the untuned merges? `shoal evolve` on the demo zoo, per seed, scored on test.

For each seed: build (or reuse) the zoo of that seed, write a search file (the paper's setting: DARE-TIES, a
weight and a density per parent and layer plus the embeddings, CMA-ES with its default population, sigma 1/6,
start at the middle), run it (resumable: run again to continue), and read summary.json. The evolved model is
the best *dev* trial, scored once on *test*; parents and untuned merges are scored on test too.
Prints per-seed rows and mean ± std, and writes every number to a JSON file.

    python benchmarks/evolve_seeds.py --seeds 0 1 2 --budget 1000 --out runs/evolve-seeds --json evolve_seeds.json
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import yaml
from seed_record import mean_std, outcome

from shoal.search.evolve import evolve
from shoal.search.spec import load_search
from shoal.search.summary import Summary
from shoal.zoo import build_zoo


def run_seed(seed: int, args: argparse.Namespace) -> Summary:
    cache = args.zoo_cache or Path.home() / ".cache/shoal/zoo-bench" / args.size  # one folder per size: never rebuilt over
    zoo = build_zoo(cache / f"seed{seed}", seed=seed, size=args.size, threads=1)
    folder = args.out / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    search = {
        "base": str(zoo.base),
        "parents": {name: str(path) for name, path in zoo.parents.items()},
        "space": args.space,
        "method": args.method,
        "genome": {"layers_per_group": args.layers_per_group},
        "tasks": [{"path": str(zoo.tasks[args.task])}],
        "budget": args.budget,
        "seed": seed,
    }
    if args.space == "dfs":  # default A = the language parent: its layers read and write XX
        search["dfs"] = {"parents": args.dfs_parents, "scaling": args.scaling}
        if "pretrained" in args.dfs_parents:  # the base's own layers as a source too
            search["parents"]["pretrained"] = str(zoo.base)
    if args.space == "hybrid":  # the paper's hybrid: A = the PS result, B = the math parent
        search["dfs"] = {"parents": ["math"], "scaling": args.scaling}
        if args.reuse_ps and not (folder / "run" / "ps").exists():  # the PS stage is the PS search: reuse its trials
            shutil.copytree(args.reuse_ps / f"seed{seed}" / "run", folder / "run" / "ps")
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(search, sort_keys=False))
    return evolve(load_search(path), folder / "run")


def row(seed: int, summary: Summary) -> dict:
    """seed_record.outcome (the evolved model against the best parent and untuned merge), with every parent's test
    score, a hybrid's stage scores and the search's timings."""
    return {
        "seed": seed,
        **outcome(summary),
        "parents": {k: 100 * v for k, v in summary.parents.items()},
        "stages": {k: 100 * v.test for k, v in (summary.stages or {}).items()},
        "seconds_per_trial": summary.seconds_per_trial.model_dump(),
        "wall_seconds": summary.wall_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--method", default="dare_ties")
    parser.add_argument("--space", choices=["ps", "dfs", "hybrid"], default="ps")
    parser.add_argument("--task", default="xx-math", help="the zoo task to evolve for (its dev split is the fitness)")
    parser.add_argument("--scaling", choices=["full", "seam", "none"], default="full",
                        help="DFS input scales: the paper's full M x M matrix, one per seam, or none")
    parser.add_argument("--dfs-parents", nargs="+", default=["language", "math"],
                        help="for --space dfs: the parents in layout order (the first, A, gives embeddings and head); "
                             "`pretrained` is the zoo's base, added as a parent")
    parser.add_argument("--reuse-ps", type=Path, help="for --space hybrid: a PS run of this script (same seeds, budget)")
    parser.add_argument("--layers-per-group", type=int, default=1)
    parser.add_argument("--size", default="default", help="zoo size: default, deep (8 narrower layers) or smoke")
    parser.add_argument("--zoo-cache", type=Path, help="default: ~/.cache/shoal/zoo-bench/SIZE")
    parser.add_argument("--out", type=Path, default=Path("runs/evolve-seeds"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        summary = run_seed(seed, args)
        rows.append(row(seed, summary))
        r = rows[-1]
        print(
            f"seed {seed}: evolved dev {r['evolved_dev']:.1f} test {r['evolved_test']:.1f} | best parent "
            f"{r['best_parent']} {r['best_parent_test']:.1f} | best untuned {r['best_untuned']} "
            f"{r['best_untuned_test']:.1f} | margins {r['margin_parent']:+.1f} / {r['margin_untuned']:+.1f}",
            flush=True,
        )
    print(f"\n| {args.space} {args.method}, budget {args.budget}, {len(rows)} seeds | test (mean ± std) |\n|:--|--:|")
    for name in rows[0]["parents"]:
        print(f"| parent {name} | {mean_std([r['parents'][name] for r in rows])} |")
    for name in rows[0]["untuned"]:
        print(f"| untuned {name} | {mean_std([r['untuned'][name] for r in rows])} |")
    print(f"| best parent per seed | {mean_std([r['best_parent_test'] for r in rows])} |")
    print(f"| best untuned per seed (chosen on test) | {mean_std([r['best_untuned_test'] for r in rows])} |")
    if rows[0]["stages"]:
        print(f"| PS stage of the hybrid | {mean_std([r['stages']['ps'] for r in rows])} |")
    print(f"| **evolved (best dev trial)** | **{mean_std([r['evolved_test'] for r in rows])}** |")
    print(f"| margin over best parent | {mean_std([r['margin_parent'] for r in rows])} |")
    print(f"| margin over best untuned | {mean_std([r['margin_untuned'] for r in rows])} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
