"""What the per-seed benchmarks (zoo_seeds.py, vlm_seeds.py, pool_seeds.py) write and merge: their rows, one per
seed, with the versions of the libraries that decide the numbers and the machine that made them."""

from __future__ import annotations

import json
import platform
from importlib.metadata import version
from pathlib import Path

LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "optuna", "cmaes", "numpy", "pillow")


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
