"""The results table: one row per observation, one verified file per cell, written atomically.

Columns (in this order), the same for every table the project writes (``run``, ``reproduce``):

- ``experiment``: which experiment the row belongs to (``run`` for a plain comparison run; the
  thesis reproduction writes ``baselines``, ``storage`` and ``loops``).
- ``method``, ``seed``, ``target_sparsity``: the cell (a method that never prunes has target 0).
- ``step``: pruning step, 0 = the prepared baseline before any pruning.
- ``metric``, ``value``, ``unit``: the observation (see :data:`UNITS` for the usual metrics).
- ``note``: free text; the reason of a failure, how a method stores its pruned layers.
- ``run_id``: digest of the settings (see :attr:`RunConfig.run_id`); rows with the same id are
  comparable.
- environment: ``dataset``, ``device``, ``device_name``, ``threads``, ``torch_version``,
  ``nni_version``, ``git_commit``, ``host`` (the machine the cell computed on; with
  ``device_name`` and ``threads`` it says which kind of node measured the row).

A cell's rows are written to ``cells/<cell>.csv`` in one atomic step when the cell ends, and a
manifest ``cells/<cell>.manifest.json`` (row count and SHA-256 of the file) proves it whole.
A cell file without a manifest that matches is not trusted: :func:`verified_cell_paths` moves
it aside into ``cells/damaged/`` (never deletes it) so that ``run`` computes it again.
``results.csv`` is derived: the rows of every verified cell, rebuilt whenever it disagrees
with them. A failed cell's file holds the rows measured before the failure and a ``failed``
row whose ``note`` says why.
"""

from __future__ import annotations

import contextlib
import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from comparison.files import DirectoryLock, atomic_path, is_writable, move_aside, sha256_of, write_json_atomic

CELL_COLUMNS = ("method", "seed", "target_sparsity", "step", "metric", "value", "unit", "note")
ENVIRONMENT_COLUMNS = (
    "run_id", "dataset", "device", "device_name", "threads", "torch_version", "nni_version", "git_commit", "host",
)
COLUMNS = ("experiment",) + CELL_COLUMNS + ENVIRONMENT_COLUMNS
DEFAULT_EXPERIMENT = "run"
# Columns added after tables had been written, with the value a table without them is read with.
ADDED_COLUMNS = {"experiment": DEFAULT_EXPERIMENT, "host": "unknown"}
# The first schema (none of the added columns); any table of COLUMNS minus some added ones reads too.
LEGACY_COLUMNS = tuple(column for column in COLUMNS if column not in ADDED_COLUMNS)
FAILED_METRIC = "failed"
RESULTS_FILE = "results.csv"
CELLS_DIR = "cells"
MANIFEST_SUFFIX = ".manifest.json"


class CorruptResultsError(ValueError):
    """A results file cannot be read or fails its check; the message names the file."""

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
    "training_s": "s",
    "flops": "flop",
    "theoretical_speedup": "ratio",
    "measured_speedup": "ratio",
    "measured_speedup_batch1": "ratio",
    "measured_speedup_train_step": "ratio",
    "compression_ratio": "ratio",
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


def manifest_path(path: str | Path) -> Path:
    """The manifest that proves the cell file ``path`` whole."""
    path = Path(path)
    return path.with_name(path.stem + MANIFEST_SUFFIX)


def make_row(cell: Cell, step: int, metric: str, value: float, unit: str, note: str,
             environment: Mapping[str, object]) -> dict[str, object]:
    """One table row; ``environment`` must hold every :data:`ENVIRONMENT_COLUMNS` key.

    Its ``experiment`` key, if any, fills the ``experiment`` column (default ``run``).
    """
    missing = [key for key in ENVIRONMENT_COLUMNS if key not in environment]
    if missing:
        raise KeyError(f"environment lacks columns {missing}")
    row = {
        "experiment": environment.get("experiment", DEFAULT_EXPERIMENT),
        "method": cell.method, "seed": cell.seed, "target_sparsity": cell.target_sparsity, "step": step,
        "metric": metric, "value": float(value), "unit": unit, "note": note,
    }
    row.update({key: environment[key] for key in ENVIRONMENT_COLUMNS})
    return row


