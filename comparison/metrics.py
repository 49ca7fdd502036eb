"""What is measured on a model: latency, bytes held, checkpoint size, a fresh process's peak memory."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from actuallysparse.memory import stored_bytes
from comparison.data import IMAGE_SHAPE
from comparison.device import synchronize
from comparison.files import save_torch
from comparison.training import timed_step

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
    """Size on disk of ``torch.save(model.state_dict())``, what a user would ship as a checkpoint.

    Raises:
        MachineFaultError: the disk of ``directory`` is full or failing (the path is named).
    """
    # A clean-up error must not hide the write error that came first.
    with tempfile.TemporaryDirectory(dir=directory, ignore_cleanup_errors=True) as scratch:
        path = Path(scratch) / "state_dict.pt"
        save_torch(model.state_dict(), path)
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
        MachineFaultError: the model could not be written to ``directory`` (a full or failing disk).
    """
    with tempfile.TemporaryDirectory(dir=directory, ignore_cleanup_errors=True) as scratch:
        path = Path(scratch) / "model.pt"
        save_torch(model, path)
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


# --------------------------------------------------------------- against the dense reference
def forward_flops(model: nn.Module, input_shape: tuple[int, ...] = IMAGE_SHAPE) -> int:
    """Floating-point operations of one forward pass of one sample, as the model computes it.

    Dense layers (plain, masked or shrunk) are counted by :class:`torch.utils.flop_counter.FlopCounterMode`
    (2 per multiply-add of every matrix product and convolution). A sparse layer
    (:class:`~actuallysparse.layers.SparseLayer`, :class:`~actuallysparse.conv.SparseConv2d`) is
    counted as it computes: 2 per stored weight and output position (its kernels multiply only
    the non-zeros). Element-wise work (masks, activations, batch norm) is not counted, as
    FlopCounterMode does not count it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counted, stand_ins = _with_sparse_layers_silent(model)
    device = next(iter(model.parameters())).device
    was_training = counted.training
    counted.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        counted(torch.zeros(1, *input_shape, device=device))
    counted.train(was_training)
    return int(counter.get_total_flops()) + sum(stand_in.flops for stand_in in stand_ins)


class _Silent(nn.Module):
    """Stands in for a sparse layer while dense FLOPs are counted: right output shape, no counted
    work, and its own count of what the sparse kernel does (2 per non-zero and output position)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.nnz = layer.nnz
        self.out_features = layer._matrix_shape[0]
        self.output_size = getattr(layer, "output_size", None)   # a convolution's (H, W) -> (H_out, W_out)
        self.flops = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output_size is None:
            shape = (*x.shape[:-1], self.out_features)
            positions = math.prod(x.shape[1:-1])
        else:
            height, width = self.output_size(x.shape[-2], x.shape[-1])
            shape = (*x.shape[:-3], self.out_features, height, width)
            positions = height * width
        self.flops += 2 * self.nnz * positions
        return x.new_zeros(shape)


def _with_sparse_layers_silent(model: nn.Module) -> tuple[nn.Module, list[_Silent]]:
    """A copy of ``model`` with each sparse layer replaced by a :class:`_Silent`, and those stand-ins."""
    import copy

    from actuallysparse.storage import SparseModule

    if not any(isinstance(module, SparseModule) for module in model.modules()):
        return model, []
    counted = copy.deepcopy(model)
    stand_ins = []
    for name, module in list(counted.named_modules()):
        if isinstance(module, SparseModule):
            parent_name, _, child = name.rpartition(".")
            stand_ins.append(_Silent(module))
            setattr(counted.get_submodule(parent_name) if parent_name else counted, child, stand_ins[-1])
    return counted, stand_ins


def held_bytes(model: nn.Module) -> int:
    """Bytes the model holds to compute (every tensor once: weights, indices, masks, copies,
    buffers), without gradients or optimizer state."""
    report = stored_bytes(model)
    return report.total_bytes - report.by_category.get("gradients", 0)


@dataclass(frozen=True)
class DenseReference:
    """The dense baseline a cell compares itself with, measured in the same process.

    Attributes:
        model: the dense baseline (eval mode), timed interleaved with the cell's model.
        flops: its :func:`forward_flops`.
        bytes: its :func:`held_bytes`.
        train_step_ms: median wall time of its training step at the run's batch size, measured
            when the cell starts.
        time_step: one more training step of a training copy of the baseline (its own
            optimizer, a fixed random batch); returns its wall time in ms. The runner calls it
            between the cell's own steps, so the two are timed under the same conditions.
    """

    model: nn.Module
    flops: int
    bytes: int
    train_step_ms: float
    time_step: Callable[[], float]


