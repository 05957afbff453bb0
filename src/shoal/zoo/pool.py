"""The zoo's pool: more fine-tunes of the zoo's base, one more useful to the target and two distractors, so that a
search over every parent has to find which ones matter (pool.json), built once, then reused."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from shoal.errors import ShoalError
from shoal.threads import torch_threads
from shoal.zoo.build import HARD_FRACTION, SIZES, ParentSpec, Progress, Zoo, _fingerprint, _train_stage, load_zoo
from shoal.zoo.language import mixture, split_operands
from shoal.zoo.part import PartRecord
from shoal.zoo.train import Schedule, save_model

POOL_VERSION = 1
Role = Literal["useful", "distractor"]


@dataclass(frozen=True)
class PoolParent:
    spec: ParentSpec
    role: Role


POOL = {
    # 2+2 addition in the bare format, no words of either language: math that does not drift into English.
    "equations": PoolParent(ParentSpec("bare-math", {"hard-equations": 0.8, "equations": 0.2}), "useful"),
    # English prose only: a skill the target does not need.
    "prose": PoolParent(ParentSpec("en-prose", {"en-text": 1.0}), "distractor"),
    # Describing scenes in both languages: nor this one.
    "scenes": PoolParent(ParentSpec("scene-talk", {"en-look": 0.4, "xx-look": 0.4, "scene-pairs": 0.2}), "distractor"),
}

SCHEDULES = {size: Schedule(300, 64, 2e-3, 30) for size in ("default", "deep")} | {"smoke": Schedule(10, 16, 1e-3, 3)}


@dataclass(frozen=True)
class PoolZoo:
    """A zoo with its pool: every parent (the zoo's math and language parents and the pool's), the skill and role
    of each, the base and the target."""

    root: Path
    seed: int
    size: str
    base: Path
    parents: dict[str, Path]
    skills: dict[str, str]
    roles: dict[str, str]
    target: Path


def settings_hash(zoo: Zoo) -> str:
    """What decides the pool: its parents, schedule, version, the zoo's seed and size, and its base's weights."""
    settings = {
        "version": POOL_VERSION,
        "seed": zoo.seed,
        "pool": {name: asdict(p) for name, p in POOL.items()},
        "schedule": asdict(SCHEDULES[zoo.size]),
        "base": _fingerprint(zoo.base / "model.safetensors")["sha256"],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _pool_from_json(zoo: Zoo, data: dict) -> PoolZoo:
    pool = data["parents"]
    return PoolZoo(
        root=zoo.root, seed=zoo.seed, size=zoo.size, base=zoo.base,
        parents=zoo.parents | {name: zoo.root / "models" / name for name in pool},
        skills=zoo.skills | {name: p["skill"] for name, p in pool.items()},
        roles={name: "useful" for name in zoo.parents} | {name: p["role"] for name, p in pool.items()},
        target=zoo.target,
    )


def _record(zoo: Zoo) -> PartRecord[PoolZoo]:
    return PartRecord("pool.json", "pool", "--pool", lambda data: _pool_from_json(zoo, data))


def load_pool(zoo: Zoo | str | Path) -> PoolZoo:
    """The pool described by pool.json in a built zoo, after checking every file against what pool.json records."""
    if not isinstance(zoo, Zoo):
        zoo = load_zoo(zoo)
    return _record(zoo).load(zoo.root)


def build_pool(zoo: Zoo, *, threads: int = 1, progress: Progress | None = None,
               notice: Callable[[str], None] | None = None) -> PoolZoo:
    """Fine-tune each pool parent from the zoo's base (or reuse them, if built with the same settings from the same
    base and intact) and describe them in pool.json."""
    if threads < 1:
        raise ShoalError(f"threads must be at least 1 (got {threads})")
    digest = settings_hash(zoo)
    record = _record(zoo)
    cached = record.reuse(zoo.root, digest, notice)
    if cached is not None:
        return cached
    operands = split_operands(SIZES[zoo.size].held_out)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(zoo.base)
    schedule = SCHEDULES[zoo.size]
    steps: dict[str, int] = {}
    with torch_threads(threads):
        for i, (name, parent) in enumerate(POOL.items(), start=1):
            model = LlamaForCausalLM.from_pretrained(zoo.base)
            model.config._attn_implementation = "eager"
            sample = mixture(parent.spec.mix, operands, HARD_FRACTION)
            steps[name] = _train_stage(name, model, sample, schedule, zoo.seed * 1000 + 100 + i,
                                       tokenizer.backend_tokenizer, progress)
            save_model(model, tokenizer, zoo.root / "models" / name)
    data = {
        "seed": zoo.seed,
        "size": zoo.size,
        "settings_hash": digest,
        "parents": {name: {"skill": p.spec.skill, "role": p.role, "steps": steps[name]} for name, p in POOL.items()},
        "files": {
            str(path.relative_to(zoo.root)): _fingerprint(path)
            for name in POOL
            for path in sorted((zoo.root / "models" / name).rglob("*"))
            if path.is_file()
        },
    }
    return record.write(zoo.root, data)

