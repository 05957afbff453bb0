"""`shoal report RUN_DIR` turns an evolution run folder into plots and a markdown table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from conftest import zoo_search

import shoal.cli.report  # noqa: F401  (registers `shoal report`)

from shoal.report import (
    PathBox,
    best_so_far,
    load_run,
    path_boxes,
    path_line,
    plot_path,
    recipe_matrix,
    write_report,
)
from shoal.search.run_folder import RunRecord, read_summary, write_summary
from shoal.search.storage import default_storage, open_storage
from shoal.search.summary import Summary
from shoal.search.trials import (
    ABANDONED,
    STUDY_NAME,
    Evaluation,
    Job,
    finished_trial,
    job_trial,
    open_study,
    stored_trials,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GENES = ["math.weight.layers0-1", "math.weight.layers2-3", "language.weight.layers0-1", "math.weight.embeddings"]

SUMMARY = {
    "target": "xx-math",
    "method": "dare_ties",
    "space": "ps",
    "best": {
        "trial": 3,
        "dev": 0.41,
        "test": 0.38,
        "dev_scores": {"xx-math": 0.41},
        "test_scores": {"xx-math": 0.38},
        "recipe": {"merge_method": "dare_ties"},
        "layers": {
            "weight": {"math": [0.1, 0.5, 0.7, 0.2], "language": [0.9, 0.8, 0.3, 0.4]},
            "density": {"math": [0.6, 0.6, 0.5, 0.5], "language": [0.2, 0.3, 0.4, 0.45]},
        },
        "embeddings": {"weight": {"math": 0.3, "language": 0.6}, "density": {"math": 0.7, "language": 0.75}},
    },
    "parents": {"base": 0.15, "math": 0.03, "language": 0.09},
    "untuned": {"linear": 0.18, "task_arithmetic": 0.01, "ties": 0.05, "dare_ties": 0.01, "start": 0.2},
    "trials": 6,
    "failed_trials": 1,
    "budget": 8,
    "genes": 4,
    "population": 3,
    "seconds_per_trial": {"merge": 0.004, "merge_compute": 0.004, "eval": 0.25, "total": 0.27},
    "threads": 1,
    "wall_seconds": 412.3,
    "sessions": 1,
}

# (value or None for a failure, generation), in the order of their index in the search
TRIALS = [(0.2, 0), (0.1, 0), (None, 0), (0.41, 1), (0.3, 1), (0.35, 1)]
FAILURE = "merge produced NaN in model.layers.1.mlp.up_proj.weight"


def store_trials(storage: str, study: str, trials, genes: list[str] = GENES, running: int = 0) -> None:
    """Store `trials` with the search's own trial writer; `running` more trials are claimed and not finished."""
    created = open_study(storage, "hash", study)
    distributions = {g: FloatDistribution(0.0, 1.0) for g in genes}
    job = lambda i: Job(i, trials[i][1] if i < len(trials) else 9, {g: (i + k) % 10 / 10 for k, g in enumerate(genes)}, i)
    for i in range(len(trials)):
        value = trials[i][0]
        outcome = FAILURE if value is None else Evaluation(value, {"xx-math": value}, 0.004, 0.25)
        created.add_trial(finished_trial(job(i), outcome, distributions))
    for i in range(len(trials), len(trials) + running):
        created.add_trial(job_trial(job(i), distributions, TrialState.RUNNING))


def make_run(
    folder: Path,
    trials=TRIALS,
    summary: dict | None = SUMMARY,
    study: str = STUDY_NAME,
    space: str = "ps",
    genes: list[str] = GENES,
    running: int = 0,
) -> Path:
    """A run folder as `shoal evolve` leaves it, its trials stored by the search's own trial writer."""
    folder.mkdir(parents=True, exist_ok=True)
    storage = default_storage(folder)
    store_trials(storage, study, trials, genes, running=running)
    RunRecord(space=space, target="xx-math", method="dare_ties", search_hash="hash", storage=storage,
              study=study).write(folder)
    if summary is not None:
        write_summary(folder, Summary.model_validate(summary))
    return folder


