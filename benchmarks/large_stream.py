"""A PS search over three 7B-shaped bf16 parents under the stream plan with one live model, on this CPU: the memory
it holds against what merge/memory.py counts for it (the figure a 24 GB GPU would have to hold), and a trial's cost.

    python benchmarks/large_stream.py [--shape 7B] [--parents 3] [--method dare_ties] [--trials 3]
                                      [--work /tmp/shoal-bench]

Builds, once under --work, a random base and parents of evolve_scale.py's shape (Llama-2-7B by default: 6.7B
parameters, 13.5 GB each in bf16; parents = base + 0.01 N(0, 1), a tensor at a time, never a whole model in
memory) with merge_speed.py's 32000-word tokenizer. Then, in its own process (1 torch thread, shoal's heap rules),
the PS search's ParameterSpace with `memory: {inputs: stream}` and `overlap: false` (one live model: two would not
fit this machine's 24 GB) and its DevFitness over the first --trials candidates of a CMA-ES generation on
evolve_scale.py's generation task (8 prompts, 8 new tokens). Prints the memory plan's line, each trial's merge and
evaluation seconds, the process's peak resident set (VmHWM) and the peak of its anonymous memory (RssAnon, sampled
every 10 ms: VmHWM also counts the parents' file pages while they are mapped, which the kernel can drop at will).
The parents (54 GB for three) do not fit this machine's page cache, so a trial reads them from disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from shoal.allocator import tune_for_merging

tune_for_merging()  # as the `shoal` command does, before torch loads

import torch  # noqa: E402

from evolve_scale import SHAPES, peak_rss, write_task  # noqa: E402
from merge_peak import proc_bytes  # noqa: E402
from merge_speed import build_parents  # noqa: E402

NOISE = 0.01


def build_large(work: Path, shape: str, count: int) -> dict[str, Path]:
    """A random bf16 base and `count` parents of a Llama shape, written a tensor at a time (skipped when built)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from shoal.checkpoint.files import copy_tokenizer, write_config
    from shoal.checkpoint.writer import ModelFolderWriter, TensorSpec

    names = ["base"] + [chr(ord("a") + i) for i in range(count)]
    folder = work / f"parents-{shape}"
    out = {n: folder / n for n in names}
    if all((p / "config.json").exists() for p in out.values()):
        return out
    hidden, mlp, vocab, layers, kv = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=kv // 128,
                         max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, architectures=["LlamaForCausalLM"], dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    specs = [TensorSpec(k, s, torch.bfloat16) for k, s in shapes.items()]
    tokenizer = build_parents(work, "0.5b")["base"]  # the same 32000-word tokenizer
    writers = {}
    for name, path in out.items():
        path.mkdir(parents=True, exist_ok=True)
        writers[name] = ModelFolderWriter(path, specs)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for i, (key, s) in enumerate(shapes.items()):
        base = (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) if len(s) > 1 else \
            torch.ones(s, dtype=torch.bfloat16)
        for name, writer in writers.items():
            tensor = base if name == "base" else (base.float() + NOISE * torch.randn(s, generator=generator))
            writer.write(key, tensor.to(torch.bfloat16))
        if i % 50 == 0:
            print(f"  {i}/{len(shapes)} tensors, {time.perf_counter() - start:.0f} s", flush=True)
    for name, writer in writers.items():
        writer.close()
        write_config(out[name], config.to_dict())
        copy_tokenizer(tokenizer, out[name])
    return out


def anon_peak() -> tuple[threading.Event, list[int]]:
    """Samples this process's RssAnon every 10 ms until the event is set; the list holds the peak."""
    done, peak = threading.Event(), [0]

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], proc_bytes("/proc/self/status", "RssAnon"))

    threading.Thread(target=sample, daemon=True).start()
    return done, peak


def child(parents: dict[str, str], task: str, method: str, trials: int) -> dict:
    from evolve_speed import candidates
    from shoal.evaluate import load_task
    from shoal.search.fitness import DevFitness, WeightedTask
    from shoal.search.spaces import ParameterSpace, ps_genome
    from shoal.search.spec import SearchSpec

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    torch.set_num_threads(1)
    done, peak = anon_peak()
    names = [n for n in parents if n != "base"]
    spec = SearchSpec.model_validate({
        "base": parents["base"], "parents": {n: parents[n] for n in names}, "method": method,
        "tasks": [{"path": task}], "memory": {"inputs": "stream"}, "overlap": False, "batch_size": 8})
    lines: list[str] = []
    before = proc_bytes("/proc/self/status", "RssAnon")  # torch, transformers and shoal imported, nothing loaded
    start = time.perf_counter()
    space = ParameterSpace(spec, report=lines.append)
    load = time.perf_counter() - start
    fitness = DevFitness(space, [WeightedTask(load_task(task), 1.0)], 8)
    rows = []
    for values, seed in candidates(ps_genome(spec), 1, seed=0)[0][:trials]:
        e = fitness(values, seed)
        rows.append({"merge": e.merge_compute_seconds, "wait": e.merge_seconds, "eval": e.eval_seconds})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    done.set()
    return {"plan": lines, "need": space.merger.need.device, "load": load, "rows": rows, "rss": peak_rss(),
            "anon": peak[0], "before": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="7B")
    parser.add_argument("--parents", type=int, default=3)
    parser.add_argument("--method", choices=["dare_ties", "ties"], default="dare_ties")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/shoal-bench"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task = json.loads(args.child)
        print(json.dumps(child(task["parents"], task["task"], task["method"], task["trials"])))
        return
    from shoal.merge.memory import format_bytes

    parents = {n: str(p) for n, p in build_large(args.work, args.shape, args.parents).items()}
    task = str(write_task(args.work / "scale-task", SHAPES[args.shape][2]))
    size = sum(f.stat().st_size for f in Path(parents["a"]).glob("*.safetensors"))
    print(f"{args.parents} x {args.shape} bf16 parents and a base, {format_bytes(size)} each; {args.method}, "
          f"memory: {{inputs: stream}}, overlap: false; {args.trials} trials of 8 prompts x 8 new tokens; 1 torch "
          f"thread; torch {torch.__version__}; {format_bytes(proc_bytes('/proc/meminfo', 'MemTotal'))} memory",
          flush=True)
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(
        {"parents": parents, "task": task, "method": args.method, "trials": args.trials})],
        stdout=subprocess.PIPE, text=True)
    if out.returncode:
        raise SystemExit(f"the search's process failed ({out.returncode})")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(*r["plan"], sep="\n")
    for i, row in enumerate(r["rows"]):
        print(f"trial {i}: merge {row['merge']:.1f} s, evaluation {row['eval']:.1f} s")
    later = r["rows"][1:] or r["rows"]  # the first merge also compiles and finds the norms
    merge, evaluation = (statistics.median(x[k] for x in later) for k in ("merge", "eval"))
    print(f"load {r['load']:.1f} s; after the first trial (medians): merge {merge:.1f} s, "
          f"evaluation {evaluation:.1f} s")
    print(f"peak anonymous memory {format_bytes(r['anon'])} ({r['anon'] / size:.2f}x a parent), counted by the plan "
          f"{format_bytes(r['need'])}; {format_bytes(r['before'])} of it before anything loaded (the libraries); peak "
          f"resident set with mapped file pages {format_bytes(r['rss'])}")


if __name__ == "__main__":
    main()
