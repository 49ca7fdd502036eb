"""Runs a comparison: one cached baseline per seed, then every (method, sparsity, seed) cell.

Every cell starts from the same baseline weights, prunes to the same per-step targets, and
trains on the same batches in the same order with the same optimizer settings; the method is
the only thing that differs. A cell is independent of the others (it needs the config, its
seed's baseline and the data), so cells can run in any order, resume, or be farmed out.
"""

from __future__ import annotations

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
from typing import Callable

import torch
from tqdm.auto import tqdm

from comparison import records
from comparison.config import RUN_ID_EXCLUDES, RunConfig
from comparison.data import Dataset, derive_seed, load_dataset
from comparison.environment import available_cores, environment_columns
from comparison.methods import Method, make_method, target_layer_names
from comparison.metrics import (
    Measurement,
    checkpoint_bytes,
    latency_metric,
    latency_ms,
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
    """The cells of ``config``: one ``dense`` cell per seed (target 0), else one per (method, sparsity, seed)."""
    cells = []
    for seed in config.seeds:
        for method in config.methods:
            targets = (0.0,) if method == "dense" else config.sparsities
            cells.extend(Cell(method, target, seed) for target in targets)
    return cells


def resolve_device(config: RunConfig) -> torch.device:
    """The torch device of ``config``; raises ValueError when CUDA is asked for but absent."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False; use --device cpu")
    return torch.device(config.device)


def resolve_threads(config: RunConfig) -> int:
    """Intra-op threads for the run: ``config.threads``, or every available core when it is 0."""
    return config.threads or available_cores()


def build_model(config: RunConfig, num_classes: int, seed: int) -> VGG:
    """A freshly initialised VGG11_bn of the configured width, its weights a function of ``seed``."""
    return vgg11_bn(num_classes, config.width, seed=derive_seed(seed, "init"))


def baseline_path(out_dir: Path, config: RunConfig, seed: int) -> Path:
    """Cache file of the baseline for ``seed`` (named by the settings that decide it)."""
    return out_dir / "baselines" / f"seed-{seed}__{config.baseline_id()}.pt"


def load_or_train_baseline(
    config: RunConfig, seed: int, data: Dataset, *, device: torch.device, out_dir: Path, progress: bool = True
) -> dict[str, torch.Tensor]:
    """The baseline state dict for ``seed``: from the cache, from ``config.init``, or trained now and cached.

    Raises:
        NonFiniteLossError: pretraining diverged.
    """
    path = baseline_path(out_dir, config, seed)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
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
    payload = {
        "state_dict": state,
        "test_accuracy": result.accuracy,
        "test_loss": result.loss,
        "train_loss": [epoch.mean_loss for epoch in history],
    }
    _atomic_torch_save(payload, path)
    return state


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
) -> list[dict[str, object]]:
    """Run one cell and return its rows; an exception or a NaN loss becomes a ``failed`` row.

    Step 0 measures the prepared, unpruned model; step ``t`` prunes to the schedule's ``t``-th
    target, fine-tunes ``config.epochs_per_step`` epochs, then measures. Fine-tuning epoch
    ``e`` (counted across steps) uses batch order ``(seed, "finetune", e)`` for every method.
    """
    rows: list[dict[str, object]] = []
    step = 0
    start = time.perf_counter()

    def add(measurements: list[Measurement]) -> None:
        for m in measurements:
            rows.append(records.make_row(cell, step, m.metric, m.value, m.unit, m.note, environment))

    bar = tqdm(total=config.steps + 1, desc=str(cell), leave=False, disable=not progress, unit="step")
    try:
        method = make_method(cell.method, config.scope)
        model = build_model(config, data.num_classes, cell.seed)
        model.load_state_dict(baseline)
        model.to(device)
        model = method.prepare(model, target_layer_names(model, config.scope))
        # After prepare, always: NNI's wrapping replaces the Parameters an earlier optimizer held.
        optimizer = make_optimizer(model.parameters(), config)
        schedule = sparsity_schedule(cell.target_sparsity, config.steps, config.schedule)
        add(_measure_step(config, method, model, optimizer, data, None, 0.0, device, threads, scratch_dir))
        add([Measurement("elapsed_s", time.perf_counter() - start, "s")])
        bar.update()
        for step, target in enumerate(schedule, start=1):
            method.prune(model, target, optimizer)
            epochs = [
                train_epoch(model, optimizer, data.train, batch_size=config.batch_size, seed=cell.seed,
                            stream="finetune", epoch=(step - 1) * config.epochs_per_step + index,
                            device=device, on_batch=on_batch)
                for index in range(config.epochs_per_step)
            ]
            add(_measure_step(config, method, model, optimizer, data, epochs, target, device, threads, scratch_dir))
            add([Measurement("elapsed_s", time.perf_counter() - start, "s")])
            bar.update()
    except Exception as error:  # one cell's failure must not stop the run; its reason is recorded
        reason = f"{type(error).__name__}: {error}"
        tqdm.write(f"cell {cell} failed at step {step}: {reason}")
        if os.environ.get("COMPARISON_TRACEBACK"):
            tqdm.write(traceback.format_exc())
        add([Measurement(records.FAILED_METRIC, 1.0, "flag", reason)])
    finally:
        bar.close()
    return rows


def _measure_step(
    config: RunConfig,
    method: Method,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    epochs: list[EpochResult] | None,
    step_target: float,
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
    if epochs:
        step_times = [t for epoch in epochs for t in epoch.step_times_ms[1:]] or \
                     [t for epoch in epochs for t in epoch.step_times_ms]
        rows += [
            Measurement("train_loss", epochs[-1].mean_loss, "nats"),
            Measurement("train_step_ms", statistics.median(step_times) if step_times else math.nan, "ms"),
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
    for batch_size in sorted({1, config.batch_size}):
        rows.append(Measurement(latency_metric(batch_size),
                                latency_ms(model, batch_size, repeats=config.latency_repeats, device=device), "ms"))
    rows.append(Measurement("checkpoint_bytes", checkpoint_bytes(model, scratch_dir), "bytes"))
    try:
        rows += probe_process_memory(model, batch_size=config.batch_size, threads=threads, device=config.device,
                                     preimport=method.runtime_modules, directory=scratch_dir)
    except Exception as error:  # a failed probe loses one number, not the cell's training
        rows.append(Measurement("peak_rss_bytes", math.nan, "bytes", f"probe failed: {type(error).__name__}: {error}"))
    return rows


def run(
    config: RunConfig,
    *,
    retry_failed: bool = False,
    progress: bool = True,
    make_plots: bool = True,
    echo: Callable[[str], None] = print,
) -> RunResult:
    """Run every planned cell of ``config`` not finished yet, then write the table, summary and plots.

    Args:
        retry_failed: run again the cells recorded as failed (default: keep their failure).
        progress: show tqdm progress bars.
        make_plots: draw the PNG plots at the end.
        echo: where to print the configuration and the summary.

    Returns:
        A :class:`RunResult`.

    Raises:
        ValueError: the results directory belongs to other settings, or a bad device.
        DatasetNotFoundError: the data set is missing.
    """
    out_dir = config.out_dir
    device = resolve_device(config)
    threads = resolve_threads(config)
    _claim_out_dir(out_dir, config)
    cells = planned_cells(config)
    statuses = {cell: records.cell_status(out_dir, cell, config.run_id) for cell in cells}
    echo(config.describe())

    data = load_dataset(config.dataset, config.data_dir, download=config.download,
                        limit_train=config.limit_train, limit_test=config.limit_test)
    environment = environment_columns(config.run_id, config.dataset, device, threads)
    records.write_text_atomic(out_dir / "environment.json", json.dumps(
        {**environment, "cores": available_cores(), "python": sys.version.split()[0],
         "train_samples": len(data.train), "test_samples": len(data.test)}, indent=2) + "\n")

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    result = RunResult(out_dir, out_dir / records.RESULTS_FILE)
    try:
        to_run = [cell for cell in cells if statuses[cell] == "missing" or (retry_failed and statuses[cell] == "failed")]
        for cell in cells:
            if cell not in to_run:
                result.statuses[cell] = "skipped"
        if len(to_run) < len(cells):
            echo(f"{len(cells) - len(to_run)} of {len(cells)} cells already done in {out_dir}; running {len(to_run)}")
        baselines: dict[int, dict[str, torch.Tensor] | NonFiniteLossError] = {}
        with tempfile.TemporaryDirectory(prefix=".scratch-", dir=out_dir) as scratch:
            for cell in tqdm(to_run, desc="cells", disable=not progress, unit="cell"):
                if cell.seed not in baselines:
                    try:
                        baselines[cell.seed] = load_or_train_baseline(config, cell.seed, data, device=device,
                                                                      out_dir=out_dir, progress=progress)
                    except NonFiniteLossError as error:  # this seed's cells fail; other seeds go on
                        baselines[cell.seed] = error
                baseline = baselines[cell.seed]
                if isinstance(baseline, NonFiniteLossError):
                    reason = f"baseline training failed: {type(baseline).__name__}: {baseline} (try a smaller --lr)"
                    rows = [records.make_row(cell, 0, records.FAILED_METRIC, 1.0, "flag", reason, environment)]
                else:
                    rows = run_cell(config, cell, baseline, data, environment, device=device, threads=threads,
                                    scratch_dir=Path(scratch), progress=progress)
                records.write_rows(records.cell_path(out_dir, cell), rows)
                failed = any(row["metric"] == records.FAILED_METRIC for row in rows)
                result.statuses[cell] = "failed" if failed else "finished"
    finally:
        torch.set_num_threads(previous_threads)
        # Whatever happened, the table holds every cell finished so far.
        records.write_rows(result.table_path, records.collect_cells(out_dir, cells, config.run_id))

    from comparison.summary import summary_markdown

    table = records.load_table(result.table_path)
    summary = summary_markdown(table)
    records.write_text_atomic(out_dir / "summary.md", summary + "\n")
    echo(summary)
    if make_plots:
        from comparison.plots import plot_all

        paths = plot_all(table, out_dir / "plots")
        echo(f"plots: {', '.join(str(p) for p in paths)}")
    if result.failed:
        echo(f"{len(result.failed)} cell(s) failed: {', '.join(map(str, result.failed))} (reasons in the 'note' column)")
    echo(f"results: {result.table_path}")
    return result


def _claim_out_dir(out_dir: Path, config: RunConfig) -> None:
    """Create ``out_dir`` and record the config in it; refuse a directory of other settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config_file = out_dir / "config.json"
    if config_file.is_file():
        previous = json.loads(config_file.read_text())
        if previous.get("run_id") != config.run_id:
            changed = sorted(
                key for key, value in config.to_dict().items()
                if previous.get("config", {}).get(key) != value and key not in RUN_ID_EXCLUDES
            )
            raise ValueError(
                f"{out_dir} holds results of run {previous.get('run_id')}, not of this run {config.run_id} "
                f"(settings differ: {', '.join(changed) or 'unknown'}); use another --out or remove the directory"
            )
    records.write_text_atomic(config_file, json.dumps({"run_id": config.run_id, "config": config.to_dict()}, indent=2) + "\n")


def _atomic_torch_save(payload: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.chmod(temporary, records._FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
