"""Does the demo zoo show the paper's phenomenon? Parents, base, untuned merges and a dev-chosen grid merge, per seed.

For each seed: build (or reuse) the zoo, score the base and parents on every task's test split, merge the
parents with shoal (linear 0.5/0.5, task arithmetic 1/1, TIES and DARE-TIES at density 0.5 weight 1), search a
grid of two global task-arithmetic weights on the dev split (of the target, and of the union task), and score
each dev-chosen merge on test.
Prints markdown tables (per seed and mean ± std) and writes every number to a JSON file.

    python benchmarks/zoo_table.py --seeds 0 1 2 --json zoo_table.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from shoal.evaluate import evaluate, load_task
from shoal.merge.engine import run_merge
from shoal.recipe import parse_recipe
from shoal.zoo import Zoo, build_zoo

TASKS = ("xx-math", "en-math", "xx-easy", "union")


def merge(zoo: Zoo, method: str, weights: dict[str, float], out: Path, density: float | None = None) -> Path:
    models = []
    for name, weight in weights.items():
        params: dict[str, float] = {"weight": weight}
        if density is not None:
            params["density"] = density
        models.append({"model": str(zoo.parents[name]), "parameters": params})
    recipe = {"merge_method": method, "models": models, "dtype": "float32", "seed": 0}
    if method != "linear":
        recipe["base_model"] = str(zoo.base)
    return run_merge(parse_recipe(yaml.safe_dump(recipe)), out, overwrite=True)


def score(model: Path, zoo: Zoo, task: str, split: str = "test") -> dict[str, float]:
    result = evaluate(model, load_task(zoo.tasks[task]), split=split, batch_size=200)
    out = {"score": 100 * result.score}
    if "form" in result.constraint_failures:
        out["not_xx"] = 100 * result.constraint_failures["form"] / result.n
    return out


def measure_seed(seed: int, cache: Path, size: str, threads: int, grid: list[float]) -> dict:
    root = cache / f"seed{seed}"
    start = time.perf_counter()
    built: list[str] = []
    zoo = build_zoo(root, seed=seed, size=size, threads=threads, progress=lambda stage, step, total: built.append(stage))
    timing = root / "build_seconds.json"
    if built:
        timing.write_text(json.dumps({"seconds": time.perf_counter() - start, "threads": threads}))
    row: dict = {"seed": seed, "build": json.loads(timing.read_text()) if timing.is_file() else None, "models": {}}

    models = {"base": zoo.base, **zoo.parents}
    merges = root / "merges"
    models["linear 0.5/0.5"] = merge(zoo, "linear", {"math": 0.5, "language": 0.5}, merges / "linear")
    models["task arithmetic 1/1"] = merge(zoo, "task_arithmetic", {"math": 1, "language": 1}, merges / "ta")
    models["TIES d0.5 w1"] = merge(zoo, "ties", {"math": 1, "language": 1}, merges / "ties", density=0.5)
    models["DARE-TIES d0.5 w1"] = merge(zoo, "dare_ties", {"math": 1, "language": 1}, merges / "dare", density=0.5)

    start = time.perf_counter()
    dev: dict[str, dict[str, float]] = {"xx-math": {}, "union": {}}
    for w_math in grid:
        for w_language in grid:
            path = merge(zoo, "task_arithmetic", {"math": w_math, "language": w_language}, merges / "grid")
            for task, scores in dev.items():
                scores[f"{w_math}/{w_language}"] = score(path, zoo, task, "dev")["score"]
    row["grid"] = {"seconds": time.perf_counter() - start, "all_dev": dev}
    for task, label in [("xx-math", "grid TA (target dev)"), ("union", "grid TA (union dev)")]:
        best = max(dev[task], key=dev[task].get)
        w_math, w_language = (float(w) for w in best.split("/"))
        row["grid"][task] = {"best": best, "dev": dev[task][best]}
        models[label] = merge(zoo, "task_arithmetic", {"math": w_math, "language": w_language}, merges / f"best-{task}")

    for name, path in models.items():
        row["models"][name] = {task: score(path, zoo, task) for task in TASKS}
    return row


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def table(rows: list[dict], task: str, title: str) -> str:
    names = list(rows[0]["models"])
    lines = [f"### {title}", "", "| seed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in rows:
        cells = []
        for name in names:
            cell = f"{row['models'][name][task]['score']:.1f}"
            if "not_xx" in row["models"][name][task]:
                cell += f" ({row['models'][name][task]['not_xx']:.0f})"
            cells.append(cell)
        lines.append(f"| {row['seed']} | " + " | ".join(cells) + " |")
    lines.append("| mean ± std | " + " | ".join(mean_std([r["models"][n][task]["score"] for r in rows]) for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", default="default")
    parser.add_argument("--threads", type=int, default=1, help="training threads (1 is safest on a shared machine)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "shoal" / "zoo-bench")
    parser.add_argument("--json", type=Path, default=Path("zoo_table.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = [round(0.25 * i, 2) for i in range(7)]  # 0 .. 1.5
    rows = []
    for seed in args.seeds:
        rows.append(measure_seed(seed, args.cache / args.size, args.size, args.threads, grid))
        grid_best = {task: rows[-1]["grid"][task] for task in ("xx-math", "union")}
        print(f"seed {seed}: build {rows[-1]['build']}, grid best on dev {grid_best}", flush=True)
    print()
    print(table(rows, "xx-math", "Target xx-math, test exact match % (in brackets: % of answers not in XX form)"))
    for task, title in [("en-math", "en-math (English 2+2), test %"), ("xx-easy", "xx-easy, test %"), ("union", "union, test %")]:
        print()
        print(table(rows, task, title))
    args.json.write_text(json.dumps({"size": args.size, "grid": grid, "rows": rows}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
