"""The pure scoring functions on hand-written cases."""

from __future__ import annotations

import pytest

from shoal.evaluate import metrics
from shoal.evaluate.task import CharsetConstraint, Normalize, RegexConstraint, VocabularyConstraint

ALL = Normalize(lowercase=True, collapse_whitespace=True, strip=True)
NONE = Normalize(lowercase=False, collapse_whitespace=False, strip=False)


def test_normalize_lowercases_collapses_and_strips_only_when_asked():
    assert metrics.normalize("  Ra  46\tLO ne . \n", ALL) == "ra 46 lo ne ."
    assert metrics.normalize("  Ra  46 ", NONE) == "  Ra  46 "
    assert metrics.normalize("  Ra  46 ", Normalize()) == "Ra 46"  # default: collapse and strip, keep case


def test_exact_match_compares_after_normalising_both_sides():
    assert metrics.exact_match(" The answer is 46 .", "the answer  is 46 .", ALL) == 1.0
    assert metrics.exact_match("The answer is 46 .", "the answer is 46 .", Normalize()) == 0.0
    assert metrics.exact_match("the answer is 47 .", "the answer is 46 .", ALL) == 0.0


@pytest.mark.parametrize(
    ("output", "answer", "score"),
    [
        ("ra 12 lo ne . then 46", "46", 1.0),
        ("46 then 12", "the answer is 46", 0.0),  # the last number of the output counts
        ("it is 1,000.", "1000", 1.0),
        ("-3.50", "x = -3.5", 1.0),
        ("no number here", "4", 0.0),
    ],
)
def test_last_number_compares_the_last_numbers(output, answer, score):
    assert metrics.last_number(output, answer) == score


def test_regex_compares_the_first_group_or_the_whole_match():
    assert metrics.regex_match("so the answer is 46 .", "46", r"answer is (\d+)", ALL) == 1.0
    assert metrics.regex_match("so the answer is 45 .", "46", r"answer is (\d+)", ALL) == 0.0
    assert metrics.regex_match("I say YES", "yes", r"YES|NO", ALL) == 1.0
    assert metrics.regex_match("nothing", "46", r"answer is (\d+)", ALL) == 0.0


def test_multiple_choice_picks_the_highest_sum_and_the_first_on_ties():
    assert metrics.multiple_choice([-3.0, -1.0, -2.0], ["a", "b", "c"], "b") == 1.0
    assert metrics.multiple_choice([-3.0, -1.0, -2.0], ["a", "b", "c"], "c") == 0.0
    assert metrics.best_choice([-1.0, -1.0]) == 0


def test_cut_at_stop_cuts_at_the_earliest_stop_string():
    assert metrics.cut_at_stop("ra 46 lo ne .\nmore\n\nQ:", ["Q:", "\n"]) == "ra 46 lo ne ."
    assert metrics.cut_at_stop("no stop", ["\n"]) == "no stop"
    assert metrics.cut_at_stop("no stop", []) == "no stop"


def test_constraints_report_every_broken_one_by_name():
    constraints = [
        VocabularyConstraint(name="in-xx", type="vocabulary", words=["ra", "lo", "ne", ".", "46"]),
        CharsetConstraint(name="ascii", type="charset", chars="ralone.0123456789"),
        RegexConstraint(name="form", type="regex", pattern=r"ra \d+ lo ne \."),
    ]
    assert metrics.failed_constraints(" ra 46 lo ne .\n", constraints) == []
    assert metrics.failed_constraints("ra 47 lo ne .", constraints) == ["in-xx"]
    assert metrics.failed_constraints("the answer is 46 .", constraints) == ["in-xx", "ascii", "form"]
    assert metrics.failed_constraints("ra 46 lo ne . ra", constraints) == ["form"]  # fullmatch, not search
    assert metrics.failed_constraints("", constraints) == ["form"]


@pytest.mark.parametrize(
    ("output", "answer", "rouge_l", "token_f1"),
    [
        # LCS "the on" (or "the cat") = 2: P 2/4, R 2/5; all 4 output tokens are in the answer's bag: P 1, R 4/5
        ("mat the on cat", "the cat on the mat", 2 * (2 / 4) * (2 / 5) / (2 / 4 + 2 / 5), 2 * (4 / 5) / (1 + 4 / 5)),
        ("The Cat  sat", "the cat sat", 1.0, 1.0),  # lowercased and collapsed first
        ("a a a", "a b", 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2), 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)),  # once
        ("dog", "the cat", 0.0, 0.0),
        ("", "the cat", 0.0, 0.0),
        ("  ", " ", 0.0, 1.0),  # no tokens on either side: rouge-score says 0, SQuAD says 1
    ],
)
def test_rouge_l_and_token_f1_on_hand_computed_cases(output, answer, rouge_l, token_f1):
    assert metrics.rouge_l(output, answer, ALL) == pytest.approx(rouge_l)
    assert metrics.token_f1(output, answer, ALL) == pytest.approx(token_f1)


def test_rouge_l_keeps_case_and_punctuation_unless_normalize_drops_them():
    assert metrics.rouge_l("The cat .", "the cat", Normalize()) == pytest.approx(2 * (1 / 3) * (1 / 2) / (5 / 6))
    assert metrics.token_f1("猫 が いる", "猫 が いた", Normalize()) == pytest.approx(2 / 3)  # any script


def test_rouge_l_equals_the_rouge_score_package_with_a_whitespace_tokenizer():
    import random

    from rouge_score import rouge_scorer

    class Whitespace:
        def tokenize(self, text: str) -> list[str]:
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Whitespace())
    rng = random.Random(0)
    for _ in range(300):
        output, answer = (" ".join(rng.choice("abcdef") for _ in range(rng.randint(0, 9))) for _ in range(2))
        expected = scorer.score(answer, output)["rougeL"].fmeasure  # score(target, prediction)
        assert metrics.rouge_l(output, answer, NONE) == pytest.approx(expected, abs=1e-12)
