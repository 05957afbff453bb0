"""The zoo's captioning data: training renders and held-out caption tasks (en-caption, xx-caption) with their images."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from shoal.zoo.language import (
    EN_COLOURS, EN_LOOK, EN_PLACES, EN_SHAPES, XX_COLOURS, XX_LOOK, XX_PLACES, XX_SCENE, XX_SHAPES, Scene, scene, words,
)
from shoal.zoo.pictures import render
from shoal.zoo.tasks import Item, write_task
from shoal.zoo.tokenizer import IMAGE

SCENES: list[Scene] = [
    (c, s, p) for c in range(len(EN_COLOURS)) for s in range(len(EN_SHAPES)) for p in range(len(EN_PLACES))
]
SPLIT_SEED = 8642  # the held-out renders do not depend on the zoo's seed: every seed is scored on the same pictures
PROMPTS = {"en": f"{IMAGE} {EN_LOOK}", "xx": f"{IMAGE} {XX_LOOK}"}


@dataclass(frozen=True)
class Render:
    scene: Scene
    image: Image.Image

    @property
    def key(self) -> str:
        return hashlib.sha256(self.image.tobytes()).hexdigest()


def renders(count: int, rng: random.Random, side: int) -> list[Render]:
    """count pictures, every scene of SCENES as often as count allows (in shuffled rounds), each rendered afresh."""
    shown: list[Scene] = []
    while len(shown) < count:
        shown += rng.sample(SCENES, len(SCENES))
    return [Render(s, render(s, rng, side)) for s in shown[:count]]


def held_out(per_split: int, side: int) -> dict[str, list[Render]]:
    """The dev and test renders (per_split each), drawn from the fixed SPLIT_SEED; all differ pixel for pixel."""
    rng = random.Random(SPLIT_SEED)
    dev = renders(per_split, rng, side)
    test = renders(per_split, rng, side)
    assert len({r.key for r in dev + test}) == 2 * per_split, "two held-out renders are equal; change SPLIT_SEED"
    return {"dev": dev, "test": test}


def training_renders(count: int, seed: int, side: int, excluded: list[Render]) -> list[Render]:
    """count training pictures from the zoo's seed, none equal to a held-out one (checked pixel for pixel; a clash,
    which the renders' random size, place, turn, colour and noise make all but impossible, is drawn again)."""
    rng = random.Random(f"vlm-train-{seed}")
    banned = {r.key for r in excluded}
    pool = [r for r in renders(count, rng, side) if r.key not in banned]
    while len(pool) < count:
        pool += [r for r in renders(count - len(pool), rng, side) if r.key not in banned]
    return pool


def xx_caption_constraints() -> list[dict[str, Any]]:
    """The caption must be XX: only XX words and punctuation, in the XX scene form with a shape, colour and place."""
    alternatives = {"shape": XX_SHAPES, "colour": XX_COLOURS, "place": XX_PLACES}
    form = XX_SCENE.replace(".", r"\.")
    for slot, options in alternatives.items():
        form = form.replace(f"{{{slot}}}", f"({'|'.join(options)})")
    return [
        {"name": "in-xx", "type": "vocabulary", "words": words("xx") + [".", "?"]},
        {"name": "form", "type": "regex", "pattern": f"^{form}$"},
    ]


TASKS = {
    # name: (role, language, description)
    "en-caption": ("skill", "en", "Caption a held-out picture in English: '<image> what do you see ?' -> 'a red circle on the left .'."),
    "xx-caption": ("target", "xx", "Caption a held-out picture in XX: '<image> ka mira su ?' -> 'tomo kiru i hasu ta .'; "
                   "an answer not in the XX scene form scores 0."),
}


def write_caption_tasks(root: Path, splits: dict[str, list[Render]]) -> dict[str, tuple[Path, str]]:
    """Write each caption task under root (task.yaml, dev.jsonl, test.jsonl, images/<split>-<n>.png, the same pictures
    in both tasks, so their items pair up); return name -> (folder, role). Exact match: a caption is its three slots."""
    written = {}
    for name, (role, language, description) in TASKS.items():
        folder = root / name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        items: dict[str, list[Item]] = {}
        for split, shown in splits.items():
            items[split] = []
            for n, r in enumerate(shown):
                path = f"images/{split}-{n:03d}.png"
                r.image.save(folder / path, optimize=False)
                items[split].append({"image": path, "prompt": PROMPTS[language], "answer": scene(r.scene, language)})
        constraints = xx_caption_constraints() if language == "xx" else []
        written[name] = (write_task(folder, name, description, items["dev"], items["test"], constraints), role)
    return written
