"""`shoal evolve`'s trial at real sizes: merge / wait / eval seconds and peak RSS under each memory plan, against
merging each candidate to disk with mergekit and reloading it; then device memory and the merge's least time
projected to 7B and 8B parents.

    python benchmarks/evolve_scale.py [--size 0.5b|50m|small] [--trials 6] [--methods dare_ties,ties]
                                      [--plans 'device;stream'] [--eager] [--work /tmp/shoal-bench]

Three random bf16 parents and a base (merge_speed.py's, 0.55B by default, built once under --work) and a short
generation task (8 prompts of 12 words, 8 new tokens, greedy). Each (method, plan) runs in its own process, so its
peak RSS is its own: the PS search's ParameterSpace loads the parents as the plan keeps them, then its DevFitness
scores the first `--trials` candidates of a CMA-ES generation, the next merged into the second live model while
this one is scored (overlap, the search's default; 1 torch thread each; with --eager each plan is measured again
with SHOAL_FUSED=0, the eager steps). Per trial: the merge's own seconds, the seconds the trial waited for it, the
evaluation's and "trial", wait + eval: medians over the trials after each live model's first merge, as a search's
hundreds of trials run. Those first two apart: the first trial's merge holds the compiler's start-up when the merge
takes merge.fused's compiled pass, as at 0.5B, and finds the norms (for DARE their table), and a generation's first
trial waits for all of it; the second writes the second live model's memory for the first time. A plan needing
more bytes (merge/memory.py, from the headers) than 90 % of the memory available now is skipped, and says so; `host`
is not measured (on a CPU it is the device plan). The peer, in its own process: mergekit 0.1.5's run_merge of the same
candidates into a temporary folder, from_pretrained, the same evaluation (evolve_speed.mergekit_trial), with
--peer-threads torch threads (default 2: every core, as shoal's overlap uses both); its merge and reload are
printed apart too.

The floor of a trial's merge is the bytes it must move at least (its inputs as the plan keeps them read once, its
output written once), over this CPU's one-thread copy bandwidth measured in the same run; the measured merge over
that floor says how far the code is from moving bytes alone here. The projection to three and two 7B (Llama-2), 8B
(Llama-3) and Qwen2.5-7B bf16 parents takes each plan's bytes from shapes alone: device memory, and the merge's floor on a
24 GB-class GPU: the larger of its device bytes at --gpu-bandwidth (default 1008 GB/s: an RTX 4090) and what
crosses to the device at --link-bandwidth (default 25 GB/s: PCIe 4.0 x16 in practice), which overlap (the next
tensor is moved while this one merges). No GPU was measured: a lower bound at those rates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.allocator import tune_for_merging

tune_for_merging()  # as the `shoal` command does, before torch loads: huge pages and reused blocks for tensors

import torch  # noqa: E402

from merge_peak import proc_bytes  # noqa: E402
from merge_speed import SIZES, build_parents  # noqa: E402

PLANS = {
    "device": {},
    "device, keep parents": {"keep": "parents"},
    "device, ranks recomputed": {"ranks": "recomputed"},
    "device, parents, recomputed": {"keep": "parents", "ranks": "recomputed"},
    "host": {"inputs": "host"},
    "stream": {"inputs": "stream"},
}
PROMPTS, PROMPT_WORDS, NEW_TOKENS = 8, 12, 8
LIVE_MODELS = 2
"""The search's live models with merge-ahead (overlap): the next candidate is merged into the other."""
SHAPES = {
    # hidden, MLP, vocabulary, layers, key/value width (grouped-query attention)
    "7B": (4096, 11008, 32000, 32, 4096),
    "8B": (4096, 14336, 128256, 32, 1024),
    "Qwen2.5-7B": (3584, 18944, 152064, 28, 512),
}


@dataclass(frozen=True)
class Traffic:
    """Bytes a trial's merge must move at least: read and written in device memory, and moved to the device."""

    device: int
    link: int


