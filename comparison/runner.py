"""Runs a comparison: one cached baseline per seed, then every (method, sparsity, seed) cell.

Every cell starts from the same baseline weights, prunes to the same per-step targets, and
trains on the same batches in the same order with the same optimizer settings; the method is
the only thing that differs. A cell is independent of the others (it needs the config, its
seed's baseline and the data), so cells can run in any order, resume, or be farmed out.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from actuallysparse.functional import backend_name
from comparison import records
from comparison.config import RUN_ID_EXCLUDES, RunConfig
from comparison.data import Dataset, derive_seed, load_dataset
from comparison.device import resolve_device
from comparison.environment import available_cores, environment_columns
from comparison.footprint import check_memory
from comparison.files import (
    DirectoryLock,
    is_machine_fault,
    machine_fault,
    move_aside,
    remove_stale_temporaries,
    save_torch_atomic,
    sha256_of,
    write_json_atomic,
    write_text_atomic,
)
from comparison.methods import Method, available_methods, make_method, target_layer_names
from comparison.metrics import (
    DenseReference,
    Measurement,
    checkpoint_bytes,
    comparison_measurements,
    dense_reference,
    memory_measurements,
    probe_process_memory,
)
from comparison.models import VGG, load_init, vgg11_bn
from comparison.records import Cell
from comparison.schedule import sparsity_schedule
from comparison.training import (
    EpochResult,
    NonFiniteLossError,
    evaluate,
    make_optimizer,
    pretrain,
    recalibrate_batchnorm,
    train_epoch,
)

BatchObserver = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass
class RunResult:
    """What :func:`run` did: where the results are, and the status of every planned cell.

    Attributes:
        out_dir: the results directory.
        table_path: ``results.csv`` (the rows of every planned cell that has finished).
        statuses: ``finished`` / ``failed`` / ``skipped`` (finished earlier) per cell.
    """

    out_dir: Path
    table_path: Path
    statuses: dict[Cell, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[Cell]:
        return [cell for cell, status in self.statuses.items() if status == "failed"]


def planned_cells(config: RunConfig) -> list[Cell]:
    """The cells of ``config``: one target-0 cell per seed for a method that never prunes, else
    one per (method, sparsity, seed)."""
    methods = available_methods()
    cells = []
    for seed in config.seeds:
        for method in config.methods:
            targets = config.sparsities if methods[method].prunes else (0.0,)
            cells.extend(Cell(method, target, seed) for target in targets)
    return cells


def step_targets(config: RunConfig, target_sparsity: float) -> list[float]:
    """The per-step targets of a cell whose final target is ``target_sparsity``."""
    if config.schedule == "explicit":
        return list(config.step_targets)
    return sparsity_schedule(target_sparsity, config.steps, config.schedule)


TRAINING_S_NOTE = ("seconds of training that made this model so far: the baseline's pretraining (for a cell "
                   "that starts from it) plus this cell's epochs")


def probes_memory(config: RunConfig, seed: int) -> bool:
    """Whether the cells of ``seed`` measure a fresh process's peak memory: ``probe_memory`` is on
    and ``seed`` is among the first ``probe_memory_seeds`` seeds of the run (all when 0). The
    bytes a model holds do not depend on its seed; the probe costs a few seconds a cell."""
    if not config.probe_memory:
        return False
    return not config.probe_memory_seeds or seed in sorted(config.seeds)[:config.probe_memory_seeds]


def resolve_threads(config: RunConfig) -> int:
    """Intra-op threads for the run: ``config.threads``, or every available core when it is 0."""
    return config.threads or available_cores()


def build_model(config: RunConfig, num_classes: int, seed: int) -> VGG:
    """A freshly initialised VGG11_bn of the configured width, its weights a function of ``seed``."""
    return vgg11_bn(num_classes, config.width, seed=derive_seed(seed, "init"))


def baseline_path(out_dir: Path, config: RunConfig, seed: int) -> Path:
    """Cache file of the baseline for ``seed`` (named by the settings that decide it)."""
    directory = Path(config.baseline_dir) if config.baseline_dir else out_dir / "baselines"
    return directory / f"seed-{seed}__{config.baseline_id()}.pt"


def _cached_baseline(path: Path, echo: Callable[[str], None]) -> dict[str, object] | None:
    """The baseline payload cached at ``path`` if it is whole; a damaged one is moved aside (and retrained)."""
    if not path.is_file():
        return None
    checksum = path.with_name(path.name + ".sha256")
    problem = None
    if not checksum.is_file():
        problem = f"baseline {path} has no checksum file {checksum.name} (its write did not finish)"
    elif checksum.read_text(encoding="utf-8", errors="replace").strip() != sha256_of(path):
        problem = f"baseline {path} does not match its checksum (damaged after it was written)"
    else:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            payload["state_dict"]  # noqa: B018 - a payload without it is as unreadable as a broken file
            return payload
        except Exception as error:  # any unreadable checkpoint is retrained, not fatal
            problem = f"baseline {path} cannot be loaded ({type(error).__name__}: {error})"
    moved = move_aside(path, problem)
    if checksum.is_file():
        move_aside(checksum, problem)
    echo(f"warning: {problem}; moved it to {moved}; training the baseline again")
    return None


def load_or_train_baseline(
    config: RunConfig, seed: int, data: Dataset, *, device: torch.device, out_dir: Path, progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, torch.Tensor]:
    """The baseline state dict for ``seed`` (see :func:`baseline_payload`)."""
    return baseline_payload(config, seed, data, device=device, out_dir=out_dir, progress=progress,
                            echo=echo)["state_dict"]


def baseline_payload(
    config: RunConfig, seed: int, data: Dataset, *, device: torch.device, out_dir: Path, progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, object]:
    """The baseline of ``seed`` as :func:`train_baseline` returns it: from the cache, or made now and cached.

    The cache file is written atomically with a checksum beside it; a cached file that fails
    the checksum or does not load is named, moved aside and retrained.

    Raises:
        NonFiniteLossError: pretraining diverged.
    """
    path = baseline_path(out_dir, config, seed)
    cached = _cached_baseline(path, echo)
    if cached is not None:
        return cached
    payload = train_baseline(config, seed, data, device=device, progress=progress)
    save_baseline(path, payload)
    return payload


def train_baseline(config: RunConfig, seed: int, data: Dataset, *, device: torch.device,
                   progress: bool = True) -> dict[str, object]:
    """Make the baseline of ``seed`` (from ``config.init`` or by pretraining) and return what the
    cache holds: ``state_dict`` (on the CPU), ``test_accuracy``, ``test_loss``, ``train_loss``,
    ``pretrain_s`` (the seconds its training epochs took; 0 for an ``--init`` file).

    Writes nothing, so that it can run on another machine (:func:`save_baseline` caches it).

    Raises:
        NonFiniteLossError: pretraining diverged.
    """
    model = build_model(config, data.num_classes, seed).to(device)
    history: list[EpochResult] = []
    if config.init:
        load_init(model, config.init)
    else:
        epochs = tqdm(range(config.pretrain_epochs), desc=f"baseline seed {seed}", leave=False,
                      disable=not progress, unit="epoch")
        history = pretrain(model, data.train, config, seed, device=device, epochs=epochs)
    result = evaluate(model, data.test, batch_size=config.batch_size, device=device)
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    return {
        "state_dict": state,
        "test_accuracy": result.accuracy,
        "test_loss": result.loss,
        "train_loss": [epoch.mean_loss for epoch in history],
        "pretrain_s": sum(epoch.seconds for epoch in history),
    }


def save_baseline(path: Path, payload: dict[str, object]) -> None:
    """Cache a baseline made by :func:`train_baseline` at ``path``, atomically, with its checksum beside it."""
    save_torch_atomic(payload, path)
    try:
        write_text_atomic(path.with_name(path.name + ".sha256"), sha256_of(path) + "\n")
    except BaseException:
        # Without its checksum the file is not trusted anyway; removing it spares the next run a
        # warning about a damaged baseline that is only an unfinished write.
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        raise


def failed_baseline_rows(cell: Cell, error: Exception, environment: dict[str, object]) -> list[dict[str, object]]:
    """The rows of a cell whose seed's baseline could not be made: one ``failed`` row saying why."""
    reason = f"baseline training failed: {type(error).__name__}: {error} (try a smaller --lr)"
    return [records.make_row(cell, 0, records.FAILED_METRIC, 1.0, "flag", reason, environment)]


