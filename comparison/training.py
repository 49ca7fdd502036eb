"""The one training loop and the one evaluation every method goes through."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from comparison.config import RunConfig
from comparison.data import ImageSplit, derive_seed, eval_batches, train_batches
from comparison.device import synchronize


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the cell that raised it is recorded as failed."""


@dataclass(frozen=True)
class EpochResult:
    """What one training epoch observed.

    Attributes:
        mean_loss: mean training loss over the epoch's batches.
        step_times_ms: wall time of every optimizer step (forward, backward, update), in order.
        seconds: wall time of the whole epoch.
    """

    mean_loss: float
    step_times_ms: tuple[float, ...]
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Test-set accuracy (fraction), mean cross-entropy loss, and the pass's wall time in seconds."""

    accuracy: float
    loss: float
    seconds: float


def make_optimizer(parameters: Iterable[nn.Parameter], config: RunConfig) -> torch.optim.Optimizer:
    """The optimizer of a run, built the same way for every method from ``config``.

    Call it after a method has prepared its model: NNI replaces the pruned weights with new
    Parameter objects when it wraps a model, and an optimizer made before would not train them.
    """
    parameters = [p for p in parameters if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; valid choices: adam, sgd")


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    split: ImageSplit,
    *,
    batch_size: int,
    seed: int,
    stream: str,
    epoch: int,
    device: torch.device | str = "cpu",
    on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    after_step: Callable[[], object] | None = None,
    between_steps: Callable[[], object] | None = None,
) -> EpochResult:
    """Train ``model`` for one epoch on the seeded batch order of ``(seed, stream, epoch)``.

    The global RNG is seeded from the same triple first, so dropout draws the same masks for
    every method too.

    Args:
        on_batch: called with each ``(images, labels)`` batch before it is used (tests use it
            to check that methods see identical data).
        after_step: called after each optimizer step, inside the timed step (dynamic sparse
            training moves its weights there: its cost is part of the step's time).
        between_steps: called after each timed step, outside its time (the runner times the
            dense reference's steps there, under the same conditions as the model's own).

    Raises:
        NonFiniteLossError: a batch loss was NaN or infinite.
    """
    device = torch.device(device)
    torch.manual_seed(derive_seed(seed, f"{stream}/dropout", epoch))
    model.train()
    losses: list[float] = []
    step_times_ms: list[float] = []
    start = time.perf_counter()
    for batch_index, (images, labels) in enumerate(
        train_batches(split, batch_size, seed, stream, epoch)
    ):
        if on_batch is not None:
            on_batch(images, labels)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss, milliseconds = timed_step(model, optimizer, images, labels, device, after_step)
        step_times_ms.append(milliseconds)
        if between_steps is not None:
            between_steps()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(f"training loss became {value} at epoch {epoch}, batch {batch_index}")
        losses.append(value)
    return EpochResult(sum(losses) / max(len(losses), 1), tuple(step_times_ms), time.perf_counter() - start)


def timed_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               device: torch.device, after_step: Callable[[], object] | None = None) -> tuple[torch.Tensor, float]:
    """One training step (cross-entropy, backward, optimizer step, then ``after_step``); returns the
    loss and its wall time in ms, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if after_step is not None:
        after_step()
    synchronize(device)
    return loss, (time.perf_counter() - start) * 1e3


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, split: ImageSplit, *, batches: int, batch_size: int, seed: int,
                          step: int, device: torch.device | str = "cpu") -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``batches`` training batches.

    Pruning changes the activations each BatchNorm sees, while its running statistics (what
    evaluation uses) are an exponential average over the last training batches of a model that
    kept changing. The statistics are reset and recomputed as a plain average over the batches
    of order ``(seed, "bn-recalibration", step)``, the same for every method; no weight changes.
    Returns the number of batches used (0 when the model has no BatchNorm or ``batches`` is 0).
    """
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
             and module.track_running_stats]
    if not norms or batches <= 0:
        return 0
    device = torch.device(device)
    momenta = [module.momentum for module in norms]
    was_training = model.training
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # a cumulative average over the batches below
    model.train()
    used = 0
    try:
        for images, _ in train_batches(split, batch_size, seed, "bn-recalibration", step):
            if used == batches:
                break
            model(images.to(device))
            used += 1
    finally:
        for module, momentum in zip(norms, momenta):
            module.momentum = momentum
        model.train(was_training)
    return used


@torch.inference_mode()
def evaluate(model: nn.Module, split: ImageSplit, *, batch_size: int, device: torch.device | str = "cpu") -> EvalResult:
    """Accuracy and mean loss of ``model`` (in eval mode) on ``split``; restores the model's mode."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    synchronize(device)
    start = time.perf_counter()
    for images, labels in eval_batches(split, batch_size):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
        count += int(labels.numel())
    synchronize(device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    if count == 0:
        raise ValueError("cannot evaluate on an empty split")
    return EvalResult(correct / count, loss_sum / count, seconds)


def pretrain(
    model: nn.Module,
    split: ImageSplit,
    config: RunConfig,
    seed: int,
    *,
    device: torch.device | str = "cpu",
    epochs: Iterable[int] | None = None,
) -> list[EpochResult]:
    """Train the dense baseline for ``config.pretrain_epochs`` epochs (stream ``"pretrain"``).

    ``epochs`` overrides the epoch indices (a progress bar over them, or a subset to resume).

    Raises:
        NonFiniteLossError: the loss diverged (try a smaller ``lr``).
    """
    optimizer = make_optimizer(model.parameters(), config)
    results = []
    for epoch in epochs if epochs is not None else range(config.pretrain_epochs):
        results.append(
            train_epoch(model, optimizer, split, batch_size=config.batch_size, seed=seed, stream="pretrain",
                        epoch=epoch, device=device)
        )
    return results
