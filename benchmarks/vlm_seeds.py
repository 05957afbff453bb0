"""Does EvoVLM work on the demo zoo? `shoal demo --vlm`'s search on each pre-registered seed.

For each seed: build (or reuse) the default text zoo of that seed and its VLM part (1 thread), score the VLM on the
test split of both caption tasks, then run the search `shoal demo --vlm` runs (PS, DARE-TIES, a weight and a density
per parent and layer and the embeddings, over the VLM and the language parent, CMA-ES; fitness = xx-caption's dev
split) and read its summary: the evolved model is the best dev trial, scored once on test, beside the parents (the
text models inside the VLM's vision shell) and the untuned merges. Also counts, among the evolved model's test
captions, the share in the XX scene form and the share right per slot. Prints per-seed rows and mean ± std, and
writes every number to a JSON file.

    python benchmarks/vlm_seeds.py --seeds 0 1 2 --zoo-cache runs/zoo-cache --json benchmarks/results/vlm_seeds.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import seed_record
import torch

from shoal.cli.demo import VLM_BUDGET
from shoal.evaluate import evaluate, load_task
from shoal.zoo import build_vlm_zoo, build_zoo

SLOTS = {"shape": 0, "colour": 1, "place": 3}  # word positions in an XX scene: "tomo kiru i hasu ta ."


def slot_shares(outputs: list[str], answers: list[str], form: str) -> dict[str, float]:
    """% of captions in the XX scene form, and % of all captions whose shape, colour, place word is right."""
    shaped = [(o.split(), a.split()) for o, a in zip(outputs, answers) if re.fullmatch(form, o.strip())]
    row = {"form": 100 * len(shaped) / len(outputs)}
    for name, index in SLOTS.items():
        row[name] = 100 * sum(o[index] == a[index] for o, a in shaped) / len(outputs)
    return row


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    zoo = build_zoo(args.zoo_cache / f"seed{seed}", seed=seed, size=args.size, threads=1)
    part = build_vlm_zoo(zoo, threads=1)
    built = time.perf_counter() - start
    tasks = {name: load_task(folder) for name, folder in part.tasks.items()}
    vlm = {name: 100 * evaluate(part.vlm, task, split="test", batch_size=64).score for name, task in tasks.items()}
    folder = args.out / f"seed{seed}"
    summary = seed_record.search(folder, {"vlm": part.vlm, "language": part.language}, zoo.base, part.target,
                                 args.budget, seed)
    target = tasks["xx-caption"]
    result = evaluate(folder / "run" / "best", target, split="test", batch_size=64, return_outputs=True)
    answers = [item.answer for item in target.items("test")]
    return {
        "seed": seed,
        "build_seconds": built,
        "vlm_en_caption_test": vlm["en-caption"],
        "parents": {k: 100 * v for k, v in summary.parents.items()},
        **seed_record.outcome(summary),
        "evolved_slots": slot_shares(result.outputs, answers, target.spec.constraints[1].pattern),
        "evolved_example": result.outputs[0],
    }



def print_table(rows: list[dict]) -> None:
    print("\n| seed | VLM en-caption | VLM | language (shell) | base (shell) | best untuned merge | **evolved** (dev) | "
          "vs best parent | vs best untuned | evolved: XX form / shape / colour / place |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p, s = r["parents"], r["evolved_slots"]
        print(f"| {r['seed']} | {r['vlm_en_caption_test']:.1f} | {p['vlm']:.1f} | {p['language']:.1f} | {p['base']:.1f} | "
              f"{r['untuned'][r['best_untuned']]:.1f} ({r['best_untuned']}) | **{r['evolved_test']:.1f}** "
              f"({r['evolved_dev']:.1f}) | {r['margin_parent']:+.1f} | {r['margin_untuned']:+.1f} | "
              f"{s['form']:.0f} / {s['shape']:.0f} / {s['colour']:.0f} / {s['place']:.0f} |")
    col = lambda f: seed_record.mean_std([f(r) for r in rows])  # noqa: E731
    print(f"| mean ± std | {col(lambda r: r['vlm_en_caption_test'])} | {col(lambda r: r['parents']['vlm'])} | "
          f"{col(lambda r: r['parents']['language'])} | {col(lambda r: r['parents']['base'])} | "
          f"{col(lambda r: r['untuned'][r['best_untuned']])} | **{col(lambda r: r['evolved_test'])}** "
          f"({col(lambda r: r['evolved_dev'])}) | {col(lambda r: r['margin_parent'])} | {col(lambda r: r['margin_untuned'])} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=VLM_BUDGET)
    parser.add_argument("--size", default="default", help="zoo size (smoke: a check of this script in seconds)")
    parser.add_argument("--zoo-cache", type=Path, default=Path("runs/zoo-cache"))
    parser.add_argument("--out", type=Path, default=Path("runs/vlm-seeds"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="JSON files of other runs of this script to add")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args))
        print(json.dumps(rows[-1]), flush=True)
    rows = seed_record.gathered(rows, args.merge)
    print_table(rows)
    if args.json:
        seed_record.write(args.json, rows)


if __name__ == "__main__":
    main()