def run_cell(
    config: RunConfig,
    cell: Cell,
    baseline: dict[str, torch.Tensor],
    data: Dataset,
    environment: dict[str, object],
    *,
    device: torch.device,
    threads: int,
    scratch_dir: Path,
    progress: bool = True,
    on_batch: BatchObserver | None = None,
    pretrain_s: float = math.nan,
) -> list[dict[str, object]]:
    """Run one cell and return its rows; an exception or a NaN loss becomes a ``failed`` row.

    A fault of the machine (a full or read-only disk, an I/O error) is not the cell's result: it
    is raised as :class:`~comparison.files.MachineFaultError`, naming the path, and no row is kept.

    Step 0 measures the prepared, unpruned model; step ``t`` prunes to the schedule's ``t``-th
    target, fine-tunes ``config.epochs_per_step`` epochs, re-estimates the BatchNorm statistics on
    ``config.bn_recalibration_batches`` training batches (every method alike), then measures. Fine-tuning epoch
    ``e`` (counted across steps) uses batch order ``(seed, "finetune", e)`` for every method.

    A method that trains from scratch (``from_scratch``: dynamic sparse training) starts from the
    seed's random initialisation instead of the baseline and trains through the pretraining epochs
    too (stream ``"pretrain"``, before step 1's fine-tuning), so it sees the same batches in the
    same order as the baseline and a pruning cell together. ``training_s`` is each step's total
    training time so far: for a cell that starts from the baseline it includes ``pretrain_s``, the
    baseline's pretraining seconds.
    """
    rows: list[dict[str, object]] = []
    step = 0
    start = time.perf_counter()

    def add(measurements: list[Measurement]) -> None:
        for m in measurements:
            rows.append(records.make_row(cell, step, m.metric, m.value, m.unit, m.note, environment))

    bar = tqdm(total=config.steps + 1, desc=str(cell), leave=False, disable=not progress, unit="step")
    try:
        method = make_method(cell.method, config.scope, cell.seed)
        method.target_sparsity = cell.target_sparsity
        model = build_model(config, data.num_classes, cell.seed)
        if not method.from_scratch:
            model.load_state_dict(baseline)
        model.to(device)
        reference_model = build_model(config, data.num_classes, cell.seed)
        reference_model.load_state_dict(baseline)
        reference = dense_reference(reference_model, lambda params: make_optimizer(params, config),
                                    batch_size=config.batch_size, device=device, num_classes=data.num_classes)
        model = method.prepare(model, target_layer_names(model, config.scope))
        # After prepare, always: NNI's wrapping replaces the Parameters an earlier optimizer held.
        optimizer = make_optimizer(model.parameters(), config)
        schedule = step_targets(config, cell.target_sparsity)
        if method.from_scratch:  # sparse at the target from the start; the steps only place the measurements
            schedule = [cell.target_sparsity] * len(schedule)
        pretraining = config.pretrain_epochs if method.from_scratch and not config.init else 0
        batches_per_epoch = math.ceil(len(data.train) / config.batch_size)
        between_steps, reference_window = _reference_sampler(reference)
        after_step = method.start_training(
            model, optimizer, total_steps=(pretraining + len(schedule) * config.epochs_per_step) * batches_per_epoch,
            steps_per_epoch=batches_per_epoch)
        measure = functools.partial(_measure_step, config, method, reference=reference,
                                    reference_window=reference_window, data=data, device=device, threads=threads,
                                    scratch_dir=scratch_dir)
        training_s = 0.0 if method.from_scratch else pretrain_s
        add(measure(model, optimizer, None, 0.0, probe=False))
        add([Measurement("elapsed_s", time.perf_counter() - start, "s"),
             Measurement("training_s", training_s, "s", TRAINING_S_NOTE)])
        bar.update()
        for step, target in enumerate(schedule, start=1):
            optimizer = method.prune(model, target, optimizer) or optimizer
            epochs = [
                train_epoch(model, optimizer, data.train, batch_size=config.batch_size, seed=cell.seed,
                            stream="pretrain", epoch=index, device=device, on_batch=on_batch, after_step=after_step,
                            between_steps=between_steps)
                for index in range(pretraining if step == 1 else 0)
            ]
            epochs += [
                train_epoch(model, optimizer, data.train, batch_size=config.batch_size, seed=cell.seed,
                            stream="finetune", epoch=(step - 1) * config.epochs_per_step + index,
                            device=device, on_batch=on_batch, after_step=after_step, between_steps=between_steps)
                for index in range(config.epochs_per_step)
            ]
            training_s += sum(epoch.seconds for epoch in epochs)
            if config.bn_recalibration_batches:
                recalibrate_batchnorm(model, data.train, batches=config.bn_recalibration_batches,
                                      batch_size=config.batch_size, seed=cell.seed, step=step, device=device)
            add(measure(model, optimizer, epochs, target,
                        probe=step == len(schedule) and probes_memory(config, cell.seed)))
            add([Measurement("elapsed_s", time.perf_counter() - start, "s"),
                 Measurement("training_s", training_s, "s", TRAINING_S_NOTE)])
            bar.update()
    except Exception as error:  # one cell's failure must not stop the run; its reason is recorded
        if is_machine_fault(error):
            # Recorded, it would keep the cell failed after the disk is fixed.
            raise machine_fault(error, error.filename or scratch_dir) from error
        reason = f"{type(error).__name__}: {error}"
        tqdm.write(f"cell {cell} failed at step {step}: {reason}")
        if os.environ.get("COMPARISON_TRACEBACK"):
            tqdm.write(traceback.format_exc())
        add([Measurement(records.FAILED_METRIC, 1.0, "flag", reason)])
    finally:
        bar.close()
    return rows


