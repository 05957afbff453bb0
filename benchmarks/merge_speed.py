"""Wall time and peak RSS of `shoal merge` vs `mergekit-yaml` on three ~0.5B random parents, plus the I/O floor.

    python benchmarks/merge_speed.py [--size 0.5b|50m|small] [--repeats 3] [--work /tmp/shoal-bench] [--threads N]

Each command runs as its own process (so start-up counts for every tool alike), alternating tools on each
repeat after one warm-up read that puts the parents in the page cache. The floor is a process that reads
every parent tensor once and writes one model of the output's size (no arithmetic). Prints the median of
each, and each ratio as the median of the repeats' own ratios (a repeat's three runs are next to each other, so
a machine whose speed drifts between repeats moves its ratio less than the medians'), with their range; needs
`pip install mergekit==0.1.5` (benchmark-only dependency). Each tool runs with its own default torch threads
(shoal merge: one per core that other work leaves idle; mergekit: torch's, one per core), or with --threads N both
do (`-j N`, `--num-threads N`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

SIZES = {
    # ~0.55B parameters: 16 layers of hidden 1536 / MLP 4096, vocabulary 32000, untied head; bf16 = 1.1 GB
    "0.5b": dict(vocab_size=32000, hidden_size=1536, num_hidden_layers=16, intermediate_size=4096),
    # ~53M parameters: 6 layers of hidden 512 / MLP 1536, vocabulary 32000, untied head; bf16 = 106 MB
    "50m": dict(vocab_size=32000, hidden_size=512, num_hidden_layers=6, intermediate_size=1536),
    "small": dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, intermediate_size=512),
}
METHODS = {
    "linear": lambda p: {"merge_method": "linear", "dtype": "bfloat16",
                         "models": [{"model": str(p[n]), "parameters": {"weight": w}} for n, w in (("a", 0.5), ("b", 0.3), ("c", 0.2))]},
    "ties": lambda p: {"merge_method": "ties", "dtype": "bfloat16", "base_model": str(p["base"]),
                       "models": [{"model": str(p[n]), "parameters": {"weight": 1.0, "density": 0.5}} for n in "abc"]},
    "dare_ties": lambda p: {"merge_method": "dare_ties", "dtype": "bfloat16", "base_model": str(p["base"]),
                            "models": [{"model": str(p[n]), "parameters": {"weight": 1.0, "density": 0.5}} for n in "abc"]},
    "della": lambda p: {"merge_method": "della", "dtype": "bfloat16", "base_model": str(p["base"]),
                        "models": [{"model": str(p[n]), "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}}
                                   for n in "abc"]},
    "nuslerp": lambda p: {"merge_method": "nuslerp", "dtype": "bfloat16", "base_model": str(p["base"]),
                          "models": [{"model": str(p[n]), "parameters": {"weight": w}}
                                     for n, w in (("a", 0.6), ("b", 0.4))]},
}
RSS_WRAPPER = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)"
)


def build_parents(work: Path, size: str) -> dict[str, Path]:
    from shoal.synthetic import make_parents, tiny_config

    folder = work / f"parents-{size}"
    names = ("base", "a", "b", "c")
    if all((folder / n / "config.json").exists() for n in names):
        return {n: folder / n for n in names}
    shutil.rmtree(folder, ignore_errors=True)
    config = tiny_config(**SIZES[size])
    return make_parents(folder, names, config=config, dtype=torch.bfloat16, noise=0.01)


def floor(parents: list[str], out: str) -> None:
    """Read every tensor of every parent once; write the first parent's tensors as one model."""
    from safetensors import safe_open

    from shoal.checkpoint.writer import ModelFolderWriter, TensorSpec

    files = [str(next(Path(p).glob("*.safetensors"))) for p in parents]
    with safe_open(files[0], framework="pt") as handle:
        names = list(handle.keys())
        specs = [TensorSpec(n, tuple(handle.get_slice(n).get_shape()), torch.bfloat16) for n in names]
    Path(out).mkdir(parents=True)
    writer = ModelFolderWriter(Path(out), specs)
    for name in names:
        tensors = []
        for file in files:  # a copy out of the mapping, so every byte of every parent is really read
            with safe_open(file, framework="pt") as handle:
                tensors.append(handle.get_tensor(name).clone())
        writer.write(name, tensors[0])
    writer.close()


