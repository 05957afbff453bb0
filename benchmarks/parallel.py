"""Trials per hour of `shoal evolve` with 1 process vs N Ray workers, on the demo zoo, in one run.

Each setting runs the same search (the demo's PS search, fixed budget) into a fresh folder; the rate counts the
trial loop only (from the first stored trial to the last), not Ray's start-up or the final test scoring. The
trials of every setting are checked to be the same (a parallel search stores what a serial one does).

    python benchmarks/parallel.py --zoo ~/.cache/shoal/zoo-bench/default/seed0 --budget 120 --workers 1 2
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
from shoal.zoo import load_zoo


def rate(search: Path, out: Path, workers: int) -> tuple[float, dict]:
    times: list[float] = []

    def on_stage(stage: Stage) -> None:
        if stage.progress is not None:
            times.append(time.perf_counter())

    evolve(load_search(search), out, workers=workers, on_stage=on_stage)
    study = optuna.load_study(study_name="shoal", storage=f"sqlite:///{out / 'study.db'}")
    trials = {t.user_attrs["index"]: (t.params, t.value) for t in study.trials}
    return 3600 * (len(times) - 1) / (times[-1] - times[0]), trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path.home() / ".cache/shoal/zoo-bench/default/seed0")
    parser.add_argument("--budget", type=int, default=120)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process / worker")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    zoo = load_zoo(args.zoo)
    work = Path(tempfile.mkdtemp(prefix="shoal-parallel-"))
    search = work / "search.yaml"
    search.write_text(yaml.safe_dump({
        "base": str(zoo.base), "parents": {k: str(v) for k, v in zoo.parents.items()},
        "tasks": [{"path": str(zoo.tasks["xx-math"])}], "budget": args.budget, "seed": 0,
    }))
    results = {w: rate(search, work / f"workers{w}", w) for w in args.workers}
    first = args.workers[0]
    for w, (per_hour, trials) in results.items():
        same = trials == results[first][1]
        print(f"workers {w}: {per_hour:8.0f} trials/hour | x{per_hour / results[first][0]:.2f} vs {first} | "
              f"trials identical to workers={first}: {same}")


if __name__ == "__main__":
    main()