# A training step of the dense reference is timed after every REFERENCE_EVERY-th step of the
# cell's own, so both medians come from the same stretch of time (see dense_reference).
REFERENCE_EVERY = 6


def _reference_sampler(reference: DenseReference) -> tuple[Callable[[], None], Callable[[], float | None]]:
    """``(between_steps, window)``: ``between_steps`` times a reference step after every
    :data:`REFERENCE_EVERY`-th call, with the global random state put back afterwards (the
    cell's dropout draws stay those of every other method); ``window()`` returns the median of the
    samples since its last call (``None`` when there are none) and starts a new window."""
    samples: list[float] = []
    calls = itertools.count(1)

    def between_steps() -> None:
        if next(calls) % REFERENCE_EVERY == 0:
            with torch.random.fork_rng(devices=[]):
                samples.append(reference.time_step())

    def window() -> float | None:
        median = statistics.median(samples) if samples else None
        samples.clear()
        return median

    return between_steps, window


def _measure_step(
    config: RunConfig,
    method: Method,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epochs: list[EpochResult] | None,
    step_target: float,
    *,
    probe: bool,
    reference: DenseReference,
    reference_window: Callable[[], float | None],
    data: Dataset,
    device: torch.device,
    threads: int,
    scratch_dir: Path,
) -> list[Measurement]:
    zeros, total = method.sparsity_counts(model)
    dense_layers = method.dense_stored_layers(model)
    rows = [
        Measurement("step_target_sparsity", step_target, "fraction"),
        Measurement("achieved_sparsity", zeros / total if total else math.nan, "fraction"),
        Measurement("nonzero_weights", total - zeros, "count"),
        Measurement("layers_stored_dense", len(dense_layers), "count",
                    f"{method.storage_note()}; stored dense: {', '.join(dense_layers) or 'none'}"),
    ]
    train_step_ms = None
    if epochs:
        step_times = [t for epoch in epochs for t in epoch.step_times_ms[1:]] or \
                     [t for epoch in epochs for t in epoch.step_times_ms]
        train_step_ms = statistics.median(step_times) if step_times else None
        rows += [
            Measurement("train_loss", epochs[-1].mean_loss, "nats"),
            Measurement("train_step_ms", train_step_ms if train_step_ms else math.nan, "ms"),
            Measurement("finetune_s", sum(epoch.seconds for epoch in epochs), "s"),
        ]
    # Bytes first, while the model is as training left it: evaluation switches to eval mode,
    # which may free training-only state (the sparse layer's transposed pattern).
    rows += memory_measurements(model, optimizer, method.pruned_modules(model))
    result = evaluate(model, data.test, batch_size=config.batch_size, device=device)
    rows += [
        Measurement("test_accuracy", result.accuracy, "fraction"),
        Measurement("test_loss", result.loss, "nats"),
        Measurement("test_eval_s", result.seconds, "s"),
    ]
    rows += comparison_measurements(model, reference, batch_sizes=sorted({1, config.batch_size}),
                                    repeats=config.latency_repeats, train_step_ms=train_step_ms,
                                    reference_step_ms=reference_window(), device=device)
    rows.append(Measurement("checkpoint_bytes", checkpoint_bytes(model, scratch_dir), "bytes"))
    if not (probe and config.probe_memory):
        return rows
    try:
        rows += probe_process_memory(model, batch_size=config.batch_size, threads=threads, device=config.device,
                                     preimport=method.runtime_modules, directory=scratch_dir)
    except Exception as error:  # a failed probe loses one number, not the cell's training
        if is_machine_fault(error):
            raise
        rows.append(Measurement("peak_rss_bytes", math.nan, "bytes", f"probe failed: {type(error).__name__}: {error}"))
    return rows


