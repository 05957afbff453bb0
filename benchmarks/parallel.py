"""Trials per hour of `shoal evolve` with 1 process vs N Ray workers, and with the transformers vs the vLLM
engine, on the demo zoo, in one run.

Each setting (workers x engine) runs the same search (the demo's PS search, fixed budget) into a fresh folder; the
rate counts the trial loop only (from the first stored trial to the last), not Ray's or vLLM's start-up or the
final test scoring. The trials of every setting are compared with the first's (a parallel search stores what a
serial one does; another engine may round differently).

    python benchmarks/parallel.py --zoo ~/.cache/shoal/zoo-bench/default/seed0 --budget 120 --workers 1 2
    python benchmarks/parallel.py --device cuda --engine hf vllm    # GPU machine with vLLM installed
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import optuna
import torch
import yaml

from shoal.search.run import Stage, evolve
from shoal.search.spec import load_search
from shoal.search.storage import default_storage, open_storage
from shoal.zoo import load_zoo


def rate(search: Path, out: Path, workers: int) -> tuple[float, dict]:
    times: list[float] = []

    def on_stage(stage: Stage) -> None:
        if stage.progress is not None:
            times.append(time.perf_counter())

    evolve(load_search(search), out, workers=workers, on_stage=on_stage)
    study = optuna.load_study(study_name="shoal", storage=open_storage(default_storage(out)))
    trials = {t.user_attrs["index"]: (t.params, t.value) for t in study.trials}
    return 3600 * (len(times) - 1) / (times[-1] - times[0]), trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path.home() / ".cache/shoal/zoo-bench/default/seed0")
    parser.add_argument("--budget", type=int, default=120)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process / worker")
    parser.add_argument("--engine", nargs="+", default=["hf"], choices=["hf", "vllm"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    zoo = load_zoo(args.zoo)
    work = Path(tempfile.mkdtemp(prefix="shoal-parallel-"))
    settings = [(w, engine) for engine in args.engine for w in args.workers]
    results = {}
    for w, engine in settings:
        search = work / f"search-{engine}.yaml"
        search.write_text(yaml.safe_dump({
            "base": str(zoo.base), "parents": {k: str(v) for k, v in zoo.parents.items()},
            "tasks": [{"path": str(zoo.tasks["xx-math"])}], "budget": args.budget, "seed": 0,
            "device": args.device, "engine": engine,
        }))
        results[w, engine] = rate(search, work / f"workers{w}-{engine}", w)
    first = settings[0]
    for (w, engine), (per_hour, trials) in results.items():
        same = trials == results[first][1]
        print(f"workers {w}, engine {engine}: {per_hour:8.0f} trials/hour | x{per_hour / results[first][0]:.2f} vs "
              f"workers {first[0]}, engine {first[1]} | trials identical to it: {same}")


if __name__ == "__main__":
    main()
