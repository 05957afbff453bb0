"""Build the zoo's vision-language part (a LLaVA captioner on the zoo's base, caption tasks, vlm.json) once, then reuse it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import ShoalError
from shoal.threads import torch_threads
from shoal.zoo.build import Progress, Zoo, _fingerprint, load_zoo
from shoal.zoo.captions import PROMPTS, held_out, training_renders, write_caption_tasks
from shoal.zoo.language import scene
from shoal.zoo.part import PartRecord
from shoal.zoo.train import Schedule, save_model
from shoal.zoo.vlm import VisionShape, examples, from_base, train_vlm

VLM_VERSION = 4
VLM = "vlm"


@dataclass(frozen=True)
class VlmSize:
    vision: VisionShape
    align: Schedule  # LLaVA's first stage: the tower and projector learn to feed the frozen language model
    schedule: Schedule  # then every part, the language model at lm_lr_ratio times the rate
    lm_lr_ratio: float  # the language model's learning rate over the (fresh) vision tower's and projector's
    train_pictures: int  # distinct training renders
    held_out: int  # renders per split (dev, test)


DEFAULT_VLM_SIZE = VlmSize(
    VisionShape(side=32, patch=8, hidden=64, layers=2, heads=2, intermediate=128),
    Schedule(steps=800, batch_size=32, lr=3e-3, warmup=50),
    Schedule(steps=1000, batch_size=32, lr=3e-3, warmup=50),
    lm_lr_ratio=0.3,
    train_pictures=8192,
    held_out=128,
)

VLM_SIZES = {
    "default": DEFAULT_VLM_SIZE,
    "deep": DEFAULT_VLM_SIZE,  # the tower and its training do not depend on the language model's shape
    "smoke": VlmSize(
        VisionShape(side=16, patch=8, hidden=16, layers=1, heads=2, intermediate=32),
        Schedule(steps=4, batch_size=8, lr=2e-3, warmup=1),
        Schedule(steps=8, batch_size=8, lr=2e-3, warmup=2),
        lm_lr_ratio=0.5,
        train_pictures=64,
        held_out=16,
    ),
}


@dataclass(frozen=True)
class VlmZoo:
    """Paths of the zoo's VLM part: the VLM parent (a LLaVA folder), the text zoo's language parent and base it is
    merged with, and the caption tasks (with their roles)."""

    root: Path
    seed: int
    size: str
    vlm: Path
    language: Path
    base: Path
    skills: dict[str, str]  # parent name (vlm, language) -> the task of its skill
    tasks: dict[str, Path]
    roles: dict[str, str]

    @property
    def target(self) -> Path:
        return next(self.tasks[name] for name, role in self.roles.items() if role == "target")


def settings_hash(zoo: Zoo, size: str, seed: int) -> str:
    """A hash of everything that decides the VLM part: its settings, seed and version, and the text zoo's base and
    language parent (by the sha256 of their weights), so a rebuilt text zoo rebuilds the VLM too."""
    settings = {
        "version": VLM_VERSION,
        "seed": seed,
        "size": dataclasses.asdict(VLM_SIZES[size]),
        "prompts": PROMPTS,
        "base": _fingerprint(zoo.base / "model.safetensors")["sha256"],
        "language": _fingerprint(zoo.parents["language"] / "model.safetensors")["sha256"],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _vlm_zoo_from_json(zoo: Zoo, data: dict) -> VlmZoo:
    root = zoo.root
    return VlmZoo(
        root=root,
        seed=data["seed"],
        size=data["size"],
        vlm=root / "models" / data["vlm"],
        language=zoo.parents[data["language"]],
        base=zoo.base,
        skills={name: p["skill"] for name, p in data["parents"].items()},
        tasks={name: root / "tasks" / name for name in data["tasks"]},
        roles={name: t["role"] for name, t in data["tasks"].items()},
    )


def _record(zoo: Zoo) -> PartRecord[VlmZoo]:
    return PartRecord("vlm.json", "VLM part", "--vlm", lambda data: _vlm_zoo_from_json(zoo, data))


def load_vlm_zoo(zoo: Zoo | str | Path) -> VlmZoo:
    """The VLM part described by vlm.json in a built zoo (a Zoo, or its folder), after checking every file against
    the sizes and hashes it records."""
    if not isinstance(zoo, Zoo):
        zoo = load_zoo(zoo)
    return _record(zoo).load(zoo.root)


def build_vlm_zoo(
    zoo: Zoo,
    *,
    size: str | None = None,
    seed: int | None = None,
    threads: int = 1,
    progress: Progress | None = None,
    notice: Callable[[str], None] | None = None,
) -> VlmZoo:
    """Build (or reuse, if built with the same settings from the same base and intact) the VLM part of a built zoo:
    models/vlm (a LLaVA on the zoo's base, trained to caption pictures in English) and tasks/en-caption (its skill)
    and tasks/xx-caption (the target: captions in XX, the language parent's language), described by vlm.json.

    size and seed default to the text zoo's (the seed initialises the vision tower and projector and draws the
    training pictures and their order; the held-out pictures do not depend on it). progress(stage, step, total) is called after every
    training step; notice(reason) when a built VLM part is found damaged and rebuilt.
    """
    size = size or zoo.size
    seed = zoo.seed if seed is None else seed
    if size not in VLM_SIZES:
        raise ShoalError(f"unknown VLM zoo size {size!r} (known: {', '.join(VLM_SIZES)})")
    if threads < 1:
        raise ShoalError(f"threads must be at least 1 (got {threads})")
    if "language" not in zoo.parents:
        raise ShoalError(f"the zoo at {zoo.root} has no language parent to pair with the VLM")
    digest = settings_hash(zoo, size, seed)
    record = _record(zoo)
    cached = record.reuse(zoo.root, digest, notice)
    if cached is not None:
        return cached
    spec = VLM_SIZES[size]
    root = zoo.root
    owned = [root / "models" / VLM, *(root / "tasks" / name for name in ("en-caption", "xx-caption"))]
    for folder in owned:
        shutil.rmtree(folder, ignore_errors=True)
    splits = held_out(spec.held_out, spec.vision.side)
    tasks = write_caption_tasks(root / "tasks", splits)
    pool = training_renders(spec.train_pictures, seed, spec.vision.side, [r for rs in splits.values() for r in rs])

    with torch_threads(threads):
        model, processor = from_base(zoo.base, spec.vision, seed)
        data = examples(processor, [r.image for r in pool], [PROMPTS["en"]] * len(pool), [scene(r.scene, "en") for r in pool])
        for stage, schedule, stage_seed, ratio in (("vlm-align", spec.align, seed * 1000 + 6, 0.0),
                                                   (VLM, spec.schedule, seed * 1000 + 7, spec.lm_lr_ratio)):
            report = (lambda step, st=stage, sc=schedule: progress(st, step, sc.steps)) if progress else None
            train_vlm(model, data, schedule, stage_seed, ratio, report)
        save_model(model, processor, root / "models" / VLM)

    data_json = {
        "seed": seed,
        "size": size,
        "settings_hash": digest,
        "vlm": VLM,
        "language": "language",
        "parents": {VLM: {"skill": "en-caption"}, "language": {"skill": zoo.skills["language"]}},
        "tasks": {name: {"role": role} for name, (_, role) in tasks.items()},
        "files": {
            str(path.relative_to(root)): _fingerprint(path)
            for folder in owned
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        },
    }
    return record.write(root, data_json)
