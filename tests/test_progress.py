"""Progress where stderr is not a terminal (a log file, a pipe): whole lines while the work runs, not one line cut at
80 columns when it ends; nothing with --quiet; an error after a bar follows it directly."""

from __future__ import annotations

import subprocess
import sys

from conftest import write_recipe

from shoal.cli.progress import LOG_WIDTH, Bar, bar, console
from shoal.cli.evolve import trial_bar


def _lines(text: str) -> list[str]:
    return text.splitlines()


def test_a_bar_in_a_log_prints_its_start_its_finish_and_a_line_when_due(capsys) -> None:
    slow = Bar("{task.description}", "{task.completed}/{task.total}", every=3600)
    with slow:
        task = slow.add_task("merging", total=5)
        for done in range(6):
            slow.update(task, completed=done)
    assert _lines(capsys.readouterr().err) == ["merging 0/5", "merging 5/5"]

    eager = Bar("{task.description}", "{task.completed}/{task.total}", every=0)
    with eager:
        task = eager.add_task("merging", total=5)
        for done in (0, 2, 2, 4):
            eager.update(task, completed=done)  # a second update at 2 adds no line
    assert _lines(capsys.readouterr().err) == ["merging 0/5", "merging 2/5", "merging 4/5"]


def test_a_bar_stopped_early_says_where_it_stopped_and_adds_no_blank_line(capsys) -> None:
    progress = Bar("{task.description}", "{task.completed}/{task.total}", every=3600)
    progress.start()
    task = progress.add_task("trials", total=100)
    for done in range(8):
        progress.update(task, completed=done)
    progress.stop()
    progress.stop()  # a second stop (a finally after a with) prints nothing more
    print("error: next", file=sys.stderr)
    assert capsys.readouterr().err == "trials 0/100\ntrials 7/100\nerror: next\n"


def test_a_disabled_or_unstarted_bar_prints_nothing(capsys) -> None:
    quiet = bar(disable=True)
    with quiet:
        quiet.update(quiet.add_task("merging", total=3), completed=3)
    unstarted = trial_bar()
    unstarted.update(unstarted.add_task("trials", total=3, best="-", rate="-", items=0), completed=1)
    unstarted.stop()
    assert capsys.readouterr().err == ""


def test_the_trial_line_is_whole_in_80_columns_and_in_a_log() -> None:
    progress = trial_bar()
    task = progress.add_task("trials", total=1000, best="0.2500", rate="361", items="123,456", left="12:34:56")
    progress.update(task, completed=1000)
    line = progress.make_tasks_table(progress.tasks)
    for width in (80, LOG_WIDTH):
        out = console()
        out.width = width
        with out.capture() as captured:
            out.print(line)
        text = captured.get().rstrip("\n")
        assert "…" not in text and len(text) <= 80
        assert "1000/1000 best 0.2500 361/min 123,456 items" in text and text.endswith(" 12:34:56")


def test_shoal_merge_into_a_log_shows_its_tensors_and_no_blank_lines(parents, tmp_path) -> None:
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(parents[n]), "parameters": {"weight": 1.0}} for n in ("a", "b")]})
    done = subprocess.run([sys.executable, "-m", "shoal", "merge", str(recipe), str(tmp_path / "out"), "-j", "1"],
                          capture_output=True, text=True, check=True)
    lines = _lines(done.stderr)
    assert lines[0].startswith("merging tensors") and lines[0].split()[-3].startswith("0/")
    total = lines[0].split()[-3].split("/")[1]
    assert lines[-2].startswith("merging tensors") and f" {total}/{total} " in lines[-2]
    assert lines[-1] == f"wrote {tmp_path / 'out'}"
    assert "" not in lines
