"""The benchmark command runs and reports every variant (no timing is asserted)."""
import csv

import pytest

from actuallysparse import bench


def test_quick_benchmark_prints_all_variants(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    assert bench.main(["--quick", "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| shape | sparsity | mode | batch |" in printed
    rows = list(csv.DictReader(out.open()))
    assert {row["mode"] for row in rows} == {"inference", "train"}
    for row in rows:
        for variant in bench.VARIANTS:
            assert float(row[f"{variant}_ms"]) > 0
        # stored bytes: CSR < COO < dense < masked (weight + mask + copy)
        assert (int(row["csr_bytes"]) < int(row["coo_bytes"]) < int(row["dense_bytes"])
                < int(row["masked_bytes"]))


def test_targets_are_checked_from_records():
    record = {"shape": "4096x4096", "mode": "train", "batch": 128, "sparsity": 0.99,
              "coo_speedup": 6.0, "csr_speedup": 4.0}
    (line,) = bench.check_targets([record])
    assert "NOT met" in line
    record["csr_speedup"] = 7.0
    assert "-> met" in bench.check_targets([record])[0]


@pytest.mark.parametrize("argv, message", [(["--sparsities", "1.5"], "--sparsities"),
                                           (["--shapes", "12"], "OUTxIN"),
                                           (["--repeats", "0"], "--repeats")])
def test_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err
