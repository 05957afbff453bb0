"""Pure scoring functions: normalisation, each metric on one item, and constraint checks on one output."""

from __future__ import annotations

import re
from collections import Counter
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


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (dynamic programming, one row kept)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(output: str, answer: str, how: Normalize) -> float:
    """ROUGE-L F-measure (beta = 1) of output against answer, over whitespace tokens after normalisation.

    With LCS the longest common subsequence, P = LCS / output tokens and R = LCS / answer tokens, the score is
    2PR / (P + R), and 0 when either side has no tokens: rouge-score's `rougeL` (single sentence, no
    `rougeLsum`) with a whitespace tokenizer instead of its default (which lowercases and keeps only [a-z0-9]
    runs), so it applies to any script once the task's normalisation has run. The EvoVLM paper tokenised
    Japanese with a morphological analyser first; put spaces between words in such answers to match it.
    """
    got, gold = normalize(output, how).split(), normalize(answer, how).split()
    lcs = _lcs_length(got, gold)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(got), lcs / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(output: str, answer: str, how: Normalize) -> float:
    """SQuAD-style F1 of the bags of whitespace tokens of output and answer after normalisation.

    Shared tokens count with multiplicity (min of the two counts); P = shared / output tokens, R = shared /
    answer tokens, F1 = 2PR / (P + R). As in SQuAD's script, two empty sides score 1 and one empty side 0;
    unlike it, articles and punctuation are kept (the task's normalize says what is ignored).
    """
    got, gold = normalize(output, how).split(), normalize(answer, how).split()
    if not got or not gold:
        return float(got == gold)
    shared = sum((Counter(got) & Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(got), shared / len(gold)
    return 2 * precision * recall / (precision + recall)


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
