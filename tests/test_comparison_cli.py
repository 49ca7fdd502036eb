"""Command line: options, config files and their precedence, clear errors, the quick end-to-end run."""

import subprocess
import sys
from pathlib import Path

import pytest

from comparison import records
from comparison.cli import build_parser, config_from_args, main

QUICK = ["--width", "0.125", "--limit-train", "256", "--limit-test", "128", "--pretrain-epochs", "1",
         "--steps", "2", "--epochs-per-step", "1", "--seeds", "0", "--sparsities", "0.9,0.99"]


def _config(argv):
    return config_from_args(build_parser().parse_args(["run", *argv]))


def test_options_map_to_the_config():
    config = _config(["--methods", "nni,dense", "--sparsities", "0.5,0.8", "--seeds", "0,1", "--width", "0.25",
                      "--scope", "all", "--epochs-per-step", "3", "--device", "cpu", "--out", "x", "--download"])
    assert config.methods == ("nni", "dense") and config.sparsities == (0.5, 0.8) and config.seeds == (0, 1)
    assert config.width == 0.25 and config.scope == "all" and config.epochs_per_step == 3
    assert config.out == "x" and config.download is True


def test_config_file_then_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("width: 0.25\nsteps: 5\nmethods: [nni]\n")
    config = _config(["--config", str(path), "--steps", "2"])
    assert config.width == 0.25 and config.methods == ("nni",) and config.steps == 2


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--methods", "dense,magic"], ["unknown method 'magic'", "actuallysparse, actuallysparse-coo, actuallysparse-orphaned, dense, nni, nni-structured, random, rigl, set, torch-prune"]),
        (["--dataset", "imagenet"], ["unknown dataset 'imagenet'", "digits, cifar10, cifar100"]),
        (["--sparsities", "0.9,1.5"], ["1.5", "(0, 1)"]),
        (["--width", "wide"], ["invalid value 'wide' for width"]),
        (["--scope", "head"], ["classifier, all"]),
    ],
)
def test_bad_options_exit_2_naming_the_valid_choices(argv, words, capsys, tmp_path):
    assert main(["run", "--out", str(tmp_path), *argv]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error  # one line
    for word in words:
        assert word in error
    assert not list(tmp_path.iterdir())  # nothing was started


def test_missing_cifar_is_a_clear_error(tmp_path, capsys):
    code = main(["run", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o"),
                 "--no-progress"])
    assert code == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err


def test_help_lists_commands_and_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "run" in capsys.readouterr().out and "plot" in build_parser().format_help()
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--dataset", "--data-dir", "--methods", "--sparsities", "--seeds", "--width", "--pretrain-epochs",
                 "--steps", "--epochs-per-step", "--batch-size", "--limit-train", "--limit-test", "--device",
                 "--out", "--config", "--scope", "--init", "--break-lock", "--max-memory"):
        assert flag in text


def test_importing_the_harness_leaves_sigterm_alone():
    """The SIGTERM handler is the command line's, installed while a command runs (not on import)."""
    probe = ("import signal, comparison.cli, comparison.runner, comparison.files; "
             "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)")
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                               cwd=Path(__file__).resolve().parent.parent)
    assert completed.stdout.split()[-1] == "True"


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    """The quick run of the issue, as a user types it, in a fresh process."""
    out = tmp_path / "quick"
    completed = subprocess.run([sys.executable, "-m", "comparison", "run", *QUICK, "--out", str(out)],
                               capture_output=True, text=True, timeout=600,
                               cwd=Path(__file__).resolve().parent.parent)
    assert completed.returncode == 0, completed.stderr[-3000:]
    table = records.load_table(out)
    assert list(table.columns) == list(records.COLUMNS)
    assert set(table["method"]) == {"dense", "actuallysparse", "nni", "torch-prune", "nni-structured", "random"}
    assert set(table["target_sparsity"]) == {0.0, 0.9, 0.99}
    assert not (table["metric"] == records.FAILED_METRIC).any()
    assert len(list((out / "cells").glob("*.csv"))) == 11
    assert len(list((out / "plots").glob("*.png"))) == 8
    assert "| 0.99 | actuallysparse" in completed.stdout  # "(outputs near uniform)" may follow
    peaks = table[table["metric"] == "model_rss_bytes"]["value"]
    assert (peaks > 0).all()
