"""Unknown command-line options are usage errors (exit 2); a mergekit option that shoal has in another form is
answered with shoal's."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(("option", "hint"), [
    ("--cuda", "shoal merge has --device cuda"),
    ("--random-seed", "shoal merge has --seed N"),
    ("--out-shard-size", "shoal merge has --shard-size GB"),
    ("--copy-tokenizer", "tokenizer_source"),
    ("--lazy-unpickle", "never unpickles"),
    ("--allow-crimes", "different architectures are refused"),
])
def test_a_mergekit_option_gets_a_hint(run_cli, tmp_path, option, hint) -> None:
    code, _, err = run_cli("merge", tmp_path / "r.yaml", tmp_path / "out", option)
    assert code == 2 and "Traceback" not in err
    assert f"No such option: {option} (a mergekit option: " in err and hint in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_option_without_a_mergekit_meaning_has_no_hint(run_cli, tmp_path) -> None:
    code, _, err = run_cli("merge", tmp_path / "r.yaml", tmp_path / "out", "--frobnicate")
    assert code == 2 and "No such option: --frobnicate" in err and "mergekit" not in err


def test_mergekit_hints_are_for_merge_only(run_cli, tmp_path) -> None:
    code, _, err = run_cli("eval", tmp_path, "--task", tmp_path, "--cuda")
    assert code == 2 and "No such option: --cuda" in err and "mergekit" not in err
