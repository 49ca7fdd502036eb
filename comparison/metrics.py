"""What is measured on a model: latency, bytes held, checkpoint size, a fresh process's peak memory."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from actuallysparse.memory import stored_bytes
from comparison.data import IMAGE_SHAPE
from comparison.device import synchronize

PROBE_TIMEOUT_S = 600


@dataclass(frozen=True)
class Measurement:
    """One observation: a metric name, its value, its unit, and an optional note."""

    metric: str
    value: float
    unit: str
    note: str = ""


def latency_metric(batch_size: int) -> str:
    """Name of the inference-latency metric at ``batch_size`` (``latency_batch64_ms``)."""
    return f"latency_batch{batch_size}_ms"


@torch.inference_mode()
def latency_ms(
    model: nn.Module,
    batch_size: int,
    *,
    repeats: int = 10,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    input_shape: tuple[int, ...] = IMAGE_SHAPE,
) -> float:
    """Median wall time in ms of ``model`` (eval mode) on one batch, after ``warmup`` untimed runs.

    Threads are whatever ``torch.get_num_threads()`` is; the runner fixes them for a whole run.
    The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    for index in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        model(x)
        synchronize(device)
        if index >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    model.train(was_training)
    return statistics.median(times)


def memory_measurements(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, pruned_modules: dict[str, nn.Module]
) -> list[Measurement]:
    """Bytes ``model`` holds, by category, for the pruned layers alone, and the optimizer's state.

    Counted with :func:`actuallysparse.memory.stored_bytes`: every tensor once, masks and
    weight copies of the masking tools included.
    """
    report = stored_bytes(model, optimizer)
    rows = [Measurement("stored_bytes", report.total_bytes, "bytes")]
    rows += [Measurement(f"stored_bytes_{category}", nbytes, "bytes") for category, nbytes in report.by_category.items()]
    rows.append(Measurement("optimizer_state_bytes", report.optimizer_state_bytes, "bytes"))
    # One container so that a tensor shared between two pruned layers is still counted once.
    pruned = stored_bytes(nn.ModuleList(pruned_modules.values()))
    rows.append(Measurement("pruned_layers_bytes", pruned.total_bytes, "bytes"))
    return rows


def checkpoint_bytes(model: nn.Module, directory: str | Path) -> int:
    """Size on disk of ``torch.save(model.state_dict())``, what a user would ship as a checkpoint."""
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        path = Path(scratch) / "state_dict.pt"
        torch.save(model.state_dict(), path)
        return path.stat().st_size


def probe_process_memory(
    model: nn.Module,
    *,
    batch_size: int,
    threads: int,
    device: str = "cpu",
    preimport: tuple[str, ...] = (),
    directory: str | Path | None = None,
    input_shape: tuple[int, ...] = IMAGE_SHAPE,
) -> list[Measurement]:
    """Peak memory of a fresh Python process that loads ``model`` and runs one inference batch.

    The model is pickled whole (``torch.save(model)``) so that the child holds exactly what
    this one does, masks and copies included. The child imports torch and ``preimport``
    (the method's own libraries) before it takes its baseline, so ``model_rss_bytes`` is what
    loading and running the model added.

    Returns:
        ``peak_rss_bytes`` (the child's peak resident size while it loads and runs the model:
        interpreter and libraries included), ``model_rss_bytes`` (that peak minus the child's
        resident size just before loading), and on CUDA ``cuda_max_allocated_bytes``. Where
        the peak cannot be reset after the imports (not Linux), it may include their transient.

    Raises:
        RuntimeError: the child failed; its stderr is in the message.
    """
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        path = Path(scratch) / "model.pt"
        torch.save(model, path)
        command = [
            sys.executable, "-m", "comparison.probe", str(path),
            "--batch-size", str(batch_size), "--threads", str(threads), "--device", device,
            "--input-shape", ",".join(map(str, input_shape)), "--preimport", ",".join(preimport),
        ]
        env = dict(os.environ)
        # The child must import this very checkout of the harness, installed or not.
        project_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [project_root, env.get("PYTHONPATH")]))
        completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=PROBE_TIMEOUT_S)
    if completed.returncode != 0:
        raise RuntimeError(f"memory probe exited with {completed.returncode}: {completed.stderr.strip()[-2000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    rows = [
        Measurement("peak_rss_bytes", result["peak_rss_bytes"], "bytes"),
        Measurement("model_rss_bytes", max(0, result["peak_rss_bytes"] - result["rss_before_load_bytes"]), "bytes"),
    ]
    if "cuda_max_allocated_bytes" in result:
        rows.append(Measurement("cuda_max_allocated_bytes", result["cuda_max_allocated_bytes"], "bytes"))
    return rows
