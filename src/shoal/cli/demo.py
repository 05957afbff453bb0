"""`shoal demo`: the main job on the demo zoo: build the zoo, evolve a merge of its parents, report, print the table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml
from rich.markup import escape
from rich.table import Table

from shoal.cli.app import app
from shoal.cli.evolve import run_evolve
from shoal.cli.progress import console
from shoal.cli.zoo import build_pool_with_progress, build_vlm_with_progress, build_with_progress
from shoal.errors import ShoalError

if TYPE_CHECKING:
    from shoal.search.summary import Summary


VLM_BUDGET = 300  # trials of `shoal demo --vlm` (see docs/zoo-vlm.md)


def demo_search(
    parents: dict[str, Path], base: Path, target: Path, budget: int, seed: int, space: str, *,
    choose_parents: bool = False, tournament: bool = False,
) -> dict:
    """The paper's settings on the zoo. PS: DARE-TIES, a weight and a density per parent and layer (and the
    embeddings); with tournament, a tournament over the pairs of parents (the pool's search), or with choose_parents
    a keep gene per parent (measured to do worse). DFS: a path through 3 repeats of the language then the math
    parent's layers, full W scaling. Hybrid: PS, then DFS with the PS result as A and the math parent as B. Paths are
    absolute: a search file's relative paths are read from its own folder."""
    search: dict = {
        "base": str(base.absolute()),
        "parents": {name: str(path.absolute()) for name, path in parents.items()},
        "space": space,
        "method": "dare_ties",
        "genome": {"layers_per_group": 1, "embeddings": "search"} | ({"choose_parents": True} if choose_parents
                                                                     else {}),
        "tasks": [{"path": str(target.absolute()), "weight": 1.0}],
        "budget": budget,
        "seed": seed,
    } | ({"pool": {"subset": 2}} if tournament else {})
    if space == "dfs":
        search["dfs"] = {"parents": ["language", "math"], "repeats": 3, "scaling": "full"}
    elif space == "hybrid":
        search["dfs"] = {"parents": ["math"], "repeats": 3, "scaling": "full"}
    return search


def results_table(summary: Summary, joint: float | None = None) -> Table:
    from shoal.search.summary import untuned_label

    table = Table(title=escape(f"test split of {summary.target}") + " (the evolved model is the best dev trial)")
    table.add_column("model")
    table.add_column("test", justify="right")
    for name, score in summary.parents.items():
        table.add_row(f"parent: {escape(name)}", f"{100 * score:.1f}")
    for name, score in summary.untuned.items():
        table.add_row(escape(untuned_label(name, summary.space)), f"{100 * score:.1f}")
    if joint is not None:
        table.add_row("fine-tune of the base on both parents' data (joint)", f"{100 * joint:.1f}")
    for name, stage in (summary.stages or {}).items():
        table.add_row(f"{name} stage (best dev {100 * stage.dev:.1f})", f"{100 * stage.test:.1f}")
    best = summary.best
    label = f"evolved, {summary.space} (trial #{best.trial}, dev {100 * best.dev:.1f})"
    table.add_row(f"[bold]{label}", f"[bold]{100 * best.test:.1f}")
    for label, group in (("best parent", summary.parents), ("best untuned merge", summary.untuned)):
        name = max(group, key=lambda n: group[n])
        table.add_row(f"[dim]evolved - {label} ({escape(name)})", f"[dim]{100 * (best.test - group[name]):+.1f}")
    if joint is not None:
        table.add_row("[dim]evolved - joint fine-tune", f"[dim]{100 * (best.test - joint):+.1f}")
    return table


def weight_mass(summary: Summary) -> dict[str, float]:
    """Each parent's mean weight in the best recipe, over its layers (and the embeddings' entry, if searched)."""
    layers = summary.best.layers or {}
    outer = (summary.best.embeddings or {}).get("weight", {})
    mass = {}
    for parent, row in layers.get("weight", {}).items():
        values = [v for v in row if v is not None] + ([outer[parent]] if parent in outer else [])
        mass[parent] = sum(values) / len(values)
    return mass


def weights_table(summary: Summary, roles: dict[str, str]) -> Table:
    """The weight the evolved recipe gives each parent, with the parent's role in the pool."""
    table = Table(title="weight per parent in the evolved recipe (mean over layers)")
    table.add_column("parent")
    table.add_column("role")
    table.add_column("weight", justify="right")
    kept = summary.pool.winner if summary.pool is not None else summary.best.kept
    mass = weight_mass(summary)
    for parent in sorted(roles, key=lambda p: -mass[p] if p in mass and (kept is None or p in kept) else 1):
        shown = f"{mass[parent]:.2f}" if parent in mass and (kept is None or parent in kept) else "left out"
        table.add_row(escape(parent), roles.get(parent, ""), shown)
    return table


def against_measured(summary: Summary, seed: int) -> str:
    """Where this run falls against the pre-registered seeds measured by benchmarks/zoo_seeds.py (shipped as
    shoal/zoo/measured.json): the demo's defaults on the default zoo only."""
    from importlib.resources import files

    measured = json.loads(files("shoal.zoo").joinpath("measured.json").read_text())
    rows = measured["rows"]
    evolved = [r["evolved_test"] for r in rows]
    margins = [r["margin_parent"] for r in rows]
    mine = 100 * summary.best.test
    margin = mine - 100 * max(summary.parents.values())
    inside = min(evolved) <= mine <= max(evolved)
    seeds = ", ".join(str(r["seed"]) for r in rows)
    return (
        f"measured on seeds {seeds} ({measured['machine']}, torch {measured['versions']['torch']}): evolved "
        f"{min(evolved):.1f} to {max(evolved):.1f} on test, {min(margins):+.1f} to {max(margins):+.1f} over the best "
        f"parent; this run (seed {seed}): {mine:.1f}, {margin:+.1f} — {'inside' if inside else 'outside'} that range"
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the search file, the run and its report.")] = Path("demo"),
    budget: Annotated[int | None, typer.Option(min=1, help="Trials of the search (default 1000; --vlm 300).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the zoo and of the search.")] = 0,
    zoo: Annotated[Path | None, typer.Option(help="Folder of the zoo (default: ~/.cache/shoal/zoo[-SIZE][-seedN]).")] = None,
    zoo_size: Annotated[str, typer.Option(help="default, deep (8 narrower layers: room for --space dfs and hybrid), or "
                                          "smoke (seconds; for trying the pipeline).")] = "default",
    space: Annotated[str, typer.Option(help="ps (merge weights), dfs (layer paths) or hybrid (PS then DFS).")] = "ps",
    vlm: Annotated[bool, typer.Option("--vlm", help="EvoVLM: merge the zoo's English captioning VLM with its language "
                                      "parent to caption pictures in XX.")] = False,
    pool: Annotated[bool, typer.Option("--pool", help="Search the whole pool (the math and language parents, one more "
                                       "useful parent and two distractors) as a tournament over its pairs.")] = False,
) -> None:
    """Build the demo zoo, evolve a merge of its math and language parents for XX math (with --pool: of every parent
    of its pool; with --vlm: of its VLM and language parent for XX captions), and report on test."""
    from shoal.evaluate import evaluate, load_task
    from shoal.report import write_report
    from shoal.zoo.build import default_zoo_dir

    err = console(stderr=True)
    if space not in ("ps", "dfs", "hybrid"):
        raise ShoalError(f"--space {space}: choose ps, dfs or hybrid")
    if vlm and pool:
        raise ShoalError("--vlm and --pool are separate demos; choose one")
    if pool and space == "dfs":
        raise ShoalError("--pool is a tournament of merges (--space ps, or hybrid for its PS stage); a layer path "
                         "over the whole pool (--space dfs) is not supported")
    if vlm and space != "ps":
        raise ShoalError(f"--vlm searches merge weights (--space ps); a layer path through a VLM (--space {space}) "
                         "is not supported")
    budget = budget or (VLM_BUDGET if vlm else 1000)
    zoo = zoo or default_zoo_dir(seed, zoo_size)
    err.print(f"[bold]1/3[/] the demo zoo ({escape(zoo_size)}, seed {seed}{', with its VLM part' if vlm else ', with its pool' if pool else ''}) "
                  f"in {escape(str(zoo))}")
    built, _, _ = build_with_progress(zoo, seed, zoo_size)
    if vlm:
        part, _, _ = build_vlm_with_progress(built)
        parents, target, baseline = {"vlm": part.vlm, "language": part.language}, part.target, None
    elif pool:
        every, _, _ = build_pool_with_progress(built)
        parents, target, baseline = every.parents, built.target, built.joint
    else:
        parents, target, baseline = built.parents, built.target, built.joint
    out.mkdir(parents=True, exist_ok=True)
    search = out / "search.yaml"
    spec = demo_search(parents, built.base, target, budget, seed, space, tournament=pool)
    search.write_text(yaml.safe_dump(spec, sort_keys=False))
    err.print(f"[bold]2/3[/] evolving ({escape(str(search))}) into {escape(str(out / 'run'))}; run again to continue after an interruption")
    summary = run_evolve(search, out / "run", storage=None, budget=None, threads=1)
    err.print(f"[bold]3/3[/] report in {escape(str(out / 'run' / 'report'))}")
    written = write_report(out / "run")
    joint = evaluate(baseline, load_task(target), split="test").score if baseline else None
    console().print(results_table(summary, joint))
    if pool:  # a hybrid's weights are its PS stage's (its best is a layer path)
        from shoal.search.run_folder import read_summary

        weighted = read_summary(out / "run" / "ps") if space == "hybrid" else summary
        console().print(weights_table(weighted, every.roles))
    if vlm:
        err.print("the base and the language parent are text models: each is scored with its language model inside "
                      "the VLM's vision tower and projector. Measured on seeds 0-2, the evolved VLM is within a few "
                      "pictures of its parents here: the zoo's tiny base does not share what it sees across its two "
                      "languages (a negative result, docs/zoo-vlm.md)", markup=False)
    elif not pool and zoo_size == "default" and space == "ps" and budget == 1000:
        err.print(against_measured(summary, seed), markup=False)
    err.print(f"best model: [bold]{escape(str(out / 'run' / 'best'))}[/]; report: {escape(str(written[0]))}")
