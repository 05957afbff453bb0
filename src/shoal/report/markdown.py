"""Render a run's report.md text (a single run, or a hybrid run's combined report) from loaded records (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shoal.report.load import HybridRun, Run, Stage
from shoal.report.plots import scale_text
from shoal.search.summary import Best, Summary, untuned_label
from shoal.search.trials import Trial

MAX_LISTED_FAILURES = 5


def score(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def margin(value: float | None) -> str:
    return "–" if value is None else f"{value:+.4f}"


def best_of(scores: Mapping[str, float | None]) -> tuple[str, float] | None:
    """The (name, score) with the highest score, ignoring missing scores; None if there are none."""
    known = [(name, s) for name, s in scores.items() if s is not None]
    return max(known, key=lambda ns: ns[1]) if known else None


def path_line(steps: Sequence[Mapping[str, Any]]) -> str:
    """The path in one line: "language L0 → math L2 ×0.87 → …" (the scale only where it is not 1.0)."""
    if not steps:
        return "(no layers: the embeddings go straight to the head)"
    parts = []
    for step in steps:
        text = scale_text(float(step.get("scale", 1.0)))
        parts.append(f"{step['parent']} L{int(step['layer'])}" + (f" {text}" if text else ""))
    return " → ".join(parts)


def render_markdown(run: Run, images: Sequence[str]) -> str:
    """report.md for `run`; `images` are file names next to report.md, linked in order."""
    heading = " · ".join(part for part in (run.target, run.method, run.space) if part) or run.study
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
        best_line = f"- best dev fitness so far: {score(best.value)} (trial #{best.index})"
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
    evolved = f"evolved (best dev trial #{s.best.trial})"
    lines = ["## Test split", "", "| model | dev | test |", "|:--|--:|--:|"]
    lines += [f"| parent: {_cell(name)} | – | {score(v)} |" for name, v in s.parents.items()]
    lines += [f"| {_cell(untuned_label(name, s.space))} | – | {score(v)} |" for name, v in s.untuned.items()]
    lines += [f"| **{evolved}** | **{score(s.best.dev)}** | **{score(s.best.test)}** |", ""]
    for what, best in (("the best parent", best_of(s.parents)), ("the best untuned merge", best_of(s.untuned))):
        if best is None:
            continue
        name, value = best
        lines.append(f"- evolved over {what} ({name}, {score(value)}): **{margin(s.best.test - value)}** on test")
    if s.best.kept is not None:
        left_out = [name for name in (s.best.layers or {}).get("weight", {}) if name not in s.best.kept]
        lines.append(f"- parents in the merge (keep genes): {', '.join(map(_cell, s.best.kept))}"
                     + (f"; left out (weight 0): {', '.join(map(_cell, left_out))}" if left_out else ""))
    lines.append("")
    if s.pool is not None:
        lines += _tournament(s)
    if s.best.path is not None:
        lines += _best_path(s.best)
    lines += ["## Search", ""]
    lines.append(f"- trials: {s.trials} done ({s.failed_trials} failed), budget {_budget(s)}")
    lines.append(f"- wall time: {_duration(s.wall_seconds)}")
    per = s.seconds_per_trial
    parts = [f"{name} {v:.3g} s" for name, v in (("merge", per.merge), ("eval", per.eval), ("total", per.total))]
    lines.append(f"- seconds per trial: {', '.join(parts)}")
    return lines + _fitness(s) + [""]


def _fitness(s: Summary) -> list[str]:
    """How trials were scored, what it cost, and how the final model was picked (runs that record it)."""
    lines = []
    if s.fitness is not None:
        lines.append(f"- fitness: {s.fitness}")
    if s.compute is not None:
        lines.append(f"- compute: {s.compute.items:,} dev items scored, {s.compute.tokens:,} tokens generated")
    if s.selection is not None:
        sel = s.selection
        lines.append("- splits: dev for the search fitness and the final pick; test only for the scores above "
                     "(a task whose dev items repeat test prompts is refused)")
        lines.append(f"- final model: the best on the whole {sel.on} split of the top {sel.top} trials by search "
                     f"fitness ({sel.cost.items:,} items scored again)")
        lines += ["", "| trial | search fitness | whole dev |", "|--:|--:|--:|"]
        lines += [f"| {'**#%d**' % r.trial if r.trial == s.best.trial else '#%d' % r.trial} | {score(r.search)} | "
                  f"{score(r.dev)} |" for r in sel.rescored]
        if s.best.search is not None:
            lines += ["", f"- picked trial #{s.best.trial}: search fitness {score(s.best.search)}, whole dev "
                          f"{score(s.best.dev)}, test {score(s.best.test)}"]
    return lines


def _tournament(s: Summary) -> list[str]:
    """A pool's rounds: each subset's picked trial on the whole dev split, by round; the winner in bold."""
    assert s.pool is not None
    winner = "+".join(s.pool.winner)
    lines = ["## Pool tournament", "",
             f"Every subset of {s.pool.subset} parents searched on its own; after each round the best by whole-dev "
             f"score went on with more trials. **{_cell(winner)}** won; only its model was scored on test.", ""]
    header = [f"round {i} ({r.trials} trials)" for i, r in enumerate(s.pool.rounds, 1)]
    lines += ["| subset | " + " | ".join(header) + " |", "|:--|" + "--:|" * len(header)]
    for name in s.pool.rounds[0].dev:
        cells = [score(r.dev[name]) if name in r.dev else "" for r in s.pool.rounds]
        label = f"**{_cell(name)}**" if name == winner else _cell(name)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def _best_path(best: Best) -> list[str]:
    steps = [step.model_dump() for step in best.path or []]
    a = best.parents_order[0] if best.parents_order else None
    where = f"embeddings and head from {a}" if a else "embeddings and head from parent A"
    n = f"{len(steps)} step" + ("" if len(steps) == 1 else "s")
    return ["## Best path", "", f"{n}, {where}:", "", path_line(steps), ""]


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
    lines += [f"- trial #{t.index}: {t.error or 'no reason recorded'}" for t in failed[:MAX_LISTED_FAILURES]]
    if len(failed) > MAX_LISTED_FAILURES:
        lines.append(f"- … and {len(failed) - MAX_LISTED_FAILURES} more")
    return lines + [""]


def render_hybrid_markdown(hybrid: HybridRun, stage_files: Mapping[str, Sequence[str]]) -> str:
    """The top report.md of a hybrid run; `stage_files[stage]` are links (relative to this report.md) to the
    files of that stage's report, its report.md first, then its images."""
    names = [s.name for s in hybrid.stages]
    heading = " · ".join(part for part in (hybrid.target, hybrid.method, "hybrid") if part)
    reports = [f"[{name}]({stage_files[name][0]})" for name in names if stage_files.get(name)]
    lines = [
        f"# shoal evolve report: {heading}",
        "",
        f"Hybrid run in {len(names)} stages, each searching over the result of the one before: {' → '.join(names)}.",
        "",
    ]
    if reports:
        lines += [f"Stage reports: {', '.join(reports)}.", ""]
    s = hybrid.summary
    if s is None:
        lines += [f"**The hybrid run has not finished** (no summary.json yet): {hybrid_progress(hybrid.stages)}.", ""]
    else:
        lines += _hybrid_test_table(hybrid, s)
        if s.pool is not None:  # the PS stage was a pool's tournament
            lines += _tournament(s)
    lines += _stage_table(hybrid, stage_files)
    if s is not None:
        if s.best.path is not None:
            lines += _best_path(s.best)
        lines += _hybrid_search(s)
    figures = [(name, f) for name in names for f in stage_files.get(name, [])[1:]]
    if figures:
        lines += ["## Figures", ""]
        for name, link in figures:
            lines += [f"![{name} {link.rsplit('/', 1)[-1].rsplit('.', 1)[0]}]({link})", ""]
    return "\n".join(lines).rstrip() + "\n"