def measure(cmd: list[str], out: Path) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    res = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *cmd], capture_output=True, text=True, check=True)
    seconds, rss_kb, code = res.stdout.split()
    if code != "0":
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}")
    shutil.rmtree(out, ignore_errors=True)
    return float(seconds), int(rss_kb) / 1024**2


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--floor":
        floor(sys.argv[3:], sys.argv[2])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.5b", choices=SIZES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/shoal-bench"))
    ap.add_argument("--methods", default="linear,ties,dare_ties,della,nuslerp")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of both tools (default: each its own)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    parents = build_parents(args.work, args.size)
    params = sum(torch.tensor(s).prod().item() for s in _shapes(parents["a"]))
    threads = "each tool's default" if args.threads is None else args.threads
    print(f"parents: 3 (+ base), {params / 1e9:.2f}B parameters each, bfloat16, {torch.get_num_threads()} cores, "
          f"torch threads: {threads}")
    out = args.work / "out"
    floor_cmd = [sys.executable, __file__, "--floor", str(out), str(parents["a"]), str(parents["b"]), str(parents["c"])]
    measure(floor_cmd, out)  # warm-up: parents into the page cache
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for method in args.methods.split(","):
        recipe = args.work / f"{method}.yaml"
        spec = METHODS[method](parents)
        recipe.write_text(yaml.safe_dump(spec, sort_keys=False))
        read = [m["model"] for m in spec["models"]] + ([spec["base_model"]] if "base_model" in spec else [])
        threads = [] if args.threads is None else [str(args.threads)]
        commands = {
            "shoal": ["shoal", "merge", str(recipe), str(out)] + (["-j", *threads] if threads else []),
            "mergekit": ["mergekit-yaml", str(recipe), str(out)] + (["--num-threads", *threads] if threads else []),
            "floor": floor_cmd[:4] + read,  # the floor reads what the method reads
        }
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
        for _ in range(args.repeats):
            for tool, cmd in commands.items():
                runs[tool].append(measure(cmd, out))
        results[method] = runs
        med = {tool: (statistics.median(s for s, _ in r), max(m for _, m in r)) for tool, r in runs.items()}
        speed_up = _paired(runs["mergekit"], runs["shoal"])
        to_floor = _paired(runs["shoal"], runs["floor"])
        print(
            f"{method:10s} shoal {med['shoal'][0]:6.1f}s {med['shoal'][1]:5.2f}GB | "
            f"mergekit {med['mergekit'][0]:6.1f}s {med['mergekit'][1]:5.2f}GB | floor {med['floor'][0]:6.1f}s | "
            f"speed-up vs mergekit {_ratio(speed_up, 'x')} | shoal/floor {_ratio(to_floor)} | "
            f"RSS shoal/mergekit {med['shoal'][1] / med['mergekit'][1]:4.2f}",
            flush=True,
        )
    (args.work / "merge_speed.json").write_text(json.dumps(results, indent=1))


def _paired(over: list[tuple[float, float]], under: list[tuple[float, float]]) -> list[float]:
    """Each repeat's ratio of two tools' wall times."""
    return [a / b for (a, _), (b, _) in zip(over, under)]


def _ratio(ratios: list[float], unit: str = "") -> str:
    """The median of paired ratios, with their range when there are several."""
    text = f"{statistics.median(ratios):4.2f}{unit}"
    return text if len(ratios) == 1 else f"{text} ({min(ratios):.2f}-{max(ratios):.2f})"


def _shapes(folder: Path) -> list[list[int]]:
    from safetensors import safe_open

    with safe_open(str(next(folder.glob("*.safetensors"))), framework="pt") as f:
        return [f.get_slice(k).get_shape() for k in f.keys()]


if __name__ == "__main__":
    main()
