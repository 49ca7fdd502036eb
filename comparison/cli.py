"""Command line: ``python -m comparison run|plot ...``.

Each subcommand is a :class:`Command` in :data:`COMMANDS`; a new one (``reproduce``) is a
module with ``add_arguments(parser)`` and ``main(args) -> int`` plus one entry there. The
run options are defined once, by :func:`add_config_arguments`, so other commands can offer
the same names.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from comparison.config import (
    DATASETS,
    DEVICES,
    EXECUTORS,
    OPTIMIZERS,
    SCHEDULES,
    SCOPES,
    ConfigError,
    RunConfig,
    load_config_file,
)
from comparison.files import DirectoryBusyError, MachineFaultError, is_machine_fault, is_writable, machine_fault
from comparison.methods import available_methods

def _one_of(choices) -> str:
    return "one of " + ", ".join(choices)


# (flag, field, help). Values go through RunConfig.from_mapping, which converts and validates
# them and lists the valid choices in its errors; the choices shown here are the same tuples.
CONFIG_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("--dataset", "dataset", f"{_one_of(DATASETS)} ({DATASETS[0]} is embedded)"),
    ("--data-dir", "data_dir", "folder holding cifar-10-batches-py/ or cifar-100-python/"),
    ("--methods", "methods", "comma-separated, any of " + ", ".join(sorted(available_methods()))),
    ("--sparsities", "sparsities", "comma-separated final target sparsities in (0, 1)"),
    ("--seeds", "seeds", "comma-separated seeds; each has its own baseline"),
    ("--scope", "scope", f"{_one_of(SCOPES)}: the layers pruned ({SCOPES[0]}: the Linear layers)"),
    ("--width", "width", "VGG channel multiplier; 1.0 is the real VGG11_bn; read from --init when not given"),
    ("--init", "init", "state dict for the baseline (PyTorch_CIFAR10 vgg11_bn.pt); skips pretraining"),
    ("--pretrain-epochs", "pretrain_epochs", "dense epochs that train the baseline"),
    ("--steps", "steps", "pruning steps from 0 to the target"),
    ("--epochs-per-step", "epochs_per_step", "fine-tuning epochs after each pruning step"),
    ("--bn-recalibration-batches", "bn_recalibration_batches",
     "training batches that re-estimate BatchNorm statistics after each step's fine-tuning (0: off)"),
    ("--schedule", "schedule", f"{_one_of(SCHEDULES)}: the per-step targets"),
    ("--step-targets", "step_targets", "comma-separated per-step targets of the explicit schedule"),
    ("--batch-size", "batch_size", "training batch size (also the large latency batch)"),
    ("--optimizer", "optimizer", _one_of(OPTIMIZERS)),
    ("--lr", "lr", "learning rate"),
    ("--limit-train", "limit_train", "use only the first N training samples"),
    ("--limit-test", "limit_test", "use only the first N test samples"),
    ("--device", "device", _one_of(DEVICES)),
    ("--threads", "threads", "torch threads for training and timing (0: all cores)"),
    ("--latency-repeats", "latency_repeats", "timed repetitions per latency measurement"),
    ("--probe-memory", "probe_memory", "true or false: measure a fresh process's peak memory at a cell's last step"),
    ("--probe-memory-seeds", "probe_memory_seeds", "probe only the cells of the first N seeds (0: every seed)"),
    ("--out", "out", "results directory (default: runs/<dataset>-<run id>)"),
    ("--executor", "executor", f"{_one_of(EXECUTORS)}: cells in this process, or as tasks of a Ray cluster"),
    ("--ray-address", "ray_address", "HOST:PORT of the Ray cluster to join (default: start Ray on this machine)"),
    ("--cpus-per-cell", "cpus_per_cell", "under Ray: threads of each cell and CPUs reserved for it "
                                         "(0: --threads, or 1)"),
    ("--gpus-per-cell", "gpus_per_cell", "under Ray: GPUs reserved for each cell"),
)


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, how it adds its arguments, and its entry point."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    main: Callable[[argparse.Namespace], int]


def add_config_arguments(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """Add ``--config`` and the RunConfig options (all, or the flags in ``only``) to ``parser``.

    Options not given on the command line stay absent from the namespace, so that a config
    file's values are overridden only by what the user typed.
    """
    defaults = RunConfig()
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="TOML or YAML file with the same keys (command-line options win)")
    for flag, name, text in CONFIG_OPTIONS:
        if only is not None and flag not in only:
            continue
        default = getattr(defaults, name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(flag, dest=name, metavar=name.upper(), default=argparse.SUPPRESS,
                            help=f"{text} (default: {shown})")
    if only is None or "--download" in only:
        parser.add_argument("--download", dest="download", action="store_true", default=argparse.SUPPRESS,
                            help="let torchvision download CIFAR into --data-dir if missing")


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """The RunConfig of ``base`` (default: defaults), then ``--config FILE``, then explicit options.

    Raises:
        ConfigError: an invalid option or file.
    """
    config = base or RunConfig()
    if getattr(args, "config", None):
        config = load_config_file(args.config, config)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    explicit = {name: value for name, value in vars(args).items() if name in fields}
    return RunConfig.from_mapping(explicit, config) if explicit else config


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--retry-failed", action="store_true", help="run again the cells recorded as failed")
    parser.add_argument("--no-plots", action="store_true", help="skip drawing the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="if another run holds --out, wait up to this long for it (default: refuse at once)")
    parser.add_argument("--break-lock", action="store_true",
                        help="take over the lock of --out held by a run on another host, which this one cannot "
                             "check; only after making sure that run is gone")
    parser.add_argument("--max-memory", default=None, metavar="SIZE",
                        help="memory one cell may use, e.g. 8GiB (default: what this machine has available); "
                             "settings estimated to need more are refused before any work")


def _run_main(args: argparse.Namespace) -> int:
    from comparison.footprint import parse_size
    from comparison.runner import run

    config = config_from_args(args)
    max_memory_bytes = parse_size(args.max_memory) if args.max_memory is not None else None
    result = run(config, retry_failed=args.retry_failed, progress=not args.no_progress,
                 make_plots=not args.no_plots, wait_s=args.wait, break_lock=args.break_lock,
                 max_memory_bytes=max_memory_bytes)
    return 1 if result.failed else 0


def _add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", metavar="DIR", help="results directory of a run (or its results.csv)")
    parser.add_argument("--out", dest="plot_dir", default=None, help="where to write the PNGs (default: DIR/plots)")


def _plot_main(args: argparse.Namespace) -> int:
    from comparison.plots import plot_all
    from comparison.records import load_table
    from comparison.summary import summary_markdown

    source = Path(args.results)
    table = load_table(source)
    base = source if source.is_dir() else source.parent
    plot_dir = Path(args.plot_dir) if args.plot_dir else base / "plots"
    print(summary_markdown(table))
    existing = next(folder for folder in (plot_dir, *plot_dir.parents) if folder.exists())
    if not is_writable(existing):
        raise ValueError(f"cannot write the plots to {plot_dir}: {existing} is read-only for this process; "
                         f"pass --out DIR to draw them elsewhere (the summary above is complete)")
    try:
        paths = plot_all(table, plot_dir)
    except OSError as error:
        if not is_machine_fault(error):
            raise
        raise machine_fault(error, error.filename or plot_dir) from error
    for path in paths:
        print(path)
    return 0


COMMANDS: list[Command] = [
    Command("run", "train a baseline, prune it with every method, record and plot the results",
            _add_run_arguments, _run_main),
    Command("plot", "re-draw the plots (and print the summary) from a results directory",
            _add_plot_arguments, _plot_main),
    Command("reproduce", "rerun the thesis's experiments and write REPORT.md beside its numbers",
            lambda parser: _reproduce().add_arguments(parser), lambda args: _reproduce().main(args)),
]


def _reproduce():
    # Imported on use: matplotlib and the experiments are not needed by `run` or `plot`.
    from comparison import reproduce

    return reproduce


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m comparison`` parser with every command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="python -m comparison",
        description="Compare actually-sparse pruning with NNI masks, torch.prune and dense training on VGG11_bn.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(handler=command.main)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a scheduler, ``timeout``, ``docker stop``): the run unwinds as on Ctrl-C."""


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While the body runs, SIGTERM raises :class:`Terminated` in the main thread, so that a run
    keeps its finished cells, rebuilds ``results.csv``, removes its lock and scratch files and
    ends its child processes, as on Ctrl-C. The previous handler is restored afterwards.

    Installed by :func:`main` only: importing a module changes no signal handler.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; a caller's thread keeps the process's own
        return
    received = False

    def unwind(signum, frame) -> None:
        nonlocal received
        if received:
            return  # a repeated SIGTERM must not interrupt the clean-up of the first
        received = True
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the process exit status.

    Every error the command can meet ends as one line on stderr (what was given, what was
    expected, what to do) and exit status 2; ``COMPARISON_TRACEBACK=1`` shows the traceback
    instead. Ctrl-C exits with 130 and SIGTERM with 143, each with one line; finished cells are
    kept, and the lock and scratch files removed.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with sigterm_unwinds():
            return args.handler(args)
    except Terminated:
        print(f"{parser.prog} {args.command}: terminated (SIGTERM): finished cells are saved; run the same "
              f"command again to resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("\ninterrupted: finished cells are saved; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as error:  # one line for people; the traceback on request
        if os.environ.get("COMPARISON_TRACEBACK"):
            raise
        print(f"{parser.prog} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _one_line(error: Exception) -> str:
    """The error's message on one line, prefixed by its kind where the kind says something."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (ConfigError, ValueError, FileNotFoundError, DirectoryBusyError)):
        return text
    if is_machine_fault(error):
        fault = error if isinstance(error, MachineFaultError) else machine_fault(error)
        return f"{fault}; {fault.advice}"
    if isinstance(error, PermissionError):
        return f"permission denied: {error.filename or text}; choose a writable --out"
    if isinstance(error, OSError):
        return f"{text}" + (f" ({error.filename})" if error.filename and str(error.filename) not in text else "")
    return (f"{type(error).__name__}: {text} (an unexpected error; COMPARISON_TRACEBACK=1 shows where it "
            f"happened)")
