"""The zoo's VLM part, measured: the VLM parent, the language parent and the base inside the VLM's shell (its vision
tower and projector), and task-arithmetic merges of the language models, on en-caption and xx-caption.

    nice -n 10 python benchmarks/vlm_zoo.py --zoo /tmp/zoo --seed 0 --size default [--grid] [--out result.json]

Builds (or loads as it is) the text zoo under --zoo, builds (or reuses) its VLM part, then scores every model on the test split (and, with
--grid, a 7 x 7 grid of task-arithmetic weights (vlm, language) on dev, the best point then scored on test). A merge
is base + a * (vlm LM - base) + b * (language - base) for the language-model tensors; the vision tower and
projector are the VLM's. For the xx-caption outputs it also counts the XX scene form and, among the captions in that
form, how often each slot (shape, colour, place) is right.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from shoal.evaluate import evaluate, load_task
from shoal.zoo import build_vlm_zoo, build_zoo, load_zoo

GRID = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


def lm_name(name: str) -> str:
    """The LLaVA's name of a Llama tensor: model.X -> model.language_model.X; lm_head stays."""
    return name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name


def slots(outputs: list[str], answers: list[str], form: str) -> dict[str, float]:
    """% of outputs in the XX scene form; among those, % right per slot (shape, colour, place)."""
    shaped = [(o.split(), a.split()) for o, a in zip(outputs, answers) if re.fullmatch(form, o.strip())]
    result = {"form": round(100 * len(shaped) / len(outputs), 1)}
    for name, index in (("shape", 0), ("colour", 1), ("place", 3)):
        result[name] = round(100 * sum(o[index] == a[index] for o, a in shaped) / len(shaped), 1) if shaped else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="default")
    parser.add_argument("--grid", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    # A zoo already there is used as it is (whatever its settings: e.g. one built with another mix for a trial);
    # build_zoo would rebuild it to this checkout's settings.
    zoo = load_zoo(args.zoo) if (args.zoo / "zoo.json").is_file() else build_zoo(args.zoo, seed=args.seed, size=args.size)
    print(f"text zoo: {time.perf_counter() - start:.0f} s", flush=True)
    start = time.perf_counter()

    def progress(stage: str, step: int, total: int) -> None:
        if step % 50 == 0 or step == total:
            print(f"  {stage} {step}/{total} {time.perf_counter() - start:.0f} s", flush=True)

    vlm_zoo = build_vlm_zoo(zoo, progress=progress)
    build_seconds = time.perf_counter() - start
    print(f"VLM part: {build_seconds:.0f} s", flush=True)

    model = AutoModelForImageTextToText.from_pretrained(vlm_zoo.vlm).eval()
    processor = AutoProcessor.from_pretrained(vlm_zoo.vlm)
    tasks = {name: load_task(folder) for name, folder in vlm_zoo.tasks.items()}
    form = tasks["xx-caption"].spec.constraints[1].pattern
    vlm_state = {k: v.clone() for k, v in model.state_dict().items()}
    base = load_file(vlm_zoo.base / "model.safetensors")
    language = load_file(vlm_zoo.language / "model.safetensors")
    tau_vlm = {k: vlm_state[lm_name(k)] - v for k, v in base.items()}
    tau_lang = {k: language[k] - v for k, v in base.items()}

    def load(a: float, b: float) -> None:
        """The resident VLM with language model base + a * tau_vlm + b * tau_lang."""
        state = dict(vlm_state)
        for k, v in base.items():
            state[lm_name(k)] = v + a * tau_vlm[k] + b * tau_lang[k]
        model.load_state_dict(state)

    def score(split: str) -> dict:
        row = {}
        for name, task in tasks.items():
            result = evaluate(model, task, split, processor=processor, batch_size=64, return_outputs=True)
            row[name] = round(100 * result.score, 1)
            if name == "xx-caption":
                answers = [item.answer for item in task.splits[split]]
                row["xx-slots"] = slots(result.outputs, answers, form)
                row["xx-example"] = result.outputs[0]
            else:
                row["en-example"] = result.outputs[0]
        return row

    models = {
        "vlm (a=1, b=0)": (1.0, 0.0),
        "language in the VLM shell (a=0, b=1)": (0.0, 1.0),
        "base in the VLM shell (a=0, b=0)": (0.0, 0.0),
        "task arithmetic 1/1": (1.0, 1.0),
        "task arithmetic 0.5/0.5": (0.5, 0.5),
    }
    table = {}
    for name, (a, b) in models.items():
        load(a, b)
        table[name] = score("test")
        print(f"{name}: {json.dumps(table[name])}", flush=True)

    grid = {}
    if args.grid:
        for a in GRID:
            for b in GRID:
                load(a, b)
                result = evaluate(model, tasks["xx-caption"], "dev", processor=processor, batch_size=64)
                grid[f"{a}/{b}"] = round(100 * result.score, 1)
        best = max(grid, key=grid.get)
        a, b = (float(w) for w in best.split("/"))
        load(a, b)
        table[f"grid best on xx-caption dev ({best}, dev {grid[best]})"] = score("test")
        print("grid (xx-caption dev, rows a = vlm weight, columns b = language weight):")
        print("      " + " ".join(f"{b:>5}" for b in GRID))
        for a in GRID:
            print(f"{a:>5} " + " ".join(f"{grid[f'{a}/{b}']:>5}" for b in GRID))
        print(f"best {best}: {json.dumps(table[list(table)[-1]])}", flush=True)

    if args.out:
        args.out.write_text(json.dumps({"seed": args.seed, "size": args.size, "vlm_build_seconds": round(build_seconds),
                                        "test": table, "grid_dev": grid}, indent=2) + "\n")


if __name__ == "__main__":
    main()
