"""--executor ray writes what --executor local writes, resumes a grid either executor started, records
a cell that keeps failing, survives a worker killed mid-cell, and refuses bad input up front."""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from comparison import records, runner
from comparison.config import EXECUTORS, ConfigError, RunConfig
from tiny_run import deterministic, run_tiny

ROOT = Path(__file__).resolve().parent.parent
SPARSE_CELL = records.Cell("actuallysparse", 0.9, 0)
DENSE_CELL = records.Cell("dense", 0.0, 0)


def _rows(directory):
    return len(records.read_rows(Path(directory) / records.RESULTS_FILE))


def _forget(directory, cell):
    """As if the run had been stopped before ``cell`` finished."""
    path = records.cell_path(directory, cell)
    path.unlink()
    records.manifest_path(path).unlink()


# ------------------------------------------------------------------ no Ray needed
def test_the_executor_settings_do_not_change_the_run_id_and_are_checked():
    assert RunConfig(executor="ray", cpus_per_cell=2, ray_address="h:1").run_id == RunConfig().run_id
    with pytest.raises(ConfigError, match="valid choices: " + ", ".join(EXECUTORS)):
        RunConfig(executor="slurm")
    with pytest.raises(ConfigError, match="cpus_per_cell"):
        RunConfig(executor="ray", cpus_per_cell=-1)
    with pytest.raises(ConfigError, match="gpus_per_cell > 0"):
        RunConfig(executor="ray", device="cuda")


def test_the_library_and_the_local_executor_never_import_ray():
    code = ("import sys, actuallysparse, comparison.cli, comparison.runner; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_without_ray_installed_the_error_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail as if it were absent
    assert run_tiny(tmp_path / "out", "--executor", "ray") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "pip install 'actuallysparse[distributed]'" in error
    assert not (tmp_path / "out").exists()


def test_an_unreachable_address_is_refused_within_seconds_naming_it(tmp_path, capsys):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    start = time.perf_counter()
    assert run_tiny(tmp_path / "out", "--executor", "ray", "--ray-address", address) == 2
    assert time.perf_counter() - start < 10
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and address in error
    assert not (tmp_path / "out").exists()


def test_the_summary_says_when_rows_come_from_several_kinds_of_node():
    from comparison.summary import mixed_nodes_note

    table = pd.DataFrame({"device": ["cpu", "cpu"], "device_name": ["A", "A"], "threads": [4, 4]})
    assert mixed_nodes_note(table) is None
    table.loc[1, "device_name"] = "B"
    assert "2 kinds of node" in mixed_nodes_note(table)


# ------------------------------------------------------------------ on a local Ray instance
@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    assert run_tiny(out) == 0
    return out


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, ray_instance):
    out = tmp_path_factory.mktemp("ray") / "run"
    assert run_tiny(out, "--executor", "ray") == 0
    return out


@pytest.mark.slow
def test_ray_writes_the_same_cells_and_metrics_as_local(local_run, ray_run):
    assert sorted(p.name for p in (ray_run / "cells").iterdir()) == sorted(p.name for p in (local_run / "cells").iterdir())
    assert deterministic(ray_run) == deterministic(local_run)
    assert _rows(ray_run) == _rows(local_run)
    table = records.load_table(ray_run, echo=lambda text: None)
    assert set(table.host) == {__import__("socket").gethostname()} and set(table.threads) == {1}
    assert "kinds of node" not in (ray_run / "summary.md").read_text()
    # only the driver wrote the directory: nothing a worker would leave (scratch, temporaries)
    assert sorted(p.name for p in ray_run.iterdir()) == sorted(p.name for p in local_run.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [("local", "ray"), ("ray", "local")])
def test_a_grid_started_by_one_executor_finishes_under_the_other(first, then, local_run, ray_run, tmp_path,
                                                                 capsys):
    out = tmp_path / "run"
    shutil.copytree(local_run if first == "local" else ray_run, out)
    _forget(out, SPARSE_CELL if then == "ray" else DENSE_CELL)
    assert run_tiny(out, "--executor", then) == 0
    assert "1 of 2 cells already done" in capsys.readouterr().out
    assert deterministic(out) == deterministic(local_run)
    assert _rows(out) == _rows(local_run)  # no row twice, none missing


@pytest.mark.slow
def test_a_cell_that_keeps_failing_is_retried_recorded_and_rerun_by_retry_failed(ray_instance, local_run, tmp_path,
                                                                                 monkeypatch):
    from comparison.ray_executor import MAX_RETRIES

    attempts = tmp_path / "attempts"
    attempts.mkdir()

    def failing_run_cell(config, cell, *args, **kwargs):  # runs on the workers
        from comparison import runner as real

        if cell.method == "actuallysparse":
            (attempts / str(time.time_ns())).touch()
            raise RuntimeError("boom")
        return real.run_cell(config, cell, *args, **kwargs)

    monkeypatch.setattr(runner, "run_cell", failing_run_cell)
    out = tmp_path / "run"
    assert run_tiny(out, "--executor", "ray") == 1
    assert len(list(attempts.iterdir())) == 1 + MAX_RETRIES
    assert records.cell_status(out, DENSE_CELL, _run_id(out)) == "finished"
    failed = [row for row in records.read_rows(records.cell_path(out, SPARSE_CELL)) if row["metric"] == "failed"]
    assert len(failed) == 1 and "RuntimeError: boom" in failed[0]["note"] and "attempts" in failed[0]["note"]
    assert "Failed cells:" in (out / "summary.md").read_text()

    monkeypatch.undo()
    assert run_tiny(out, "--executor", "ray") == 0  # nothing to run: the failure is kept without --retry-failed
    assert records.cell_status(out, SPARSE_CELL, _run_id(out)) == "failed"
    assert run_tiny(out, "--executor", "ray", "--retry-failed") == 0
    assert deterministic(out) == deterministic(local_run)


def _run_id(out):
    import json

    return json.loads((out / "config.json").read_text())["run_id"]


@pytest.mark.slow
def test_a_worker_killed_mid_cell_is_retried_and_the_cell_finishes(ray_instance, local_run, tmp_path, monkeypatch):
    marker = tmp_path / "killed-once"

    def run_cell_killed_once(config, cell, *args, **kwargs):  # runs on the workers
        import os
        import signal

        from comparison import runner as real

        def kill_on_first_batch(images, labels):
            if cell.method == "actuallysparse" and not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)

        return real.run_cell(config, cell, *args, on_batch=kill_on_first_batch, **kwargs)

    monkeypatch.setattr(runner, "run_cell", run_cell_killed_once)
    out = tmp_path / "run"
    assert run_tiny(out, "--executor", "ray") == 0
    assert marker.exists()  # a worker did die in the middle of the cell
    assert deterministic(out) == deterministic(local_run)


@pytest.mark.slow
def test_a_cell_larger_than_every_node_is_refused_up_front(ray_instance, tmp_path, capsys):
    assert run_tiny(tmp_path / "out", "--executor", "ray", "--cpus-per-cell", "64") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "64 CPUs" in error and "--cpus-per-cell" in error
    assert not (tmp_path / "out").exists()
