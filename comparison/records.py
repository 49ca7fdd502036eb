"""The results table: one row per observation, one file per cell, written atomically.

Columns (in this order):

- ``method``, ``seed``, ``target_sparsity``: the cell (``dense`` has target 0).
- ``step``: pruning step, 0 = the prepared baseline before any pruning.
- ``metric``, ``value``, ``unit``: the observation (see :data:`UNITS` for the usual metrics).
- ``note``: free text; the reason of a failure, how a method stores its pruned layers.
- ``run_id``: digest of the settings (see :attr:`RunConfig.run_id`); rows with the same id are
  comparable.
- environment: ``dataset``, ``device``, ``device_name``, ``threads``, ``torch_version``,
  ``nni_version``, ``git_commit``.

A cell's rows are written to ``cells/<cell>.csv`` in one atomic step (temporary file, then
``os.replace``) when the cell ends, so a crash or Ctrl-C never leaves half a cell, and a cell
whose file exists is finished. A failed cell's file holds the rows measured before the failure
and a ``failed`` row whose ``note`` says why.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

CELL_COLUMNS = ("method", "seed", "target_sparsity", "step", "metric", "value", "unit", "note")
ENVIRONMENT_COLUMNS = (
    "run_id", "dataset", "device", "device_name", "threads", "torch_version", "nni_version", "git_commit",
)
COLUMNS = CELL_COLUMNS + ENVIRONMENT_COLUMNS
FAILED_METRIC = "failed"
# Temporary files are private (0600); results are ordinary files, readable as the umask allows.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
RESULTS_FILE = "results.csv"
CELLS_DIR = "cells"

# Metrics the runner records, with their units; plots and summaries look them up by these names.
UNITS = {
    "step_target_sparsity": "fraction",
    "achieved_sparsity": "fraction",
    "nonzero_weights": "count",
    "test_accuracy": "fraction",
    "test_loss": "nats",
    "test_eval_s": "s",
    "train_loss": "nats",
    "train_step_ms": "ms",
    "finetune_s": "s",
    "stored_bytes": "bytes",
    "pruned_layers_bytes": "bytes",
    "optimizer_state_bytes": "bytes",
    "checkpoint_bytes": "bytes",
    "peak_rss_bytes": "bytes",
    "model_rss_bytes": "bytes",
    "cuda_max_allocated_bytes": "bytes",
    "layers_stored_dense": "count",
    "elapsed_s": "s",
    FAILED_METRIC: "flag",
}


@dataclass(frozen=True, order=True)
class Cell:
    """One independent unit of work: a method at a target sparsity with a seed.

    Example::

        >>> Cell("nni", 0.9, 0).file_name
        'nni__sparsity-0.9__seed-0.csv'
    """

    method: str
    target_sparsity: float
    seed: int

    @property
    def file_name(self) -> str:
        return f"{self.method}__sparsity-{self.target_sparsity:g}__seed-{self.seed}.csv"

    def __str__(self) -> str:
        return f"{self.method} @ {self.target_sparsity:g}, seed {self.seed}"


def cell_path(out_dir: str | Path, cell: Cell) -> Path:
    """Where ``cell``'s rows live under ``out_dir``."""
    return Path(out_dir) / CELLS_DIR / cell.file_name


def make_row(cell: Cell, step: int, metric: str, value: float, unit: str, note: str,
             environment: Mapping[str, object]) -> dict[str, object]:
    """One table row; ``environment`` must hold every :data:`ENVIRONMENT_COLUMNS` key."""
    missing = [key for key in ENVIRONMENT_COLUMNS if key not in environment]
    if missing:
        raise KeyError(f"environment lacks columns {missing}")
    row = {
        "method": cell.method, "seed": cell.seed, "target_sparsity": cell.target_sparsity, "step": step,
        "metric": metric, "value": float(value), "unit": unit, "note": note,
    }
    row.update({key: environment[key] for key in ENVIRONMENT_COLUMNS})
    return row


