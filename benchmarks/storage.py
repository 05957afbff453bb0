"""Trials per hour of `shoal evolve` with the run folder's study in an Optuna journal file (the default) vs in
SQLite (what run folders made before used, and still use when they hold a study.db), on the demo zoo, in one run.

First, the cost of storing one finished trial (`Study.add_trial`, 20 genes and shoal's attributes) alone: median
of 50 calls on a SQLite file, an in-memory SQLite database and a journal file.

Both loops run the same search into fresh folders (the SQLite one is given an empty study.db, so shoal keeps
the study there); the rate counts the trial loop only (first stored trial to last), and the stored trials are
checked to be the same. Storing a trial is Python work on the same cores as merging and scoring, so the
difference is the share of a trial that Optuna's SQLite layer took.

    python benchmarks/storage.py --zoo ~/.cache/shoal/zoo-bench/default/seed0 --budget 120 --space ps dfs
    python benchmarks/storage.py --space            # the per-call figures only
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import torch
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from shoal.search.run import Stage, evolve
from shoal.search.spec import load_search
from shoal.search.storage import default_storage, open_storage
from shoal.zoo import load_zoo


def rate(search: Path, out: Path) -> tuple[float, list]:
    times: list[float] = []

    def on_stage(stage: Stage) -> None:
        if stage.progress is not None:
            times.append(time.perf_counter())

    evolve(load_search(search), out, on_stage=on_stage)
    study = optuna.load_study(study_name="shoal", storage=open_storage(default_storage(out)))
    trials = [(t.params, t.value) for t in sorted(study.trials, key=lambda t: t.number)]
    return 3600 * (len(times) - 1) / (times[-1] - times[0]), trials


def add_trial_ms(storage: object, genes: int = 20, calls: int = 60) -> float:
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    distributions = {f"g{i}": FloatDistribution(0, 1) for i in range(genes)}
    times = []
    for k in range(calls):
        trial = optuna.trial.create_trial(
            params={g: 0.5 for g in distributions}, distributions=distributions, value=k / calls,
            state=TrialState.COMPLETE, user_attrs={"index": k, "generation": k // 10, "seed": k, "dev_scores": {"t": 0.1},
                                                    "merge_seconds": 0.1, "eval_seconds": 0.2})
        start = time.perf_counter()
        study.add_trial(trial)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[calls - 50:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path.home() / ".cache/shoal/zoo-bench/default/seed0")
    parser.add_argument("--budget", type=int, default=120)
    parser.add_argument("--space", nargs="*", default=["ps", "dfs"], choices=["ps", "dfs"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    zoo = load_zoo(args.zoo)
    work = Path(tempfile.mkdtemp(prefix="shoal-storage-"))
    calls = {"sqlite file": add_trial_ms(f"sqlite:///{work / 'calls.db'}"),
             "sqlite in memory": add_trial_ms("sqlite:///:memory:"),
             "journal file": add_trial_ms(open_storage(str(work / "calls.log")))}
    print("add_trial, median ms: " + " | ".join(f"{k} {v:.2f}" for k, v in calls.items())
          + f" | sqlite file / journal x{calls['sqlite file'] / calls['journal file']:.0f}")
    for space in args.space:
        search = work / f"search-{space}.yaml"
        search.write_text(yaml.safe_dump({
            "base": str(zoo.base), "parents": {k: str(v) for k, v in zoo.parents.items()},
            "tasks": [{"path": str(zoo.tasks["xx-math"])}], "budget": args.budget, "seed": 0, "space": space,
            "dfs": {"parents": ["language", "math"]},
        }))
        (work / f"sqlite-{space}").mkdir()
        (work / f"sqlite-{space}" / "study.db").touch()
        sqlite = rate(search, work / f"sqlite-{space}")
        journal = rate(search, work / f"journal-{space}")
        genes = len(sqlite[1][0][0])
        print(f"{space} ({genes} genes): sqlite {sqlite[0]:8.0f} | journal {journal[0]:8.0f} trials/hour | "
              f"x{journal[0] / sqlite[0]:.2f} | trials identical: {journal[1] == sqlite[1]}")


if __name__ == "__main__":
    main()
