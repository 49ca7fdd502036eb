"""The committed reference results match what the code writes now (schema, metrics, files, checks)."""
import json
from pathlib import Path

import pytest

from comparison import records
from comparison.reproduce import EXPERIMENTS, load_tables

RESULTS = Path(__file__).resolve().parent.parent / "results"
RUN_DIRS = ([RESULTS / name for name in ("run", "run-scope-all", "dynamic", "backends/native", "backends/torch")]
            + [RESULTS / "reproduce" / name for name in EXPERIMENTS])


def _quiet(text):
    raise AssertionError(f"the committed results raised a warning: {text}")


@pytest.mark.parametrize("directory", RUN_DIRS, ids=lambda p: str(p.relative_to(RESULTS)))
def test_committed_run_directories_verify_and_have_the_current_schema(directory):
    for cell in (directory / records.CELLS_DIR).glob("*.csv"):
        assert records.cell_problem(cell) is None
    table = records.load_table(directory, echo=_quiet)
    assert tuple(table.columns) == records.COLUMNS
    known = set(records.UNITS)
    unknown = {m for m in table.metric if m not in known and not m.startswith(("stored_bytes_", "latency_batch"))}
    assert not unknown, f"metrics the code no longer writes: {unknown}"
    assert not (table.metric == records.FAILED_METRIC).any()
    for metric, unit in records.UNITS.items():
        assert set(table.loc[table.metric == metric, "unit"]) <= {unit}
    config = json.loads((directory / "config.json").read_text())
    assert set(table.run_id) == {config["run_id"]}
    assert set(table.experiment) == {config["config"]["experiment"]}


def test_reference_run_files():
    for name in ("summary.md", "environment.json", "plots/accuracy_vs_sparsity.png",
                 "plots/stored_bytes_vs_sparsity.png", "plots/training_curves.png"):
        assert (RESULTS / "run" / name).is_file(), name
    from comparison.config import DEFAULT_METHODS

    assert set(records.load_table(RESULTS / "run", echo=_quiet).method) == set(DEFAULT_METHODS)


def test_reference_run_shows_what_readme_says_of_it():
    """The committed default run: magnitude pruning keeps dense's accuracy at 0.9 with a low loss,
    random pruning falls apart at 0.98, and only actually-sparse is faster than dense."""
    from comparison.summary import final_values, seed_stats

    final = final_values(records.load_table(RESULTS / "run", echo=_quiet))
    accuracy = seed_stats(final, "test_accuracy").set_index(["method", "target_sparsity"])
    loss = seed_stats(final, "test_loss").set_index(["method", "target_sparsity"])
    dense = accuracy.loc[("dense", 0.0), "mean"]
    for method in ("actuallysparse", "nni", "torch-prune"):
        assert accuracy.loc[(method, 0.9), "mean"] >= dense - 0.015, method
        assert loss.loc[(method, 0.9), "mean"] < 0.3, method
    random, magnitude = accuracy.loc[("random", 0.98)], accuracy.loc[("actuallysparse", 0.98)]
    assert random["mean"] + random["half_width"] < magnitude["mean"] - magnitude["half_width"]
    speed = seed_stats(final, "measured_speedup_train_step").set_index(["method", "target_sparsity"])["mean"]
    assert speed[("actuallysparse", 0.9)] > 1 > speed[("nni", 0.9)]


def test_reference_reproduction_has_every_experiment_and_figure():
    table = load_tables(RESULTS / "reproduce", echo=_quiet)
    assert set(table.experiment) == set(EXPERIMENTS)
    for name in ("baselines", "memory", "latency", "loops"):
        assert (RESULTS / "reproduce" / "figures" / f"{name}.png").is_file()
    report = (RESULTS / "reproduce" / "REPORT.md").read_text()
    assert report.startswith("# Reproducing the thesis")


def test_results_readme_names_the_commands_that_made_them():
    text = (RESULTS / "README.md").read_text()
    assert "python -m comparison run --out results/run" in text
    assert "python -m comparison reproduce --out results/reproduce" in text


@pytest.mark.parametrize("directory", RUN_DIRS, ids=lambda p: str(p.relative_to(RESULTS)))
def test_reference_numbers_are_measured_not_typed(directory):
    table = records.load_table(directory, echo=_quiet)
    # every row carries the commit and versions of the process that measured it
    assert table.git_commit.notna().all() and (table.git_commit != "unknown").all()
    assert table.torch_version.str.startswith("2.").all()
