"""`shoal evolve SEARCH RUN_DIR`."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from shoal.cli.app import app
from shoal.cli.progress import Bar, console
from shoal.errors import Interrupted, ShoalError
from shoal.threads import cpu_sample, spare_threads

if TYPE_CHECKING:
    from shoal.search.spec import SearchSpec
    from shoal.search.summary import Summary


def trial_bar() -> Bar:
    """trials, done of budget, the best dev fitness, trials a minute, dev items scored, time taken and left: a
    78-column line at 1000 trials and 6-digit item counts, whole in an 80-column terminal. The rate and the time left
    are this session's (rich's own estimate would count the stored trials a resumed run replays as done now)."""
    return Bar(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=10),
        MofNCompleteColumn(),
        TextColumn("best {task.fields[best]}"),
        TextColumn("{task.fields[rate]}/min"),
        TextColumn("{task.fields[items]} items"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[left]}"),
    )


def run_evolve(
    search: Path, run_dir: Path, storage: str | None, budget: int | None, threads: int | None, workers: int = 1,
    ray_address: str | None = None, memory_limit: str | None = None, budget_items: int | None = None,
    budget_tokens: int | None = None,
) -> Summary:
    """Load the search file and run it with a live display; returns the summary."""
    started = cpu_sample()  # what other processes use from here to the search sets its threads (the imports take ~2 s)
    import torch
    from transformers.utils import logging as transformers_logging

    from shoal.merge.memory import parse_bytes
    from shoal.search.evolve import evolve
    from shoal.search.loop import Progress as TrialProgress
    from shoal.search.spec import load_search

    transformers_logging.disable_progress_bar()

    spec = load_search(search)
    overrides = {"budget": budget, "budget_items": budget_items, "budget_tokens": budget_tokens}
    spec = spec.model_copy(update={key: value for key, value in overrides.items() if value is not None})
    if memory_limit is not None:
        parse_bytes(memory_limit)  # a ShoalError naming the bad size
        spec = spec.model_copy(update={"memory": spec.memory.model_copy(update={"limit": memory_limit})})
    err = console(stderr=True)
    if threads is not None:
        torch.set_num_threads(threads)
    # a search keeps its thread count (scores can differ in their last bits with another, and a resumed run must
    # score as the first session did): other work is only pointed out, at the first trial
    spare = spare_threads(started, torch.get_num_threads()) if threads is None and spec.device == "cpu" else None
    hint = None if spare is None or spare.threads >= torch.get_num_threads() else (
        f"{spare.load}: --threads {spare.threads} may search faster (keep one count for a run)")
    progress = trial_bar()
    task = progress.add_task("trials", total=spec.budget, best="-", rate="-", items=0, left="-:--:--")
    shown: dict[str, float] = {}

    def on_step(name: str) -> None:
        err.print(f"[dim]{escape(name)}[/]")

    def on_trial(p: TrialProgress) -> None:
        if p.evaluated == 1:
            shown["since"] = time.perf_counter()
        minutes = (time.perf_counter() - shown.get("since", time.perf_counter())) / 60
        per_minute = (p.evaluated - 1) / minutes if p.evaluated > 1 and minutes > 0 else None
        rate = f"{per_minute:.0f}" if per_minute else "-"
        left = str(timedelta(seconds=round((p.budget - p.done) / per_minute * 60))) if per_minute else "-:--:--"
        best = f"{p.best:.4f}" if p.best is not None else "-"
        items = f"{p.items:,}" + (f" of {spec.budget_items:,}" if spec.budget_items else "")
        progress.update(task, completed=p.done, total=p.budget, best=best, rate=rate, items=items, left=left)
        shown["done"] = p.done
        if p.evaluated and "started" not in shown:  # the first trial scored now: a resumed run's replay is done
            shown["started"] = 1
            if hint is not None:
                err.print(hint, markup=False, highlight=False)
            progress.start()  # only once the search has started: an error before it comes alone

    try:
        return evolve(spec, run_dir, storage=storage, on_step=on_step, on_trial=on_trial,
                      notice=lambda line: err.print(line, markup=False, highlight=False),
                      workers=workers, ray_address=ray_address)
    except KeyboardInterrupt:
        raise Interrupted(f"{_stored(spec, run_dir, int(shown.get('done', 0)))} for {run_dir}; run the same command "
                          "again to continue from them (no trial is scored twice)") from None
    finally:
        progress.stop()


def _stored(spec: SearchSpec, run_dir: Path, shown: int) -> str:
    """What is stored, in words: a one-space run's trials as its storage holds them (the display may lag one
    behind), a hybrid run's each stage's; where a storage cannot be read, the count shown."""
    if spec.space != "hybrid":
        return f"{max(shown, _count(run_dir) or 0)} of {spec.budget} trials are stored"
    ps, dfs = _count(run_dir / "ps"), _count(run_dir / "dfs")
    if ps is None:
        return f"{shown} trials of the current stage are stored"
    return (f"{ps} of {spec.budget} trials of the PS stage and {dfs or 0} of {spec.dfs.budget or spec.budget} of the "
            "DFS stage are stored")


def _count(run_dir: Path) -> int | None:
    """Trials stored for a one-space run (a stage's, a tournament's last search's); None where none can be read."""
    from shoal.search.run_folder import RUN_FILE, read_run, study_storage
    from shoal.search.trials import open_study, stored_trials

    try:
        record = read_run(run_dir) if (run_dir / RUN_FILE).is_file() else None
        storage = None if record is None else study_storage(run_dir, record)
        if record is None or storage is None or record.study is None:
            return None
        return len(stored_trials(open_study(storage, record.search_hash, record.study)))
    except (ShoalError, OSError, ValueError, KeyError):
        return None


@app.command()
def evolve(
    search: Annotated[Path, typer.Argument(help="Search file (YAML): parents, method, genome, tasks, budget.")],
    run_dir: Annotated[Path, typer.Argument(help="Run folder; run again on the same folder to continue.")],
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL or journal file (default: RUN_DIR/study.log).")] = None,
    budget: Annotated[int | None, typer.Option(min=1, help="Trials in all (overrides the search file's).")] = None,
    budget_items: Annotated[int | None, typer.Option(min=1, help="Also end with the first generation by which the "
                                                     "trials have scored this many dev items (overrides the search file's).")] = None,
    budget_tokens: Annotated[int | None, typer.Option(min=1, help="The same in generated tokens.")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch (1 suits tiny models; a busy "
                                                 "machine is pointed out at the first trial).",
                                                 show_default="torch's")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Ray actors scoring each generation in parallel (1: this process).")] = 1,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster (default: start a local one).")] = None,
    memory_limit: Annotated[str | None, typer.Option(
        help="Refuse a search whose memory plan needs more device memory than this, e.g. 24GB (overrides the "
             "search file's memory.limit; default on CUDA: the GPU's free memory).")] = None,
) -> None:
    """Evolve a merge (ps), a layer path (dfs) or both (hybrid) with CMA-ES into RUN_DIR (best/, summary.json)."""
    summary = run_evolve(search, run_dir, storage, budget, threads, workers, ray_address, memory_limit, budget_items,
                         budget_tokens)
    best = summary.best
    console(stderr=True).print(
        f"best trial #{best.trial}: dev {best.dev:.4f}, test {best.test:.4f}; "
        f"model in [bold]{escape(str(run_dir / 'best'))}[/], summary in {escape(str(run_dir / 'summary.json'))}"
    )
