"""Seconds for `shoal.evaluate` vs lm-evaluation-harness's HF backend on the same tiny model, data and settings.

    python benchmarks/eval_speed.py [--items 256] [--repeats 3] [--threads 1] [--work /tmp/shoal-eval-bench]

Builds a random tiny Llama (shoal.synthetic) and two tasks over the same JSONL: generation (exact_match, greedy,
16 new tokens, stop "\\n") and multiple_choice (4 choices). Half the generation answers are the model's own greedy
outputs, so the score is about 0.5 and depends on every generated token. lm-eval (`pip install lm_eval`,
benchmark-only) reads the same JSONL through a local task YAML and runs on the same loaded model object.
Prints the median seconds of each (after one warm-up call, which is shown apart), the ratio, the two scores and
how many per-item outputs agree.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from shoal.evaluate import evaluate, load_task  # noqa: E402
from shoal.synthetic import make_parents, tiny_config  # noqa: E402

MAX_NEW_TOKENS = 16
BATCH_SIZE = 64


def words(rng: random.Random, lo: int, hi: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(rng.randint(lo, hi)))


def write_tasks(work: Path, model, tokenizer, items: int, vocab: int) -> dict[str, Path]:
    """The generation and multiple-choice task folders (shoal format) over one shared JSONL file each."""
    rng = random.Random(0)
    prompts = [words(rng, 4, 24, vocab) for _ in range(items)]
    gen = work / "gen"
    gen.mkdir(parents=True, exist_ok=True)
    spec = {"name": "bench-gen", "metric": "exact_match", "max_new_tokens": MAX_NEW_TOKENS, "stop": ["\n"],
            "normalize": {"lowercase": False, "collapse_whitespace": False, "strip": False},
            "splits": {"dev": "dev.jsonl"}}
    (gen / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (gen / "dev.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in prompts))
    own = evaluate(model, load_task(gen), tokenizer=tokenizer, batch_size=BATCH_SIZE, return_outputs=True).outputs
    rows = [{"prompt": p, "answer": o if i % 2 == 0 else "w4"} for i, (p, o) in enumerate(zip(prompts, own))]
    (gen / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    mc = work / "mc"
    mc.mkdir(parents=True, exist_ok=True)
    spec = {"name": "bench-mc", "metric": "multiple_choice", "splits": {"dev": "dev.jsonl"}}
    (mc / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    rows = []
    for p in prompts:
        choices = [words(rng, 1, 6, vocab) for _ in range(4)]
        rows.append({"prompt": p, "answer": choices[0], "choices": choices})
    (mc / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"gen": gen, "mc": mc}


def lm_eval_yaml(name: str, folder: Path) -> dict:
    """An lm-eval task over the same JSONL with the same prompt, target, stop and token budget."""
    common = {
        "task": f"shoal_{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "dev.jsonl")}},
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
    }
    if name == "gen":
        return common | {
            "output_type": "generate_until",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_NEW_TOKENS, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        }
    return common | {
        "output_type": "multiple_choice",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{choices.index(answer)}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


def timed(run) -> tuple[float, object]:
    """(seconds, result) of run(), its progress bars hidden."""
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        result = run()
    return time.perf_counter() - start, result


def median_seconds(run, repeats: int) -> tuple[float, float, object]:
    """(first call's seconds, median of the next `repeats` calls, last result)."""
    first, result = timed(run)
    times = []
    for _ in range(repeats):
        seconds, result = timed(run)
        times.append(seconds)
    return first, statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up (at least 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/shoal-eval-bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)

    from lm_eval.evaluator import evaluate as lm_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    config = tiny_config(vocab_size=512, hidden_size=128, num_hidden_layers=4, intermediate_size=256)
    folder = make_parents(args.work / "model", names=("base",), config=config, seed=0)["base"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tasks = write_tasks(args.work, model, tokenizer, args.items, config.vocab_size)
    include = args.work / "lm_eval_tasks"
    include.mkdir(exist_ok=True)
    for name, task_folder in tasks.items():
        (include / f"shoal_{name}.yaml").write_text(yaml.safe_dump(lm_eval_yaml(name, task_folder), sort_keys=False))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH_SIZE, device="cpu")
    manager = TaskManager(include_path=str(include))

    print(f"model: random Llama, {sum(p.numel() for p in model.parameters()):,} parameters, vocab {config.vocab_size}; "
          f"{args.items} items; batch {BATCH_SIZE}; torch threads {args.threads}; median of {args.repeats} "
          f"after a warm-up call")
    print(f"{'task':<18}{'tool':<34}{'first s':>9}{'median s':>10}{'score':>8}")
    for name, task_folder in tasks.items():
        task = load_task(task_folder)
        first, shoal_s, ours = median_seconds(
            lambda task=task: evaluate(model, task, tokenizer=tokenizer, batch_size=BATCH_SIZE, return_outputs=True),
            args.repeats)
        print(f"{task.name:<18}{'shoal.evaluate':<34}{first:>9.2f}{shoal_s:>10.2f}{ours.score:>8.4f}")

        import lm_eval

        simple_s, full = timed(
            lambda name=name: lm_eval.simple_evaluate(model=lm, tasks=[f"shoal_{name}"], task_manager=manager,
                                                      log_samples=False, bootstrap_iters=0, verbosity="ERROR"))
        metric = "exact_match,none" if name == "gen" else "acc,none"
        print(f"{'':<18}{'lm_eval.simple_evaluate (1 call)':<34}{simple_s:>9.2f}{'':>10}"
              f"{full['results'][f'shoal_{name}'][metric]:>8.4f}")
        task_dict = manager.load([f"shoal_{name}"])
        first, lm_s, theirs = median_seconds(
            lambda task_dict=task_dict: lm_evaluate(lm, task_dict, bootstrap_iters=0, log_samples=True,
                                                   verbosity="ERROR"),
            args.repeats)
        lm_score = theirs["results"][f"shoal_{name}"][metric]
        print(f"{'':<18}{'lm_eval evaluate (task prebuilt)':<34}{first:>9.2f}{lm_s:>10.2f}{lm_score:>8.4f}")
        samples = sorted(theirs["samples"][f"shoal_{name}"], key=lambda s: s["doc_id"])
        if name == "gen":
            same = sum(s["filtered_resps"][0] == o for s, o in zip(samples, ours.outputs))
        else:
            picks = [s["doc"]["choices"][max(range(4), key=lambda i: s["filtered_resps"][i][0])] for s in samples]
            same = sum(p == o for p, o in zip(picks, ours.outputs))
        print(f"{'':<18}lm-eval / shoal: {lm_s / shoal_s:.1f}x the time; identical per-item outputs: "
              f"{same}/{len(samples)}")


if __name__ == "__main__":
    main()
