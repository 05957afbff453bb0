"""`shoal zoo build`: train the demo zoo's base and parents here on CPU, or reuse a built one."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from shoal.cli.app import app
from shoal.cli.progress import bar, console

if TYPE_CHECKING:
    from shoal.zoo.build import Zoo
    from shoal.zoo.pool import PoolZoo
    from shoal.zoo.vlmzoo import VlmZoo

T = TypeVar("T")

zoo_app = typer.Typer(help="The demo zoo: a tiny base model, specialist parents and their tasks.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


def build_with_progress(out: Path, seed: int, size: str, threads: int = 1) -> tuple[Zoo, float, bool]:
    """Build or reuse the zoo with a progress bar per training stage: (zoo, seconds, whether anything was trained)."""
    from shoal.zoo.build import build_zoo

    return _with_progress(lambda report, notice: build_zoo(out, seed=seed, size=size, threads=threads,
                                                           progress=report, notice=notice))


def build_vlm_with_progress(zoo: Zoo, threads: int = 1) -> tuple[VlmZoo, float, bool]:
    """Build or reuse the zoo's VLM part, with a progress bar: (VLM part, seconds, whether anything was trained)."""
    from shoal.zoo.vlmzoo import build_vlm_zoo

    return _with_progress(lambda report, notice: build_vlm_zoo(zoo, threads=threads, progress=report, notice=notice))


def build_pool_with_progress(zoo: Zoo, threads: int = 1) -> tuple[PoolZoo, float, bool]:
    """Build or reuse the zoo's pool, with a progress bar per parent: (pool, seconds, whether anything was trained)."""
    from shoal.zoo.pool import build_pool

    return _with_progress(lambda report, notice: build_pool(zoo, threads=threads, progress=report, notice=notice))


def _with_progress(build: Callable[[Callable, Callable], T]) -> tuple[T, float, bool]:
    start = time.perf_counter()
    err = console(stderr=True)
    with bar() as progress:
        stages: dict[str, int] = {}

        def report(stage: str, step: int, total: int) -> None:
            if stage not in stages:
                stages[stage] = progress.add_task(f"training {stage}", total=total)
            progress.update(stages[stage], completed=step)

        built = build(report, lambda reason: err.print(reason, markup=False, highlight=False))
    return built, time.perf_counter() - start, bool(stages)


@zoo_app.command()
def build(
    out: Annotated[Path | None, typer.Option(help="Folder of the zoo (default: ~/.cache/shoal/zoo[-SIZE][-seedN]).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and data order.")] = 0,
    size: Annotated[str, typer.Option(help="default (the demo), deep (8 narrower layers, for layer paths) or smoke "
                                      "(tiny, for tests).")] = "default",
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for training (more than 1 pays only on an idle machine).")] = 1,
    vlm: Annotated[bool, typer.Option("--vlm", help="Also the VLM part: a LLaVA captioner on the base, caption tasks.")] = False,
    pool: Annotated[bool, typer.Option("--pool", help="Also the pool: one more useful parent and two distractors.")] = False,
) -> None:
    """Build the base model, the math and language parents, the joint fine-tune and the tasks (with --vlm also a
    vision-language parent and the caption tasks; with --pool three more parents); a second call reuses them (after
    checking every file against the sizes and hashes zoo.json, vlm.json and pool.json recorded)."""
    from shoal.zoo.build import default_zoo_dir  # torch and transformers load only when needed

    zoo, seconds, trained = build_with_progress(out or default_zoo_dir(seed, size), seed, size, threads)
    part = None
    if vlm:
        part, vlm_seconds, vlm_trained = build_vlm_with_progress(zoo, threads)
        seconds, trained = seconds + vlm_seconds, trained or vlm_trained
    extra = None
    if pool:
        extra, pool_seconds, pool_trained = build_pool_with_progress(zoo, threads)
        seconds, trained = seconds + pool_seconds, trained or pool_trained
    table = Table(title=f"shoal zoo ({zoo.size}, seed {zoo.seed})")
    table.add_column("what")
    table.add_column("name")
    table.add_column("path")
    table.add_row("base", "base", escape(str(zoo.base)))
    for name, path in zoo.parents.items():
        table.add_row(f"parent ({zoo.skills[name]})", name, escape(str(path)))
    table.add_row("baseline (joint fine-tune)", escape(zoo.joint.name), escape(str(zoo.joint)))
    for name, path in zoo.tasks.items():
        table.add_row(f"task ({zoo.roles[name]})", name, escape(str(path)))
    if extra:
        for name in [n for n in extra.parents if n not in zoo.parents]:
            table.add_row(f"pool parent, {extra.roles[name]} ({extra.skills[name]})", name, escape(str(extra.parents[name])))
    if part:
        table.add_row(f"VLM parent ({part.skills[part.vlm.name]})", part.vlm.name, escape(str(part.vlm)))
        for name, path in part.tasks.items():
            table.add_row(f"task ({part.roles[name]}, images)", name, escape(str(path)))
    console().print(table)
    how = f"built in {seconds:.0f} s" if trained else "already built with these settings; reused"
    console(stderr=True).print(f"zoo at [bold]{escape(str(zoo.root))}[/]: {how}")
