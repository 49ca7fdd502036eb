"""Plots and the summary are drawn from a saved table alone."""

import pandas as pd
import pytest

from comparison import records
from comparison.cli import main
from comparison.plots import plot_all
from comparison.records import Cell, make_row
from comparison.summary import final_values, seed_stats, summary_markdown

ENV = {"run_id": "r1", "dataset": "digits", "device": "cpu", "device_name": "test cpu", "threads": 2,
       "torch_version": "2.x", "nni_version": "3.0", "git_commit": "unknown"}
MIB = 1024 * 1024


def synthetic_rows():
    """Two seeds, dense plus two pruning methods at two targets, two steps; values known in advance."""
    rows = []
    cells = [Cell("dense", 0.0, seed) for seed in (0, 1)]
    cells += [Cell(m, t, seed) for m in ("actuallysparse", "nni") for t in (0.9, 0.99) for seed in (0, 1)]
    for cell in cells:
        for step in (0, 1, 2):
            sparse = cell.method == "actuallysparse"
            size = (1 - cell.target_sparsity) * 8 * MIB if sparse else (3 if cell.method == "nni" else 1) * 4 * MIB
            values = {
                "test_accuracy": 0.9 - cell.target_sparsity / 10 + 0.01 * cell.seed - 0.001 * step,
                "achieved_sparsity": cell.target_sparsity * step / 2,
                "stored_bytes": size, "pruned_layers_bytes": size / 2, "optimizer_state_bytes": size,
                "checkpoint_bytes": size, "model_rss_bytes": size,
                "latency_batch1_ms": 1.0 + cell.seed, "latency_batch64_ms": 10.0, "train_step_ms": 5.0,
            }
            if step:
                values["train_loss"] = 1.0 / step
            rows += [make_row(cell, step, metric, value, records.UNITS.get(metric, "ms"), "", ENV)
                     for metric, value in values.items()]
    return rows


@pytest.fixture
def saved_table(tmp_path):
    records.write_rows(tmp_path / records.RESULTS_FILE, synthetic_rows())
    return tmp_path


def test_final_values_and_seed_stats():
    table = pd.DataFrame(synthetic_rows())
    final = final_values(table)
    assert set(final["step"]) == {2}
    stats = seed_stats(final, "test_accuracy")
    row = stats[(stats["method"] == "nni") & (stats["target_sparsity"] == 0.9)].iloc[0]
    assert row["mean"] == pytest.approx(0.9 - 0.09 + 0.005 - 0.002)
    assert row["std"] == pytest.approx(pd.Series([0.0, 0.01]).std())
    assert row["n"] == 2


def test_summary_puts_methods_beside_dense_at_each_sparsity():
    text = summary_markdown(pd.DataFrame(synthetic_rows()))
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert "latency b64 ms" in lines[0] and "accuracy" in lines[0]
    assert sum(line.startswith("| (reference) | dense") for line in lines) == 2
    sparse_99 = next(line for line in lines if line.startswith("| 0.99 | actuallysparse"))
    # mean ± std over the two seeds; 0.01 * 8 MiB / 2 = 0.04 MiB for the pruned layers
    assert "0.8040 ± 0.0071" in sparse_99 and "| 0.04 ± 0.00 |" in sparse_99


def test_summary_lists_failed_cells():
    rows = synthetic_rows()
    rows.append(make_row(Cell("nni", 0.99, 1), 1, records.FAILED_METRIC, 1, "flag", "ValueError: bad", ENV))
    text = summary_markdown(pd.DataFrame(rows))
    assert "Failed cells:" in text and "nni @ 0.99, seed 1, step 1: ValueError: bad" in text


def test_plot_all_from_a_saved_table(saved_table):
    table = records.load_table(saved_table)
    paths = plot_all(table, saved_table / "plots")
    names = {p.name for p in paths}
    assert names == {"accuracy_vs_sparsity.png", "latency_vs_sparsity.png", "stored_bytes_vs_sparsity.png",
                     "accuracy_vs_bytes.png", "training_curves.png"}
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_command_redraws_from_a_directory(saved_table, capsys):
    assert main(["plot", str(saved_table)]) == 0
    output = capsys.readouterr().out
    assert "| 0.9 | nni |" in output
    assert len(list((saved_table / "plots").glob("*.png"))) == 5


def test_plot_command_on_a_missing_directory_fails_clearly(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no results" in capsys.readouterr().err


def test_plots_skip_what_the_table_lacks(tmp_path):
    only_dense = [row for row in synthetic_rows() if row["method"] == "dense" and row["metric"] == "test_accuracy"]
    paths = plot_all(pd.DataFrame(only_dense), tmp_path)
    assert {p.name for p in paths} == {"accuracy_vs_sparsity.png", "training_curves.png"}