def hybrid_record(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    RunRecord(space="hybrid", target="xx-math", method="dare_ties", search_hash="hash", stages=["ps", "dfs"]).write(folder)


def edit_run_json(folder: Path, **changes: object) -> Path:
    record = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps(record | changes))
    return folder


def assert_png(path: Path, min_side: int = 200) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, channels = matplotlib.image.imread(path).shape
    assert height >= min_side and width >= min_side and channels in (3, 4)


def test_best_so_far_carries_the_best_over_failures():
    assert best_so_far([None, 0.2, 0.1, None, 0.5, 0.4, None, 0.6]) == [None, 0.2, 0.2, 0.2, 0.5, 0.5, 0.5, 0.6]
    assert best_so_far([]) == []
    assert best_so_far([None, None]) == [None, None]
    assert best_so_far([-1.0, -2.0, -0.5]) == [-1.0, -1.0, -0.5]


def test_recipe_matrix_puts_each_value_in_its_row_and_column():
    m = recipe_matrix(SUMMARY["best"]["layers"], SUMMARY["best"]["embeddings"])
    assert m.rows == [("weight", "math"), ("weight", "language"), ("density", "math"), ("density", "language")]
    assert m.columns == ["0", "1", "2", "3", "emb"]
    assert m.values[0] == [0.1, 0.5, 0.7, 0.2, 0.3]
    assert m.values[1] == [0.9, 0.8, 0.3, 0.4, 0.6]
    assert m.values[2][2] == 0.5 and m.values[3][1] == 0.3
    assert m.values[3][4] == 0.75


def test_recipe_matrix_without_embeddings_has_no_emb_column():
    m = recipe_matrix({"weight": {"a": [1.0, 2.0]}}, None)
    assert m.columns == ["0", "1"]
    assert m.values == [[1.0, 2.0]]


def test_recipe_matrix_leaves_cells_without_a_value_blank():
    layers = {"weight (attn)": {"a": [0.1, 0.2, 0.3]}, "weight (mlp)": {"a": [0.4, None, 0.6], "b": [0.7]}}
    m = recipe_matrix(layers, {"weight": {"a": 0.9}})
    assert m.rows == [("weight (attn)", "a"), ("weight (mlp)", "a"), ("weight (mlp)", "b"), ("weight", "a")]
    assert m.columns == ["0", "1", "2", "emb"]
    assert math.isnan(m.values[0][3]) and math.isnan(m.values[1][1])
    assert m.values[2][0] == 0.7 and all(math.isnan(v) for v in m.values[2][1:])
    assert all(math.isnan(v) for v in m.values[3][:3]) and m.values[3][3] == 0.9


def test_finished_run_writes_both_plots_and_the_test_table(run_cli, tmp_path):
    run = make_run(tmp_path / "run")
    code, out, err = run_cli("report", run)
    assert code == 0, err
    report = run / "report"
    written = [Path(line) for line in out.strip().splitlines()]
    assert written == [report / "report.md", report / "fitness.png", report / "recipe.png"]
    assert_png(report / "fitness.png")
    assert_png(report / "recipe.png")

    md = (report / "report.md").read_text()
    assert "xx-math" in md and "dare_ties" in md
    for name, value in SUMMARY["parents"].items():
        assert f"| parent: {name} | – | {value:.4f} |" in md
    assert "| untuned merge: ties | – | 0.0500 |" in md and "| untuned merge: linear | – | 0.1800 |" in md
    assert "| search's start (every gene mid-range) | – | 0.2000 |" in md and "untuned merge: start" not in md
    assert "evolved (best dev trial #3)** | **0.4100** | **0.3800** |" in md
    best_parent = max(SUMMARY["parents"].items(), key=lambda kv: kv[1])
    best_untuned = max(SUMMARY["untuned"].items(), key=lambda kv: kv[1])
    assert best_parent == ("base", 0.15) and best_untuned == ("start", 0.2)
    assert f"best parent (base, 0.1500): **{0.38 - 0.15:+.4f}**" in md
    assert f"best untuned merge (start, 0.2000): **{0.38 - 0.2:+.4f}**" in md
    assert "+0.2300" in md and "+0.1800" in md
    assert "6 done (1 failed), budget 8" in md
    assert "412.3 s (6 min 52 s)" in md
    assert "merge 0.004 s, eval 0.25 s, total 0.27 s" in md
    assert "trial #2: merge produced NaN" in md
    assert "](fitness.png)" in md and "](recipe.png)" in md