def trial_traffic(sizes: list, plan: dict, on_cpu: bool) -> Traffic:
    """The floor of one trial's merge under `plan`, from merge.memory's TensorSizes: every kept input (task vectors
    or parents, base, stored ranks) or, streamed, every parent tensor read once, and the output written once."""
    from shoal.merge.memory import MemoryPlan

    memory = MemoryPlan(**plan)
    device = link = 0
    for t in sizes:
        if not t.merged:
            continue
        parents = t.numel * (t.base + sum(t.inputs))
        if memory.inputs == "stream":
            read = moved = parents
        else:
            deltas = t.task_vectors and memory.keep == "deltas"
            read = t.numel * (t.base + t.compute * len(t.inputs)) if deltas else parents
            read += t.numel * t.rank * len(t.inputs) if memory.ranks == "stored" else 0
            moved = read if memory.inputs == "host" else 0
        device += read + t.numel * t.out
        link += 0 if on_cpu else moved
    return Traffic(device, link)


def write_task(folder: Path, vocab: int) -> Path:
    """A generation task the random parents' word-level tokenizer reads: PROMPTS prompts, NEW_TOKENS new tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = torch.Generator().manual_seed(0)
    words = torch.randint(4, vocab, (PROMPTS, PROMPT_WORDS + 1), generator=rng).tolist()
    rows = [{"prompt": " ".join(f"w{i}" for i in row[:-1]), "answer": f"w{row[-1]}"} for row in words]
    (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.yaml").write_text(json.dumps({
        "name": "scale-generation", "metric": "exact_match", "max_new_tokens": NEW_TOKENS,
        "splits": {"dev": "dev.jsonl", "test": "dev.jsonl"}}))
    return folder


def search_spec(parents: dict[str, str], task: str, method: str, plan: dict):
    from shoal.search.spec import SearchSpec

    return SearchSpec.model_validate({
        "base": parents["base"], "parents": {n: parents[n] for n in "abc"}, "method": method,
        "tasks": [{"path": task}], "memory": plan, "batch_size": PROMPTS,
    })


def generation(spec, trials: int) -> list:
    from evolve_speed import candidates
    from shoal.search.spaces import ps_genome

    return candidates(ps_genome(spec), 1, seed=0)[0][:trials]


def shoal_trials(parents: dict[str, str], task: str, method: str, plan: dict, trials: int) -> dict:
    """In this process: the search's space and objective over the first `trials` candidates of a generation."""
    from shoal.evaluate import load_task
    from shoal.search.fitness import DevFitness, WeightedTask
    from shoal.search.spaces import ParameterSpace

    torch.set_num_threads(1)
    spec = search_spec(parents, task, method, plan)
    start = time.perf_counter()
    space = ParameterSpace(spec)
    load = time.perf_counter() - start
    fitness = DevFitness(space, [WeightedTask(load_task(task), 1.0)], PROMPTS)
    found = generation(spec, trials)
    rows = []
    for j, (values, seed) in enumerate(found):
        e = fitness(values, seed, found[j + 1] if j + 1 < len(found) else None)
        rows.append({"merge": e.merge_compute_seconds, "wait": e.merge_seconds, "eval": e.eval_seconds})
    return {"load": load, "rows": rows, "rss": peak_rss()}


def peer_trials(parents: dict[str, str], task: str, method: str, trials: int, threads: int) -> dict:
    """In this process: mergekit's merge of the same candidates to disk, reload and the same evaluation."""
    from evolve_speed import mergekit_trial
    from shoal.evaluate import load_task
    from shoal.search.spaces import ps_genome

    torch.set_num_threads(threads)
    spec = search_spec(parents, task, method, {})
    genome, loaded = ps_genome(spec), load_task(task)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(parents["base"])
    rows = [mergekit_trial(genome.recipe(*c), loaded, tokenizer, PROMPTS) for c in generation(spec, trials)]
    return {"rows": rows, "rss": peak_rss()}


def peak_rss() -> int:
    """This process's peak resident set since its exec (VmHWM: getrusage's ru_maxrss would count the parent's
    resident set at fork)."""
    return proc_bytes("/proc/self/status", "VmHWM")


def copy_bandwidth() -> float:
    """This CPU's one-thread copy bandwidth (bytes read + written per second, best of 3) over 512 MB."""
    torch.set_num_threads(1)
    a = torch.ones(2**27)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.numel() * a.element_size() / best


def available_bytes() -> int:
    return proc_bytes("/proc/meminfo", "MemAvailable")


def measured_sizes(parents: dict[str, str], task: str, method: str, plan: dict):
    """The plan's TensorSizes and device bytes for the search's own start recipe (two live models)."""
    from shoal.merge.memory import MemoryPlan, tensor_sizes
    from shoal.merge.resident import plan_resident
    from shoal.recipe import Recipe
    from shoal.search.spaces import ps_genome

    genome = ps_genome(search_spec(parents, task, method, plan))
    recipe = Recipe.model_validate(genome.recipe(genome.values(genome.start()), 0))
    planned = plan_resident(recipe, "cpu", 2, MemoryPlan(**plan))
    return tensor_sizes(planned.plan, planned.parents, recipe.method), planned.need.device


