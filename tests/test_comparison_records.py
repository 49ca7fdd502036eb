"""The tidy results table: schema, atomic per-cell files, resume status, loading."""

import math

import pytest

from comparison import records
from comparison.records import (
    COLUMNS,
    Cell,
    cell_path,
    cell_status,
    load_table,
    make_row,
    read_rows,
    write_cell,
    write_rows,
)

ENV = {"run_id": "abc", "dataset": "digits", "device": "cpu", "device_name": "test cpu", "threads": 2,
       "torch_version": "2.x", "nni_version": "3.0", "git_commit": "unknown", "host": "node-1"}


def _rows(cell, n=3, run_id="abc"):
    env = {**ENV, "run_id": run_id}
    return [make_row(cell, step, "test_accuracy", 0.5 + step / 10, "fraction", "", env) for step in range(n)]


def test_schema_is_the_tidy_long_table():
    assert COLUMNS[:8] == ("experiment", "method", "seed", "target_sparsity", "step", "metric", "value", "unit")
    for column in ("note", "run_id", "dataset", "device", "threads", "torch_version", "nni_version", "git_commit",
                   "host"):
        assert column in COLUMNS
    row = make_row(Cell("nni", 0.9, 1), 2, "latency_batch1_ms", 3.5, "ms", "", ENV)
    assert list(row) == list(COLUMNS)
    assert row["experiment"] == "run"
    assert make_row(Cell("nni", 0.9, 1), 2, "x", 1, "u", "", {**ENV, "experiment": "loops"})["experiment"] == "loops"
    with pytest.raises(KeyError, match="git_commit"):
        make_row(Cell("nni", 0.9, 1), 2, "x", 1, "u", "", {k: v for k, v in ENV.items() if k != "git_commit"})


def test_write_and_read_round_trip_keeps_floats_and_nan(tmp_path):
    cell = Cell("actuallysparse", 0.99, 0)
    env = dict(ENV)
    rows = [make_row(cell, 0, "a", 0.1 + 0.2, "x", "note, with comma", env),
            make_row(cell, 1, "b", math.nan, "x", "", env)]
    path = cell_path(tmp_path, cell)
    write_rows(path, rows)
    back = read_rows(path)
    assert float(back[0]["value"]) == 0.1 + 0.2
    assert back[0]["note"] == "note, with comma"
    assert math.isnan(float(back[1]["value"]))
    table = load_table(path)
    assert list(table.columns) == list(COLUMNS)
    assert table["value"].iloc[0] == 0.1 + 0.2 and math.isnan(table["value"].iloc[1])
    assert table["note"].iloc[1] == ""


