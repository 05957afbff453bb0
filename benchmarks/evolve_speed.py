"""Seconds per trial of shoal's resident merge vs merging each candidate to disk with mergekit and reloading it.

The peer loop is what mergekit-evolve does by default: `mergekit.merge.run_merge` of the candidate recipe into
a temporary folder, `from_pretrained` of that folder, then the evaluation. shoal runs its own trial objective
(`DevFitness` over the resident merger), once merging each candidate ahead while the previous one is scored
(the default) and once inline. All loops score the same candidates (CMA-ES generations of the demo search)
with the same evaluator on the same dev split. Prints, per loop, the time a trial waits for its merge (and
load), the evaluation time, trials per hour and the merge share of a trial; needs `pip install mergekit==0.1.5`.

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
from shoal.search.fitness import DevFitness, WeightedTask
from shoal.search.genome import Genome
from shoal.search.loop import Candidate
from shoal.search.optimizer import CmaEs
from shoal.search.spaces import ParameterSpace, ps_genome
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


def candidates(genome: Genome, generations: int, seed: int) -> list[list[Candidate]]:
    """CMA-ES generations of the search (told a constant fitness: only the candidates' spread matters here), each
    candidate merged under the search's seed, as the search merges it."""
    optimizer = CmaEs(len(genome), seed=seed)
    out = []
    for _ in range(generations):
        xs = [optimizer.ask() for _ in range(optimizer.population)]
        out.append([(genome.values(x), seed) for x in xs])
        optimizer.tell([(x, 0.0) for x in xs])
    return out


def shoal_loop(spec: SearchSpec, generations: list[list[Candidate]], task, batch_size: int) -> list[dict[str, float]]:
    fitness = DevFitness(ParameterSpace(spec), [WeightedTask(task, 1.0)], batch_size)
    rows = []
    for generation in generations:
        for j, (values, seed) in enumerate(generation):
            upcoming = generation[j + 1] if j + 1 < len(generation) else None
            e = fitness(values, seed, upcoming)
            rows.append({"merge": e.merge_seconds, "load": 0.0, "eval": e.eval_seconds, "score": e.fitness})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path.home() / ".cache/shoal/zoo-bench/default/seed0")
    parser.add_argument("--generations", type=int, default=3)
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
    generations = candidates(genome, args.generations, seed=0)
    flat = [c for g in generations for c in g]
    tokenizer = ParameterSpace(spec.model_copy(update={"overlap": False})).tokenizer
    mergekit_trial(genome.recipe(*flat[0]), task, tokenizer, args.batch_size)  # warm-up: imports, tokenised prompts
    rows = {
        "shoal": shoal_loop(spec, generations, task, args.batch_size),
        "shoal-inline": shoal_loop(spec.model_copy(update={"overlap": False}), generations, task, args.batch_size),
    }
    rows["mergekit"] = [mergekit_trial(genome.recipe(*c), task, tokenizer, args.batch_size) for c in flat]
    print(f"{len(flat)} trials ({args.generations} generations) of {args.method} on {args.zoo} ({len(genome)} genes), "
          f"{args.threads} thread(s)")
    med = {name: {k: statistics.mean(r[k] for r in rs) for k in ("merge", "load", "eval")} for name, rs in rows.items()}
    for name, m in med.items():
        total = sum(m.values())
        print(f"{name:12s} merge+load {1e3 * (m['merge'] + m['load']):7.1f} ms | eval {m['eval'] * 1e3:7.1f} ms"
              f" | trial {total * 1e3:7.1f} ms | {3600 / total:7.0f} trials/hour | merge share "
              f"{100 * (m['merge'] + m['load']) / total:4.1f} %")
    ratio = sum(med["mergekit"].values()) / sum(med["shoal"].values())
    print(f"seconds per trial: mergekit-to-disk / shoal = {ratio:.2f}x (means)")
    same = sum(a["score"] == b["score"] for a, b in zip(rows["shoal"], rows["mergekit"]))
    why = " (DARE's random drops differ between the two tools)" if "dare" in args.method else ""
    print(f"dev scores equal in {same}/{len(rows['shoal'])} trials{why}")


if __name__ == "__main__":
    main()
