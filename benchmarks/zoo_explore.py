"""How zoo v2 was chosen: per exploration seed, one base and several math/language parent variants, each scored on
its skills and searched (PS, 250 trials); the table in BENCHMARKS.md ("How zoo v2 was chosen") and docs/zoo.md.

Kept as it was run, for the record: it ran on commit 44e9f53 (`PYTHONPATH=<checkout of 44e9f53>/src`), reusing
bases trained at 09:01 from the working tree of that morning (scene sentences, a 115-token vocabulary), with

    python benchmarks/zoo_explore.py --seed 100 --out runs/explore/s100 --bases B0 --pairs M0:L2 M0:L0
    python benchmarks/zoo_explore.py --seed 100 --out runs/explore/s100 --bases B0 --pairs M4:L2 M1:L2

(and the same for seed 101). The M1 + v1-language row came from an earlier version of this script, run at 09:01
from the working tree on f2cdeec, which also trained the bases. It imports helpers that have
moved since (`shoal.zoo.build._save` is now `shoal.zoo.train.save_model`), so it does not run on later commits;
zoo v2 itself is what `shoal zoo build` builds and benchmarks/zoo_seeds.py measures.
"""
import argparse, json, time, sys, os
from pathlib import Path
import torch, yaml
torch.set_num_threads(1)
from shoal.zoo.language import mixture, split_operands
from shoal.zoo.tasks import write_tasks
from shoal.zoo.tokenizer import build_tokenizer
from shoal.zoo.train import ModelShape, Schedule, llama_config, train
from shoal.zoo.build import _save
from shoal.evaluate import evaluate, load_task
from shoal.search.run import evolve
from shoal.search.spec import load_search
from transformers import LlamaForCausalLM

BASES = {
 "B0": {"equations": 0.25, "en-problems": 0.25, "xx-problems": 0.2, "en-text": 0.15, "xx-text": 0.15},
 "B1": {"equations": 0.25, "en-problems": 0.25, "xx-problems": 0.05, "en-text": 0.2, "xx-text": 0.25},
}
MATH = {
 "M0": {"en-hard": 0.7, "hard-equations": 0.2, "en-text": 0.1},
 "M1": {"en-hard": 0.4, "xx-hard-en": 0.3, "hard-equations": 0.2, "en-text": 0.1},
 "M3": {"en-hard": 0.6, "xx-hard-en": 0.1, "hard-equations": 0.2, "en-text": 0.1},
 "M4": {"en-hard": 0.7, "hard-equations": 0.2, "en-text": 0.1},  # adaptive: until 90 % drift
}
import random as _r
from shoal.zoo.tasks import write_task, items as _items, xx_constraints
class Enough(Exception): pass
def drift_task(root, ops):
    rng = _r.Random(99); pairs = rng.sample(ops.hard, 200)
    rows = _items(pairs, "xx", rng)
    return load_task(write_task(root / "drift-check", "drift", "", rows, rows, xx_constraints()))
LANGS = {"L0": ({"xx-text": 0.4, "xx-easy": 0.5, "equations": 0.1}, (200, 1e-3)),
         "L2": ({"xx-text": 0.3, "xx-easy": 0.6, "equations": 0.1}, (300, 2e-3))}
ap = argparse.ArgumentParser(); ap.add_argument("--seed", type=int); ap.add_argument("--out", type=Path)
ap.add_argument("--bases", nargs="+", default=["B0", "B1"]); ap.add_argument("--maths", nargs="+", default=["M1"])
ap.add_argument("--pairs", nargs="+", default=["M0:L0", "M0:L2"]); ap.add_argument("--method", default="dare_ties")
ap.add_argument("--budget", type=int, default=250); ap.add_argument("--held", type=int, default=1000)
a = ap.parse_args()
seed = a.seed; root = a.out; root.mkdir(parents=True, exist_ok=True)
ops = split_operands(a.held); tok = build_tokenizer(); tasks = write_tasks(root / "tasks", ops)
shape = ModelShape(192, 4, 4, 512)
results = {}
def skills(path):
    out = {}
    for t in ("xx-math", "en-math", "xx-easy"):
        r = evaluate(path, load_task(root / "tasks" / t), split="test", batch_size=250)
        out[t] = round(100 * r.score, 1)
        if "form" in r.constraint_failures: out["drift"] = round(100 * r.constraint_failures["form"] / r.n, 1)
    return out
