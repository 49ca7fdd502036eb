"""The torch device of a run, and waiting for it: one place for both."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """The torch device called ``name`` (``cpu`` or ``cuda``); refuses CUDA where there is none.

    Raises:
        ValueError: ``cuda`` asked for but ``torch.cuda.is_available()`` is False.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False; use --device cpu")
    return torch.device(name)


def synchronize(device: torch.device | str) -> None:
    """Wait until ``device`` has finished its queued work (a no-op on the CPU).

    CUDA runs asynchronously: without this a timer would stop when the kernels are launched,
    not when they finish.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