def test_write_is_atomic_an_interrupted_write_keeps_the_old_file(tmp_path):
    cell = Cell("nni", 0.9, 0)
    path = cell_path(tmp_path, cell)
    write_rows(path, _rows(cell))
    before = path.read_text()

    def interrupted():
        yield from _rows(cell, 1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_rows(path, interrupted())
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_a_table_without_the_experiment_column_reads_as_run(tmp_path):
    legacy = records.LEGACY_COLUMNS
    row = {key: value for key, value in make_row(Cell("nni", 0.9, 0), 1, "a", 1.0, "x", "", ENV).items()
           if key in legacy}
    write_rows(tmp_path / "old.csv", [row], columns=legacy)
    assert read_rows(tmp_path / "old.csv")[0]["experiment"] == "run"
    assert read_rows(tmp_path / "old.csv")[0]["host"] == "unknown"
    assert list(load_table(tmp_path / "old.csv").columns) == list(COLUMNS)


def test_a_table_without_the_host_column_reads_with_host_unknown(tmp_path):
    without_host = tuple(column for column in COLUMNS if column != "host")
    write_rows(tmp_path / "old.csv", [make_row(Cell("nni", 0.9, 0), 1, "a", 1.0, "x", "", ENV)], columns=without_host)
    row = read_rows(tmp_path / "old.csv")[0]
    assert list(row) == list(COLUMNS) and row["host"] == "unknown" and row["experiment"] == "run"
    # an old cell with its manifest still verifies, so resuming an old directory recomputes nothing
    cell = Cell("nni", 0.9, 0)
    write_cell(cell_path(tmp_path, cell), _rows(cell))
    path = cell_path(tmp_path, cell)
    write_rows(path, [{k: v for k, v in r.items() if k != "host"} for r in _rows(cell)], columns=without_host)
    records.write_json_atomic(records.manifest_path(path), {"file": path.name, "rows": 3,
                                                            "sha256": records.sha256_of(path)})
    assert cell_status(tmp_path, cell, "abc") == "finished"
    # columns in another order, or an unknown column, are not an older schema
    write_rows(tmp_path / "odd.csv", [], columns=tuple(reversed(COLUMNS)))
    with pytest.raises(records.CorruptResultsError, match="expected"):
        read_rows(tmp_path / "odd.csv")


def test_cell_status(tmp_path):
    cell = Cell("torch-prune", 0.5, 3)
    assert cell_status(tmp_path, cell, "abc") == "missing"
    write_cell(cell_path(tmp_path, cell), _rows(cell))
    assert cell_status(tmp_path, cell, "abc") == "finished"
    failed = _rows(cell, 1) + [make_row(cell, 1, records.FAILED_METRIC, 1, "flag", "ValueError: boom", ENV)]
    write_cell(cell_path(tmp_path, cell), failed)
    assert cell_status(tmp_path, cell, "abc") == "failed"
    write_rows(cell_path(tmp_path, cell), _rows(cell))  # rewritten without its manifest
    assert cell_status(tmp_path, cell, "abc") == "damaged"
    write_cell(cell_path(tmp_path, cell), _rows(cell))
    with pytest.raises(ValueError, match="run abc, not of this run zzz"):
        cell_status(tmp_path, cell, "zzz")


def test_load_table_from_a_directory_of_cells_and_rejects_other_schemas(tmp_path):
    for cell in (Cell("dense", 0.0, 0), Cell("nni", 0.9, 0)):
        write_cell(cell_path(tmp_path, cell), _rows(cell))
    table = load_table(tmp_path)
    assert len(table) == 6 and set(table["method"]) == {"dense", "nni"}
    (tmp_path / "results.csv").write_text("a,b\n1,2\n")
    assert len(load_table(tmp_path, echo=lambda text: None)) == 6  # rebuilt from the cells
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="expected"):
        load_table(tmp_path / "other.csv")
    with pytest.raises(FileNotFoundError, match="no results"):
        load_table(tmp_path / "empty")


def test_cell_file_names_are_distinct():
    names = {Cell(m, s, seed).file_name for m in ("nni", "dense") for s in (0.9, 0.99, 0.999) for seed in (0, 1)}
    assert len(names) == 12
    assert str(Cell("nni", 0.9, 1)) == "nni @ 0.9, seed 1"


def test_collect_cells_keeps_earlier_cells_of_the_same_run_only(tmp_path):
    earlier, planned, foreign = Cell("nni", 0.9, 0), Cell("nni", 0.9, 1), Cell("dense", 0.0, 0)
    write_cell(cell_path(tmp_path, earlier), _rows(earlier))
    write_cell(cell_path(tmp_path, planned), _rows(planned))
    write_cell(cell_path(tmp_path, foreign), _rows(foreign, run_id="other"))
    rows = records.collect_cells(tmp_path, [planned], run_id="abc")
    assert {row["seed"] for row in rows} == {"0", "1"}
    assert {row["method"] for row in rows} == {"nni"}
    assert len(records.collect_cells(tmp_path, [planned])) == 3


def test_written_files_are_readable_by_others(tmp_path):
    import os
    import stat

    path = cell_path(tmp_path, Cell("nni", 0.9, 0))
    write_rows(path, _rows(Cell("nni", 0.9, 0)))
    from comparison.files import write_text_atomic

    write_text_atomic(tmp_path / "summary.md", "x\n")
    umask = os.umask(0)
    os.umask(umask)
    for written in (path, tmp_path / "summary.md"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask
