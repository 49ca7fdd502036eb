"""``python -m comparison reproduce``: the thesis's experiments, rerun through the ordinary runner.

The thesis this package grew from measured on CIFAR-10: baselines and iterative NNI level
pruning, the classifier's memory, inference latency, and an actually-sparse training loop
against NNI's. Each is an ordinary comparison run here, of methods from
:mod:`comparison.methods`, written under ``--out`` as a run directory of its own:

- ``baselines/``: dense and NNI at 0.90 and 0.99, a linear schedule (NNI's ``LinearPruner``);
- ``storage/``: every storage of the classifier (dense, actually-sparse CSR and COO, NNI masks,
  ``torch.nn.utils.prune``) unpruned (step 0) and pruned once to 0.90 and 0.99 (step 1, no
  fine-tuning): bytes held, a fresh process's peak memory, whole-test-set time and latency;
- ``loops/``: from the baseline to 0.90, then 0.93, 0.96, 0.99, each followed by fine-tuning:
  the actually-sparse loop, the NNI loop, and the thesis's own loop with its bug
  (``actuallysparse-orphaned``: pruning does not tell the optimizer).

The three runs share one baseline cache, so the baseline is trained once. Every row has the
project's one tidy schema, its ``experiment`` column naming the run. ``REPORT.md`` and
``figures/`` are drawn from those tables alone (:mod:`comparison.report`). A rerun resumes cell
by cell, like ``run``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from comparison import records
from comparison.config import RunConfig
from comparison.runner import run

EXPERIMENTS = ("baselines", "storage", "loops")
# The datasets the thesis's experiments make sense on: the embedded one, and the thesis's own.
REPRODUCE_DATASETS = ("digits", "cifar10")
# The thesis's loop: from the baseline to 0.90, then these targets, each followed by fine-tuning.
LOOP_STEP_TARGETS = (0.9, 0.93, 0.96, 0.99)
STORAGE_METHODS = ("dense", "actuallysparse", "actuallysparse-coo", "nni", "torch-prune")
LOOP_METHODS = ("actuallysparse", "nni", "actuallysparse-orphaned")


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

    def __post_init__(self) -> None:
        if self.dataset not in REPRODUCE_DATASETS:
            raise ValueError(f"reproduce --dataset {self.dataset!r} is not supported; valid choices: "
                             f"{', '.join(REPRODUCE_DATASETS)} (the thesis's experiments are on CIFAR-10)")
        if self.seed < 0 or self.threads < 0:
            raise ValueError(f"--seed and --threads must be >= 0, got {self.seed} and {self.threads}")

    def run_configs(self) -> dict[str, RunConfig]:
        """The run of each experiment, by name."""
        out = Path(self.out)
        # The thesis's setting, fixed here so that a change of the run's defaults leaves it alone:
        # the classifier pruned, Adam at lr 1e-4, the BatchNorm statistics training left.
        common = dict(dataset=self.dataset, data_dir=self.data_dir, init=self.init, download=self.download,
                      seeds=(self.seed,), threads=self.threads, baseline_dir=str(out / "baselines-cache"),
                      scope="classifier", lr=1e-4, bn_recalibration_batches=0, probe_memory_seeds=0)
        if self.quick:
            common.update(width=0.125, limit_train=256, limit_test=128, pretrain_epochs=1, latency_repeats=3)
        else:
            common.update(width=1.0, pretrain_epochs=4, latency_repeats=5)
        # A fresh process's peak memory is the storage experiment's question; the others skip it.
        # The thesis ran 10 NNI iterations of 3 epochs and a loop of 2 epochs per step; the full
        # setting keeps 10 iterations and the loop's 2 epochs, with 1 epoch per NNI iteration.
        experiments = {
            "baselines": dict(methods=("dense", "nni"), sparsities=(0.9, 0.99), schedule="linear",
                              steps=2 if self.quick else 10, epochs_per_step=1, probe_memory=False),
            "storage": dict(methods=STORAGE_METHODS, sparsities=(0.9, 0.99), schedule="linear", steps=1,
                            epochs_per_step=0),
            "loops": dict(methods=LOOP_METHODS, sparsities=(LOOP_STEP_TARGETS[-1],), schedule="explicit",
                          steps=len(LOOP_STEP_TARGETS), step_targets=LOOP_STEP_TARGETS,
                          epochs_per_step=1 if self.quick else 2, probe_memory=False),
        }
        return {name: RunConfig(**common, **changes, experiment=name, out=str(out / name))
                for name, changes in experiments.items()}

    def command(self) -> str:
        """The command line that makes these settings."""
        defaults = ReproduceSettings()
        flags = [("--dataset", self.dataset, defaults.dataset), ("--data-dir", self.data_dir, defaults.data_dir),
                 ("--init", self.init, defaults.init), ("--seed", self.seed, defaults.seed),
                 ("--threads", self.threads, defaults.threads)]
        return ("python -m comparison reproduce"
                + "".join(f" {flag} {value}" for flag, value, default in flags if value != default)
                + (" --quick" if self.quick else "") + f" --out {self.out}")


def load_tables(out: str | Path, echo: Callable[[str], None] = print):
    """The tables of every experiment run under ``out``, as one DataFrame of the tidy schema."""
    import pandas as pd

    out = Path(out)
    frames = [records.load_table(out / name, echo=echo) for name in EXPERIMENTS if (out / name).is_dir()]
    if not frames:
        raise FileNotFoundError(f"no experiment results in {out}; run `python -m comparison reproduce` first")
    return pd.concat(frames, ignore_index=True)


def reproduce(settings: ReproduceSettings, echo: Callable[[str], None] = print,
              experiments: tuple[str, ...] = EXPERIMENTS) -> Path:
    """Run (or resume) the chosen experiments, then draw the figures and write REPORT.md.

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
    configs = settings.run_configs()
    failed = []
    for index, name in enumerate(experiments, start=1):
        echo(f"experiment {index}/{len(experiments)}: {name}")
        result = run(configs[name], progress=settings.progress, make_plots=False, echo=_warnings_only(echo))
        failed += [f"{name}: {cell}" for cell in result.failed]
    if failed:
        echo(f"{len(failed)} cell(s) failed: {'; '.join(failed)} (reasons in the 'note' column)")
    from comparison.files import write_json_atomic
    from comparison.report import write_report

    out = Path(settings.out)
    write_json_atomic(out / "settings.json", {"command": settings.command(), "settings": settings.__dict__})
    return write_report(out, load_tables(out, echo=echo), configs, command=settings.command(),
                        dataset=settings.dataset, quick=settings.quick)


def _warnings_only(echo: Callable[[str], None]) -> Callable[[str], None]:
    # A run prints its config and summary; inside reproduce only its warnings are news.
    return lambda text: echo(text) if text.startswith(("warning", "note")) else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m comparison reproduce``."""
    parser.add_argument("--dataset", default="digits",
                        help=f"one of {', '.join(REPRODUCE_DATASETS)} (digits is embedded; cifar10 is the thesis's)")
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
    out = args.out or ("runs/reproduce-quick" if args.quick else "results/reproduce")
    settings = ReproduceSettings(dataset=args.dataset, data_dir=args.data_dir, init=args.init, out=out,
                                 quick=args.quick, download=args.download, seed=args.seed, threads=args.threads,
                                 progress=not args.no_progress)
    report = reproduce(settings)
    print(f"report: {report}")
    return 0