@dataclass
class RunPlan:
    """A validated run: what it computes and where. Making one touches no file.

    Attributes:
        config: the run's settings.
        device, threads: where and with how many threads it computes.
        cells: every planned cell, in order.
        statuses: ``missing`` / ``finished`` / ``failed`` / ``damaged`` per cell, as found.
    """

    config: RunConfig
    device: torch.device
    threads: int
    cells: list[Cell]
    statuses: dict[Cell, str]

    @property
    def out_dir(self) -> Path:
        return self.config.out_dir

    def to_run(self, retry_failed: bool) -> list[Cell]:
        """The cells still to compute: missing and damaged ones (and failed ones with ``retry_failed``)."""
        again = {"missing", "damaged"} | ({"failed"} if retry_failed else set())
        return [cell for cell in self.cells if self.statuses[cell] in again]


def plan_run(config: RunConfig, *, max_memory_bytes: int | None = None) -> RunPlan:
    """Check everything a run needs before it touches its directory, and list its cells.

    Args:
        max_memory_bytes: the memory one cell may use (``--max-memory``); default: what this
            machine has available (:func:`comparison.footprint.check_memory`).

    Raises:
        ValueError: a bad device, a width or batch size whose estimated memory does not fit, an
            ``--init`` file that does not load into the model, a results directory (or file) of
            other settings, an unreadable ``config.json``.
    """
    # Under Ray the cells compute on the workers' devices; the driver may have no GPU.
    device = torch.device(config.device) if config.executor == "ray" else resolve_device(config.device)
    # Before anything is built: a model too large for the machine would take minutes to fail.
    check_memory(config, _num_classes(config), max_memory_bytes)
    if config.init:
        load_init(build_model(config, _num_classes(config), seed=0), config.init)
    check_out_dir(config)
    cells = planned_cells(config)
    statuses = {cell: records.cell_status(config.out_dir, cell, config.run_id) for cell in cells}
    return RunPlan(config, device, resolve_threads(config), cells, statuses)


