"""The one description of a comparison run: a frozen dataclass, its validation, its id, its file form."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from comparison.data import DATASETS
from comparison.methods import available_methods
from comparison.methods.base import SCOPES

# The choice lists of a run, each defined once: the CLI's help, the validation and the error
# messages all read these (and tests check README against them).
SCHEDULES = ("cubic", "linear", "explicit")
OPTIMIZERS = ("adam", "sgd")
DEVICES = ("cpu", "cuda")
DEFAULT_METHODS = ("dense", "actuallysparse", "nni", "torch-prune", "nni-structured", "random")
# Where the cells run: in this process, or as tasks of a Ray cluster (comparison/ray_executor.py).
EXECUTORS = ("local", "ray")

# The grid axes are columns of the results table; leaving them (and where things live on disk)
# out of the run id lets a later run add seeds, sparsities or methods to an existing results dir.
RUN_ID_EXCLUDES = ("methods", "sparsities", "seeds", "out", "data_dir", "download", "experiment", "baseline_dir",
                   # where a grid runs does not change what it computes (each row records its node)
                   "executor", "ray_address", "cpus_per_cell", "gpus_per_cell")
# What decides the baseline weights; anything else may change without retraining the baseline.
_BASELINE_KEYS = (
    "dataset", "width", "init", "pretrain_epochs", "batch_size", "optimizer", "lr", "momentum",
    "weight_decay", "limit_train", "device",
)


# Fields added after results directories existed: left out of the run id at their default.
_COUNTED_WHEN_SET: dict[str, Any] = {"step_targets": [], "probe_memory": True, "bn_recalibration_batches": 0,
                                     "probe_memory_seeds": 0}
# The width of the default model, unless an --init checkpoint says otherwise.
DEFAULT_WIDTH = 0.375


class ConfigError(ValueError):
    """A run configuration value is invalid; the message says which, what was given and what is valid."""


@dataclass(frozen=True)
class RunConfig:
    r"""Everything that defines a comparison run.

    Defaults are the default run (``python -m comparison run``): VGG11_bn at three eighths of its
    width on the embedded digits data set with every convolution but the first and every linear
    layer pruned, six pretraining epochs (Adam, lr 1e-3, batch 64), five cubic pruning steps each
    followed by two fine-tuning epochs and a re-estimation of the BatchNorm statistics, every
    method of the default grid at targets 0.9, 0.95 and 0.98 (where magnitude and random pruning
    agree, where they part, and where they are far apart), three seeds. ``docs/DEFAULT_RUN.md``
    says what was measured to choose it; ``width=1.0`` is the real VGG11_bn (about seven times
    the compute).

    Args:
        dataset: one of ``digits`` (scikit-learn, embedded), ``cifar10``, ``cifar100``.
        data_dir: where the CIFAR files are (``cifar-10-batches-py/`` or ``cifar-100-python/``).
        download: allow torchvision to download CIFAR into ``data_dir`` when it is missing.
        methods: methods to compare, any of :func:`~comparison.methods.available_methods`; the
            default grid is :data:`DEFAULT_METHODS` (``dense, actuallysparse, nni, torch-prune,
            nni-structured, random``); ``set`` and ``rigl`` (dynamic sparse training from the
            random initialisation) run when named; ``actuallysparse-orphaned`` and
            ``actuallysparse-coo`` are variants kept for the thesis reproduction.
        sparsities: final target sparsities (fraction of zeros of the pruned layers), in (0, 1).
        seeds: one cell per (method, sparsity, seed); each seed has its own baseline.
        scope: ``all`` (the default) prunes every Linear and every Conv2d but the first;
            ``classifier`` prunes the three Linear layers only (the thesis's scope).
        width: VGG channel multiplier; 1.0 is the real VGG11_bn. ``None`` (the default) means
            :data:`DEFAULT_WIDTH`, or the width of the ``init`` checkpoint when one is given.
        init: optional state-dict file for the baseline (PyTorch_CIFAR10 ``vgg11_bn.pt``);
            when given, no pretraining happens.
        pretrain_epochs: dense epochs that make the baseline.
        steps: number of pruning steps; step ``t`` prunes to ``schedule(t)`` then fine-tunes.
        epochs_per_step: fine-tuning epochs after each pruning step.
        schedule: ``cubic`` (Zhu & Gupta 2017) or ``linear``, from 0 to the target, or
            ``explicit``: the per-step targets are ``step_targets``.
        step_targets: the targets of an ``explicit`` schedule, one per step, non-decreasing;
            the last is the cell's target (so ``sparsities`` must be that one value).
        batch_size: training batch size; also the large latency batch.
        optimizer: ``adam`` or ``sgd``; made the same way for every method.
        lr: learning rate of pretraining and fine-tuning.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty of the optimizer.
        limit_train: keep only the first N training samples (quick runs).
        limit_test: keep only the first N test samples.
        device: ``cpu`` or ``cuda``.
        threads: torch intra-op threads for training and timing; 0 means every available core.
        latency_repeats: timed repetitions per latency measurement (median reported).
        probe_memory_seeds: probe only the cells of the first N seeds (0: every seed); the bytes
            a model holds do not depend on its seed.
        bn_recalibration_batches: after each step's fine-tuning, re-estimate every BatchNorm's
            running statistics on this many training batches (the same batches for every
            method; 0: keep the statistics training left).
        probe_memory: measure the peak memory of a fresh process that loads the model
            (``peak_rss_bytes``, ``model_rss_bytes``) at the last step of each cell (a method
            that never prunes: its one unpruned model); it costs a few seconds a cell.
        out: results directory; ``None`` means ``runs/<dataset>-<run_id>``.
        experiment: the ``experiment`` column of every row (``run`` for a plain run).
        baseline_dir: where cached baselines live; ``None`` means ``<out>/baselines``. Runs
            that share it (the thesis reproduction's experiments) train each baseline once.
        executor: ``local`` runs the cells one after another in this process; ``ray`` runs
            them as tasks of a Ray cluster (only this process writes the results directory).
        ray_address: the cluster to join (``HOST:PORT`` of ``ray start --head``, or ``auto``);
            ``None`` starts a Ray instance on this machine.
        cpus_per_cell: under Ray, the threads each cell uses and the CPUs Ray reserves for it;
            0 means ``threads`` (1 when ``threads`` is 0).
        gpus_per_cell: under Ray, the GPUs reserved per cell (``device`` ``cuda`` needs > 0).

    Example::

        >>> config = RunConfig(width=0.125, steps=2)
        >>> config.run_id == RunConfig(width=0.125, steps=2, seeds=(0, 1)).run_id
        True
    """

    dataset: str = "digits"
    data_dir: str = "data"
    download: bool = False
    methods: tuple[str, ...] = DEFAULT_METHODS
    sparsities: tuple[float, ...] = (0.9, 0.95, 0.98)
    seeds: tuple[int, ...] = (0, 1, 2)
    scope: str = "all"
    width: float | None = None
    init: str | None = None
    pretrain_epochs: int = 6
    steps: int = 5
    epochs_per_step: int = 2
    schedule: str = "cubic"
    step_targets: tuple[float, ...] = ()
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    limit_train: int | None = None
    limit_test: int | None = None
    device: str = "cpu"
    threads: int = 0
    latency_repeats: int = 5
    probe_memory: bool = True
    probe_memory_seeds: int = 1
    bn_recalibration_batches: int = 8
    out: str | None = field(default=None, compare=False)
    experiment: str = "run"
    baseline_dir: str | None = None
    executor: str = "local"
    ray_address: str | None = None
    cpus_per_cell: int = 0
    gpus_per_cell: float = 0.0

    def __post_init__(self) -> None:
        # Normalise sequences so that a config built from a list hashes like one built from a tuple.
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "sparsities", tuple(float(s) for s in self.sparsities))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "step_targets", tuple(float(s) for s in self.step_targets))
        if self.width is None:
            object.__setattr__(self, "width", _init_width(self.init) if self.init else DEFAULT_WIDTH)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field, the given value and the valid ones."""
        _choice("dataset", self.dataset, DATASETS)
        _choice("scope", self.scope, SCOPES)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("device", self.device, DEVICES)
        _choice("executor", self.executor, EXECUTORS)
        valid_methods = tuple(sorted(available_methods()))
        if not self.methods:
            raise ConfigError(f"methods is empty; choose from {', '.join(valid_methods)}")
        for method in self.methods:
            _choice("method", method, valid_methods)
        _unique("methods", self.methods)
        if not self.sparsities:
            raise ConfigError("sparsities is empty; give targets in (0, 1), e.g. 0.9,0.99")
        for sparsity in self.sparsities:
            if not (0.0 < sparsity < 1.0):
                raise ConfigError(f"sparsity {sparsity} is outside (0, 1); a target is a fraction of zeros, e.g. 0.9")
        _unique("sparsities", self.sparsities)
        if not self.seeds:
            raise ConfigError("seeds is empty; give at least one, e.g. 0")
        for seed in self.seeds:
            if seed < 0:
                raise ConfigError(f"seed {seed} is negative; seeds are integers >= 0")
        _unique("seeds", self.seeds)
        self._validate_step_targets()
        if not (math.isfinite(self.width) and self.width > 0):
            raise ConfigError(f"width {self.width} must be a positive number (1.0 is the real VGG11_bn)")
        _at_least("pretrain_epochs", self.pretrain_epochs, 0)
        _at_least("steps", self.steps, 1)
        _at_least("epochs_per_step", self.epochs_per_step, 0)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("threads", self.threads, 0)
        _at_least("latency_repeats", self.latency_repeats, 1)
        _at_least("probe_memory_seeds", self.probe_memory_seeds, 0)
        _at_least("bn_recalibration_batches", self.bn_recalibration_batches, 0)
        _at_least("cpus_per_cell", self.cpus_per_cell, 0)
        if not (math.isfinite(self.gpus_per_cell) and self.gpus_per_cell >= 0):
            raise ConfigError(f"gpus_per_cell {self.gpus_per_cell} must be a number >= 0")
        if self.executor == "ray" and self.device == "cuda" and not self.gpus_per_cell:
            raise ConfigError("device 'cuda' under executor 'ray' needs gpus_per_cell > 0 (e.g. --gpus-per-cell 1)")
        for name in ("limit_train", "limit_test"):
            value = getattr(self, name)
            if value is not None:
                _at_least(name, value, 1)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr {self.lr} must be a positive number")
        if self.weight_decay < 0 or not (0 <= self.momentum < 1):
            raise ConfigError(
                f"weight_decay {self.weight_decay} must be >= 0 and momentum {self.momentum} in [0, 1)"
            )

    def _validate_step_targets(self) -> None:
        if self.schedule != "explicit":
            if self.step_targets:
                raise ConfigError(f"step_targets {list(self.step_targets)} given with schedule {self.schedule!r}; "
                                  f"they need schedule 'explicit'")
            return
        targets = self.step_targets
        if len(targets) != self.steps:
            raise ConfigError(f"schedule 'explicit' needs one step target per step: steps={self.steps}, "
                              f"step_targets has {len(targets)}")
        if any(not 0.0 < t < 1.0 for t in targets) or any(b < a for a, b in zip(targets, targets[1:])):
            raise ConfigError(f"step_targets {list(targets)} must be non-decreasing fractions in (0, 1)")
        if self.sparsities != (targets[-1],):
            raise ConfigError(f"schedule 'explicit' ends at {targets[-1]}, so sparsities must be just that one "
                              f"target; got {list(self.sparsities)}")

    @property
    def run_id(self) -> str:
        """Short digest of every setting that decides a cell's results.

        The grid axes (methods, sparsities, seeds) are not part of it: they are columns of the
        results table, so cells of different axes values under one run id are comparable.
        Fields added after the first release count only when set, so older run ids still hold.
        """
        values = {k: v for k, v in self.to_dict().items() if k not in RUN_ID_EXCLUDES}
        for key, default in _COUNTED_WHEN_SET.items():
            if values.get(key) == default:
                values.pop(key)
        return _digest(values)

    def baseline_id(self) -> str:
        """Digest of the settings that decide the baseline weights (seed excluded)."""
        return _digest({k: self.to_dict()[k] for k in _BASELINE_KEYS})

    @property
    def out_dir(self) -> Path:
        """The results directory: ``out`` if given, else ``runs/<dataset>-<run_id>``."""
        return Path(self.out) if self.out else Path("runs") / f"{self.dataset}-{self.run_id}"

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict of every field (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: "RunConfig | None" = None) -> "RunConfig":
        """Build from a mapping of field names (dashes or underscores) to values, over ``base``.

        Lists may be given as sequences or as comma-separated strings (``"0.9,0.99"``).

        Raises:
            ConfigError: an unknown key (the message lists the valid ones) or an invalid value.
        """
        base = base or cls()
        known = {f.name: f for f in dataclasses.fields(cls)}
        changes: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                raise ConfigError(f"unknown config key {raw_key!r}; valid keys: {', '.join(sorted(known))}")
            changes[key] = _coerce(key, value)
        if changes.get("init") and "width" not in changes:
            changes["width"] = None  # read from the new checkpoint, not kept from base
        return dataclasses.replace(base, **changes)

    def describe(self) -> str:
        """Human-readable listing of every field, one per line (printed at the start of a run)."""
        width = max(len(name) for name in self.to_dict())
        lines = [f"run {self.run_id} -> {self.out_dir}"]
        lines += [f"  {name:<{width}} = {value}" for name, value in self.to_dict().items()]
        return "\n".join(lines)


def load_config_file(path: str | os.PathLike, base: RunConfig | None = None) -> RunConfig:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file with RunConfig keys over ``base``.

    Raises:
        ConfigError: missing file, unknown extension, unparsable content, unknown key, bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            import tomllib

            values = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path} has extension {suffix!r}; expected .toml, .yaml or .yml")
    except ConfigError:
        raise
    except Exception as error:  # the parsers raise their own types; report them uniformly
        raise ConfigError(f"cannot parse config file {path}: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a table of keys, got {type(values).__name__}")
    return RunConfig.from_mapping(values, base)


def _init_width(path: str) -> float:
    """The width of the model in an ``--init`` checkpoint, or :class:`ConfigError` saying why not."""
    from comparison.models import checkpoint_width

    try:
        return checkpoint_width(path)
    except (OSError, ValueError) as error:
        raise ConfigError(str(error)) from error


def _digest(values: Mapping[str, Any]) -> str:
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")


def _unique(name: str, values: tuple) -> None:
    if len(set(values)) != len(values):
        raise ConfigError(f"{name} has duplicates: {', '.join(map(str, values))}")


def _at_least(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


_LIST_TYPES = {"methods": str, "sparsities": float, "seeds": int, "step_targets": float}
_SCALAR_TYPES = {
    "width": float, "lr": float, "momentum": float, "weight_decay": float,
    "pretrain_epochs": int, "steps": int, "epochs_per_step": int, "batch_size": int,
    "threads": int, "latency_repeats": int, "limit_train": int, "limit_test": int,
    "probe_memory_seeds": int, "bn_recalibration_batches": int,
    "cpus_per_cell": int, "gpus_per_cell": float,
}


_OPTIONAL_SCALARS = ("limit_train", "limit_test")


def _coerce(key: str, value: Any) -> Any:
    """Turn a value from a file or the command line into the field's type, or raise ConfigError."""
    try:
        if key in _LIST_TYPES:
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                items = [items]
            cast = _LIST_TYPES[key]
            return tuple(cast(str(item).strip()) if cast is not str else str(item).strip() for item in items
                         if str(item).strip() != "")
        if key in _SCALAR_TYPES:
            if value is None or (isinstance(value, str) and value.lower() in ("", "none")):
                if key in _OPTIONAL_SCALARS:
                    return None
                raise ValueError(f"{key} needs a number; only {', '.join(_OPTIONAL_SCALARS)} may be none")
            cast = _SCALAR_TYPES[key]
            if cast is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{value} is not a whole number")
            return cast(value)
        if key in ("download", "probe_memory"):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError("expected true or false")
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if key in ("init", "out", "baseline_dir", "ray_address") and value in (None, ""):
            return None
        return str(value) if value is not None else None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid value {value!r} for {key}: {error}") from error
