"""`shoal merge`'s torch threads on an idle machine and beside one process that keeps a core busy.

    python benchmarks/merge_threads.py [--methods linear,ties] [--repeats 1] [--work /tmp/shoal-bench]

On the three ~0.55B bf16 parents of merge_speed.py (built there if missing), each method is merged as:
default (threads chosen from the load when the merge starts, libgomp spinning 10,000 rounds), `-j 1`, `-j 2`, and
`-j 2` with libgomp's default spin count (GOMP_SPINCOUNT=300000: shoal merge before it set threads or spin count),
first with nothing else running, then beside `python -c "while True: pass"`, after one warm-up merge a method. Prints
each wall time (median of the repeats) and the ratio to `-j 1` in the same setting.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from merge_speed import METHODS, build_parents  # noqa: E402

SETTINGS = {
    "default": ([], {}),
    "-j 1": (["-j", "1"], {}),
    "-j 2": (["-j", "2"], {}),
    "-j 2, spin 300000": (["-j", "2"], {"GOMP_SPINCOUNT": "300000"}),
}


def timed(cmd: list[str], env: dict[str, str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def main() -> None:
    import os

    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="linear,ties")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/shoal-bench"))
    args = ap.parse_args()
    parents = build_parents(args.work, "0.5b")
    out = args.work / "out-threads"
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, torch's default threads {torch.get_num_threads()}")
    base_env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    for load in ("idle", "beside one busy core"):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load != "idle" else None
        try:
            time.sleep(1.0)
            for method in args.methods.split(","):
                recipe = args.work / f"{method}.yaml"
                recipe.write_text(yaml.safe_dump(METHODS[method](parents), sort_keys=False))
                runs: dict[str, list[float]] = {name: [] for name in SETTINGS}
                timed(["shoal", "merge", str(recipe), str(out), "--quiet"], base_env, out)  # warm-up, not counted
                for _ in range(args.repeats):
                    for name, (flags, env) in SETTINGS.items():
                        runs[name].append(timed(["shoal", "merge", str(recipe), str(out), "--quiet", *flags],
                                                base_env | env, out))
                one = statistics.median(runs["-j 1"])
                cells = " | ".join(f"{name} {statistics.median(r):6.1f}s ({statistics.median(r) / one:4.2f})"
                                   for name, r in runs.items())
                print(f"{load:21s} {method:9s} | {cells}", flush=True)
        finally:
            if hog is not None:
                hog.kill()


if __name__ == "__main__":
    main()
