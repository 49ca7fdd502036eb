"""`python -m comparison reproduce`: the quick end-to-end run, and its report."""
from pathlib import Path

import pytest

from comparison import records
from comparison.cli import main
from comparison.reproduce import EXPERIMENTS, ReproduceSettings, load_tables


def test_unknown_dataset_is_refused(tmp_path, capsys):
    assert main(["reproduce", "--dataset", "mnist", "--out", str(tmp_path)]) == 2
    assert "valid choices: digits, cifar10" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_every_experiment_is_a_run_of_registered_methods():
    from comparison.methods import available_methods

    configs = ReproduceSettings(out="x", quick=True).run_configs()
    assert tuple(configs) == EXPERIMENTS
    for name, config in configs.items():
        assert config.experiment == name and Path(config.out) == Path("x") / name
        assert set(config.methods) <= set(available_methods())
    # one baseline for all three: the settings that decide it are equal
    assert len({config.baseline_id() for config in configs.values()}) == 1
    assert len({config.baseline_dir for config in configs.values()}) == 1


@pytest.mark.slow
def test_quick_reproduce_writes_every_table_figure_and_report(quick_reproduction):
    out = quick_reproduction
    table = load_tables(out)
    assert tuple(table.columns) == records.COLUMNS
    assert set(table.experiment) == set(EXPERIMENTS)
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == ["baselines.png", "latency.png", "loops.png",
                                                                         "memory.png"]
    storage = table[(table.experiment == "storage") & (table.metric == "pruned_layers_bytes") & (table.step == 1)]
    held = storage.set_index(["method", "target_sparsity"]).value
    dense = float(table[(table.experiment == "storage") & (table.method == "dense")
                        & (table.metric == "pruned_layers_bytes")].value.iloc[0])
    # physical removal shrinks; masks grow
    assert held[("actuallysparse", 0.99)] < held[("actuallysparse", 0.9)] < dense < held[("nni", 0.9)]
    assert held[("actuallysparse", 0.9)] < held[("actuallysparse-coo", 0.9)]
    loops = table[(table.experiment == "loops") & (table.metric == "achieved_sparsity")]
    assert loops.groupby("method").value.max().round(3).eq(0.99).all()
    assert set(loops.method) == {"actuallysparse", "nni", "actuallysparse-orphaned"}
    report = (out / "REPORT.md").read_text()
    for heading in ("## 1. Baselines", "## 2. Memory", "## 3. Inference latency", "## 4. Training loops"):
        assert heading in report
    assert "0.7486" in report and "24.0" in report
    # one baseline trained for the three experiments
    assert len(list((out / "baselines-cache").glob("*.pt"))) == 1
    # a second run finds every cell and redoes nothing but the report
    cell = next((out / "loops" / "cells").glob("*.csv"))
    mtime = cell.stat().st_mtime
    assert main(["reproduce", "--quick", "--no-progress", "--out", str(out)]) == 0
    assert cell.stat().st_mtime == mtime


def test_results_of_other_settings_are_refused(tmp_path, capsys):
    from comparison.files import write_json_atomic

    write_json_atomic(tmp_path / "baselines" / "config.json", {"run_id": "someoneelse", "config": {}})
    assert main(["reproduce", "--quick", "--out", str(tmp_path)]) == 2
    assert "someoneelse" in capsys.readouterr().err