def projected_sizes(shape: str, parents: int, method: str) -> list:
    """TensorSizes of `parents` bf16 parents and a base of a Llama shape, from shapes alone."""
    from shoal.merge.memory import TensorSize
    from shoal.merge.methods import index_dtype

    hidden, mlp, vocab, layers, kv = SHAPES[shape]
    shapes = [(vocab, hidden)] + layers * ([(hidden, hidden)] * 2 + [(kv, hidden)] * 2 + [(mlp, hidden)] * 2
                                           + [(hidden, mlp)] + [(hidden,)] * 2) + [(hidden,), (vocab, hidden)]
    ranked = method == "ties"
    return [TensorSize(numel=torch.Size(s).numel(), out=2, merged=True, base=2, inputs=(2,) * parents, compute=4,
                       rank=index_dtype(torch.Size(s).numel()).itemsize if ranked else 0, task_vectors=True,
                       sparsify="magnitude" if ranked else "random", work=2, pieces=True,
                       read=torch.Size(s).numel() * 2 * (parents + 1))
            for s in shapes]


def run_child(kind: str, task: dict, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(task)], capture_output=True,
                         text=True, env=None if env is None else {**os.environ, **env})
    if out.returncode:
        raise RuntimeError(f"{kind} {task.get('method')} {task.get('plan')} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="0.5b")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--methods", default="dare_ties,ties")
    parser.add_argument("--work", type=Path, default=Path("/tmp/shoal-bench"))
    parser.add_argument("--peer-threads", type=int, default=2)
    parser.add_argument("--gpu-bandwidth", type=float, default=1008e9)
    parser.add_argument("--link-bandwidth", type=float, default=25e9)
    parser.add_argument("--plans", help="the memory plans to measure, separated by ';' (default: every plan)")
    parser.add_argument("--eager", action="store_true",
                        help="also measure each plan with SHOAL_FUSED=0 (the merge in eager steps, not compiled)")
    parser.add_argument("--project-only", action="store_true", help="print the projection alone (no measurement)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = parser.parse_args()
    if args.trials <= LIVE_MODELS:
        parser.error(f"--trials must be at least {LIVE_MODELS + 1} (the medians are over the trials after each live "
                     "model's first merge)")
    plans = list(PLANS) if args.plans is None else args.plans.split(";")
    if not set(plans) <= set(PLANS):
        parser.error(f"--plans: of {'; '.join(PLANS)}")
    if not set(args.methods.split(",")) <= {"dare_ties", "ties"}:
        parser.error("--methods: dare_ties and ties (the projection models no other method's ranks)")
    if args.child:
        kind, task = args.child[0], json.loads(args.child[1])
        if kind == "shoal":
            print(json.dumps(shoal_trials(task["parents"], task["task"], task["method"], task["plan"], task["trials"])))
        else:
            print(json.dumps(peer_trials(task["parents"], task["task"], task["method"], task["trials"],
                                         task["threads"])))
        return
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    methods = args.methods.split(",")
    if not args.project_only:
        measure(args, methods, plans)
    project(methods, args.gpu_bandwidth, args.link_bandwidth)


def measure(args: argparse.Namespace, methods: list[str], plans: list[str]) -> None:
    """The table of measured trials: each plan's and mergekit's, per method."""
    from shoal.merge.memory import format_bytes

    parents = {n: str(p) for n, p in build_parents(args.work, args.size).items()}
    task = str(write_task(args.work / "scale-task", SIZES[args.size]["vocab_size"]))
    parent_bytes = sum(f.stat().st_size for f in Path(parents["a"]).glob("*.safetensors"))
    bandwidth = copy_bandwidth()
    print(f"three {args.size} bf16 parents and a base, {format_bytes(parent_bytes)} each; {args.trials} trials of "
          f"{PROMPTS} prompts x {NEW_TOKENS} new tokens; shoal 1 thread + 1 merging ahead, mergekit "
          f"{args.peer_threads} threads; one-thread copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"torch {torch.__version__}")
    print(f"{'method':<10} {'loop':<36} {'load s':>6} {'merge s':>7} {'wait s':>6} {'eval s':>6} {'trial s':>7} "
          f"{'peak RSS':>9} {'x parent':>8} {'floor s':>7} {'merge/floor':>11} {'1st merge s':>11} {'2nd merge s':>11}")
    runs = [(name, plan, env) for name, plan in PLANS.items() if name in plans
            for env in ([None, {"SHOAL_FUSED": "0"}] if args.eager else [None])]
    for method in methods:
        merges = {}
        for name, plan, env in runs:
            if plan.get("inputs") == "host":  # on a CPU the host is the device: the same as "device"
                continue
            name = name if env is None else f"{name}, eager steps"
            sizes, need = measured_sizes(parents, task, method, plan)
            if need > 0.9 * available_bytes():
                print(f"{method:<10} {'shoal, ' + name:<36} skipped: needs {format_bytes(need)}, "
                      f"{format_bytes(available_bytes())} available", flush=True)
                continue
            r = run_child("shoal", {"parents": parents, "task": task, "method": method, "plan": plan,
                                    "trials": args.trials}, env)
            rows = r["rows"]
            later = rows[LIVE_MODELS:]  # after each live model's first merge
            merge = statistics.median(x["merge"] for x in later)
            wait = statistics.median(x["wait"] for x in later)
            evaluation = statistics.median(x["eval"] for x in later)
            trial = statistics.median(x["wait"] + x["eval"] for x in later)
            floor = trial_traffic(sizes, plan, on_cpu=True).device / bandwidth
            merges[name] = merge
            print(f"{method:<10} {'shoal, ' + name:<36} {r['load']:6.1f} {merge:7.2f} {wait:6.2f} {evaluation:6.2f} "
                  f"{trial:7.2f} {format_bytes(r['rss']):>9} {r['rss'] / parent_bytes:8.1f} "
                  f"{floor:7.2f} {merge / floor:11.1f} {rows[0]['merge']:11.2f} {rows[1]['merge']:11.2f}", flush=True)
        r = run_child("mergekit", {"parents": parents, "task": task, "method": method, "trials": args.trials,
                                   "threads": args.peer_threads})
        rows = r["rows"]
        merge = statistics.median(x["merge"] + x["load"] for x in rows)
        evaluation = statistics.median(x["eval"] for x in rows)
        written, reloaded = (statistics.median(x[k] for x in rows) for k in ("merge", "load"))
        print(f"{method:<10} {'mergekit to disk + reload':<36} {'':>6} {merge:7.2f} {merge:6.2f} {evaluation:6.2f} "
              f"{merge + evaluation:7.2f} {format_bytes(r['rss']):>9} {r['rss'] / parent_bytes:8.1f}", flush=True)
        print(f"{method:<10}   mergekit's merge to disk {written:.2f} s, reload {reloaded:.2f} s (medians)")
        for name, seconds in merges.items():
            print(f"{method:<10}   merge + reload / shoal's merge ({name}): {merge / seconds:.1f}x")


def project(methods: list[str], gpu_bandwidth: float, link_bandwidth: float) -> None:
    """Device memory and a merge's floor per plan for two and three 7B and 8B parents, from shapes alone."""
    from shoal.merge.memory import MemoryPlan, format_bytes, memory_need

    print(f"\nprojected: bf16 parents and a base, device memory (1 | 2 live models) and the floor of a trial's merge "
          f"at {gpu_bandwidth / 1e9:.0f} GB/s on the device and {link_bandwidth / 1e9:.0f} GB/s to it")
    for shape in SHAPES:
        for count in (3, 2):
            for method in methods:
                sizes = projected_sizes(shape, count, method)
                for name, plan in PLANS.items():
                    one, two = (memory_need(sizes, MemoryPlan(**plan), slots=s, on_cpu=False) for s in (1, 2))
                    traffic = trial_traffic(sizes, plan, on_cpu=False)
                    floor = max(traffic.device / gpu_bandwidth, traffic.link / link_bandwidth)
                    host = f" (+{format_bytes(one.host)} host)" if one.host else ""
                    print(f"{count} x {shape} {method:<10} {name:<28} {format_bytes(one.device):>8} | "
                          f"{format_bytes(two.device):>8}{host:<16} merge floor {floor:6.2f} s "
                          f"({format_bytes(traffic.device)} on the device, {format_bytes(traffic.link)} to it)")


if __name__ == "__main__":
    main()
