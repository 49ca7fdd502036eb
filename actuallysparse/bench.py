"""Side-by-side benchmark: dense ``nn.Linear`` vs masked dense vs ``SparseLayer`` (COO, CSR).

Run ``python -m actuallysparse.bench`` (``--help`` for options). Every variant of a
shape and sparsity is timed in the same process, interleaved repeat by repeat, and
reported as a ratio to dense (``dense time / variant time``: above 1 is faster).

* ``masked`` is what NNI and ``torch.nn.utils.prune`` run: the dense weight times a
  mask in every forward (measured on a real ``torch.nn.utils.prune`` layer);
* ``coo`` and ``csr`` are :class:`~actuallysparse.layers.SparseLayer` in each format;
* ``train`` is forward + backward of ``out.sum()`` with the input requiring grad,
  as for a layer inside a network.

Stored bytes come from :func:`actuallysparse.memory.stored_bytes` (every tensor
the layer holds); ``train_bytes`` is what it holds after a backward and an Adam step
(gradients, the sparse layer's transposed pattern, Adam's two moments).
"""
from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn
from tqdm import tqdm

from actuallysparse.converter import convert
from actuallysparse.memory import stored_bytes
from actuallysparse.pruning import prune_to_sparsity

VARIANTS = ("dense", "masked", "coo", "csr")
DEFAULT_SHAPES = "4096x512,4096x4096,10x4096"
DEFAULT_SPARSITIES = "0.5,0.9,0.95,0.99"
DEFAULT_BATCHES = "1,16,64,256"
DEFAULT_TRAIN_BATCHES = "16,64,128,256"


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. Shapes are ``(out_features, in_features)``."""

    shapes: tuple[tuple[int, int], ...]
    sparsities: tuple[float, ...]
    batches: tuple[int, ...]
    train_batches: tuple[int, ...]
    repeats: int = 11
    warmup: int = 2
    threads: int | None = None
    seed: int = 0


def _make_variants(out_features: int, in_features: int, sparsity: float, seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features)
    masked = copy.deepcopy(dense)
    torch_prune.l1_unstructured(masked, "weight", amount=sparsity)
    variants = {"dense": dense, "masked": masked}
    for fmt in ("coo", "csr"):
        layer = convert(dense, fmt)
        prune_to_sparsity(layer, sparsity)
        variants[fmt] = layer
    return variants


def _train_bytes(layer: nn.Module, in_features: int) -> int:
    """Bytes held while training with Adam: after one backward (gradients, caches) plus two moments."""
    x = torch.randn(2, in_features, requires_grad=True)
    layer.train()
    layer(x).sum().backward()
    optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad])
    optimizer.step()
    report = stored_bytes(layer, optimizer)
    for param in layer.parameters():
        param.grad = None
    return report.total_bytes + report.optimizer_state_bytes


def _time_interleaved(calls: dict[str, callable], repeats: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of each call, measured round-robin so drift hits all alike."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples = {name: [] for name in calls}
    names = list(calls)
    for repeat in range(repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            start = time.perf_counter()
            calls[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def _inference_call(layer: nn.Module, x: torch.Tensor):
    def call():
        with torch.no_grad():
            layer(x)
    return call


def _train_call(layer: nn.Module, x: torch.Tensor):
    def call():
        x.grad = None
        for param in layer.parameters():
            param.grad = None
        layer(x).sum().backward()
    return call


def run_benchmark(config: BenchConfig, progress: bool = True) -> list[dict]:
    """Measure every (shape, sparsity, mode, batch); one record per combination.

    Returns:
        Records with ``shape, sparsity, mode, batch, dense_ms`` and, per variant,
        ``<variant>_ms`` and ``<variant>_speedup`` (dense ms / variant ms), plus
        ``<variant>_bytes`` (stored) and ``<variant>_train_bytes``.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    jobs = [(shape, sparsity) for shape in config.shapes for sparsity in config.sparsities]
    records = []
    bar = tqdm(total=len(jobs) * (len(config.batches) + len(config.train_batches)),
               desc="benchmark", disable=not progress, file=sys.stderr)
    for (out_features, in_features), sparsity in jobs:
        variants = _make_variants(out_features, in_features, sparsity, config.seed)
        sizes = {f"{name}_bytes": stored_bytes(layer).total_bytes for name, layer in variants.items()}
        # One Adam step moves the weights a little; timings do not depend on their values.
        train_sizes = {f"{name}_train_bytes": _train_bytes(layer, in_features) for name, layer in variants.items()}
        for mode, batches in (("inference", config.batches), ("train", config.train_batches)):
            for batch in batches:
                bar.set_postfix_str(f"{out_features}x{in_features} s={sparsity} {mode} B={batch}")
                x = torch.randn(batch, in_features, requires_grad=(mode == "train"))
                make_call = _inference_call if mode == "inference" else _train_call
                for layer in variants.values():
                    layer.train(mode == "train")
                times = _time_interleaved({name: make_call(layer, x) for name, layer in variants.items()},
                                          config.repeats, config.warmup)
                record = {"shape": f"{out_features}x{in_features}", "sparsity": sparsity,
                          "mode": mode, "batch": batch, "threads": torch.get_num_threads()}
                for name in VARIANTS:
                    record[f"{name}_ms"] = times[name]
                    record[f"{name}_speedup"] = times["dense"] / times[name]
                record.update(sizes)
                record.update(train_sizes)
                records.append(record)
                bar.update()
    bar.close()
    return records


