"""Render a scene (a coloured shape in a place) as a small RGB picture, its variations drawn from a seeded rng."""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from shoal.zoo.language import Scene

# RGB of each colour of language.EN_COLOURS (red, green, blue, yellow), before jitter.
INKS = [(220, 40, 40), (40, 180, 60), (50, 80, 230), (235, 215, 40)]
# Where each place of language.EN_PLACES (left, right, top, bottom) puts the shape's centre, as fractions of the side.
CENTRES = [(0.25, 0.5), (0.75, 0.5), (0.5, 0.25), (0.5, 0.75)]
SUPERSAMPLE = 4  # drawn this many times larger, then shrunk, so small shapes keep their outline


def _outline(shape: int, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]] | None:
    """The polygon of a shape of language.EN_SHAPES (circle, square, triangle, star) around (cx, cy), radius r,
    turned by `turn` radians; None for the circle, which is drawn as an ellipse."""
    if shape == 0:
        return None
    if shape == 1:
        corners = [(math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif shape == 2:
        corners = [(-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3)]
    else:
        corners = [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else 0.45 * r) for k in range(10)]
    return [(cx + d * math.cos(a + turn), cy + d * math.sin(a + turn)) for a, d in corners]


def render(shown: Scene, rng: random.Random, side: int = 32) -> Image.Image:
    """A side x side RGB picture of the scene: a grey ground of random shade with pixel noise, and the shape in its
    colour (jittered), size (a fifth to a third of the side) and place (centre jittered by up to a tenth of the side,
    the whole shape kept inside), slightly turned. The same scene and rng state give the same picture."""
    colour, shape, place = shown
    big = side * SUPERSAMPLE
    shade = rng.randint(30, 150)
    image = Image.new("RGB", (big, big), (shade, shade, shade))
    r = rng.uniform(0.32, 0.46) * big / 2 * (1.2 if shape == 3 else 1.0)  # a star's arms reach further out
    fx, fy = CENTRES[place]
    jitter = 0.06 * big
    cx = min(max(fx * big + rng.uniform(-jitter, jitter), r + 1), big - r - 1)
    cy = min(max(fy * big + rng.uniform(-jitter, jitter), r + 1), big - r - 1)
    ink = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in INKS[colour])
    outline = _outline(shape, cx, cy, r, rng.uniform(-0.25, 0.25))
    draw = ImageDraw.Draw(image)
    if outline is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
    else:
        draw.polygon(outline, fill=ink)
    image = image.resize((side, side), Image.Resampling.BOX)
    noise = rng.randint(0, 12)
    grain = np.random.default_rng(rng.getrandbits(64)).integers(-noise, noise + 1, size=(side, side, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8), "RGB")
