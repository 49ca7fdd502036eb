"""``python -m comparison reproduce``: the thesis's four experiments, rerun honestly.

The thesis (``shared/THESIS.md``) measured on CIFAR-10: (1) baselines and iterative NNI
level pruning, (2) the classifier's memory, (3) inference latency, (4) its actually-sparse
training loop against NNI's. This module reruns each on the chosen data set with the
harness's own pieces (runner, methods, metrics, records) and writes, under ``--out``:

- ``baselines/``: a regular ``run`` directory (experiment 1 is an ordinary comparison run);
- ``tables/<experiment>.csv``: one tidy table per experiment (a row per observation);
- ``figures/<experiment>.png``;
- ``REPORT.md``: for every figure, the thesis's reported number (CIFAR-10) beside ours.

Every experiment's table is written atomically when the experiment ends, and a rerun of the
same command skips the experiments whose table exists: an interrupt loses at most the
experiment in progress (and experiment 1 resumes cell by cell, like ``run``).
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from actuallysparse.converter import convert_model
from actuallysparse.memory import stored_bytes
from actuallysparse.optim import orphan_remapping_disabled
from actuallysparse.pruning import prune_to_sparsity
from comparison import records
from comparison.config import RunConfig
from comparison.data import Dataset, load_dataset
from comparison.environment import available_cores, environment_columns
from comparison.methods import make_method, target_layer_names
from comparison.metrics import latency_ms, probe_process_memory
from comparison.runner import build_model, load_or_train_baseline, resolve_device, run
from comparison.training import evaluate, make_optimizer, train_epoch

EXPERIMENTS = ("baselines", "memory", "latency", "loops")
TABLE_COLUMNS = ("experiment", "variant", "target_sparsity", "step", "metric", "value", "unit", "note",
                 "run_id", "dataset", "device", "threads", "torch_version", "nni_version", "git_commit")
MIB = 2.0 ** 20

# What the thesis reported (CIFAR-10, VGG11_bn, classifier 512-4096-4096-10); see shared/THESIS.md.
THESIS = {
    "baseline_accuracy": 0.9074,
    "extra_trained_accuracy": 0.8191,
    "nni_0.9_accuracy": 0.8365,
    "nni_0.99_accuracy": 0.7648,
    "classifier_dense_mib_reported": 24.0,
    "classifier_dense_mib_true": 72.2,
    "coo_0.9_mib": 36.1,
    "coo_0.99_mib": 3.6,
    "test_set_s_dense": 9.4,
    "test_set_s_coo_0.9": 14.5,
    "test_set_s_coo_0.99": 11.3,
    "loop_actuallysparse_accuracy": 0.7486,
    "loop_nni_accuracy": 0.8201,
    "loop_actuallysparse_wall": "3 h 21 min",
    "loop_nni_wall": "3 h 11 min",
}
# The thesis's loop: from the 0.90 model, prune to these targets, each followed by 2 epochs.
LOOP_TARGETS = (0.93, 0.96, 0.99)
LOOP_START = 0.9
MEMORY_SPARSITIES = (0.0, 0.9, 0.99)
LATENCY_SPARSITIES = (0.9, 0.99)
THESIS_EVAL_BATCH = 16


@dataclass(frozen=True)
class ReproduceSettings:
    """What ``reproduce`` runs on; everything else follows from ``quick``.

    Args:
        dataset: ``digits`` (embedded) or ``cifar10`` (the thesis's).
        data_dir: where the CIFAR files are.
        init: optional PyTorch_CIFAR10 ``vgg11_bn.pt`` for the baseline.
        out: output directory.
        quick: a narrow model (width 0.125) on a few samples and short schedules, for CI and
            smoke tests; the full setting uses the real VGG11_bn.
        download: let torchvision download CIFAR when missing.
        seed: seed of the baseline and of the batch orders.
        threads: torch threads (0: every core).
        progress: show progress bars.
    """

    dataset: str = "digits"
    data_dir: str = "data"
    init: str | None = None
    out: str = "results/reproduce"
    quick: bool = False
    download: bool = False
    seed: int = 0
    threads: int = 0
    progress: bool = True

    def run_config(self) -> RunConfig:
        """The experiment-1 run (dense and NNI at 0.90 and 0.99, linear schedule as NNI's LinearPruner)."""
        common = dict(dataset=self.dataset, data_dir=self.data_dir, init=self.init, download=self.download,
                      methods=("dense", "nni"), sparsities=(0.9, 0.99), seeds=(self.seed,), schedule="linear",
                      threads=self.threads, out=str(Path(self.out) / "baselines"))
        if self.quick:
            return RunConfig(**common, width=0.125, limit_train=256, limit_test=128, pretrain_epochs=1,
                             steps=2, epochs_per_step=1, latency_repeats=3)
        # The thesis ran 10 NNI iterations of 3 epochs; 10 iterations of 1 epoch fit the time budget.
        return RunConfig(**common, width=1.0, pretrain_epochs=4, steps=10, epochs_per_step=1,
                         latency_repeats=5)

    @property
    def loop_epochs(self) -> int:
        """Fine-tuning epochs after each loop step (thesis: 2)."""
        return 1 if self.quick else 2

    @property
    def timing_repeats(self) -> int:
        return 3 if self.quick else 10


@dataclass
class Context:
    """What every experiment needs: settings, the run config, data, baseline weights, environment."""

    settings: ReproduceSettings
    config: RunConfig
    data: Dataset
    baseline: dict[str, torch.Tensor]
    device: torch.device
    threads: int
    environment: dict[str, object]
    rows: list[dict[str, object]] = field(default_factory=list)

    def model(self) -> nn.Module:
        """A fresh copy of the baseline model."""
        model = build_model(self.config, self.data.num_classes, self.settings.seed)
        model.load_state_dict(self.baseline)
        return model.to(self.device)

    def add(self, experiment: str, variant: str, target_sparsity: float, step: int, metric: str,
            value: float, unit: str, note: str = "") -> None:
        self.rows.append({"experiment": experiment, "variant": variant, "target_sparsity": target_sparsity,
                          "step": step, "metric": metric, "value": value, "unit": unit, "note": note,
                          **{key: self.environment[key] for key in TABLE_COLUMNS[8:]}})


# --------------------------------------------------------------------------- variants
VARIANTS = ("dense", "coo", "csr", "nni", "torch-prune")


def make_variant(ctx: Context, variant: str, target_sparsity: float) -> tuple[nn.Module, tuple[str, ...]]:
    """The baseline with its classifier pruned to ``target_sparsity`` the way ``variant`` stores it.

    ``dense`` writes the zeros into the dense weights; ``coo``/``csr`` convert the Linear layers
    to ``SparseLayer`` and remove the pruned weights; ``nni``/``torch-prune`` keep the dense
    weights and add their masks. Returns the model and the modules a fresh process must import.
    """
    model = ctx.model()
    targets = target_layer_names(model, "classifier")
    if variant in ("coo", "csr"):
        model.classifier = convert_model(model.classifier, nn.Linear, variant)
        if target_sparsity:
            prune_to_sparsity(model.classifier, target_sparsity)
        return model, ("actuallysparse.layers",)
    if variant == "dense":
        if target_sparsity:
            sparse = convert_model(model.classifier, nn.Linear, "csr")
            prune_to_sparsity(sparse, target_sparsity)
            model.classifier = convert_model(sparse, type(sparse[0]), "dense")
        return model, ()
    method = make_method(variant, "classifier")
    model = method.prepare(model, targets)
    if target_sparsity:
        method.prune(model, target_sparsity, make_optimizer(model.parameters(), ctx.config))
    return model, method.runtime_modules


# --------------------------------------------------------------------------- experiments
def experiment_baselines(ctx: Context, echo: Callable[[str], None]) -> None:
    """1. Baseline, baseline trained further (dense), iterative NNI level pruning to 0.90 / 0.99."""
    result = run(ctx.config, progress=ctx.settings.progress, make_plots=True, echo=lambda text: None)
    table = records.load_table(result.table_path)
    accuracy = table[table.metric == "test_accuracy"]
    for (method, target), frame in accuracy.groupby(["method", "target_sparsity"]):
        for _, row in frame.iterrows():
            ctx.add("baselines", method, float(target), int(row.step), "test_accuracy", float(row.value), "fraction")
    if failed := result.failed:
        echo(f"experiment 1: {len(failed)} cell(s) failed: {', '.join(map(str, failed))}")


def experiment_memory(ctx: Context, echo: Callable[[str], None]) -> None:
    """2. Bytes of the classifier in every storage, counted tensor by tensor, and a fresh process's peak."""
    jobs = [(variant, sparsity) for sparsity in MEMORY_SPARSITIES for variant in VARIANTS]
    in_features = ctx.model().classifier[0].in_features
    with tempfile.TemporaryDirectory() as scratch:
        for variant, sparsity in tqdm(jobs, desc="memory", unit="variant", disable=not ctx.settings.progress):
            model, preimport = make_variant(ctx, variant, sparsity)
            report = stored_bytes(model.classifier)
            ctx.add("memory", variant, sparsity, 0, "stored_bytes", report.total_bytes, "bytes")
            for category, nbytes in report.by_category.items():
                if nbytes:
                    ctx.add("memory", variant, sparsity, 0, f"stored_bytes_{category}", nbytes, "bytes")
            try:
                measurements = probe_process_memory(model.classifier.eval(), batch_size=THESIS_EVAL_BATCH,
                                                    threads=ctx.threads, device=ctx.device.type,
                                                    preimport=preimport, directory=scratch,
                                                    input_shape=(in_features,))
            except Exception as error:  # a failed probe loses one number, not the experiment
                ctx.add("memory", variant, sparsity, 0, "model_rss_bytes", math.nan, "bytes",
                        f"probe failed: {type(error).__name__}: {error}")
                continue
            for measurement in measurements:
                ctx.add("memory", variant, sparsity, 0, measurement.metric, measurement.value, measurement.unit)
    # The thesis's "dense" figure summed the first layer three times; show what that gives here.
    first = stored_bytes(ctx.model().classifier[0]).total_bytes
    ctx.add("memory", "dense", 0.0, 0, "thesis_style_dense_bytes", 3 * first, "bytes",
            "first Linear layer counted three times, as the thesis's notebook did")


def experiment_latency(ctx: Context, echo: Callable[[str], None]) -> None:
    """3. Whole-test-set inference time (batch 16, as the thesis) and batch-1 latency."""
    jobs = [("dense", 0.0)] + [(variant, s) for s in LATENCY_SPARSITIES for variant in VARIANTS]
    for variant, sparsity in tqdm(jobs, desc="latency", unit="variant", disable=not ctx.settings.progress):
        model, _ = make_variant(ctx, variant, sparsity)
        model.eval()
        runs = [evaluate(model, ctx.data.test, batch_size=THESIS_EVAL_BATCH, device=ctx.device)
                for _ in range(max(1, ctx.settings.timing_repeats // 3))]
        ctx.add("latency", variant, sparsity, 0, "test_set_s", statistics.median(r.seconds for r in runs), "s",
                f"{len(ctx.data.test)} test images, batch {THESIS_EVAL_BATCH}")
        ctx.add("latency", variant, sparsity, 0, "test_accuracy", runs[0].accuracy, "fraction")
        ctx.add("latency", variant, sparsity, 0, "latency_batch1_ms",
                latency_ms(model, 1, repeats=ctx.settings.timing_repeats, device=ctx.device), "ms")


def _loop(ctx: Context, variant: str, echo: Callable[[str], None]) -> None:
    """One training loop from the 0.90 model towards 0.99 (see :func:`experiment_loops`)."""
    method = make_method("nni" if variant == "nni" else "actuallysparse", "classifier")
    model = ctx.model()
    model = method.prepare(model, target_layer_names(model, "classifier"))
    optimizer = make_optimizer(model.parameters(), ctx.config)
    orphaned = variant == "actuallysparse-orphaned"
    start = time.perf_counter()
    epoch = 0
    for step, target in enumerate((LOOP_START,) + LOOP_TARGETS):
        with orphan_remapping_disabled() if orphaned else nullcontext():
            if orphaned:
                # The thesis's loop: prune without telling the optimizer made before the loop.
                for layer in method.pruned_modules(model).values():
                    prune_to_sparsity(layer, target)
            else:
                method.prune(model, target, optimizer)
            losses = []
            for _ in range(ctx.settings.loop_epochs):
                losses.append(train_epoch(model, optimizer, ctx.data.train, batch_size=ctx.config.batch_size,
                                          seed=ctx.settings.seed, stream="loop", epoch=epoch,
                                          device=ctx.device).mean_loss)
                epoch += 1
        zeros, total = method.sparsity_counts(model)
        result = evaluate(model, ctx.data.test, batch_size=ctx.config.batch_size, device=ctx.device)
        ctx.add("loops", variant, target, step, "test_accuracy", result.accuracy, "fraction")
        ctx.add("loops", variant, target, step, "train_loss", losses[-1], "nats")
        ctx.add("loops", variant, target, step, "achieved_sparsity", zeros / total, "fraction")
        ctx.add("loops", variant, target, step, "elapsed_s", time.perf_counter() - start, "s")
    ctx.add("loops", variant, LOOP_TARGETS[-1], len(LOOP_TARGETS), "stored_bytes",
            stored_bytes(nn.ModuleList(method.pruned_modules(model).values())).total_bytes, "bytes",
            "the three pruned Linear layers")


def experiment_loops(ctx: Context, echo: Callable[[str], None]) -> None:
    """4. From the 0.90 model to 0.99: the actually-sparse loop vs the NNI loop, same schedule.

    Step 0 prunes the baseline to 0.90 and fine-tunes (the thesis's "0.90 model"); steps 1-3
    prune to 0.93, 0.96, 0.99, each followed by the same fine-tuning epochs on the same
    batches. The footnote loop ``actuallysparse-orphaned`` prunes without telling the
    optimizer and with the library's remap switched off: the thesis's original bug.
    """
    for variant in tqdm(("actuallysparse", "nni", "actuallysparse-orphaned"), desc="loops", unit="loop",
                        disable=not ctx.settings.progress):
        _loop(ctx, variant, echo)


RUNNERS = {
    "baselines": experiment_baselines,
    "memory": experiment_memory,
    "latency": experiment_latency,
    "loops": experiment_loops,
}


# --------------------------------------------------------------------------- tables
def table_path(out: Path, experiment: str) -> Path:
    return out / "tables" / f"{experiment}.csv"


def write_table(path: Path, rows: list[dict[str, object]]) -> None:
    """Write an experiment's rows atomically (temporary file, then ``os.replace``)."""
    records.write_rows(path, rows, columns=TABLE_COLUMNS)


def load_tables(out: str | Path):
    """Every experiment table under ``out/tables`` as one pandas DataFrame."""
    import pandas as pd

    paths = [table_path(Path(out), name) for name in EXPERIMENTS if table_path(Path(out), name).is_file()]
    if not paths:
        raise FileNotFoundError(f"no experiment tables in {Path(out) / 'tables'}; run `python -m comparison reproduce` first")
    frames = []
    for path in paths:
        frame = pd.read_csv(path, keep_default_na=False, na_values=["nan"], dtype={"note": str, "git_commit": str})
        if tuple(frame.columns) != TABLE_COLUMNS:
            raise ValueError(f"{path} has columns {list(frame.columns)}, expected {list(TABLE_COLUMNS)}")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- entry point
def reproduce(settings: ReproduceSettings, echo: Callable[[str], None] = print,
              experiments: tuple[str, ...] = EXPERIMENTS) -> Path:
    """Run every experiment whose table is missing, then draw the figures and write REPORT.md.

    Args:
        settings: data set, output directory, quick or full.
        echo: where progress lines go.
        experiments: run only these (the notebooks run one each); REPORT.md covers what exists.

    Returns:
        The path of ``REPORT.md``.
    """
    unknown = [name for name in experiments if name not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; valid choices: {', '.join(EXPERIMENTS)}")
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    config = settings.run_config()
    device = resolve_device(config)
    threads = settings.threads or available_cores()
    _check_existing_tables(out, config.run_id)
    records.write_text_atomic(out / "settings.json", json.dumps(
        {"settings": settings.__dict__, "run_config": config.to_dict(), "run_id": config.run_id}, indent=2) + "\n")
    pending = [name for name in experiments if not table_path(out, name).is_file()]
    if len(pending) < len(experiments):
        echo(f"{len(experiments) - len(pending)} of {len(experiments)} experiments already done in {out}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if pending:
            data = load_dataset(config.dataset, config.data_dir, download=config.download,
                                limit_train=config.limit_train, limit_test=config.limit_test)
            baseline = load_or_train_baseline(config, settings.seed, data, device=device, out_dir=config.out_dir,
                                              progress=settings.progress)
            environment = environment_columns(config.run_id, config.dataset, device, threads)
            for name in pending:
                echo(f"experiment {EXPERIMENTS.index(name) + 1}/{len(EXPERIMENTS)}: {name}")
                ctx = Context(settings, config, data, baseline, device, threads, environment)
                started = time.perf_counter()
                RUNNERS[name](ctx, echo)
                ctx.add(name, "all", math.nan, 0, "experiment_s", time.perf_counter() - started, "s")
                write_table(table_path(out, name), ctx.rows)
    finally:
        torch.set_num_threads(previous_threads)
    from comparison.report import write_report

    return write_report(out, settings, config)


def _check_existing_tables(out: Path, run_id: str) -> None:
    """Refuse an output directory whose finished tables were made under other settings."""
    for name in EXPERIMENTS:
        path = table_path(out, name)
        if path.is_file():
            ids = {row["run_id"] for row in records.read_rows(path, columns=TABLE_COLUMNS)}
            if ids - {run_id}:
                raise ValueError(f"{path} holds results of run {', '.join(sorted(ids))}, not of these settings "
                                 f"(run {run_id}); use another --out or remove {out}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m comparison reproduce``."""
    parser.add_argument("--dataset", default="digits", help="digits (embedded, default) or cifar10 (the thesis's)")
    parser.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/")
    parser.add_argument("--init", default=None, help="PyTorch_CIFAR10 vgg11_bn.pt for the baseline (skips pretraining)")
    parser.add_argument("--out", default=None, help="output directory (default: results/reproduce, or "
                                                     "runs/reproduce-quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="narrow model, few samples, short schedules (minutes)")
    parser.add_argument("--download", action="store_true", help="let torchvision download CIFAR if missing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the baseline and batch orders")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``python -m comparison reproduce``."""
    valid = ("digits", "cifar10")
    if args.dataset not in valid:
        raise ValueError(f"reproduce --dataset {args.dataset!r} is not supported; valid choices: {', '.join(valid)} "
                         f"(the thesis's experiments are on CIFAR-10)")
    if args.seed < 0 or args.threads < 0:
        raise ValueError(f"--seed and --threads must be >= 0, got {args.seed} and {args.threads}")
    out = args.out or ("runs/reproduce-quick" if args.quick else "results/reproduce")
    settings = ReproduceSettings(dataset=args.dataset, data_dir=args.data_dir, init=args.init, out=out,
                                 quick=args.quick, download=args.download, seed=args.seed, threads=args.threads,
                                 progress=not args.no_progress)
    report = reproduce(settings)
    print(f"report: {report}")
    return 0