def dense_reference(model: nn.Module, optimizer_factory, *, batch_size: int, steps: int = 5,
                    device: torch.device | str = "cpu", input_shape: tuple[int, ...] = IMAGE_SHAPE,
                    num_classes: int = 10) -> DenseReference:
    """Measure the dense baseline ``model``: FLOPs, bytes, and the median of ``steps`` timed
    training steps (after one untimed) of a copy, so ``model`` itself is left as it was; the copy
    stays to be stepped again (:attr:`DenseReference.time_step`).

    A median of steps taken in one burst when the cell starts proved a poor reference on a shared
    host: in the default run of 9fa8879 (20 steps) the ``actuallysparse`` cells at 0.9 took
    25-26 ms a step in every seed while their references read about 50, 41 and 49 ms (speedups
    1.93, 1.61, 1.89), and in that of b22d88f (5 steps) 49 against 42-44 ms. The runner therefore
    times the reference between the cell's own steps (``_reference_sampler``); this burst is only
    the fallback of a step without such samples."""
    import copy

    device = torch.device(device)
    trained = copy.deepcopy(model).to(device).train()
    optimizer = optimizer_factory(trained.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *input_shape, generator=generator).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)

    def time_step() -> float:
        return timed_step(trained, optimizer, x, y, device)[1]

    times = [time_step() for _ in range(steps + 1)][1:]
    model = model.to(device).eval()
    return DenseReference(model, forward_flops(model, input_shape), held_bytes(model), statistics.median(times),
                          time_step)


@torch.inference_mode()
def latency_pair_ms(model: nn.Module, reference: nn.Module, batch_size: int, *, repeats: int = 10, warmup: int = 2,
                    device: torch.device | str = "cpu", input_shape: tuple[int, ...] = IMAGE_SHAPE) -> tuple[float, float]:
    """Median wall times in ms of ``model`` and ``reference`` on one batch, timed alternately.

    Interleaving the two, repeat by repeat, puts both under the same conditions (a busy core,
    a clock that drifts), so their ratio is steadier than two separate medians.
    """
    device = torch.device(device)
    modes = (model.training, reference.training)
    model.eval()
    reference.eval()
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    times: dict[int, list[float]] = {0: [], 1: []}
    for index in range(warmup + repeats):
        for which, module in enumerate((model, reference)):
            synchronize(device)
            start = time.perf_counter()
            module(x)
            synchronize(device)
            if index >= warmup:
                times[which].append((time.perf_counter() - start) * 1e3)
    model.train(modes[0])
    reference.train(modes[1])
    return statistics.median(times[0]), statistics.median(times[1])


def comparison_measurements(model: nn.Module, reference: DenseReference, *, batch_sizes: list[int], repeats: int,
                            train_step_ms: float | None, reference_step_ms: float | None = None,
                            device: torch.device | str = "cpu") -> list[Measurement]:
    """Latency at each batch size, and the cell against its dense reference: FLOPs, theoretical
    and measured speedup (dense ÷ cell: above 1 is faster), compression (dense bytes ÷ bytes held).
    The training-step speedup divides ``reference_step_ms`` (the reference's steps taken between
    the cell's; its steps at the cell's start when ``None``) by ``train_step_ms``."""
    flops = forward_flops(model)
    rows = [
        Measurement("flops", flops, "flop", "one forward pass of one sample; a sparse layer counts 2 per stored weight"),
        Measurement("theoretical_speedup", reference.flops / flops if flops else math.nan, "ratio",
                    "dense FLOPs / this model's FLOPs"),
        Measurement("compression_ratio", reference.bytes / held_bytes(model), "ratio",
                    "dense bytes / bytes held (weights, indices, masks, copies, buffers; no gradients)"),
    ]
    largest = max(batch_sizes)
    for batch_size in batch_sizes:
        ms, dense_ms = latency_pair_ms(model, reference.model, batch_size, repeats=repeats, device=device)
        rows.append(Measurement(latency_metric(batch_size), ms, "ms"))
        name = "measured_speedup" if batch_size == largest else f"measured_speedup_batch{batch_size}"
        rows.append(Measurement(name, dense_ms / ms, "ratio",
                                f"dense latency / this model's latency, inference at batch {batch_size}, timed alternately"))
    if train_step_ms:
        reference_ms = reference_step_ms or reference.train_step_ms
        rows.append(Measurement("measured_speedup_train_step", reference_ms / train_step_ms, "ratio",
                                "dense training step / this model's training step (medians, same batch size; the "
                                "dense steps taken between this model's)"))
    return rows
