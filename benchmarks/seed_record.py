"""What the per-seed benchmarks (zoo_seeds.py, vlm_seeds.py, pool_seeds.py) share: the demo's search run into a
folder, what its summary says of the evolved model against the parents and untuned merges, the rows they write and
merge (one per seed, with the versions of the libraries that decide the numbers and the machine), and mean ± std."""

from __future__ import annotations

import json
import platform
import statistics
from importlib.metadata import version
from pathlib import Path

import yaml

from shoal.cli.demo import demo_search
from shoal.search.evolve import evolve
from shoal.search.spec import load_search
from shoal.search.summary import Summary

LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "optuna", "cmaes", "numpy", "pillow")


def search(
    folder: Path, parents: dict[str, Path], base: Path, target: Path, budget: int, seed: int, choose_parents: bool = False,
) -> Summary:
    """`shoal demo`'s PS search over these parents, written to folder/search.yaml and run into folder/run."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "search.yaml"
    spec = demo_search(parents, base, target, budget, seed, "ps", choose_parents=choose_parents)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return evolve(load_search(path), folder / "run")


def outcome(summary: Summary) -> dict:
    """The evolved model (dev and test, %) against the best parent (the base included) and the best untuned merge
    on test, every untuned merge's test score, and what the search took."""
    best_parent = max(summary.parents, key=summary.parents.get)
    best_untuned = max(summary.untuned, key=summary.untuned.get)
    evolved = 100 * summary.best.test
    return {
        "evolved_dev": 100 * summary.best.dev,
        "evolved_test": evolved,
        "best_parent": best_parent,
        "best_parent_test": 100 * summary.parents[best_parent],
        "best_untuned": best_untuned,
        "best_untuned_test": 100 * summary.untuned[best_untuned],
        "margin_parent": evolved - 100 * summary.parents[best_parent],
        "margin_untuned": evolved - 100 * summary.untuned[best_untuned],
        "untuned": {name: 100 * score for name, score in summary.untuned.items()},
        "trials": summary.trials,
        "evolve_seconds": summary.wall_seconds,
    }


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def versions() -> dict[str, str]:
    return {lib: version(lib) for lib in LIBRARIES}


def gathered(rows: list[dict], others: list[Path]) -> list[dict]:
    """These rows and those of other runs' JSON files (--merge), by seed."""
    every = rows + [row for path in others for row in json.loads(path.read_text())["rows"]]
    return sorted(every, key=lambda r: r["seed"])


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"rows": rows, "versions": versions(), "python": platform.python_version(),
              "machine": platform.machine(), "processor": platform.processor()}
    path.write_text(json.dumps(record, indent=2) + "\n")