def _num_classes(config: RunConfig) -> int:
    return 100 if config.dataset == "cifar100" else 10


def check_batch_size(config: RunConfig, train_samples: int) -> None:
    """Refuse a batch larger than the training set: it would never fill, yet the synthetic
    batches of the timing measurements would be made at that size.

    Raises:
        ValueError: ``config.batch_size`` exceeds ``train_samples``.
    """
    if config.batch_size > train_samples:
        limit = f" (--limit-train {config.limit_train})" if config.limit_train else ""
        raise ValueError(f"batch size {config.batch_size} is larger than the training set: {config.dataset} has "
                         f"{train_samples} training samples{limit}; use --batch-size {train_samples} or less")


def check_out_dir(config: RunConfig) -> None:
    """Refuse a results directory that is a file, or that holds results of other settings (reads only)."""
    out_dir = config.out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a directory; give a directory for the results")
    config_file = out_dir / "config.json"
    if not config_file.is_file():
        return
    try:
        previous = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise records.CorruptResultsError(
            f"{config_file} is not valid JSON ({error}); it should hold this directory's settings: "
            f"move it away if the cells are yours, or use another --out") from error
    if not isinstance(previous, dict) or not isinstance(previous.get("config", {}), dict):
        raise records.CorruptResultsError(
            f"{config_file} holds a {type(previous).__name__}, expected an object with run_id and config; "
            f"move it away or use another --out")
    if previous.get("run_id") != config.run_id:
        changed = sorted(
            key for key, value in config.to_dict().items()
            if previous.get("config", {}).get(key) != value and key not in RUN_ID_EXCLUDES
        )
        raise ValueError(
            f"{out_dir} holds results of run {previous.get('run_id')}, not of this run {config.run_id} "
            f"(settings differ: {', '.join(changed) or 'unknown'}); use another --out"
        )