def format_table(records: list[dict]) -> str:
    """A markdown table of speedups (dense ms / variant ms) and stored MiB."""
    header = ("| shape | sparsity | mode | batch | dense ms | masked × | coo × | csr × "
              "| dense MiB | masked MiB | coo MiB | csr MiB |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    mib = 2.0 ** 20
    for r in records:
        lines.append(
            f"| {r['shape']} | {r['sparsity']:.2f} | {r['mode']} | {r['batch']} | {r['dense_ms']:.2f} "
            f"| {r['masked_speedup']:.2f} | {r['coo_speedup']:.2f} | {r['csr_speedup']:.2f} "
            f"| {r['dense_bytes'] / mib:.2f} | {r['masked_bytes'] / mib:.2f} "
            f"| {r['coo_bytes'] / mib:.2f} | {r['csr_bytes'] / mib:.2f} |"
        )
    return "\n".join(lines)


# Targets from the project's issue for the 4096x4096 layer: (mode, sparsity, batch, minimum speedup).
TARGETS = (
    ("inference", 0.90, 64, 2.0),
    ("inference", 0.90, 1, 1.0),
    ("inference", 0.90, 256, 1.0),
    ("inference", 0.99, 64, 8.0),
    ("train", 0.90, 128, 1.5),
    ("train", 0.99, 128, 5.0),
)


def check_targets(records: list[dict]) -> list[str]:
    """One line per target that the records cover: measured speedups of COO and CSR vs the target."""
    lines = []
    for mode, sparsity, batch, minimum in TARGETS:
        for r in records:
            if (r["shape"], r["mode"], r["batch"]) == ("4096x4096", mode, batch) and abs(r["sparsity"] - sparsity) < 1e-9:
                worst = min(r["coo_speedup"], r["csr_speedup"])
                verdict = "met" if worst >= minimum else "NOT met"
                lines.append(f"4096x4096 {mode:9s} s={sparsity:.2f} B={batch:<3d} target >= {minimum:.1f}x: "
                             f"coo {r['coo_speedup']:.2f}x, csr {r['csr_speedup']:.2f}x -> {verdict}")
    return lines


def _parse_list(text: str, cast, name: str) -> tuple:
    try:
        values = tuple(cast(item) for item in text.split(",") if item.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--{name}: cannot parse {text!r} ({error})") from None
    if not values:
        raise argparse.ArgumentTypeError(f"--{name}: expected a comma-separated list, got {text!r}")
    return values


def _parse_shape(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2:
        raise ValueError(f"shape {text!r} is not OUTxIN, e.g. 4096x512")
    return int(parts[0]), int(parts[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actuallysparse.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="OUTxIN list (default: the VGG classifier)")
    parser.add_argument("--sparsities", default=DEFAULT_SPARSITIES)
    parser.add_argument("--batches", default=DEFAULT_BATCHES, help="batch sizes for inference")
    parser.add_argument("--train-batches", default=DEFAULT_TRAIN_BATCHES, help="batch sizes for training steps")
    parser.add_argument("--repeats", type=int, default=11, help="timed runs per variant (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: one 256x512 layer at 0.9, few repeats (replaces the list options)")
    parser.add_argument("--csv", default=None, help="also write the records to this CSV file")
    args = parser.parse_args(argv)
    try:
        shapes = _parse_list(args.shapes, _parse_shape, "shapes")
        sparsities = _parse_list(args.sparsities, float, "sparsities")
        batches = _parse_list(args.batches, int, "batches")
        train_batches = _parse_list(args.train_batches, int, "train-batches")
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    bad = [s for s in sparsities if not 0 <= s < 1]
    if bad:
        parser.error(f"--sparsities must lie in [0, 1), got {bad}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.quick:
        shapes, sparsities, batches, train_batches, repeats = ((256, 512),), (0.9,), (1, 16), (16,), 3
    else:
        repeats = args.repeats
    config = BenchConfig(shapes=shapes, sparsities=sparsities, batches=batches,
                         train_batches=train_batches, repeats=repeats, threads=args.threads)
    records = run_benchmark(config)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"speedup = dense ms / variant ms (>1: faster than dense); MiB = bytes stored by the layer")
    print(format_table(records))
    targets = check_targets(records)
    if targets:
        print("\nTargets (4096x4096):")
        print("\n".join(targets))
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
