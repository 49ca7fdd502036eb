"""Memory estimated before a run: sizes parsed, an estimate that counts what a cell holds, and
settings that cannot fit refused with one line before anything is written."""
import pytest
import torch

from comparison import footprint
from comparison.cli import main
from comparison.config import RunConfig
from comparison.footprint import MODEL_COPIES, TRAINED_COPIES, estimate_memory, parse_size
from comparison.models import VGG
from tiny_run import TINY

GIB = 1 << 30


@pytest.mark.parametrize("text, expected", [
    ("8GiB", 8 * GIB), ("8 GiB", 8 * GIB), ("8G", 8 * GIB), ("8gb", 8 * 10**9), ("512MiB", 512 << 20),
    ("1.5TiB", int(1.5 * (1 << 40))), ("4096", 4096), ("64k", 64 << 10),
])
def test_sizes_parse(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "8 GiBs", "-1G", "0", "", "1e9"])
def test_a_bad_size_names_the_accepted_forms(text):
    with pytest.raises(ValueError, match="e.g. 8GiB"):
        parse_size(text)


def test_the_estimate_counts_the_real_model_and_grows_with_width_and_batch():
    config = RunConfig(width=0.125, batch_size=16)
    estimate = estimate_memory(config, 10)
    real = VGG(10, 0.125)
    assert estimate.parameters_bytes == 4 * sum(t.numel() for t in real.state_dict().values())
    assert estimate.gradients_bytes == 4 * sum(p.numel() for p in real.parameters())
    assert estimate.optimizer_state_bytes == 2 * estimate.gradients_bytes  # Adam: two moments
    # Activations: every layer's output of one batch, measured on the real model, twice (backward).
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.numel()))
             for m in real.modules() if not list(m.children())]
    real(torch.zeros(16, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert estimate.activations_bytes == 4 * 2 * (sum(outputs) + 16 * 3 * 32 * 32)
    assert estimate.total_bytes > MODEL_COPIES * estimate.parameters_bytes
    # the model being pruned and the dense reference's training copy both hold gradients and Adam's moments
    assert estimate.total_bytes >= (MODEL_COPIES * estimate.parameters_bytes
                                    + TRAINED_COPIES * (estimate.gradients_bytes + estimate.optimizer_state_bytes))
    assert estimate_memory(config.replace(width=0.25), 10).total_bytes > estimate.total_bytes
    assert estimate_memory(config.replace(batch_size=64), 10).activations_bytes == 4 * estimate.activations_bytes
    assert estimate_memory(config.replace(methods=("dense", "actuallysparse")), 10).masked_copies_bytes == 0


def test_the_estimate_is_sane_for_the_default_and_the_real_model():
    default = estimate_memory(RunConfig(), 10).total_bytes
    assert 50 << 20 < default < 1 * GIB
    real = estimate_memory(RunConfig(width=1.0), 10)
    assert real.parameters_bytes == pytest.approx(4 * 28.15e6, rel=0.01)  # VGG11_bn's 28.15 M parameters
    assert 0.5 * GIB < real.total_bytes < 4 * GIB
    # The attacks: width 64 and a batch of 100000 each need far more than a workstation has.
    assert estimate_memory(RunConfig(width=64), 10).total_bytes > 1 << 40
    assert estimate_memory(RunConfig(batch_size=100000), 10).total_bytes > 64 * GIB


@pytest.mark.parametrize("argv, words", [
    (["--width", "64"], ["width 64", "available on this machine", "--max-memory"]),
    (["--width", "64", "--max-memory", "8GiB"], ["width 64", "more than --max-memory 8.0 GiB"]),
    (["--width", "1e9"], ["width 1e+09 makes layers too large to exist", "smaller --width"]),
    (["--max-memory", "1MiB"], ["more than --max-memory 1.0 MiB", "smaller --width or --batch-size"]),
    (["--max-memory", "plenty"], ["--max-memory 'plenty' is not a size"]),
    (["--batch-size", "100000", "--limit-train", "256"],
     ["batch size 100000 is larger than the training set", "256 training samples", "--batch-size 256 or less"]),
])
def test_settings_that_cannot_fit_are_refused_before_any_work(tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    assert main(["run", *TINY, "--out", str(out), *argv]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    for word in words:
        assert word in error, error
    assert not out.exists()


def test_the_machine_s_available_memory_is_the_default_limit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(footprint, "available_memory_bytes", lambda device="cpu": 1 << 20)
    assert main(["run", *TINY, "--out", str(tmp_path / "out")]) == 2
    assert "more than the 1.0 MiB available on this machine" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_machine_s_available_memory_is_read():
    available = footprint.available_memory_bytes("cpu")
    assert available is None or available > 0
