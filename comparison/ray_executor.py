"""Running a grid's cells as tasks of a Ray cluster (``--executor ray``); every ``import ray`` is here.

Ray is the scheduler: this module only says what a task is and what it needs. The driver (the
process of ``python -m comparison run``) puts the data set in Ray's object store once (Ray copies
it to each node once, so workers need no data files and no shared file system), trains each
missing seed's baseline as a task, puts cached baselines in the store, and submits one task per
cell that depends on its seed's baseline. A task writes nothing: it returns its rows, and the
driver writes each cell's file (with its manifest) as the cell finishes. A cell that fails, or
whose worker dies, is tried again by Ray up to :data:`MAX_RETRIES` times, then recorded as a
failed cell whose ``note`` says why.

Each row says where it computed (``host``, ``device_name``, ``threads``), since latency is
comparable only within one kind of node.
"""

from __future__ import annotations

import math
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from comparison import records
from comparison.config import RunConfig
from comparison.device import resolve_device
from comparison.environment import available_cores, node_columns
from comparison.files import is_machine_fault, machine_fault

# Times Ray runs a cell again after it raised or its worker died (so a cell has 1 + this attempts).
MAX_RETRIES = 2
# How long a --ray-address may take to answer before the run is refused.
CONNECT_TIMEOUT_S = 5.0
INSTALL_HINT = "pip install 'actuallysparse[distributed]' (or pip install 'ray>=2.9')"


class ExecutorError(ValueError):
    """The Ray executor cannot start: Ray is missing, the cluster unreachable, or too small for one cell."""


class CellFailed(Exception):
    """Raised by a cell task whose cell failed, so that Ray tries it again; carries the cell's rows."""

    def __init__(self, rows: list[dict[str, object]]):
        super().__init__(str(rows[-1]["note"]) if rows else "cell failed")
        self.rows = rows

    def __reduce__(self):
        return CellFailed, (self.rows,)


def import_ray():
    """The ``ray`` module, or :class:`ExecutorError` saying how to install it."""
    try:
        import ray
    except ImportError as error:
        raise ExecutorError(f"--executor ray needs Ray, which is not installed ({error}); {INSTALL_HINT}") from error
    return ray


