"""The committed reference results match what the code writes now (columns, metrics, files)."""
import json
from pathlib import Path

import pandas as pd
import pytest

from comparison import records
from comparison.reproduce import EXPERIMENTS, TABLE_COLUMNS, load_tables

RESULTS = Path(__file__).resolve().parent.parent / "results"


def test_reference_run_table_has_the_current_schema():
    table = records.load_table(RESULTS / "run")
    assert tuple(table.columns) == records.COLUMNS
    unknown = set(table.metric) - set(records.UNITS) - {m for m in table.metric if m.startswith(("stored_bytes_", "latency_batch"))}
    assert not unknown, f"metrics the code no longer writes: {unknown}"
    assert not (table.metric == records.FAILED_METRIC).any()
    for metric, unit in records.UNITS.items():
        assert set(table.loc[table.metric == metric, "unit"]) <= {unit}
    config = json.loads((RESULTS / "run" / "config.json").read_text())
    assert set(table.run_id) == {config["run_id"]}
    assert set(table.method) == {"dense", "actuallysparse", "nni", "torch-prune"}


def test_reference_run_files():
    for name in ("summary.md", "environment.json", "plots/accuracy_vs_sparsity.png",
                 "plots/stored_bytes_vs_sparsity.png", "plots/training_curves.png"):
        assert (RESULTS / "run" / name).is_file(), name


def test_reference_reproduce_tables_have_the_current_schema():
    table = load_tables(RESULTS / "reproduce")
    assert tuple(table.columns) == TABLE_COLUMNS
    assert set(table.experiment) == set(EXPERIMENTS)
    for name in EXPERIMENTS:
        assert (RESULTS / "reproduce" / "figures" / f"{name}.png").is_file()
    report = (RESULTS / "reproduce" / "REPORT.md").read_text()
    assert report.startswith("# Reproducing the thesis")


def test_results_readme_names_the_commands_that_made_them():
    text = (RESULTS / "README.md").read_text()
    assert "python -m comparison run --out results/run" in text
    assert "python -m comparison reproduce --out results/reproduce" in text


@pytest.mark.parametrize("path", ["run/results.csv", "reproduce/tables/memory.csv"])
def test_reference_numbers_are_measured_not_typed(path):
    frame = pd.read_csv(RESULTS / path, dtype={"git_commit": str})
    # every row carries the commit and versions of the process that measured it
    assert frame.git_commit.notna().all() and (frame.git_commit != "unknown").all()
    assert frame.torch_version.str.startswith("2.").all()
