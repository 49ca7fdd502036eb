"""`python -m comparison reproduce`: the quick end-to-end run, and its report."""
import csv
from pathlib import Path

import pytest

from comparison.cli import main
from comparison.reproduce import EXPERIMENTS, TABLE_COLUMNS, load_tables


def test_unknown_dataset_is_refused(tmp_path, capsys):
    assert main(["reproduce", "--dataset", "mnist", "--out", str(tmp_path)]) == 2
    assert "valid choices: digits, cifar10" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_reproduce_writes_every_table_figure_and_report(tmp_path):
    out = tmp_path / "reproduce"
    assert main(["reproduce", "--quick", "--out", str(out)]) == 0
    for name in EXPERIMENTS:
        with open(out / "tables" / f"{name}.csv", newline="") as handle:
            assert tuple(csv.DictReader(handle).fieldnames) == TABLE_COLUMNS
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == sorted(f"{n}.png" for n in EXPERIMENTS)
    table = load_tables(out)
    memory = table[(table.experiment == "memory") & (table.metric == "stored_bytes")]
    held = memory.set_index(["variant", "target_sparsity"]).value
    # physical removal shrinks; masks grow
    assert held[("csr", 0.99)] < held[("csr", 0.9)] < held[("dense", 0.9)] < held[("nni", 0.9)]
    loops = table[(table.experiment == "loops") & (table.metric == "achieved_sparsity")]
    assert loops.groupby("variant").value.max().round(3).eq(0.99).all()
    report = (out / "REPORT.md").read_text()
    for heading in ("## 1. Baselines", "## 2. Memory", "## 3. Inference latency", "## 4. Training loops"):
        assert heading in report
    assert "0.7486" in report and "24.0" in report
    # a second run finds every table and redoes nothing but the report
    mtime = (out / "tables" / "loops.csv").stat().st_mtime
    assert main(["reproduce", "--quick", "--out", str(out)]) == 0
    assert (out / "tables" / "loops.csv").stat().st_mtime == mtime


def test_tables_of_other_settings_are_refused(tmp_path, capsys):
    from comparison import records
    from comparison.reproduce import table_path

    row = dict.fromkeys(TABLE_COLUMNS, "")
    row.update(experiment="memory", run_id="someoneelse", value=1.0)
    records.write_rows(table_path(tmp_path, "memory"), [row], columns=TABLE_COLUMNS)
    assert main(["reproduce", "--quick", "--out", str(tmp_path)]) == 2
    assert "someoneelse" in capsys.readouterr().err
