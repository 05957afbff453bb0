"""The zoo's evaluation tasks, written as task folders (task.yaml, dev.jsonl, test.jsonl) for `shoal.evaluate`."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from shoal.zoo.language import XX_ANSWER, Operands, Pair, answer, question, words

Item = dict[str, str]
SPLIT_SEED = 4321


def items(pairs: list[Pair], language: str, rng: random.Random) -> list[Item]:
    """One question per pair, in a template drawn from rng, with the gold answer."""
    return [{"prompt": question(p, language, rng.randrange(3)), "answer": answer(p, language)} for p in pairs]


def _interleave(a: list[Item], b: list[Item]) -> list[Item]:
    return [item for pair in zip(a, b) for item in pair]


def xx_constraints() -> list[dict[str, Any]]:
    """The output must be XX: only XX words, punctuation and numbers, in the XX answer's form."""
    numbers = [str(n) for n in range(199)]
    form = "^" + XX_ANSWER.replace(".", r"\.").replace("{c}", "[0-9]+") + "$"
    return [
        {"name": "in-xx", "type": "vocabulary", "words": words("xx") + [".", "?"] + numbers},
        {"name": "form", "type": "regex", "pattern": form},
    ]


def write_task(folder: Path, name: str, description: str, dev: list[Item], test: list[Item], constraints: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {
        "name": name,
        "description": description,
        "metric": "exact_match",
        "normalize": {"lowercase": True, "collapse_whitespace": True, "strip": True},
        "max_new_tokens": 12,
        "stop": ["\n"],
    }
    if constraints:
        spec["constraints"] = constraints
    spec["splits"] = {"dev": "dev.jsonl", "test": "test.jsonl"}
    # One key a line, each value in JSON (which YAML reads), so "\n" and long word lists stay legible.
    (folder / "task.yaml").write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in spec.items()))
    for split, rows in (("dev", dev), ("test", test)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def write_tasks(root: Path, operands: Operands) -> dict[str, tuple[Path, str]]:
    """Write the skill, target and union tasks under root; return name -> (folder, role).

    Every task draws its operands from pairs held out of all training, so no item was seen in training.
    """
    rng = random.Random(SPLIT_SEED)
    en_dev, en_test = items(operands.hard_dev, "en", rng), items(operands.hard_test, "en", rng)
    easy_dev, easy_test = items(operands.easy_dev, "xx", rng), items(operands.easy_test, "xx", rng)
    xx_dev, xx_test = items(operands.hard_dev, "xx", rng), items(operands.hard_test, "xx", rng)
    half = len(en_dev) // 2
    specs = {
        "en-math": ("skill", "2+2-digit addition asked and answered in English.", en_dev, en_test, []),
        "xx-easy": ("skill", "1+1 and 2+1-digit addition asked and answered in XX.", easy_dev, easy_test, []),
        "xx-math": ("target", "2+2-digit addition asked and answered in XX; an English answer scores 0.", xx_dev, xx_test, xx_constraints()),
        "union": (
            "union",
            "Both skills: half en-math items, half xx-easy items.",
            _interleave(en_dev[:half], easy_dev[:half]),
            _interleave(en_test[:half], easy_test[:half]),
            [],
        ),
    }
    return {
        name: (write_task(root / name, name, description, dev, test, constraints), role)
        for name, (role, description, dev, test, constraints) in specs.items()
    }