def write_rows(path: str | Path, rows: Iterable[Mapping[str, object]],
               columns: tuple[str, ...] = COLUMNS) -> None:
    """Write ``rows`` as CSV with ``columns`` (default :data:`COLUMNS`) to ``path`` atomically (all or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", newline="", encoding="utf-8", dir=path.parent,
                                         prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="raise")
            writer.writeheader()
            for row in rows:
                writer.writerow({key: _format(row.get(key, "")) for key in columns})
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, _FILE_MODE)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` all or nothing (temporary file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(text)
        os.chmod(handle.name, _FILE_MODE)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def read_rows(path: str | Path, columns: tuple[str, ...] = COLUMNS) -> list[dict[str, str]]:
    """The rows of one CSV written by :func:`write_rows`, as strings."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != columns:
            raise ValueError(f"{path} has columns {reader.fieldnames}, expected {list(columns)}")
        return list(reader)


def cell_status(out_dir: str | Path, cell: Cell, run_id: str) -> str:
    """``missing``, ``finished`` or ``failed`` for ``cell`` under ``out_dir``.

    Raises:
        ValueError: the cell's file was written under another run id (other settings); mixing
            them would compare unlike runs.
    """
    path = cell_path(out_dir, cell)
    if not path.is_file():
        return "missing"
    rows = read_rows(path)
    other_ids = {row["run_id"] for row in rows} - {run_id}
    if other_ids:
        raise ValueError(
            f"{path} holds results of run {', '.join(sorted(other_ids))}, not of this run {run_id} "
            f"(different settings); use another --out or remove that directory"
        )
    return "failed" if any(row["metric"] == FAILED_METRIC for row in rows) else "finished"


def load_table(source: str | Path):
    """The results table as a pandas DataFrame, from a results CSV or a results directory.

    A directory's ``results.csv`` is read if present, else every cell file under ``cells/``.

    Raises:
        FileNotFoundError: nothing to read; ValueError: the columns are not :data:`COLUMNS`.
    """
    import pandas as pd

    source = Path(source)
    if source.is_dir():
        if (source / RESULTS_FILE).is_file():
            paths = [source / RESULTS_FILE]
        else:
            paths = sorted((source / CELLS_DIR).glob("*.csv"))
    else:
        paths = [source]
    if not paths or not all(path.is_file() for path in paths):
        raise FileNotFoundError(f"no results in {source}: expected {RESULTS_FILE} or {CELLS_DIR}/*.csv")
    frames = []
    for path in paths:
        frame = pd.read_csv(path, keep_default_na=False, na_values=["nan"],
                            dtype={"note": str, "method": str, "metric": str, "unit": str, "git_commit": str})
        if tuple(frame.columns) != COLUMNS:
            raise ValueError(f"{path} has columns {list(frame.columns)}, expected {list(COLUMNS)}")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def collect_cells(out_dir: str | Path, cells: Iterable[Cell], run_id: str | None = None) -> list[dict[str, str]]:
    """Rows of every given cell that has a file, in the given order.

    With ``run_id``, cells finished earlier in the same directory under the same run id (a
    previous invocation with other methods, sparsities or seeds) follow, so a results table
    never drops what an earlier command measured.
    """
    cells = list(cells)
    rows: list[dict[str, str]] = []
    paths = [cell_path(out_dir, cell) for cell in cells]
    for path in paths:
        if path.is_file():
            rows.extend(read_rows(path))
    if run_id is not None:
        planned = set(paths)
        for path in sorted((Path(out_dir) / CELLS_DIR).glob("*.csv")):
            if path not in planned:
                earlier = read_rows(path)
                if earlier and all(row["run_id"] == run_id for row in earlier):
                    rows.extend(earlier)
    return rows


def _format(value: object) -> object:
    # repr keeps every digit of a float; CSV readers parse "nan" and "inf" back.
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return value