def test_unfinished_run_says_so_and_gives_the_best_so_far(tmp_path):
    run = make_run(tmp_path / "run", trials=[(0.2, 0), (None, 0), (0.33, 0), (0.1, 1)], summary=None)
    written = write_report(run)
    report = run / "report"
    assert written == [report / "report.md", report / "fitness.png"]
    assert not (report / "recipe.png").exists()
    assert_png(report / "fitness.png")
    md = (report / "report.md").read_text()
    assert "has not finished" in md
    assert "trials so far: 4 finished (1 failed)" in md
    assert "best dev fitness so far: 0.3300 (trial #2)" in md
    assert "](fitness.png)" in md and "recipe.png" not in md


def test_report_counts_and_numbers_trials_as_the_search_does(tmp_path):
    """Trials stored out of order with a claim abandoned by a dead process (what a shared study or a Ray run
    leaves): the report sees the trials the search sees, numbered by their index in the search."""
    run = make_run(tmp_path / "run", trials=[], summary=None)
    study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(default_storage(run)))
    distributions = {g: FloatDistribution(0.0, 1.0) for g in GENES}
    job = lambda i: Job(i, i // 2, {g: i / 10 for g in GENES}, i)
    scored = lambda i, value: finished_trial(job(i), Evaluation(value, {"xx-math": value}, 0.0, 0.0), distributions)
    study.add_trial(scored(1, 0.5))
    study.add_trial(job_trial(job(3), distributions, TrialState.FAIL, attrs={ABANDONED: True}))  # its process died
    study.add_trial(scored(0, 0.2))
    study.add_trial(scored(3, 0.1))  # scored by another process
    study.add_trial(scored(2, 0.3))
    loaded = load_run(run)
    assert [(t.index, t.value) for t in loaded.trials] == [(0, 0.2), (1, 0.5), (2, 0.3), (3, 0.1)]
    assert loaded.trials == sorted(stored_trials(study).values(), key=lambda t: t.index)
    md = write_report(run)[0].read_text()
    assert "trials so far: 4 finished (0 failed)" in md
    assert "best dev fitness so far: 0.5000 (trial #1)" in md


@pytest.mark.usefixtures("one_torch_thread")
def test_report_of_a_run_shoal_evolve_made_agrees_with_its_summary(zoo, run_cli, tmp_path):
    code, _, err = run_cli("evolve", zoo_search(zoo, tmp_path, budget=4, seed=0), tmp_path / "run", "--threads", "1")
    assert code == 0, err
    run = tmp_path / "run"
    summary = read_summary(run)
    code, _, err = run_cli("report", run)
    assert code == 0, err
    md = (run / "report" / "report.md").read_text()
    best = summary.best
    assert f"evolved (best dev trial #{best.trial})** | **{best.dev:.4f}** | **{best.test:.4f}** |" in md
    assert f"- trials: 4 done ({summary.failed_trials} failed), budget 4" in md
    assert summary.compute is not None and f"- compute: {summary.compute.items:,} dev items scored" in md
    assert "- fitness: full" in md and "- final model: the best on the whole dev split of the top 5 trials" in md
    assert f"- picked trial #{best.trial}: search fitness {best.search:.4f}, whole dev {best.dev:.4f}" in md
    assert "](compute.png)" in md
    assert_png(run / "report" / "compute.png")
    trials = load_run(run).trials
    assert [t.index for t in trials] == [0, 1, 2, 3]
    assert max((t for t in trials if not t.failed), key=lambda t: (t.value, -t.index)).index == best.trial


@pytest.mark.usefixtures("one_torch_thread")
def test_a_moved_run_folder_reports_from_its_own_journal_where_it_is_now(zoo, run_cli, tmp_path):
    code, _, err = run_cli("evolve", zoo_search(zoo, tmp_path, budget=3, seed=0), tmp_path / "run", "--threads", "1")
    assert code == 0, err
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    code, _, err = run_cli("report", moved)
    assert code == 0, err
    assert [t.index for t in load_run(moved).trials] == [0, 1, 2]
    assert not (tmp_path / "run").exists()  # nothing was made at the old place


def test_a_moved_run_folder_with_a_named_storage_reads_that_storage(run_cli, tmp_path):
    run = make_run(tmp_path / "run")
    named = tmp_path / "shared.log"
    (run / "study.log").rename(named)  # the trials live in a storage the user named, outside the folder
    edit_run_json(run, storage=str(named), default_storage=False)
    run.rename(tmp_path / "moved")
    trials = load_run(tmp_path / "moved").trials
    assert len(trials) == len(TRIALS) and trials == load_run(tmp_path / "moved", str(named)).trials
    code, _, err = run_cli("report", tmp_path / "moved")
    assert code == 0, err


def test_storage_option_overrides_run_json(run_cli, tmp_path):
    run = make_run(tmp_path / "run")
    moved = tmp_path / "elsewhere.log"
    (run / "study.log").rename(moved)
    code, _, err = run_cli("report", run, "--storage", str(moved))
    assert code == 0, err
    assert (run / "report" / "recipe.png").exists()


def expect_error(run_cli, *args, needles: tuple[str, ...]) -> None:
    code, _, err = run_cli("report", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], err


def test_missing_run_folder_is_an_error(run_cli, tmp_path):
    expect_error(run_cli, tmp_path / "nope", needles=("nope", "does not exist"))


def test_folder_without_run_json_is_an_error(run_cli, tmp_path):
    expect_error(run_cli, tmp_path, needles=("is not a `shoal evolve` run folder (no run.json)",))


def test_unopenable_storage_is_an_error(run_cli, tmp_path):
    run = make_run(tmp_path / "run")
    expect_error(run_cli, run, "--storage", f"sqlite:///{tmp_path}/missing.db", needles=("cannot open", "missing.db"))
    (tmp_path / "garbage.db").write_text("not a database")
    expect_error(run_cli, run, "--storage", f"sqlite:///{tmp_path}/garbage.db", needles=("cannot open", "garbage.db"))
    assert not (tmp_path / "missing.db").exists()


def test_unknown_study_name_is_an_error(run_cli, tmp_path):
    run = make_run(tmp_path / "run")
    edit_run_json(run, study="other")
    expect_error(run_cli, run, needles=("no study named 'other'", "studies there: shoal"))


def test_study_without_trials_is_an_error(run_cli, tmp_path):
    run = make_run(tmp_path / "run", trials=[], summary=None)
    expect_error(run_cli, run, needles=("has no trials yet",))
    assert not (run / "report").exists()


@pytest.mark.parametrize("summary", ["{not json", json.dumps({"best": {"trial": "first"}})])
def test_broken_summary_is_an_error(run_cli, tmp_path, summary):
    run = make_run(tmp_path / "run", summary=None)
    (run / "summary.json").write_text(summary)
    expect_error(run_cli, run, needles=("summary.json",))



# ---- data-flow space (dfs) and hybrid runs ----

DFS_GENES = ["slot000.language.layer0", "slot001.math.layer2", "scale.language.1->math.2", "scale.language->math"]
PATH = [
    {"parent": "language", "layer": 0, "scale": 1.0},
    {"parent": "language", "layer": 1, "scale": 1.0},
    {"parent": "math", "layer": 2, "scale": 0.87},
    {"parent": "math", "layer": 3, "scale": 1.2345},
    {"parent": "language", "layer": 3, "scale": 1.0},
]
PATH_LINE = "language L0 → language L1 → math L2 ×0.87 → math L3 ×1.23 → language L3"


def dfs_summary(path=PATH, parents_order=("language", "math"), **best) -> dict:
    return {
        **SUMMARY,
        "space": "dfs",
        "method": "dfs",
        "best": {"trial": 4, "dev": 0.45, "test": 0.4, "dev_scores": {"xx-math": 0.45},
                 "test_scores": {"xx-math": 0.4}, "path": path, "parents_order": list(parents_order), "slots": 16,
                 **best},
    }


def steps(n: int) -> list[dict]:
    return [{"parent": ("a", "b", "c")[i % 3], "layer": i, "scale": 1.0 if i % 2 else 0.5 + i / 100} for i in range(n)]


def test_path_boxes_go_from_the_embeddings_through_each_step_to_the_head():
    boxes = path_boxes(PATH, ["language", "math"])
    assert boxes == [
        PathBox(0, 0, "embeddings", "language", "emb", ""),
        PathBox(0, 1, "layer", "language", "L0", ""),
        PathBox(0, 2, "layer", "language", "L1", ""),
        PathBox(0, 3, "layer", "math", "L2", "×0.87"),
        PathBox(0, 4, "layer", "math", "L3", "×1.23"),
        PathBox(0, 5, "layer", "language", "L3", ""),
        PathBox(0, 6, "head", "language", "head", ""),
    ]


def test_path_boxes_of_an_empty_path_are_the_embeddings_then_the_head():
    assert path_boxes([], ["ps", "math"]) == [PathBox(0, 0, "embeddings", "ps", "emb", ""),
                                               PathBox(0, 1, "head", "ps", "head", "")]
    assert [b.parent for b in path_boxes([], None)] == [None, None]  # no parent A known


def test_path_boxes_keep_24_steps_on_one_row_and_wrap_longer_paths_evenly():
    assert {b.row for b in path_boxes(steps(24), ["a"])} == {0}
    assert [b.column for b in path_boxes(steps(24), ["a"])] == list(range(26))

    boxes = path_boxes(steps(25), ["a"])  # 27 boxes: two rows of 14 and 13
    assert [(b.row, b.column) for b in boxes] == [divmod(i, 14) for i in range(27)]

    path = steps(60)
    boxes = path_boxes(path, ["a", "b", "c"])  # 62 boxes: three rows of 21, 21, 20
    assert [(b.row, b.column) for b in boxes] == [divmod(i, 21) for i in range(62)]
    assert boxes[0].kind == "embeddings" and boxes[-1].kind == "head" and boxes[-1].parent == "a"
    for box, step in zip(boxes[1:-1], path):  # every step, in path order, in its own box
        assert (box.kind, box.parent, box.label) == ("layer", step["parent"], f"L{step['layer']}")
        assert box.scale_text == ("" if step["scale"] == 1.0 else f"×{step['scale']:.2f}")
    assert boxes[3].scale_text == "×0.52" and boxes[2].scale_text == ""


def test_dfs_run_draws_its_path_and_lists_it_in_one_line(run_cli, tmp_path):
    run = make_run(tmp_path / "run", summary=dfs_summary(), space="dfs", genes=DFS_GENES)
    code, out, err = run_cli("report", run)
    assert code == 0, err
    report = run / "report"
    assert [Path(line) for line in out.strip().splitlines()] == [report / "report.md", report / "fitness.png",
                                                                 report / "path.png"]
    assert not (report / "recipe.png").exists()  # a dfs summary has no layers table
    assert_png(report / "path.png")
    md = (report / "report.md").read_text()
    assert "# shoal evolve report: xx-math · dfs · dfs" in md
    assert "5 steps, embeddings and head from language:" in md
    assert f"\n{PATH_LINE}\n" in md
    assert "](path.png)" in md and "](fitness.png)" in md
    assert "evolved (best dev trial #4)** | **0.4500** | **0.4000** |" in md
    assert "| search's start (parent A's layers, scales at 1) | – | 0.2000 |" in md  # DFS starts on A's own path


def test_dfs_run_with_an_empty_or_long_path_still_draws_it(tmp_path):
    empty = make_run(tmp_path / "empty", summary=dfs_summary(path=[]), space="dfs", genes=DFS_GENES)
    write_report(empty)
    assert_png(empty / "report" / "path.png", min_side=150)
    assert "0 steps, embeddings and head from language:\n\n(no layers:" in (empty / "report" / "report.md").read_text()

    import matplotlib.image

    long = plot_path(tmp_path / "long.png", steps(60), ["a", "b", "c"], title="long")
    height, width, _ = matplotlib.image.imread(long).shape
    assert 1000 < width < 2500 and height > 300  # three rows of 21, not one row 62 boxes wide
    assert path_line(steps(60)).startswith("a L0 ×0.50 → b L1 → c L2 ×0.52 → a L3 → ")
    assert path_line(steps(60)).count(" → ") == 59


PS_TEST, FINAL_TEST = 0.38, 0.52


def make_hybrid(folder: Path, dfs: str = "finished") -> Path:
    """A hybrid run folder; `dfs` is "finished", "running", "no trials" or "absent" (then no top summary)."""
    make_run(folder / "ps", summary=SUMMARY, study="shoal-ps", space="ps")
    order = ("ps", "math", "language")
    final = dfs_summary(path=[{"parent": "ps", "layer": 0, "scale": 1.0}, {"parent": "math", "layer": 1, "scale": 0.9}],
                        parents_order=order, test=FINAL_TEST, dev=0.5, trial=5)
    if dfs == "finished":
        make_run(folder / "dfs", summary=final, study="shoal-dfs", space="dfs", genes=DFS_GENES)
    elif dfs == "running":
        make_run(folder / "dfs", trials=[(0.3, 0), (None, 0), (0.44, 0)], summary=None, study="shoal-dfs",
                 space="dfs", genes=DFS_GENES, running=2)
    elif dfs == "no trials":
        make_run(folder / "dfs", trials=[], summary=None, study="shoal-dfs", space="dfs", running=1)
    hybrid_record(folder)
    if dfs == "finished":
        top = {
            **{k: v for k, v in final.items() if k not in ("parents", "untuned")},
            "space": "hybrid",
            "method": "dare_ties",
            "parents": SUMMARY["parents"],
            "untuned": SUMMARY["untuned"],
            "stages": {"ps": {"dev": 0.41, "test": PS_TEST, "trials": 6, "best_trial": 3},
                       "dfs": {"dev": 0.5, "test": FINAL_TEST, "trials": 6, "best_trial": 5}},
            "trials": 12, "failed_trials": 2, "budget": 16, "wall_seconds": 100.0,
        }
        write_summary(folder, Summary.model_validate(top))
    return folder


def links(md: str) -> list[str]:
    import re

    return re.findall(r"\]\(([^)]+)\)", md)


def test_hybrid_run_writes_both_stage_reports_and_a_combined_one(run_cli, tmp_path):
    run = make_hybrid(tmp_path / "run")
    code, out, err = run_cli("report", run)
    assert code == 0, err
    ps, dfs, top = run / "ps" / "report", run / "dfs" / "report", run / "report"
    assert [Path(line) for line in out.strip().splitlines()] == [
        ps / "report.md", ps / "fitness.png", ps / "recipe.png",
        dfs / "report.md", dfs / "fitness.png", dfs / "path.png",
        top / "report.md",
    ]
    for png in (ps / "fitness.png", ps / "recipe.png", dfs / "fitness.png", dfs / "path.png"):
        assert_png(png)
    assert "ps L0 → math L1 ×0.90" in (dfs / "report.md").read_text()

    md = (top / "report.md").read_text()
    assert "# shoal evolve report: xx-math · dare_ties · hybrid" in md
    for name, value in SUMMARY["parents"].items():
        assert f"| parent: {name} | – | {value:.4f} |" in md
    assert "| untuned merge: ties | – | 0.0500 |" in md and "| untuned merge: linear | – | 0.1800 |" in md
    assert "| search's start (its PS stage's: every gene mid-range) | – | 0.2000 |" in md and "untuned merge: start" not in md
    assert "| PS stage best (trial #3) | 0.4100 | 0.3800 |" in md
    assert "| **hybrid (PS then DFS) best (trial #5)** | **0.5000** | **0.5200** |" in md
    assert f"over the best parent (base, 0.1500): **{FINAL_TEST - 0.15:+.4f}** on test" in md
    assert f"over the best untuned merge (start, 0.2000): **{FINAL_TEST - 0.2:+.4f}** on test" in md
    assert f"over the PS stage best (0.3800): **{FINAL_TEST - PS_TEST:+.4f}** on test" in md
    assert "+0.3700" in md and "+0.3200" in md and "+0.1400" in md
    assert "\nps L0 → math L1 ×0.90\n" in md
    targets = links(md)
    for expected in ("../ps/report/report.md", "../ps/report/fitness.png", "../ps/report/recipe.png",
                     "../dfs/report/report.md", "../dfs/report/fitness.png", "../dfs/report/path.png"):
        assert expected in targets
    for target in targets:
        assert (top / target).resolve().is_file(), target


@pytest.mark.parametrize(
    ("dfs", "says", "stage_reports"),
    [
        ("running", "stage `dfs` has not finished", ["ps", "dfs"]),
        ("no trials", "stage `dfs` has not finished (no trial is stored yet)", ["ps"]),
        ("absent", "stage `ps` finished; stage `dfs` has not started yet", ["ps"]),
    ],
)
def test_unfinished_hybrid_reports_the_stages_so_far(tmp_path, dfs, says, stage_reports):
    run = make_hybrid(tmp_path / "run", dfs=dfs)
    written = write_report(run)
    assert written[-1] == run / "report" / "report.md"
    assert {p.parent.parent.name for p in written[:-1]} == set(stage_reports)
    assert (run / "dfs" / "report").exists() == ("dfs" in stage_reports)
    md = written[-1].read_text()
    assert f"**The hybrid run has not finished** (no summary.json yet): {says}." in md
    assert "| ps | finished | 6 | #3 | 0.4100 | 0.3800 | [report.md](../ps/report/report.md) |" in md
    if dfs == "running":
        assert "| dfs | unfinished | 3 (1 failed, 2 running) | #2 | 0.4400* | – | [report.md](../dfs/report/report.md) |" in md
        assert "\\* an unfinished stage's best search fitness so far" in md
    else:
        assert "search fitness so far" not in md
    for target in links(md):
        assert (run / "report" / target).resolve().is_file(), target


def test_hybrid_run_with_no_stage_trials_yet_is_an_error(run_cli, tmp_path):
    run = tmp_path / "run"
    make_run(run / "ps", trials=[], summary=None)
    hybrid_record(run)
    expect_error(run_cli, run, needles=("no stage with finished trials yet",))


def test_storage_option_on_a_hybrid_run_is_an_error(run_cli, tmp_path):
    run = tmp_path / "run"
    hybrid_record(run)
    expect_error(run_cli, run, "--storage", "sqlite:///x.db", needles=("hybrid", "--storage"))


def test_unknown_space_is_an_error(run_cli, tmp_path):
    run = edit_run_json(make_run(tmp_path / "run"), space="tensor")
    expect_error(run_cli, run, needles=("run.json is not a valid run record: space:", "'ps', 'dfs' or 'hybrid'"))
    hybrid = make_hybrid(tmp_path / "hybrid")
    edit_run_json(hybrid / "dfs", space="flow")
    expect_error(run_cli, hybrid, needles=("dfs/run.json is not a valid run record: space:",))


def test_summary_space_that_contradicts_run_json_is_an_error(run_cli, tmp_path):
    run = make_run(tmp_path / "run", summary=dfs_summary(), space="ps")
    expect_error(run_cli, run, needles=("summary.json says space 'dfs'", "run.json says 'ps'"))