def run(
    config: RunConfig,
    *,
    retry_failed: bool = False,
    progress: bool = True,
    make_plots: bool = True,
    echo: Callable[[str], None] = print,
    wait_s: float = 0.0,
    break_lock: bool = False,
    max_memory_bytes: int | None = None,
) -> RunResult:
    """Run every planned cell of ``config`` not finished yet, then write the table, summary and plots.

    The steps: :func:`plan_run` validates everything (nothing is written if it refuses); the
    data set is loaded; the directory is locked (:class:`~comparison.files.DirectoryLock`),
    cleared of a killed run's scratch files and damaged cells, and claimed; the cells run
    (:func:`execute_cells`); the table, summary and plots are written (:func:`write_outputs`).

    Args:
        retry_failed: run again the cells recorded as failed (default: keep their failure).
        progress: show tqdm progress bars.
        make_plots: draw the PNG plots at the end.
        echo: where to print the configuration, warnings and the summary.
        wait_s: how long to wait for another run holding the directory (default: refuse at once).
        break_lock: take over a lock held by a process on another host, which this one cannot
            check (the user has made sure it is gone).
        max_memory_bytes: the memory one cell may use; default: what this machine has available.

    Returns:
        A :class:`RunResult`.

    Raises:
        ValueError: invalid settings, settings too large for the memory, a batch larger than the
            training set, a results directory of other settings, a bad device or ``--init``;
            DirectoryBusyError: another live run holds the directory; DatasetNotFoundError: the
            data set is missing; MachineFaultError: a full, read-only or failing disk (nothing is
            recorded for the cell it interrupted; the same command resumes once it is fixed).
    """
    plan = plan_run(config, max_memory_bytes=max_memory_bytes)
    data = load_dataset(config.dataset, config.data_dir, download=config.download,
                        limit_train=config.limit_train, limit_test=config.limit_test)
    check_batch_size(config, len(data.train))
    cluster = connect_executor(config, echo=echo)  # refuses a bad address or resources before any write
    try:
        echo(config.describe())
        return _run_locked(plan, data, cluster, retry_failed=retry_failed, progress=progress,
                           make_plots=make_plots, echo=echo, wait_s=wait_s, break_lock=break_lock,
                           max_memory_bytes=max_memory_bytes)
    finally:
        if cluster is not None:
            cluster.close()


