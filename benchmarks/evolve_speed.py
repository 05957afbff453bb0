"""Seconds per trial of shoal's resident merge vs merging each candidate to disk with mergekit and reloading it.

The second loop is what mergekit-evolve does by default: `mergekit.merge.run_merge` of the candidate recipe
into a temporary folder, `from_pretrained` of that folder, then the evaluation. Both loops score the same
candidates (a CMA-ES generation of the demo search) with the same evaluator on the same dev split, alternating
trial by trial so that load on the machine hits both alike. Prints the split of a trial (merge, load, eval),
the merge share of a shoal trial, trials per hour, and the ratio; needs `pip install mergekit==0.1.5`.

    python benchmarks/evolve_speed.py --zoo ~/.cache/shoal/zoo-bench/default/seed0 --trials 24
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as transformers_logging

from shoal.evaluate import evaluate, load_task
from shoal.merge.resident import ResidentMerger
from shoal.recipe import Recipe
from shoal.search.genome import Genome
from shoal.search.loop import trial_seed
from shoal.search.optimizer import CmaEs
from shoal.search.spaces import ps_genome
from shoal.search.spec import SearchSpec
from shoal.zoo import load_zoo


def mergekit_trial(recipe: dict, task, tokenizer, batch_size: int) -> dict[str, float]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate({k: v for k, v in recipe.items() if k != "seed"})
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_merge(config, out, MergeOptions(copy_tokenizer=True, quiet=True, random_seed=recipe["seed"]))
        merged = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
        loaded = time.perf_counter()
        score = evaluate(model, task, "dev", tokenizer=tokenizer, batch_size=batch_size).score
        done = time.perf_counter()
    return {"merge": merged - start, "load": loaded - merged, "eval": done - loaded, "score": score}


def shoal_trial(merger: ResidentMerger, recipe: dict, task, batch_size: int) -> dict[str, float]:
    start = time.perf_counter()
    merger.apply(Recipe.model_validate(recipe))
    merged = time.perf_counter()
    score = evaluate(merger.model, task, "dev", tokenizer=merger.tokenizer, batch_size=batch_size).score
    return {"merge": merged - start, "load": 0.0, "eval": time.perf_counter() - merged, "score": score}


def candidates(genome: Genome, n: int, seed: int) -> list[dict]:
    optimizer = CmaEs(len(genome), seed=seed)
    return [genome.recipe(genome.values(optimizer.ask()), trial_seed(seed, i)) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path.home() / ".cache/shoal/zoo-bench/default/seed0")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--method", default="dare_ties")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()
    zoo = load_zoo(args.zoo)
    spec = SearchSpec.model_validate({
        "base": str(zoo.base), "parents": {k: str(v) for k, v in zoo.parents.items()}, "method": args.method,
        "tasks": [{"path": str(zoo.tasks["xx-math"])}],
    })
    genome = ps_genome(spec)
    task = load_task(zoo.tasks["xx-math"])
    recipes = candidates(genome, args.trials + 2, seed=0)
    setup = time.perf_counter()
    merger = ResidentMerger(Recipe.model_validate(recipes[0]))
    setup = time.perf_counter() - setup
    rows: dict[str, list[dict[str, float]]] = {"shoal": [], "mergekit": []}
    for i, recipe in enumerate(recipes):
        shoal = shoal_trial(merger, recipe, task, args.batch_size)
        peer = mergekit_trial(recipe, task, merger.tokenizer, args.batch_size)
        if i >= 2:  # the first two warm up caches and lazy imports in both loops
            rows["shoal"].append(shoal)
            rows["mergekit"].append(peer)
    print(f"{args.trials} trials of {args.method} on {args.zoo} ({len(genome)} genes), {args.threads} thread(s); "
          f"shoal's one-off setup (read parents, task vectors, ranks, model) {setup:.2f} s")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("merge", "load", "eval")} for name, rs in rows.items()}
    for name, m in med.items():
        total = sum(m.values())
        print(f"{name:9s} merge {m['merge'] * 1e3:7.1f} ms | load {m['load'] * 1e3:7.1f} ms | eval {m['eval'] * 1e3:7.1f} ms"
              f" | trial {total * 1e3:7.1f} ms | {3600 / total:7.0f} trials/hour | merge share "
              f"{100 * (m['merge'] + m['load']) / total:4.1f} %")
    ratio = sum(med["mergekit"].values()) / sum(med["shoal"].values())
    print(f"seconds per trial: mergekit-to-disk / shoal = {ratio:.2f}x (medians)")
    same = sum(a["score"] == b["score"] for a, b in zip(rows["shoal"], rows["mergekit"]))
    why = " (DARE's random drops differ between the two tools)" if "dare" in args.method else ""
    print(f"dev scores equal in {same}/{len(rows['shoal'])} trials{why}")


if __name__ == "__main__":
    main()
