"""Results survive damage and bad input: every case either recovers to the complete table or stops
with one line naming the file; nothing is lost silently (docs/RESULTS.md)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comparison import records, runner
from comparison.cli import main
from comparison.metrics import Measurement
from tiny_run import TINY, deterministic, run_tiny

ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A complete tiny run, copied afresh by each test that damages it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_tiny(out) == 0
    return out


@pytest.fixture
def damaged(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def _cell(directory):
    return sorted((directory / records.CELLS_DIR).glob("actuallysparse*.csv"))[0]


# ------------------------------------------------------------------ the check itself, exhaustively
def test_every_truncation_of_a_cell_file_fails_its_check(damaged):
    path = _cell(damaged)
    content = path.read_bytes()
    boundaries = [i + 1 for i, byte in enumerate(content) if byte == ord("\n")][:-1]
    cuts = boundaries + random.Random(0).sample(range(1, len(content)), 40)
    assert len(boundaries) > 20
    for cut in cuts:
        path.write_bytes(content[:cut])
        assert records.cell_problem(path) is not None, f"cut at byte {cut} passed the check"
    path.write_bytes(content)
    assert records.cell_problem(path) is None


def test_every_byte_flip_of_a_cell_file_fails_its_check(damaged):
    path = _cell(damaged)
    content = bytearray(path.read_bytes())
    for position in random.Random(1).sample(range(len(content)), 60):
        flipped = bytearray(content)
        flipped[position] ^= 1 << random.Random(position).randrange(8)
        path.write_bytes(bytes(flipped))
        assert records.cell_problem(path) is not None, f"flip at byte {position} passed the check"


# ------------------------------------------------------------------ recovery end to end
@pytest.mark.parametrize("damage", ["cut_at_line", "cut_mid_line", "flip", "no_manifest", "garbage"])
def test_a_damaged_cell_is_moved_aside_and_run_again(finished, damaged, damage, capsys):
    path = _cell(damaged)
    content = path.read_bytes()
    if damage == "cut_at_line":
        path.write_bytes(content[: content.rindex(b"\n", 0, len(content) - 1) + 1])
    elif damage == "cut_mid_line":
        path.write_bytes(content[: len(content) // 2])
    elif damage == "flip":
        path.write_bytes(content[:100] + bytes([content[100] ^ 4]) + content[101:])
    elif damage == "no_manifest":
        records.manifest_path(path).unlink()
    else:
        path.write_bytes(b"\xff\xfe garbage \x00\x01")
    assert run_tiny(damaged) == 0
    out = capsys.readouterr().out
    assert str(path) in out and "moved it to" in out
    assert list((path.parent / "damaged").glob(path.name + ".*"))
    assert records.cell_problem(path) is None
    assert deterministic(damaged) == deterministic(finished)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "drop_rows"])
def test_plot_never_draws_a_damaged_results_file(finished, damaged, damage, capsys):
    table = damaged / records.RESULTS_FILE
    lines = table.read_text().splitlines(keepends=True)
    if damage == "truncate":
        table.write_text("".join(lines[: len(lines) // 3]) + lines[len(lines) // 3][:7])
    elif damage == "garbage":
        table.write_bytes(b"\x00\x9f\x92\x96 not a table")
    else:
        table.write_text("".join(lines[:1] + lines[1::2]))
    assert main(["plot", str(damaged), "--out", str(damaged / "replot")]) == 0
    assert str(table) in capsys.readouterr().out
    assert deterministic(damaged) == deterministic(finished)
    assert records._canonical(records.read_rows(table)) == records._canonical(
        records.read_rows(finished / records.RESULTS_FILE))


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_checksum"])
def test_a_damaged_baseline_is_named_moved_aside_and_retrained(finished, damaged, damage, capsys):
    baseline = next((damaged / "baselines").glob("*.pt"))
    content = baseline.read_bytes()
    if damage == "truncate":
        baseline.write_bytes(content[: len(content) // 2])
    elif damage == "flip":
        baseline.write_bytes(content[:500] + bytes([content[500] ^ 1]) + content[501:])
    else:
        baseline.with_name(baseline.name + ".sha256").unlink()
    _cell(damaged).unlink()  # a cell to compute, so the baseline is needed
    assert run_tiny(damaged) == 0
    out = capsys.readouterr().out
    assert str(baseline) in out and "training the baseline again" in out
    assert deterministic(damaged) == deterministic(finished)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", b'{"run_id": "other", "config": {}}'])
def test_a_bad_config_file_stops_with_one_line_and_changes_nothing(damaged, content, capsys):
    (damaged / "config.json").write_bytes(content)
    before = {p: p.read_bytes() for p in damaged.rglob("*") if p.is_file()}
    assert run_tiny(damaged) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and (str(damaged / "config.json") in error or "other" in error), error
    assert {p: p.read_bytes() for p in damaged.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------ refused runs touch nothing
@pytest.mark.parametrize("argv, words", [
    (["--init", "missing.pt"], "does not exist"),
    (["--init", "README.md"], "not a PyTorch checkpoint"),
    (["--lr", "none"], "lr needs a number"),
    (["--width", "none"], "width needs a number"),
])
def test_a_refused_run_writes_nothing(tmp_path, argv, words, capsys):
    out = tmp_path / "out"
    argv = [str(ROOT / a) if a.endswith(("md", ".pt")) else a for a in argv]
    assert run_tiny(out, *argv) == 2
    error = capsys.readouterr().err
    assert words in error and error.count("\n") == 1, error
    assert not out.exists()


def test_out_naming_a_file_or_an_unwritable_folder_is_one_line(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    assert run_tiny(file) == 2
    assert "is a file" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert run_tiny(locked / "out") == 2
        assert "permission denied" in capsys.readouterr().err


def test_a_run_refused_for_other_settings_keeps_the_original_config(damaged, capsys):
    before = (damaged / "config.json").read_text()
    assert run_tiny(damaged, "--lr", "0.5") == 2
    assert "settings differ: lr" in capsys.readouterr().err
    assert (damaged / "config.json").read_text() == before
    assert run_tiny(damaged) == 0  # the original command still resumes


# ------------------------------------------------------------------ the lock
def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(damaged, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (damaged / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename,
                                                   "since": "now"}))
        assert run_tiny(damaged) == 2
        assert f"in use by process {sleeper.pid}" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run_tiny(damaged) == 0  # its process is gone: the lock is stale
    assert f"left by process {sleeper.pid}" in capsys.readouterr().out
    assert not (damaged / ".lock").exists()


def test_scratch_left_by_a_killed_run_is_cleaned(damaged):
    (damaged / ".scratch-dead").mkdir()
    (damaged / ".scratch-dead" / "model.pt").write_bytes(b"x" * 100)
    (damaged / records.CELLS_DIR / ".x.csv.abc.tmp").write_text("half")
    assert run_tiny(damaged) == 0
    assert not (damaged / ".scratch-dead").exists()
    assert not list(damaged.rglob("*.tmp"))


def _spawn(out):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "comparison", "run", *TINY, "--methods",
                             "dense,actuallysparse,torch-prune", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)


@pytest.mark.slow
def test_two_concurrent_runs_one_works_the_other_says_who(tmp_path):
    out = tmp_path / "run"
    first = _spawn(out)
    deadline = time.monotonic() + 60
    while not (out / ".lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # hold it mid-run, however fast this machine is
    try:
        second = _spawn(out)
        _, error = second.communicate(timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert f"in use by process {first.pid}" in error.decode()
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert set(records.load_table(out, echo=lambda text: None).method) == {"dense", "actuallysparse", "torch-prune"}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_random_moment_loses_nothing(tmp_path, seed):
    out = tmp_path / "run"
    victim = _spawn(out)
    time.sleep(random.Random(seed).uniform(3.0, 12.0))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = _spawn(out)
    _, error = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, error.decode()[-2000:]
    table = records.load_table(out, echo=lambda text: None)
    cells = set(zip(table.method, table.target_sparsity))
    assert cells == {("dense", 0.0), ("actuallysparse", 0.9), ("torch-prune", 0.9)}
    assert not (table.metric == records.FAILED_METRIC).any()
    for cell in (out / records.CELLS_DIR).glob("*.csv"):
        assert records.cell_problem(cell) is None
    assert not list(out.rglob("*.tmp")) and not (out / ".lock").exists()


# ------------------------------------------------------------------ any command line: 0 or one line
hypothesis = pytest.importorskip("hypothesis")
strategies = hypothesis.strategies

_VALUES = strategies.sampled_from(["0", "-1", "1", "0.5", "1.5", "none", "nan", "inf", "", "x", "digits",
                                   "cifar10", "dense", "nni,dense", "0.9,0.99", "classifier", "all", "cubic",
                                   "explicit", "0.9", "1e9", "true", "cuda", "adam", "sgd"])
_FLAGS = strategies.sampled_from(["--dataset", "--methods", "--sparsities", "--seeds", "--scope", "--width",
                                  "--steps", "--epochs-per-step", "--schedule", "--step-targets",
                                  "--batch-size", "--optimizer", "--lr", "--limit-train", "--limit-test",
                                  "--device", "--threads", "--latency-repeats", "--probe-memory", "--init",
                                  "--pretrain-epochs"])


@hypothesis.settings(max_examples=60, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(strategies.lists(strategies.tuples(_FLAGS, _VALUES), max_size=4))
def test_any_command_line_exits_0_or_2_with_one_line(tmp_path, monkeypatch, options):
    # Cells are not computed here (the other tests do): a valid command line would train.
    monkeypatch.setattr(runner, "execute_cells",
                        lambda plan, *a, **k: runner.RunResult(plan.out_dir, plan.out_dir / records.RESULTS_FILE))
    monkeypatch.setattr(runner, "write_outputs", lambda *a, **k: None)
    monkeypatch.setattr(runner, "probe_process_memory",
                        lambda *a, **k: [Measurement("peak_rss_bytes", 1.0, "bytes")])
    argv = ["run", "--out", str(tmp_path / f"o{random.random()}"), "--no-progress", "--data-dir",
            str(tmp_path / "nodata")]
    for flag, value in options:
        argv += [flag, value]
    errors = []
    import contextlib
    import io

    stream = io.StringIO()
    with contextlib.redirect_stderr(stream):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own usage errors
            code = exit_.code
    errors = stream.getvalue()
    assert code in (0, 2), (argv, code, errors)
    if code == 2:
        assert errors.strip() and "Traceback" not in errors, (argv, errors)
        assert len([line for line in errors.splitlines() if "error:" in line]) == 1, (argv, errors)


# ------------------------------------------------------------------ faults of the machine
_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 15232 vs 15128"


def _fault_the_second_cell(monkeypatch, fault):
    """Make the actuallysparse cell (the second) meet ``fault``; the dense cell before it finishes."""
    import errno

    import torch

    from comparison import files

    if fault == "torch_short_write":  # what torch.save raises when the disk fills mid-file
        real_save, calls = torch.save, []

        def save(payload, path, *args, **kwargs):
            if str(path).endswith("state_dict.pt"):
                calls.append(path)
                if len(calls) > 2:  # the dense cell saves two checkpoints (steps 0 and 1)
                    raise RuntimeError(_SHORT_WRITE)
            return real_save(payload, path, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
        monkeypatch.setattr(files, "free_bytes", lambda directory: 0)
        return "no space left on device writing", "state_dict.pt"
    if fault == "read_only":
        real_checkpoint = runner.checkpoint_bytes

        def checkpoint(model, directory):
            if any("Sparse" in type(module).__name__ for module in model.modules()):
                raise OSError(errno.EROFS, "Read-only file system", str(directory / "x.pt"))
            return real_checkpoint(model, directory)

        monkeypatch.setattr(runner, "checkpoint_bytes", checkpoint)
        return "read-only file system writing", "x.pt"
    # A plain write with no file name in its error (as Python's own writes raise it), failing for
    # the cell and again for results.csv in the clean-up: the first error must be the one named.
    def full_open(file, mode="r", *args, **kwargs):
        if "w" in mode and ("actuallysparse" in str(file) or "results.csv" in str(file)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(records, "open", full_open, raising=False)
    return "no space left on device writing", "cells/actuallysparse__sparsity-0.9__seed-0.csv"


@pytest.mark.parametrize("fault", ["torch_short_write", "read_only", "write_without_a_path"])
def test_a_machine_fault_stops_the_run_records_nothing_and_the_same_command_completes(
        finished, tmp_path, monkeypatch, capsys, fault):
    out = tmp_path / "run"
    words, where = _fault_the_second_cell(monkeypatch, fault)
    assert run_tiny(out) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and words in error and where in error, error
    assert "results.csv" not in error  # the clean-up's own failure does not hide the first error
    assert "run the same command again" in error
    # Nothing is recorded as failed, nothing half-written stays, the finished cell is kept.
    cells = sorted(path.name for path in (out / records.CELLS_DIR).glob("*.csv"))
    assert cells == ["dense__sparsity-0__seed-0.csv"]
    assert records.cell_status(out, records.Cell("dense", 0.0, 0), records.read_rows(out / "cells" / cells[0])[0]
                               ["run_id"]) == "finished"
    assert not list(out.rglob("*.tmp")) and not list(out.glob(".scratch-*")) and not (out / ".lock").exists()
    monkeypatch.undo()
    assert run_tiny(out) == 0  # the disk is fixed: the plain command completes the table
    assert deterministic(out) == deterministic(finished)


def test_torch_s_short_write_becomes_an_os_error_naming_the_file(tmp_path, monkeypatch):
    import errno

    import torch

    from comparison import files

    def short_write(payload, path, *args, **kwargs):
        raise RuntimeError(_SHORT_WRITE)

    monkeypatch.setattr(torch, "save", short_write)
    target = tmp_path / "baseline.pt"
    for free, expected in ((0, errno.ENOSPC), (1 << 40, errno.EIO)):
        monkeypatch.setattr(files, "free_bytes", lambda directory: free)
        with pytest.raises(files.MachineFaultError) as raised:
            files.save_torch_atomic({"x": 1}, target)
        assert raised.value.errno == expected and str(target) in str(raised.value)
        assert not list(tmp_path.iterdir())  # no partial file left to trust
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("not a disk problem")))
    with pytest.raises(RuntimeError, match="not a disk problem"):
        files.save_torch(1, target)


def test_a_node_s_full_disk_under_ray_is_not_a_cell_result():
    import errno

    from comparison.files import MachineFaultError
    from comparison.ray_executor import RayCluster

    class TaskError(Exception):
        cause = OSError(errno.ENOSPC, "No space left on device", "/tmp/comparison-cell-x/state_dict.pt")

    class FakeRay:
        @staticmethod
        def get(ref):
            raise TaskError("task failed")

    environment = {key: "x" for key in records.ENVIRONMENT_COLUMNS}
    with pytest.raises(MachineFaultError, match="no space left on device writing /tmp/comparison-cell-x"):
        RayCluster._rows(FakeRay, None, records.Cell("dense", 0.0, 0), environment)


# ------------------------------------------------------------------ SIGTERM
def _lock_scratch_and_temporaries(out):
    return [(out / ".lock")] * (out / ".lock").exists() + list(out.glob(".scratch-*")) + list(out.rglob("*.tmp"))


def test_sigterm_keeps_finished_cells_ends_the_child_and_restores_the_handler(
        finished, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    pid_file = tmp_path / "child.pid"
    # The memory probe's child: the real one for the first cell, then one that writes its pid and hangs.
    hanging = tmp_path / "hanging-python"
    hanging.write_text(f"#!/bin/sh\nif [ ! -e {tmp_path}/probed ]; then touch {tmp_path}/probed; "
                       f"exec {sys.executable} \"$@\"; fi\necho $$ > {pid_file}\nexec sleep 60\n")
    hanging.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(hanging))

    def terminate_when_the_child_runs():
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    import threading

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_when_the_child_runs, daemon=True).start()
    assert run_tiny(out, "--probe-memory", "true") == 143
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "terminated (SIGTERM)" in error, error
    assert signal.getsignal(signal.SIGTERM) == before
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    assert _lock_scratch_and_temporaries(out) == []
    # The dense cell (the first) finished before the probe of the second hung; the table holds it.
    table = records.read_rows(out / records.RESULTS_FILE)
    assert {row["method"] for row in table} == {"dense"}
    monkeypatch.undo()
    assert run_tiny(out, "--probe-memory", "true") == 0  # the same command resumes
    assert deterministic(out) == deterministic(finished)


@pytest.mark.slow
def test_a_real_sigterm_to_a_running_command(tmp_path):
    out = tmp_path / "run"
    victim = _spawn(out)
    deadline = time.monotonic() + 120
    while not list((out / records.CELLS_DIR).glob(f"*{records.MANIFEST_SUFFIX}")) and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGTERM)
    _, error = victim.communicate(timeout=120)
    assert victim.returncode == 143, error.decode()[-2000:]
    assert error.decode().strip().count("\n") == 0 and "terminated (SIGTERM)" in error.decode()
    assert _lock_scratch_and_temporaries(out) == []
    verified = records.collect_cells(out, records_cells := [records.Cell(m, t, 0) for m, t in
                                                           (("dense", 0.0), ("actuallysparse", 0.9),
                                                            ("torch-prune", 0.9))])
    assert verified and records._canonical(records.read_rows(out / records.RESULTS_FILE)) == \
        records._canonical(verified)
    # No child of the run (the memory probe reads a model under the run's scratch folder) is left.
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert str(out) not in cmdline.read_bytes().decode(errors="replace"), cmdline
        except OSError:
            pass
    resumed = _spawn(out)
    _, error = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, error.decode()[-2000:]
    assert len(records.collect_cells(out, records_cells)) > len(verified)


# ------------------------------------------------------------------ a lock held from another host
def test_a_lock_from_another_host_says_how_to_take_it_over(damaged, capsys):
    (damaged / ".lock").write_text(json.dumps({"pid": 4242, "host": "elsewhere-node", "since": "then"}))
    assert run_tiny(damaged) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "process 4242 on elsewhere-node" in error and "--break-lock" in error, error
    assert json.loads((damaged / ".lock").read_text())["host"] == "elsewhere-node"  # left as it was
    assert run_tiny(damaged, "--break-lock") == 0
    assert "held by process 4242 on elsewhere-node (--break-lock)" in capsys.readouterr().out
    assert not (damaged / ".lock").exists()


def test_break_lock_does_not_take_the_lock_of_a_live_process_on_this_host(damaged, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (damaged / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename,
                                                   "since": "now"}))
        assert run_tiny(damaged, "--break-lock") == 2
        error = capsys.readouterr().err
        assert f"process {sleeper.pid}" in error and "still running on this host" in error, error
        assert json.loads((damaged / ".lock").read_text())["pid"] == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------ a read-only results directory
def _snapshot(directory):
    return {path: path.read_bytes() if path.is_file() else None for path in directory.rglob("*")}


def _read_only(monkeypatch, directory):
    # Tests run as root, for whom permissions do not stop writes: the code asks os.access, which
    # says "not writable" on a read-only file system even to root.
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve().is_relative_to(directory.resolve()):
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_plot_of_a_read_only_directory_draws_what_verifies_and_changes_nothing(damaged, tmp_path, monkeypatch,
                                                                              capsys):
    cell = _cell(damaged)
    content = cell.read_bytes()
    cell.write_bytes(content[:100] + bytes([content[100] ^ 4]) + content[101:])
    table = damaged / records.RESULTS_FILE
    table.write_text(table.read_text()[:200])
    before = _snapshot(damaged)
    _read_only(monkeypatch, damaged)
    elsewhere = tmp_path / "elsewhere"
    assert main(["plot", str(damaged), "--out", str(elsewhere)]) == 0
    captured = capsys.readouterr()
    assert str(cell) in captured.out and "left in place" in captured.out, captured.out
    summary = captured.out[captured.out.index("## Summary"):]
    assert "| dense" in summary and "actuallysparse" not in summary  # the verified cell alone is drawn
    assert list(elsewhere.glob("*.png"))
    assert _snapshot(damaged) == before
    # Without --out the plots would go into the read-only tree: one line says so.
    assert main(["plot", str(damaged)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "cannot write the plots" in error and "--out" in error, error
    assert _snapshot(damaged) == before