def _run_locked(plan: RunPlan, data: Dataset, cluster, *, retry_failed: bool, progress: bool, make_plots: bool,
                echo: Callable[[str], None], wait_s: float, break_lock: bool,
                max_memory_bytes: int | None) -> RunResult:
    config = plan.config
    with DirectoryLock(plan.out_dir, wait_s=wait_s, break_lock=break_lock) as lock:
        if lock.broke:
            echo(f"note: took over the lock of {plan.out_dir} held by process {lock.took_over.get('pid')} on "
                 f"{lock.took_over.get('host')} (--break-lock)")
        elif lock.took_over:
            echo(f"note: took over the lock of {plan.out_dir} left by process {lock.took_over.get('pid')}, "
                 f"which is gone")
        for path in remove_stale_temporaries(plan.out_dir):
            echo(f"note: removed {path}, left by an interrupted run")
        records.verified_cell_paths(plan.out_dir, echo)
        # Again under the lock: another run may have finished cells meanwhile.
        plan = plan_run(config, max_memory_bytes=max_memory_bytes)
        claim_out_dir(plan)
        environment = write_environment(plan, data)
        result = execute_cells(plan, data, environment, retry_failed=retry_failed, progress=progress, echo=echo,
                               cluster=cluster)
        write_outputs(result, plan, make_plots=make_plots, echo=echo)
    return result


def connect_executor(config: RunConfig, echo: Callable[[str], None] = print):
    """``None`` for the local executor; for ``ray``, a connected
    :class:`comparison.ray_executor.RayCluster` (Ray is imported only then).

    Raises:
        ValueError: Ray is not installed, ``--ray-address`` cannot be reached, or no node can
            hold one cell's ``--cpus-per-cell`` / ``--gpus-per-cell``.
    """
    if config.executor != "ray":
        return None
    from comparison.ray_executor import RayCluster

    return RayCluster.connect(config, echo=echo)


@dataclass(frozen=True)
class CellWork:
    """The functions an executor calls to compute a seed's baseline and a cell elsewhere, so that
    it needs no import of this module. Each is a module-level function, shipped by reference.

    Attributes:
        train_baseline: :func:`train_baseline` (writes nothing).
        run_cell: :func:`run_cell` (returns rows, writes only under its ``scratch_dir``).
        failed_baseline_rows: :func:`failed_baseline_rows`.
    """

    train_baseline: Callable
    run_cell: Callable
    failed_baseline_rows: Callable


def claim_out_dir(plan: RunPlan) -> None:
    """Record the run's settings in ``config.json`` (the directory was checked by :func:`plan_run`)."""
    write_json_atomic(plan.out_dir / "config.json", {"run_id": plan.config.run_id, "config": plan.config.to_dict()})


def write_environment(plan: RunPlan, data: Dataset) -> dict[str, object]:
    """The environment columns of every row; also written to ``environment.json``."""
    config = plan.config
    environment = {**environment_columns(config.run_id, config.dataset, plan.device, plan.threads),
                   "experiment": config.experiment}
    write_json_atomic(plan.out_dir / "environment.json", {
        **environment, "cores": available_cores(), "python": sys.version.split()[0],
        "sparse_backend": backend_name(plan.device),
        "train_samples": len(data.train), "test_samples": len(data.test)})
    return environment


