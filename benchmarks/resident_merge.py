"""Seconds of the search's resident merge alone, with no evaluation beside it: what a trial's merge costs on this CPU.

    python benchmarks/resident_merge.py [--method dare_ties] [--plan device|stream] [--merges 4] [--size 0.5b]
                                        [--work /tmp/shoal-bench]

Three random bf16 parents and a base (merge_speed.py's), the PS search's ParameterSpace with one live model
(`overlap: false`) under the memory plan, 1 torch thread, shoal's heap rules; merges the first --merges candidates
of a CMA-ES generation (evolve_scale.py's) one after the other and prints each one's seconds (the first also
compiles the pass and finds the norms). Run it under `PYTHONPATH=<a checkout>/src` to time another commit's code.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from shoal.allocator import tune_for_merging

tune_for_merging()  # as the `shoal` command does, before torch loads

import torch  # noqa: E402

from evolve_scale import generation, search_spec, write_task  # noqa: E402
from merge_speed import SIZES, build_parents  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["dare_ties", "ties"], default="dare_ties")
    parser.add_argument("--plan", choices=["device", "stream"], default="device")
    parser.add_argument("--merges", type=int, default=4)
    parser.add_argument("--size", choices=SIZES, default="0.5b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/shoal-bench"))
    args = parser.parse_args()
    from transformers.utils import logging as transformers_logging

    import shoal
    from shoal.search.spaces import ParameterSpace

    transformers_logging.disable_progress_bar()
    torch.set_num_threads(1)
    parents = {n: str(p) for n, p in build_parents(args.work, args.size).items()}
    task = str(write_task(args.work / "scale-task", SIZES[args.size]["vocab_size"]))
    plan = {"inputs": "stream"} if args.plan == "stream" else {}
    spec = search_spec(parents, task, args.method, plan).model_copy(update={"overlap": False})
    space = ParameterSpace(spec)
    seconds = []
    for values, seed in generation(spec, args.merges):
        start = time.perf_counter()
        space.build(values, seed)
        seconds.append(time.perf_counter() - start)
    print(f"{args.method} {args.plan} ({Path(shoal.__file__).parent}): merges "
          f"{', '.join(f'{s:.2f}' for s in seconds)} s")


if __name__ == "__main__":
    main()