def write_rows(path: str | Path, rows: Iterable[Mapping[str, object]],
               columns: tuple[str, ...] = COLUMNS) -> int:
    """Write ``rows`` as CSV with ``columns`` to ``path`` all or nothing; returns the row count."""
    count = 0
    with atomic_path(path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="raise")
            writer.writeheader()
            for row in rows:
                writer.writerow({key: _format(row.get(key, "")) for key in columns})
                count += 1
    return count


def write_cell(path: str | Path, rows: Iterable[Mapping[str, object]]) -> None:
    """Write a cell's rows, then the manifest that proves the file whole (row count, SHA-256).

    The manifest is written last: a crash between the two leaves a cell that fails its check
    and is computed again, never one that passes while incomplete.
    """
    path = Path(path)
    manifest_path(path).unlink(missing_ok=True)
    count = write_rows(path, rows)
    try:
        write_json_atomic(manifest_path(path), {"file": path.name, "rows": count, "sha256": sha256_of(path)})
    except BaseException:
        # Without its manifest the file is not trusted anyway; removing it spares the next run a
        # warning about a damaged cell that is only an unfinished write (a full disk, an interrupt).
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        raise


def cell_problem(path: str | Path) -> str | None:
    """Why the cell file ``path`` cannot be trusted, or ``None`` when its manifest vouches for it."""
    path = Path(path)
    manifest = manifest_path(path)
    if not manifest.is_file():
        return f"{path} has no manifest {manifest.name} (its write did not finish)"
    try:
        import json

        expected = json.loads(manifest.read_text(encoding="utf-8"))
        rows, digest = int(expected["rows"]), str(expected["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{manifest} is unreadable ({type(error).__name__}: {error})"
    if sha256_of(path) != digest:
        return f"{path} does not match its manifest's checksum (changed or damaged after it was written)"
    try:
        found = len(read_rows(path))
    except CorruptResultsError as error:
        return str(error)
    if found != rows:
        return f"{path} holds {found} rows, its manifest says {rows}"
    return None


def read_rows(path: str | Path, columns: tuple[str, ...] = COLUMNS) -> list[dict[str, str]]:
    """The rows of one CSV written by :func:`write_rows`, as strings.

    A table written before some of :data:`ADDED_COLUMNS` existed (the same columns in the same
    order, less those) is read with their default values (``experiment`` = ``run``, ``host`` =
    ``unknown``).

    Raises:
        CorruptResultsError: the file is not UTF-8 CSV with ``columns``, or a row is cut short;
            the message names the file.
    """
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            found = tuple(reader.fieldnames or ())
            absent = _absent_added_columns(found) if columns == COLUMNS and found != columns else None
            if found != columns and absent is None:
                raise CorruptResultsError(f"{path} has columns {list(found)}, expected {list(columns)}")
            rows = []
            for line, row in enumerate(reader, start=2):
                if None in row or any(value is None for value in row.values()):
                    raise CorruptResultsError(f"{path}: line {line} has {len(row) - (None in row)} fields "
                                              f"where {len(columns)} were expected (the file is damaged)")
                if absent:
                    row = {column: row[column] if column in row else absent[column] for column in COLUMNS}
                rows.append(row)
            return rows
    except UnicodeDecodeError as error:
        raise CorruptResultsError(f"{path} is not a UTF-8 CSV results file ({error.reason} at byte {error.start})") from error
    except csv.Error as error:
        raise CorruptResultsError(f"{path} is not a readable CSV results file: {error}") from error


def _absent_added_columns(found: tuple[str, ...]) -> dict[str, str] | None:
    """The added columns (with their defaults) a table of columns ``found`` lacks, or ``None`` when
    ``found`` is not :data:`COLUMNS` less some added columns."""
    absent = {column: default for column, default in ADDED_COLUMNS.items() if column not in found}
    expected = tuple(column for column in COLUMNS if column not in absent)
    return absent if found == expected else None


def cell_run_ids(path: str | Path) -> set[str]:
    """Run ids found in a cell file (empty when it cannot be read)."""
    try:
        return {row["run_id"] for row in read_rows(path)}
    except CorruptResultsError:
        return set()


def cell_status(out_dir: str | Path, cell: Cell, run_id: str) -> str:
    """``missing``, ``finished``, ``failed`` or ``damaged`` (fails its check) for ``cell`` under ``out_dir``.

    Raises:
        ValueError: a verified cell file written under another run id (other settings); mixing
            them would compare unlike runs.
    """
    path = cell_path(out_dir, cell)
    if not path.is_file():
        return "missing"
    if cell_problem(path):
        return "damaged"
    rows = read_rows(path)
    other_ids = {row["run_id"] for row in rows} - {run_id}
    if other_ids:
        raise ValueError(
            f"{path} holds results of run {', '.join(sorted(other_ids))}, not of this run {run_id} "
            f"(different settings); use another --out, or move that directory away"
        )
    return "failed" if any(row["metric"] == FAILED_METRIC for row in rows) else "finished"


def cell_commits(out_dir: str | Path, cells) -> set[str]:
    """The ``git_commit`` values in the files of ``cells`` under ``out_dir`` (the code that made them)."""
    return {row["git_commit"] for cell in cells for row in read_rows(cell_path(out_dir, cell))}


def verified_cell_paths(out_dir: str | Path, echo: Callable[[str], None] = print) -> list[Path]:
    """Cell files under ``out_dir`` that pass their check, sorted; damaged ones are moved aside.

    A damaged cell is reported by path and moved to ``cells/damaged/`` (kept, never deleted),
    so that ``run`` computes it again. While another live process holds the directory's lock
    (a run is writing it), damaged cells are only reported: the writer may be between the
    cell and its manifest. In a directory this process cannot write (a read-only file system)
    they are only reported too, and nothing is changed.
    """
    cells_dir = Path(out_dir) / CELLS_DIR
    paths = sorted(cells_dir.glob("*.csv"))
    good = []
    busy = DirectoryLock(out_dir).owner() is not None and not _locked_by_me(out_dir)
    read_only = not is_writable(cells_dir) if cells_dir.is_dir() else False
    for path in paths:
        problem = cell_problem(path)
        if problem is None:
            good.append(path)
        elif busy:
            echo(f"warning: {problem}; left in place while another process writes {out_dir}")
        elif read_only:
            echo(f"warning: {problem}; left in place: {cells_dir} cannot be written (read-only)")
        else:
            moved = move_aside(path, problem)
            manifest = manifest_path(path)
            if manifest.is_file():
                move_aside(manifest, problem)
            echo(f"warning: {problem}; moved it to {moved} and its cell will be run again")
    return good


def _locked_by_me(out_dir: str | Path) -> bool:
    import os
    import socket

    owner = DirectoryLock(out_dir).owner() or {}
    return owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()


def is_legacy_directory(out_dir: str | Path) -> bool:
    """True for a results directory written before cells carried manifests (nothing to verify with)."""
    cells_dir = Path(out_dir) / CELLS_DIR
    return any(cells_dir.glob("*.csv")) and not any(cells_dir.glob(f"*{MANIFEST_SUFFIX}"))


def refresh_results_file(out_dir: str | Path, run_id: str | None = None,
                         echo: Callable[[str], None] = print) -> Path:
    """Make ``results.csv`` hold exactly the rows of the verified cells (of ``run_id`` if given).

    It is rewritten (atomically) only when it is missing or disagrees with the cells.
    """
    out_dir = Path(out_dir)
    rows = verified_rows(out_dir, run_id, echo)
    target = out_dir / RESULTS_FILE
    try:
        current = read_rows(target) if target.is_file() else None
    except CorruptResultsError as error:
        echo(f"warning: {error}; rebuilding it from the cells")
        current = None
    if current is None or _canonical(current) != _canonical(rows):
        if current is not None:
            echo(f"warning: {target} disagreed with the verified cells ({len(current)} rows vs {len(rows)}); "
                 f"rebuilt from them")
        write_rows(target, rows)
    return target


def verified_rows(out_dir: str | Path, run_id: str | None = None,
                  echo: Callable[[str], None] = print) -> list[dict[str, str]]:
    """The rows of every verified cell under ``out_dir`` (of ``run_id`` if given); damaged cells
    are named (and moved aside where the directory can be written)."""
    rows = []
    for path in verified_cell_paths(out_dir, echo):
        cell_rows = read_rows(path)
        if run_id is None or all(row["run_id"] == run_id for row in cell_rows):
            rows.extend(cell_rows)
    return rows


def _canonical(rows: list[dict[str, str]]) -> list[tuple]:
    return sorted(tuple(row[key] for key in COLUMNS) for row in rows)


def load_table(source: str | Path, echo: Callable[[str], None] = print):
    """The results table as a pandas DataFrame, from a results directory or a CSV file.

    A directory (or a ``results.csv`` inside one with ``cells/``) is read from its verified
    cells, and ``results.csv`` is rebuilt if it disagrees with them. A directory written before
    cells carried manifests is read as it is, with a warning that it cannot be verified. A lone
    CSV is read as it is. A directory this process cannot write (a read-only file system) is
    read from its verified cells and left exactly as it is: damaged cells are named, not moved,
    and ``results.csv`` is not rebuilt.

    Raises:
        FileNotFoundError: nothing to read; CorruptResultsError: a damaged file, named.
    """
    source = Path(source)
    directory = source if source.is_dir() else source.parent
    if source.is_dir() or (source.name == RESULTS_FILE and (directory / CELLS_DIR).is_dir()):
        if is_legacy_directory(directory):
            echo(f"note: {directory} was written before cells carried manifests; its cells cannot be verified")
            paths = [directory / RESULTS_FILE] if (directory / RESULTS_FILE).is_file() else \
                sorted((directory / CELLS_DIR).glob("*.csv"))
        elif (directory / CELLS_DIR).is_dir() and not is_writable(directory):
            echo(f"note: {directory} cannot be written (read-only); reading its verified cells without "
                 f"repairing anything")
            return _frame(verified_rows(directory, echo=echo), source)
        elif (directory / CELLS_DIR).is_dir():
            paths = [refresh_results_file(directory, echo=echo)]
        else:  # a table copied without its cells: nothing to verify it against
            paths = [directory / RESULTS_FILE] if (directory / RESULTS_FILE).is_file() else []
    else:
        paths = [source] if source.is_file() else []
    if not paths:
        raise FileNotFoundError(f"no results in {source}: expected {RESULTS_FILE} or {CELLS_DIR}/*.csv")
    return _frame([row for path in paths for row in read_rows(path)], source)


def _frame(rows: list[dict[str, str]], source: Path):
    import pandas as pd

    if not rows:
        raise FileNotFoundError(f"no finished cells in {source} yet")
    frame = pd.DataFrame.from_records(rows, columns=list(COLUMNS))
    for column in ("seed", "step", "threads", "target_sparsity", "value"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def collect_cells(out_dir: str | Path, cells: Iterable[Cell], run_id: str | None = None) -> list[dict[str, str]]:
    """Rows of every given cell that has a verified file, in the given order.

    With ``run_id``, verified cells finished earlier in the same directory under the same run
    id (a previous invocation with other methods, sparsities or seeds) follow, so a results
    table never drops what an earlier command measured.
    """
    cells = list(cells)
    rows: list[dict[str, str]] = []
    paths = [cell_path(out_dir, cell) for cell in cells]
    for path in paths:
        if path.is_file() and cell_problem(path) is None:
            rows.extend(read_rows(path))
    if run_id is not None:
        planned = set(paths)
        for path in sorted((Path(out_dir) / CELLS_DIR).glob("*.csv")):
            if path not in planned and cell_problem(path) is None:
                earlier = read_rows(path)
                if earlier and all(row["run_id"] == run_id for row in earlier):
                    rows.extend(earlier)
    return rows


def _format(value: object) -> object:
    # repr keeps every digit of a float; CSV readers parse "nan" and "inf" back.
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return value
