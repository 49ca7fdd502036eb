"""Plots and the summary are drawn from a saved table alone."""

import pandas as pd
import pytest

from comparison import records
from comparison.cli import main
from comparison.plots import plot_all
from comparison.records import Cell, make_row
from comparison.summary import final_values, seed_stats, summary_markdown

ENV = {"run_id": "r1", "dataset": "digits", "device": "cpu", "device_name": "test cpu", "threads": 2,
       "torch_version": "2.x", "nni_version": "3.0", "git_commit": "unknown", "host": "testhost"}
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
    # two seeds: t(0.975, 1) = 12.706
    assert row["half_width"] == pytest.approx(12.706 * row["std"] / 2 ** 0.5, rel=1e-4)


def test_confidence_interval_matches_a_textbook_example():
    from comparison.summary import confidence_half_width

    # n = 16, s = 4: t(0.975, 15) = 2.131, half-width 2.131 * 4 / 4 = 2.131
    assert confidence_half_width(4.0, 16) == pytest.approx(2.1314, abs=1e-4)
    # n = 25, s = 10, 90 %: t(0.95, 24) = 1.711, half-width 3.422
    assert confidence_half_width(10.0, 25, level=0.90) == pytest.approx(3.4218, abs=1e-3)
    assert confidence_half_width(1.0, 1) != confidence_half_width(1.0, 1)  # NaN: one value has no interval


def test_summary_says_when_accuracy_does_not_separate_methods():
    rows = synthetic_rows()
    text = summary_markdown(pd.DataFrame(rows))
    assert "2 seeds (0, 1): mean ± half-width of the 95 % confidence interval" in text
    # the two methods differ by far less than their intervals at each target
    assert "At 0.9: accuracy does not separate" in text and "indistinguishable" in text
    single = summary_markdown(pd.DataFrame([row for row in rows if row["seed"] == 0]))
    assert "1 seed (0), no interval" in single and "not shown to be real" in single


def test_separated_methods_are_named_apart():
    from comparison.summary import separation

    stats = pd.DataFrame({"method": ["a", "b", "c"], "mean": [0.9, 0.89, 0.5], "half_width": [0.02, 0.02, 0.01]})
    assert separation(stats) == (["a", "b"], ["c"])


def test_summary_puts_methods_beside_dense_at_each_sparsity():
    text = summary_markdown(pd.DataFrame(synthetic_rows()))
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert "latency b64 ms" in lines[0] and "accuracy" in lines[0]
    assert sum(line.startswith("| (reference) | dense") for line in lines) == 2
    sparse_99 = next(line for line in lines if line.startswith("| 0.99 | actuallysparse"))
    # mean ± 95 % half-width over the two seeds (12.706 * 0.00707 / sqrt 2 = 0.0635); 0.01 * 8 MiB / 2 = 0.04 MiB
    assert "0.8040 ± 0.0635" in sparse_99 and "| 0.04 ± 0.00 |" in sparse_99


def test_summary_lists_failed_cells():
    rows = synthetic_rows()
    rows.append(make_row(Cell("nni", 0.99, 1), 1, records.FAILED_METRIC, 1, "flag", "ValueError: bad", ENV))
    text = summary_markdown(pd.DataFrame(rows))
    assert "Failed cells:" in text and "nni @ 0.99, seed 1, step 1: ValueError: bad" in text


def test_plot_all_from_a_saved_table(saved_table):
    table = records.load_table(saved_table)
    paths = plot_all(table, saved_table / "plots")
    names = {p.name for p in paths}
    assert names == {"overview.png", "accuracy_vs_sparsity.png", "latency_vs_sparsity.png",
                     "stored_bytes_vs_sparsity.png", "accuracy_vs_bytes.png", "training_curves.png"}
    # no speedup metrics in this table
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_command_redraws_from_a_directory(saved_table, capsys):
    assert main(["plot", str(saved_table)]) == 0
    output = capsys.readouterr().out
    assert "| 0.9 | nni |" in output
    assert len(list((saved_table / "plots").glob("*.png"))) == 6


def test_plot_command_on_a_missing_directory_fails_clearly(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no results" in capsys.readouterr().err


def test_plots_skip_what_the_table_lacks(tmp_path):
    only_dense = [row for row in synthetic_rows() if row["method"] == "dense" and row["metric"] == "test_accuracy"]
    paths = plot_all(pd.DataFrame(only_dense), tmp_path)
    assert {p.name for p in paths} == {"overview.png", "accuracy_vs_sparsity.png", "training_curves.png"}


def test_overview_has_accuracy_speedup_and_bytes_panels():
    from comparison.plots import plot_overview

    rows = synthetic_rows()
    rows += [make_row(Cell("actuallysparse", t, seed), 2, "measured_speedup_train_step", 1.5 + t, "ratio", "", ENV)
             for t in (0.9, 0.99) for seed in (0, 1)]
    figure = plot_overview(final_values(pd.DataFrame(rows)))
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == ["Accuracy", "Training-step speedup, whole model", "Bytes held"]
    # the speedup panel holds the one method that has the metric, at both targets
    lines = [line for line in figure.axes[1].get_lines() if len(line.get_xdata()) == 2]
    assert any(list(line.get_ydata()) == [2.4, 2.49] for line in lines)


def _loss_rows(losses):
    """Final-step test losses of (method, target, seed) cells, digits (10 classes)."""
    return [make_row(Cell(method, target, seed), 1, metric, value, "x", "", ENV)
            for (method, target, seed), loss in losses.items()
            for metric, value in (("test_loss", loss), ("test_accuracy", 0.9))]


def test_summary_flags_outputs_near_uniform_whatever_the_accuracy():
    import math

    uniform = math.log(10)
    rows = _loss_rows({("random", 0.98, 0): uniform * 0.97, ("random", 0.98, 1): uniform * 1.04,
                       ("actuallysparse", 0.98, 0): uniform * 0.94, ("actuallysparse", 0.9, 0): 0.05})
    text = summary_markdown(pd.DataFrame(rows))
    assert "| 0.98 | random (outputs near uniform) |" in text
    assert "| 0.98 | actuallysparse |" in text      # 6 % below ln 10: not flagged
    assert "| 0.9 | actuallysparse |" in text
    assert ("- Outputs near uniform: random @ 0.98 (seed 0, 1): test loss 2.31 is within 5% of "
            "ln(classes) = 2.30, whatever its accuracy reads.") in text
    assert text.count("Outputs near uniform") == 1