def cell_cpus(config: RunConfig) -> int:
    """Threads of one cell under Ray, and the CPUs reserved for it: ``cpus_per_cell``, else
    ``threads``, else 1."""
    return config.cpus_per_cell or config.threads or 1


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse, within ``timeout_s``, a ``HOST:PORT`` (or ``ray://HOST:PORT``) nobody answers on.

    Ray's own connect retries for a long time; a plain TCP connect says at once whether anything
    listens there. ``auto`` (the cluster ``ray start`` left on this machine) is Ray's to find.
    """
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(f"--ray-address {address!r} is not HOST:PORT (e.g. 10.0.0.1:6379, the address "
                            f"`ray start --head` prints) nor 'auto'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise ExecutorError(f"cannot reach the Ray cluster at --ray-address {address} ({error}); start it with "
                            f"`ray start --head` on that machine, or check the address and port") from error


@dataclass
class RayCluster:
    """A connection to Ray for one run: the cluster at ``config.ray_address``, one already
    initialised in this process, or a Ray instance started on this machine (shut down by
    :meth:`close`).

    Attributes:
        config: the run's settings.
        started: whether this object started Ray (and so stops it).
    """

    config: RunConfig
    started: bool

    @classmethod
    def connect(cls, config: RunConfig, echo: Callable[[str], None] = print) -> "RayCluster":
        """Connect (or start Ray) and check that some node can hold one cell.

        Raises:
            ExecutorError: Ray missing, address unreachable, or resources no node has.
        """
        ray = import_ray()
        cpus, gpus = cell_cpus(config), config.gpus_per_cell
        if config.ray_address:
            check_reachable(config.ray_address)
        started = False
        if not ray.is_initialized():
            if config.ray_address:
                try:
                    ray.init(address=config.ray_address, include_dashboard=False)
                except Exception as error:  # Ray raises several kinds; all mean the same to the user
                    raise ExecutorError(f"cannot join the Ray cluster at --ray-address {config.ray_address}: "
                                        f"{type(error).__name__}: {_first_line(error)}") from error
            else:
                cores = available_cores()
                if cpus > cores:
                    raise ExecutorError(f"--cpus-per-cell {cpus} is more than the {cores} cores of this machine; "
                                        f"give at most {cores}, or join a cluster with --ray-address")
                ray.init(num_cpus=cores, include_dashboard=False)
                echo(f"note: started a local Ray instance with {cores} CPUs")
            started = True
        cluster = cls(config, started)
        try:
            cluster.check_resources(cpus, gpus)
        except ExecutorError:
            cluster.close()
            raise
        return cluster

    def check_resources(self, cpus: int, gpus: float) -> None:
        """Refuse a cell size that no live node of the cluster can ever hold (Ray would wait forever)."""
        ray = import_ray()
        nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
        if any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus for node in nodes):
            return
        largest = ", ".join(sorted({f"{node.get('CPU', 0):g} CPUs/{node.get('GPU', 0):g} GPUs" for node in nodes}))
        raise ExecutorError(f"no node of the Ray cluster can hold one cell of {cpus} CPUs and {gpus:g} GPUs "
                            f"(nodes have {largest or 'nothing'}); lower --cpus-per-cell / --gpus-per-cell "
                            f"or add a larger node")

    def close(self) -> None:
        """Stop Ray if this object started it."""
        if self.started:
            import_ray().shutdown()
            self.started = False

    def cells(
        self,
        plan,
        data,
        environment: dict[str, object],
        to_run: list[records.Cell],
        work,
        *,
        cached_baseline: Callable[[int], dict | None],
        save_baseline: Callable[[int, dict], None],
        echo: Callable[[str], None] = print,
    ) -> Iterator[tuple[records.Cell, list[dict[str, object]]]]:
        """Compute ``to_run`` as Ray tasks, yielding each cell with its rows as it finishes.

        Args:
            plan: the :class:`comparison.runner.RunPlan`.
            data: the data set, put in the object store once.
            environment: the driver's environment columns; a task replaces where it ran.
            work: the :class:`comparison.runner.CellWork` a task calls.
            cached_baseline: the driver's cached baseline payload of a seed (``state_dict``,
                ``pretrain_s``, ...), or ``None``.
            save_baseline: caches a baseline a task made (called by the driver only).

        Closing the generator (Ctrl-C, an error) cancels the tasks not finished.
        """
        ray = import_ray()
        config = plan.config
        cpus, gpus = cell_cpus(config), self.config.gpus_per_cell
        options = dict(num_cpus=cpus, num_gpus=gpus, max_retries=MAX_RETRIES, retry_exceptions=True)
        train_task = ray.remote(**options)(_train_baseline_task)
        cell_task = ray.remote(**options)(_cell_task)
        data_ref = ray.put(data)
        pending: dict[object, tuple[str, object]] = {}
        baselines: dict[int, object] = {}
        try:
            for seed in dict.fromkeys(cell.seed for cell in to_run):
                payload = cached_baseline(seed)
                if payload is not None:
                    baselines[seed] = ray.put(payload)
                else:
                    baselines[seed] = train_task.remote(work.train_baseline, config, seed, data_ref, config.device, cpus)
                    pending[baselines[seed]] = ("baseline", seed)
            for cell in to_run:
                ref = cell_task.remote(work, config, cell, baselines[cell.seed], data_ref, environment,
                                       config.device, cpus)
                pending[ref] = ("cell", cell)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    kind, key = pending.pop(ref)
                    if kind == "baseline":
                        self._save_baseline(ray, ref, key, save_baseline, echo)
                    else:
                        yield key, self._rows(ray, ref, key, environment)
        finally:
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # already finished or gone: nothing left to stop
                    pass

    @staticmethod
    def _save_baseline(ray, ref, seed: int, save_baseline, echo) -> None:
        try:
            payload = ray.get(ref)
        except Exception as error:  # its cells fail with the reason; nothing to cache
            echo(f"warning: the baseline of seed {seed} could not be made on Ray: {_first_line(error)}")
            return
        if isinstance(payload, dict):
            save_baseline(seed, payload)

    @staticmethod
    def _rows(ray, ref, cell: records.Cell, environment: dict[str, object]) -> list[dict[str, object]]:
        attempts = f"after {1 + MAX_RETRIES} attempts on Ray"
        try:
            return ray.get(ref)
        except Exception as error:  # the last attempt failed: record why, and the grid goes on
            cause = getattr(error, "cause", None) or error
            if is_machine_fault(cause):
                raise machine_fault(cause) from error  # a node's full disk is not the cell's result
            if isinstance(cause, CellFailed):
                rows = list(cause.rows)
                last = dict(rows[-1])
                last["note"] = f"{last['note']} ({attempts})"
                return rows[:-1] + [last]
            reason = f"{type(cause).__name__}: {_first_line(cause)} ({attempts})"
            return [records.make_row(cell, 0, records.FAILED_METRIC, 1.0, "flag", reason, environment)]


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _train_baseline_task(train_baseline, config: RunConfig, seed: int, data, device_name: str, threads: int):
    """A Ray task: the baseline payload of ``seed``, or the divergence error (not retried: it would recur)."""
    from comparison.training import NonFiniteLossError

    torch.set_num_threads(threads)
    try:
        return train_baseline(config, seed, data, device=resolve_device(device_name), progress=False)
    except NonFiniteLossError as error:
        return error


def _cell_task(work, config: RunConfig, cell: records.Cell, baseline, data, environment: dict[str, object],
               device_name: str, threads: int) -> list[dict[str, object]]:
    """A Ray task: the rows of ``cell``, measured on this node, in a scratch folder of its own.

    Raises:
        CellFailed: the cell failed (Ray tries it again; the last attempt's rows are recorded).
    """
    torch.set_num_threads(threads)
    device = resolve_device(device_name)
    environment = {**environment, **node_columns(device, threads)}
    if isinstance(baseline, Exception):
        return work.failed_baseline_rows(cell, baseline, environment)
    with tempfile.TemporaryDirectory(prefix="comparison-cell-") as scratch:
        rows = work.run_cell(config, cell, baseline["state_dict"], data, environment, device=device,
                             threads=threads, scratch_dir=Path(scratch), progress=False,
                             pretrain_s=baseline.get("pretrain_s", math.nan))
    if any(row["metric"] == records.FAILED_METRIC for row in rows):
        raise CellFailed(rows)
    return rows
