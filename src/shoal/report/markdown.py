"""Render a run's report.md text from the loaded run (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shoal.report.load import Run, Summary, Trial

MAX_LISTED_FAILURES = 5


def score(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def margin(value: float | None) -> str:
    return "–" if value is None else f"{value:+.4f}"


def best_of(scores: Mapping[str, float | None]) -> tuple[str, float] | None:
    """The (name, score) with the highest score, ignoring missing scores; None if there are none."""
    known = [(name, s) for name, s in scores.items() if s is not None]
    return max(known, key=lambda ns: ns[1]) if known else None


def render_markdown(run: Run, images: Sequence[str]) -> str:
    """report.md for `run`; `images` are file names next to report.md, linked in order."""
    heading = " · ".join(part for part in (run.target, run.method) if part) or run.study
    lines = [f"# shoal evolve report: {heading}", "", f"Study `{run.study}` at `{run.storage}`.", ""]
    if run.summary is None:
        lines += _unfinished(run)
    else:
        lines += _finished(run.summary)
    lines += _failures(run.trials)
    if images:
        lines += ["## Figures", ""]
        for name in images:
            lines += [f"![{name.rsplit('.', 1)[0]}]({name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _unfinished(run: Run) -> list[str]:
    failed = sum(t.failed for t in run.trials)
    running = f", {run.running} running" if run.running else ""
    done = [t for t in run.trials if not t.failed]
    if done:
        best = max(done, key=lambda t: t.value)
        best_line = f"- best dev fitness so far: {score(best.value)} (trial #{best.number})"
    else:
        best_line = "- best dev fitness so far: none (every trial so far failed)"
    return [
        "**The run has not finished** (no summary.json yet): this report covers the trials so far.",
        "",
        f"- trials so far: {len(run.trials)} finished ({failed} failed){running}",
        best_line,
        "",
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _finished(s: Summary) -> list[str]:
    evolved = f"evolved (best dev trial #{s.best.trial})" if s.best.trial is not None else "evolved (best dev trial)"
    lines = ["## Test split", "", "| model | dev | test |", "|:--|--:|--:|"]
    lines += [f"| parent: {_cell(name)} | – | {score(v)} |" for name, v in s.parents.items()]
    lines += [f"| untuned merge: {_cell(name)} | – | {score(v)} |" for name, v in s.untuned.items()]
    lines += [f"| **{evolved}** | **{score(s.best.dev)}** | **{score(s.best.test)}** |", ""]
    for what, best in (("the best parent", best_of(s.parents)), ("the best untuned merge", best_of(s.untuned))):
        if best is None:
            continue
        name, value = best
        gain = None if s.best.test is None else s.best.test - value
        lines.append(f"- evolved over {what} ({name}, {score(value)}): **{margin(gain)}** on test")
    lines += ["", "## Search", ""]
    trials = "?" if s.trials is None else str(s.trials)
    failed = "?" if s.failed_trials is None else str(s.failed_trials)
    budget = "?" if s.budget is None else str(s.budget)
    lines.append(f"- trials: {trials} done ({failed} failed), budget {budget}")
    if s.wall_seconds is not None:
        lines.append(f"- wall time: {_duration(s.wall_seconds)}")
    per = s.seconds_per_trial
    parts = [f"{name} {v:.3g} s" for name, v in (("merge", per.merge), ("eval", per.eval), ("total", per.total))
             if v is not None]
    if parts:
        lines.append(f"- seconds per trial: {', '.join(parts)}")
    return lines + [""]


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    clock = f"{hours} h {minutes} min" if hours else f"{minutes} min {rest} s"
    return f"{seconds:.1f} s ({clock})"


def _failures(trials: Sequence[Trial]) -> list[str]:
    failed = [t for t in trials if t.failed]
    if not failed:
        return []
    lines = ["## Failed trials", ""]
    lines += [f"- trial #{t.number}: {t.error or 'no reason recorded'}" for t in failed[:MAX_LISTED_FAILURES]]
    if len(failed) > MAX_LISTED_FAILURES:
        lines.append(f"- … and {len(failed) - MAX_LISTED_FAILURES} more")
    return lines + [""]
