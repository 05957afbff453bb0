"""Pure scoring functions: normalisation, each metric on one item, and constraint checks on one output."""

from __future__ import annotations

import re
from collections.abc import Sequence

from shoal.evaluate.task import NUMBER, CharsetConstraint, Constraint, Normalize, VocabularyConstraint


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """text up to (not including) the earliest occurrence of any stop string."""
    end = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:end]


def normalize(text: str, how: Normalize) -> str:
    if how.lowercase:
        text = text.lower()
    if how.collapse_whitespace:
        text = re.sub(r"\s+", " ", text)
    if how.strip:
        text = text.strip()
    return text


def exact_match(output: str, answer: str, how: Normalize) -> float:
    return float(normalize(output, how) == normalize(answer, how))


def _number(text: str) -> float | None:
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def last_number(output: str, answer: str) -> float:
    """1 if the last number in output equals the last number in answer ("1,000" reads as 1000)."""
    got = _number(output)
    return float(got is not None and got == _number(answer))


def regex_match(output: str, answer: str, pattern: str, how: Normalize) -> float:
    """1 if pattern is found in output and its first group (or the whole match) equals answer after normalisation."""
    found = re.search(pattern, output)
    if found is None:
        return 0.0
    return exact_match(found.group(1) if found.re.groups else found.group(0), answer, how)


def best_choice(loglikelihoods: Sequence[float]) -> int:
    """Index of the highest summed log-likelihood; the first on ties."""
    return max(range(len(loglikelihoods)), key=lambda i: (loglikelihoods[i], -i))


def multiple_choice(loglikelihoods: Sequence[float], choices: Sequence[str], answer: str) -> float:
    """1 if the choice with the highest summed log-likelihood (the first, on ties) is the answer."""
    return float(choices[best_choice(loglikelihoods)] == answer)


def failed_constraints(output: str, constraints: Sequence[Constraint]) -> list[str]:
    """Names of the constraints that output (stripped of surrounding whitespace) breaks."""
    text = output.strip()
    failed = []
    for c in constraints:
        if isinstance(c, VocabularyConstraint):
            ok = set(text.split()) <= set(c.words)
        elif isinstance(c, CharsetConstraint):
            ok = all(ch in c.chars or ch.isspace() for ch in text)
        else:
            ok = re.fullmatch(c.pattern, text) is not None
        if not ok:
            failed.append(c.name)
    return failed