def execute_cells(
    plan: RunPlan,
    data: Dataset,
    environment: dict[str, object],
    *,
    retry_failed: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    cluster=None,
) -> RunResult:
    """Run the cells of ``plan`` still to compute, writing each cell's file as soon as it ends.

    ``plan.config.executor`` decides where cells compute: ``local`` runs them here one after
    another; ``ray`` hands them to ``cluster`` (:mod:`comparison.ray_executor`; connected here
    when not given). Either way a cell comes back as its rows, and only this process writes the
    results directory: each cell's file with its manifest as the cell ends, ``results.csv`` at
    the end, even after an interruption.
    """
    config, out_dir = plan.config, plan.out_dir
    result = RunResult(out_dir, out_dir / records.RESULTS_FILE)
    to_run = plan.to_run(retry_failed)
    for cell in plan.cells:
        if cell not in to_run:
            result.statuses[cell] = "skipped"
    if len(to_run) < len(plan.cells):
        echo(f"{len(plan.cells) - len(to_run)} of {len(plan.cells)} cells already done in {out_dir}; "
             f"running {len(to_run)}")
        kept = [cell for cell in plan.cells if cell not in to_run]
        others = sorted(records.cell_commits(out_dir, kept) - {str(environment["git_commit"])})
        if others:
            echo(f"warning: cells kept in {out_dir} were made by commit {', '.join(others)}, not by this checkout "
                 f"({environment['git_commit']}); the table mixes code versions. To measure this code, give a new "
                 f"--out or move that directory away")
    own_cluster = cluster is None and config.executor == "ray"
    if own_cluster:
        cluster = connect_executor(config, echo=echo)
    try:
        if config.executor == "ray":
            # Looked up now, not at import, so that what runs on the workers is what this module holds.
            work = CellWork(train_baseline, run_cell, failed_baseline_rows)
            finished = cluster.cells(plan, data, environment, to_run, work,
                                     cached_baseline=lambda seed: _cached_baseline(
                                         baseline_path(out_dir, config, seed), echo),
                                     save_baseline=lambda seed, payload: save_baseline(
                                         baseline_path(out_dir, config, seed), payload),
                                     echo=echo)
        else:
            finished = _local_cells(plan, data, environment, to_run, progress=progress, echo=echo)
        with contextlib.closing(finished):
            for cell, rows in tqdm(finished, total=len(to_run), desc="cells", disable=not progress, unit="cell"):
                records.write_cell(records.cell_path(out_dir, cell), rows)
                failed = any(row["metric"] == records.FAILED_METRIC for row in rows)
                result.statuses[cell] = "failed" if failed else "finished"
    except BaseException:
        # Whatever stopped the run, the table holds every cell finished so far; but the error
        # that stopped it is the one to report, not a second one from this write (a full disk
        # fails both).
        try:
            _write_table(result, plan)
        except Exception as error:
            echo(f"warning: {result.table_path} could not be rebuilt ({error}); the next run rebuilds it")
        raise
    else:
        _write_table(result, plan)
    finally:
        if own_cluster:
            cluster.close()
    return result


def _write_table(result: RunResult, plan: RunPlan) -> None:
    records.write_rows(result.table_path, records.collect_cells(plan.out_dir, plan.cells, plan.config.run_id))


def _local_cells(plan: RunPlan, data: Dataset, environment: dict[str, object], to_run: list[Cell], *,
                 progress: bool, echo: Callable[[str], None]) -> Iterator[tuple[Cell, list[dict[str, object]]]]:
    """Compute ``to_run`` in this process, one after another, yielding each cell with its rows."""
    config, out_dir = plan.config, plan.out_dir
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    baselines: dict[int, dict[str, object] | NonFiniteLossError] = {}
    try:
        # ignore_cleanup_errors: a failing disk must not replace the error that stopped the cells.
        with tempfile.TemporaryDirectory(prefix=".scratch-", dir=out_dir, ignore_cleanup_errors=True) as scratch:
            for cell in to_run:
                if cell.seed not in baselines:
                    try:
                        baselines[cell.seed] = baseline_payload(config, cell.seed, data, device=plan.device,
                                                                out_dir=out_dir, progress=progress, echo=echo)
                    except NonFiniteLossError as error:  # this seed's cells fail; other seeds go on
                        baselines[cell.seed] = error
                baseline = baselines[cell.seed]
                if isinstance(baseline, NonFiniteLossError):
                    rows = failed_baseline_rows(cell, baseline, environment)
                else:
                    rows = run_cell(config, cell, baseline["state_dict"], data, environment, device=plan.device,
                                    threads=plan.threads, scratch_dir=Path(scratch), progress=progress,
                                    pretrain_s=baseline.get("pretrain_s", math.nan))
                yield cell, rows
    finally:
        torch.set_num_threads(previous_threads)


def write_outputs(result: RunResult, plan: RunPlan, *, make_plots: bool = True,
                  echo: Callable[[str], None] = print) -> None:
    """Write ``summary.md`` (and the plots) from the results table, and say where everything is."""
    from comparison.summary import summary_markdown

    table = records.load_table(result.table_path, echo=echo)
    summary = summary_markdown(table)
    write_text_atomic(plan.out_dir / "summary.md", summary + "\n")
    echo(summary)
    if make_plots:
        from comparison.plots import plot_all

        paths = plot_all(table, plan.out_dir / "plots")
        echo(f"plots: {', '.join(str(p) for p in paths)}")
    if result.failed:
        echo(f"{len(result.failed)} cell(s) failed: {', '.join(map(str, result.failed))} (reasons in the 'note' column)")
    echo(f"results: {result.table_path}")
