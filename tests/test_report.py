"""`shoal report RUN_DIR` turns an evolution run folder into plots and a markdown table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest

import shoal.cli.report  # noqa: F401  (registers `shoal report`)
from shoal.report import best_so_far, recipe_matrix, write_report

optuna.logging.set_verbosity(optuna.logging.WARNING)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GENES = ["math.weight.layers0-1", "math.weight.layers2-3", "language.weight.layers0-1", "math.weight.embeddings"]

SUMMARY = {
    "target": "xx-math",
    "method": "dare_ties",
    "best": {
        "trial": 3,
        "dev": 0.41,
        "test": 0.38,
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
    "wall_seconds": 412.3,
    "seconds_per_trial": {"merge": 0.004, "eval": 0.25, "total": 0.27},
}

# (value or None for a failure, generation)
TRIALS = [(0.2, 0), (0.1, 0), (None, 0), (0.41, 1), (0.3, 1), (0.35, 1)]


def make_run(folder: Path, trials=TRIALS, summary: dict | None = SUMMARY, study: str = "evolve") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{folder.resolve()}/study.db"
    created = optuna.create_study(storage=url, study_name=study, direction="maximize")
    distributions = {g: optuna.distributions.FloatDistribution(0.0, 1.0) for g in GENES}
    for i, (value, generation) in enumerate(trials):
        failed = value is None
        created.add_trial(
            optuna.trial.create_trial(
                params={g: (i + k) % 10 / 10 for k, g in enumerate(GENES)},
                distributions=distributions,
                value=None if failed else value,
                state=optuna.trial.TrialState.FAIL if failed else optuna.trial.TrialState.COMPLETE,
                user_attrs={
                    "generation": generation,
                    "dev_scores": {} if failed else {"xx-math": value},
                    "merge_seconds": 0.004,
                    "eval_seconds": 0.25,
                    **({"error": "merge produced NaN in model.layers.1.mlp.up_proj.weight"} if failed else {}),
                },
            )
        )
    (folder / "run.json").write_text(json.dumps({"storage": url, "study": study, "budget": 8}))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
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
    for name, value in {**SUMMARY["parents"], **SUMMARY["untuned"]}.items():
        assert f"{name} | – | {value:.4f} |" in md
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


def test_storage_option_overrides_run_json(run_cli, tmp_path):
    run = make_run(tmp_path / "run")
    moved = tmp_path / "elsewhere.db"
    (run / "study.db").rename(moved)
    code, _, err = run_cli("report", run, "--storage", f"sqlite:///{moved}")
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
    (run / "run.json").write_text(json.dumps({"storage": f"sqlite:///{run}/study.db", "study": "other"}))
    expect_error(run_cli, run, needles=("no study named 'other'", "studies there: evolve"))


def test_study_without_trials_is_an_error(run_cli, tmp_path):
    run = make_run(tmp_path / "run", trials=[], summary=None)
    expect_error(run_cli, run, needles=("has no trials yet",))
    assert not (run / "report").exists()


@pytest.mark.parametrize("summary", ["{not json", json.dumps({"best": {"trial": "first"}})])
def test_broken_summary_is_an_error(run_cli, tmp_path, summary):
    run = make_run(tmp_path / "run", summary=None)
    (run / "summary.json").write_text(summary)
    expect_error(run_cli, run, needles=("summary.json",))