def hybrid_progress(stages: Sequence[Stage]) -> str:
    """Which stage of an unfinished hybrid run is under way, in words (a report cannot tell one still running from one
    that was stopped)."""
    for i, stage in enumerate(stages):
        if stage.status == "finished":
            continue
        if stage.status == "unfinished":
            return f"stage `{stage.name}` has not finished" + ("" if stage.run else " (no trial is stored yet)")
        done = [f"`{s.name}`" for s in stages[:i] if s.status == "finished"]
        before = f"stage {', '.join(done)} finished; " if done else ""
        return f"{before}stage `{stage.name}` has not started yet"
    return "every stage has finished; the final summary is being written"


def _stage_label(name: str) -> str:
    return f"{name.upper()} stage best"


def _final_label(names: Sequence[str]) -> str:
    return f"hybrid ({' then '.join(n.upper() for n in names)}) best"


def _stage_result(hybrid: HybridRun, stage: Stage) -> tuple[float | None, float | None, int | None, int | None]:
    """(dev, test, trials, best trial) of a stage: from the top summary, else from the stage's own summary."""
    top = (hybrid.summary.stages or {}).get(stage.name) if hybrid.summary else None
    if top is not None:
        return top.dev, top.test, top.trials, top.best_trial
    own = stage.run.summary if stage.run else None
    if own is not None:
        return own.best.dev, own.best.test, own.trials, own.best.trial
    return None, None, None, None


