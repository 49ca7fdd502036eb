"""Where a run happened: the environment columns of every result row."""

from __future__ import annotations

import os
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from actuallysparse.kernels import cpu_model


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def package_version(name: str) -> str:
    """Installed version of distribution ``name``, without importing it; ``"not installed"`` if absent."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit(path: str | Path | None = None) -> str:
    """Commit of the checkout holding ``path`` (this package by default), ``+dirty`` if tracked files changed.

    ``unknown`` outside a git checkout or before the first commit.
    """
    where = str(Path(path) if path else Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "-C", where, "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def node_columns(device: torch.device, threads: int) -> dict[str, object]:
    """The environment columns that say where a cell computed: ``host``, ``device``, ``device_name``
    (the CPU or GPU model) and ``threads``.

    A cell run on another machine (``--executor ray``) overrides the driver's values with these,
    since latency is comparable only between rows of one kind of node.
    """
    return {"host": socket.gethostname(), "device": device.type, "device_name": device_name(device),
            "threads": threads}


def environment_columns(run_id: str, dataset: str, device: torch.device, threads: int) -> dict[str, object]:
    """The values of :data:`comparison.records.ENVIRONMENT_COLUMNS` for this process."""
    return {
        "run_id": run_id,
        "dataset": dataset,
        **node_columns(device, threads),
        "torch_version": torch.__version__,
        "nni_version": package_version("nni"),
        "git_commit": git_commit(),
    }
