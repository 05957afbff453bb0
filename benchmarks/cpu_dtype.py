"""How much slower this CPU scores a bfloat16 model than the same model in float32: the reason a search says so.

    python benchmarks/cpu_dtype.py [--size 0.5b|50m|small] [--repeats 3] [--threads 1] [--work /tmp/shoal-bench]

Prints torch's CPU capability, `devices.cpu_linear_slowdown` for bfloat16 and float16 (the figure `shoal evolve`
times at its start) with the seconds the call took, and the seconds `shoal.evaluate` takes to score
evolve_scale.py's generation task (8 prompts of 12 words, 8 new tokens, greedy) on one of merge_speed.py's random
bf16 parents, loaded in bfloat16 and in float32 (medians of --repeats after one warm-up each), with both scores.
A CPU with AVX512-BF16 or AMX multiplies bfloat16 natively; one with AVX2 alone converts it in software.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from evolve_scale import write_task
from merge_speed import SIZES, build_parents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="0.5b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/shoal-bench"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from shoal.devices import cpu_linear_slowdown
    from shoal.evaluate import evaluate, load_task

    transformers_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    parent = build_parents(args.work, args.size)["a"]
    task = load_task(write_task(args.work / "scale-task", SIZES[args.size]["vocab_size"]))
    tokenizer = AutoTokenizer.from_pretrained(parent)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} torch thread(s)")
    for dtype in (torch.bfloat16, torch.float16):
        start = time.perf_counter()
        slowdown = cpu_linear_slowdown(dtype)
        print(f"linear layer (64 x 1024 by 1024 x 1024), {dtype} over float32: {slowdown:.2f}x (timed in "
              f"{time.perf_counter() - start:.3f} s)")
    seconds = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(parent, dtype=dtype)
        evaluate(model, task, tokenizer=tokenizer, batch_size=8)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = evaluate(model, task, tokenizer=tokenizer, batch_size=8)
            times.append(time.perf_counter() - start)
        seconds[dtype] = statistics.median(times)
        print(f"scoring a {args.size} parent in {dtype}: {seconds[dtype]:.2f} s (median; runs "
              f"{', '.join(f'{t:.2f}' for t in times)}), score {result.score:.4f}", flush=True)
        del model
    print(f"bfloat16 over float32: {seconds[torch.bfloat16] / seconds[torch.float32]:.2f}x")


if __name__ == "__main__":
    main()