def _hybrid_test_table(hybrid: HybridRun, s: Summary) -> list[str]:
    names = [st.name for st in hybrid.stages]
    final = _final_label(names) + f" (trial #{s.best.trial})"
    lines = ["## Test split", "", "| model | dev | test |", "|:--|--:|--:|"]
    lines += [f"| parent: {_cell(name)} | – | {score(v)} |" for name, v in s.parents.items()]
    lines += [f"| {_cell(untuned_label(name, s.space))} | – | {score(v)} |" for name, v in s.untuned.items()]
    earlier = []
    for stage in hybrid.stages[:-1]:
        dev, test, _, best = _stage_result(hybrid, stage)
        label = _stage_label(stage.name) + (f" (trial #{best})" if best is not None else "")
        lines.append(f"| {_cell(label)} | {score(dev)} | {score(test)} |")
        earlier.append((stage.name, test))
    lines += [f"| **{_cell(final)}** | **{score(s.best.dev)}** | **{score(s.best.test)}** |", ""]
    over = []
    for what, best in (("the best parent", best_of(s.parents)), ("the best untuned merge", best_of(s.untuned))):
        if best is not None:
            over.append((f"{what} ({best[0]}, {score(best[1])})", best[1]))
    over += [(f"the {_stage_label(name)} ({score(v)})", v) for name, v in earlier if v is not None]
    for what, value in over:
        lines.append(f"- hybrid over {what}: **{margin(s.best.test - value)}** on test")
    return lines + [""]


def _stage_table(hybrid: HybridRun, stage_files: Mapping[str, Sequence[str]]) -> list[str]:
    lines = ["## Stages", "", "| stage | status | trials | best trial | dev | test | report |",
             "|:--|:--|--:|--:|--:|--:|:--|"]
    so_far = False
    for stage in hybrid.stages:
        dev, test, trials, best = _stage_result(hybrid, stage)
        dev_text = score(dev)
        run = stage.run
        if run is not None and run.summary is None:  # running: what the study holds so far
            done = [t for t in run.trials if not t.failed]
            failed = len(run.trials) - len(done)
            trials_text = f"{len(run.trials)} ({failed} failed" + (f", {run.running} running)" if run.running else ")")
            if done:
                top = max(done, key=lambda t: t.value)
                best, dev_text, so_far = top.index, f"{score(top.value)}*", True
        else:
            trials_text = "–" if trials is None else str(trials)
        files = stage_files.get(stage.name)
        link = f"[report.md]({files[0]})" if files else "–"
        best_text = "–" if best is None else f"#{best}"
        lines.append(f"| {_cell(stage.name)} | {stage.status} | {trials_text} | {best_text} | {dev_text} | "
                     f"{score(test)} | {link} |")
    if so_far:
        lines += ["", "\\* an unfinished stage's best search fitness so far: with fitness mode subset or race, a "
                  "score on part of the dev split, not comparable with a finished stage's whole-dev score"]
    return lines + [""]


def _budget(s: Summary, stage: str = "") -> str:
    """The budget as given: trials, and the compute that ends the search (each stage of a hybrid run) first if it
    comes first."""
    compute = [f"{n:,} {unit}{stage}" for n, unit in ((s.budget_items, "dev items"), (s.budget_tokens, "tokens")) if n]
    return " or ".join([f"{s.budget} trials", *compute]) + (", whichever came first" if compute else "")


def _hybrid_search(s: Summary) -> list[str]:
    return ["## Search", "", f"- trials over all stages: {s.trials} done ({s.failed_trials} failed), budget {_budget(s, ' a stage')}",
            f"- wall time: {_duration(s.wall_seconds)}", ""]