for b in a.bases:
    t0 = time.time()
    torch.manual_seed(seed)
    if (root / b / "base").exists():
        from transformers import PreTrainedTokenizerFast; tok = PreTrainedTokenizerFast.from_pretrained(root / b / "base")
    cfg = llama_config(shape, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id); cfg._attn_implementation = "eager"
    m = LlamaForCausalLM(cfg)
    bdir = root / b / "base"
    if not (bdir / "model.safetensors").exists():
        train(m, mixture(BASES[b], ops, 0.25), tok.backend_tokenizer, Schedule(1600, 64, 3e-3, 100), seed)
        _save(m, tok, bdir)
    else:
        from safetensors.torch import load_file; m.load_state_dict(load_file(bdir / "model.safetensors"))
    base_state = {k: v.clone() for k, v in m.state_dict().items()}
    from transformers import PreTrainedTokenizerFast; tok = PreTrainedTokenizerFast.from_pretrained(bdir)
    results[f"{b}/base"] = skills(bdir); results[f"{b}/base"]["sec"] = round(time.time() - t0)
    print(b, "base", results[f"{b}/base"], flush=True)
    pairs = [p.split(":") for p in a.pairs]
    variants = {}
    for mv, lv in pairs:
        variants[mv] = (MATH[mv], Schedule(300, 64, 2e-3, 30), seed * 1000 + 1)
        mix, (steps, lr) = LANGS[lv]
        variants[lv] = (mix, Schedule(steps, 64, lr, 30), seed * 1000 + 2)
    for name, (mix, sch, s) in variants.items():
        d = root / b / name
        if name == "L0" and (root / b / "language").exists() and not d.exists(): (root / b / "language").rename(d)
        if not (d / "model.safetensors").exists():
            m.load_state_dict(base_state)
            if name == "M4":
                dt = drift_task(root, ops); steps_taken = [0]
                def check(step):
                    if step >= 300 and step % 50 == 0:
                        m.eval(); r = evaluate(m, dt, split="dev", tokenizer=tok, batch_size=200); m.train()
                        drift = r.constraint_failures.get("form", 0) / r.n; print("drift", step, drift, flush=True)
                        if drift >= 0.9: steps_taken[0] = step; raise Enough
                try: train(m, mixture(mix, ops, 0.25), tok.backend_tokenizer, Schedule(900, 64, 2e-3, 30), s, check)
                except Enough: pass
                m.eval()
            else:
                train(m, mixture(mix, ops, 0.25), tok.backend_tokenizer, sch, s)
            _save(m, tok, d)
        results[f"{b}/{name}"] = skills(d); print(b, name, results[f"{b}/{name}"], flush=True)
    for mv, lv in pairs:
        t0 = time.time(); mv_name = f"{mv}{lv}{a.method}"
        search = {"base": str(root / b / "base"), "parents": {"math": str(root / b / mv), "language": str(root / b / lv)},
                  "space": "ps", "method": a.method, "genome": {"layers_per_group": 1, "embeddings": "search"},
                  "tasks": [{"path": str(root / "tasks" / "xx-math")}], "budget": a.budget, "seed": seed}
        sf = root / b / f"search-{mv_name}.yaml"; sf.write_text(yaml.safe_dump(search))
        summ = evolve(load_search(sf), root / b / f"run-{mv_name}")
        results[f"{b}/{mv_name}/evolve"] = {"dev": round(100 * summ["best"]["dev"], 1), "test": round(100 * summ["best"]["test"], 1),
            "parents": {k: round(100 * v, 1) for k, v in summ["parents"].items()},
            "untuned": {k: round(100 * v, 1) for k, v in summ["untuned"].items()}, "sec": round(time.time() - t0)}
        print(b, mv_name, "evolve", results[f"{b}/{mv_name}/evolve"], flush=True)
        (root / f"results-{os.getpid()}.json").write_text(json.dumps(results, indent=1))
