"""How much memory a run needs, estimated before it starts, against what the machine has.

A width or batch size too large for the machine does not fail: it swaps or is killed by the
kernel after minutes of work (``--width 64`` reached 14 GB resident in a minute). The runner
refuses such settings up front with :func:`check_memory`, from an estimate made on the
``meta`` device (shapes only, no storage), so that even an absurd width costs nothing to judge.

The estimate is deliberately coarse, an upper bound of what one cell holds at once, float32:

- the model's parameters, five times: the model being pruned, its dense reference and that
  reference's training copy (stepped between the cell's steps to time it), the cached baseline,
  and the copy written for a checkpoint or for the memory probe's child process;
- the gradients and the optimizer's state (Adam two per parameter, SGD with momentum one) of the
  two that train: the model being pruned and the reference's training copy;
- the masked copies of the masking methods (the original weight and its mask, per pruned layer);
- the activations of one training batch: every layer's output, kept for the backward pass, and
  as much again for their gradients.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from comparison.config import RunConfig
from comparison.data import IMAGE_SHAPE
from comparison.methods import target_layer_names
from comparison.models import VGG

FLOAT_BYTES = 4
# The model being pruned, its dense reference and its training copy, the cached baseline, and a
# checkpoint/probe copy; the first and the training copy hold gradients and optimizer state.
MODEL_COPIES = 5
TRAINED_COPIES = 2

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``8GiB``, ``512MiB``, ``8G`` (binary) or ``8GB`` (decimal).

    Example::

        >>> parse_size("8GiB")
        8589934592

    Raises:
        ValueError: ``text`` is not a positive size; the message shows the accepted forms.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"--max-memory {text!r} is not a size; give a positive number with a unit, "
                         f"e.g. 8GiB, 512MiB or 16G")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit that keeps it at or above 1 (``14.2 GiB``)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


@dataclass(frozen=True)
class MemoryEstimate:
    """What one cell of a run holds at once, by kind, in bytes (see the module's docstring).

    Attributes:
        parameters_bytes: one copy of the model's parameters and buffers.
        gradients_bytes, optimizer_state_bytes: of one model being trained (a cell trains
            :data:`TRAINED_COPIES`).
        masked_copies_bytes: original weights and masks of the pruned layers (masking methods).
        activations_bytes: one training batch's layer outputs and their gradients.
        batch_size: the batch the activations are counted for.
    """

    parameters_bytes: int
    gradients_bytes: int
    optimizer_state_bytes: int
    masked_copies_bytes: int
    activations_bytes: int
    batch_size: int

    @property
    def total_bytes(self) -> int:
        trained = TRAINED_COPIES * (self.gradients_bytes + self.optimizer_state_bytes)
        return MODEL_COPIES * self.parameters_bytes + trained + self.masked_copies_bytes + self.activations_bytes

    def describe(self) -> str:
        return (f"about {format_size(self.total_bytes)}: parameters {format_size(self.parameters_bytes)} "
                f"x{MODEL_COPIES} copies, gradients {format_size(self.gradients_bytes)} and optimizer state "
                f"{format_size(self.optimizer_state_bytes)} x{TRAINED_COPIES}, masked copies "
                f"{format_size(self.masked_copies_bytes)}, "
                f"activations of one batch of {self.batch_size} {format_size(self.activations_bytes)}")


def estimate_memory(config: RunConfig, num_classes: int) -> MemoryEstimate:
    """The memory one cell of ``config`` holds at once, from the model's shapes alone.

    Raises:
        ValueError: the width makes tensors too large for torch to describe at all.
    """
    try:
        with torch.device("meta"):
            model = VGG(num_classes, config.width)
    except RuntimeError as error:  # torch cannot even size such tensors (more than 2**63 bytes)
        raise ValueError(f"width {config.width:g} makes layers too large to exist ({error}); "
                         f"use a smaller --width (1.0 is the real VGG11_bn)") from error
    parameters = sum(tensor.numel() for tensor in model.state_dict().values())
    trainable = sum(parameter.numel() for parameter in model.parameters())
    pruned = sum(model.get_submodule(name).weight.numel() for name in target_layer_names(model, config.scope))
    outputs = []
    hooks = [module.register_forward_hook(lambda module, inputs, output: outputs.append(output.numel()))
             for module in model.modules() if not list(module.children())]
    model(torch.empty(1, *IMAGE_SHAPE, device="meta"))
    for hook in hooks:
        hook.remove()
    # A batch never holds more than the training set (a larger one is refused once the data is loaded).
    batch_size = min(config.batch_size, config.limit_train or config.batch_size)
    per_parameter = 2 if config.optimizer == "adam" else int(config.momentum > 0)
    masking = any(method not in ("dense", "actuallysparse") for method in config.methods)
    return MemoryEstimate(
        parameters_bytes=FLOAT_BYTES * parameters,
        gradients_bytes=FLOAT_BYTES * trainable,
        optimizer_state_bytes=FLOAT_BYTES * per_parameter * trainable,
        masked_copies_bytes=FLOAT_BYTES * 2 * pruned if masking else 0,
        activations_bytes=FLOAT_BYTES * 2 * batch_size * (sum(outputs) + _numel(IMAGE_SHAPE)),
        batch_size=batch_size,
    )


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def available_memory_bytes(device: str = "cpu") -> int | None:
    """Memory a new allocation may still take: on ``cuda`` the GPU's free memory; on the CPU the
    kernel's ``MemAvailable``, or less where a cgroup (a container, a job) limits this process.
    ``None`` where neither can be read."""
    if device == "cuda":
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info()[0])
    found = []
    available = _meminfo_bytes("MemAvailable")
    if available is not None:
        found.append(available)
    for limit_file, usage_file in (("memory.max", "memory.current"),                       # cgroup v2
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # v1
        limit, usage = _read_int(Path("/sys/fs/cgroup") / limit_file), _read_int(Path("/sys/fs/cgroup") / usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 says "no limit" with a huge number
            found.append(max(0, limit - usage))
    return min(found) if found else None


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):  # absent, or "max" (no limit)
        return None


def check_memory(config: RunConfig, num_classes: int, max_memory_bytes: int | None = None) -> MemoryEstimate:
    """Refuse ``config`` when one cell would need more memory than there is.

    Args:
        max_memory_bytes: the memory a cell may use (``--max-memory``); ``None`` means what this
            machine has available now (:func:`available_memory_bytes`); when that cannot be
            read, nothing is refused.

    Returns:
        The estimate, when it fits.

    Raises:
        ValueError: it does not fit; the message gives the estimate, the memory it was held
            against, and what to change.
    """
    estimate = estimate_memory(config, num_classes)
    limit = max_memory_bytes if max_memory_bytes is not None else available_memory_bytes(config.device)
    if limit is None or estimate.total_bytes <= limit:
        return estimate
    against = (f"--max-memory {format_size(limit)}" if max_memory_bytes is not None
               else f"the {format_size(limit)} {'free on the GPU' if config.device == 'cuda' else 'available'} "
                    f"on this machine")
    raise ValueError(
        f"width {config.width:g} and batch size {config.batch_size} need {estimate.describe()}; that is more "
        f"than {against}. Use a smaller --width or --batch-size, or, if the cells run where there is more "
        f"memory (other nodes under Ray), say how much with --max-memory SIZE (e.g. 64GiB)")
