"""Side-by-side benchmark: dense ``nn.Linear`` vs masked dense vs ``SparseLayer`` (COO, CSR).

Run ``python -m actuallysparse.bench`` (``--help`` for options). Every variant of a
shape and sparsity is timed in the same process, interleaved repeat by repeat, and
reported as a ratio to dense (``dense time / variant time``: above 1 is faster). The whole
measurement is repeated ``--rounds`` times; a ratio is the median over rounds, with the
lowest and highest round beside it.

* ``masked`` is what NNI and ``torch.nn.utils.prune`` run: the dense weight times a
  mask in every forward (measured on a real ``torch.nn.utils.prune`` layer);
* ``coo`` and ``csr`` are :class:`~actuallysparse.layers.SparseLayer` in each format, on the
  backend the library picks (``backend`` column: the compiled kernels and their instruction
  set, or torch); ``csr_torch`` is the CSR layer forced onto the torch backend;
* ``train`` is forward + backward of ``out.sum()`` with the input requiring grad,
  as for a layer inside a network; ``train_noinput`` is the same with an input that needs no
  gradient (a first layer);
* ``csr_gflops`` is the useful work of the CSR layer (``2 * nnz * batch`` per product: one
  in inference, three in ``train``, two in ``train_noinput``) per second.

Peers, when installed (``pip install -e ".[peers]"``; SparseProp as its README says): SparseProp's
``SparseLinear`` (inference and training) and OpenVINO (inference; dense, and with its
sparse-weight decompression). Each runs its own thread pool, so each is timed in a block of
its own after the torch variants (interleaving calls across thread pools slows both), and
compared with the dense time of the same round; ``csr ÷ SparseProp`` compares the CSR layer
timed in a block too (``csr_block``), so both find the caches as a block leaves them
(:func:`~actuallysparse.timing.time_round`).

Stored bytes come from :func:`actuallysparse.memory.stored_bytes` (every tensor
the layer holds); ``train_bytes`` is what it holds after a backward and an Adam step
(gradients, the sparse layer's transposed pattern, Adam's two moments).
"""
from __future__ import annotations

import argparse
import copy
import csv
import sys
from dataclasses import dataclass

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn
from tqdm import tqdm

from actuallysparse import functional, kernels
from actuallysparse.converter import convert
from actuallysparse.memory import MIB, stored_bytes
from actuallysparse.pruning import prune_to_sparsity
from actuallysparse.timing import (inference_call, openvino_builders, ratio_cell, summarise_rounds, time_round,
                                   train_call, versus_peer)

VARIANTS = ("dense", "masked", "coo", "csr", "csr_torch")
PEERS = ("sparseprop", "openvino", "openvino_sparse")
MODES = ("inference", "train", "train_noinput")
# products of 2 * nnz * batch flops each mode computes
PRODUCTS = {"inference": 1, "train": 3, "train_noinput": 2}
DEFAULT_SHAPES = "4096x512,4096x4096,10x4096"
DEFAULT_SPARSITIES = "0.5,0.9,0.95,0.99"
DEFAULT_BATCHES = "1,16,64,256"
DEFAULT_TRAIN_BATCHES = "16,64,128,256"
DEFAULT_NOINPUT_BATCHES = "128"


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. Shapes are ``(out_features, in_features)``."""

    shapes: tuple[tuple[int, int], ...]
    sparsities: tuple[float, ...]
    batches: tuple[int, ...]
    train_batches: tuple[int, ...]
    noinput_batches: tuple[int, ...] = ()
    repeats: int = 11
    warmup: int = 2
    threads: int | None = None
    seed: int = 0
    rounds: int = 1
    peers: bool = True


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
    variants["csr_torch"] = copy.deepcopy(variants["csr"])
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
    return report.training_bytes


def _on_torch_backend(call):
    def wrapped():
        with functional.use_backend("torch"):
            call()
    return wrapped


def _sparseprop_layer(pruned: nn.Linear):
    """SparseProp's layer for a pruned ``nn.Linear``, or ``None`` when SparseProp is not installed."""
    try:
        from sparseprop.modules import SparseLinear
    except ImportError:
        return None
    return SparseLinear.from_dense(copy.deepcopy(pruned))


def run_benchmark(config: BenchConfig, progress: bool = True) -> list[dict]:
    """Measure every (shape, sparsity, mode, batch); one record per combination.

    Returns:
        Records with ``shape, sparsity, mode, batch, threads, backend, dense_ms`` and, per variant
        (and per peer measured), ``<variant>_ms`` and ``<variant>_speedup`` (dense ms / variant ms,
        medians over rounds) with ``<variant>_speedup_lo`` / ``_hi`` (lowest and highest round),
        ``dense_gflops`` / ``csr_gflops``, plus ``<variant>_bytes`` (stored) and
        ``<variant>_train_bytes``.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    threads = torch.get_num_threads()
    jobs = [(shape, sparsity) for shape in config.shapes for sparsity in config.sparsities]
    plan = (("inference", config.batches), ("train", config.train_batches),
            ("train_noinput", config.noinput_batches))
    records = []
    bar = tqdm(total=len(jobs) * sum(len(batches) for _, batches in plan),
               desc="benchmark", disable=not progress, file=sys.stderr)
    for (out_features, in_features), sparsity in jobs:
        variants = _make_variants(out_features, in_features, sparsity, config.seed)
        sizes = {f"{name}_bytes": stored_bytes(layer).total_bytes for name, layer in variants.items()}
        # One Adam step moves the weights a little; timings do not depend on their values.
        train_sizes = {f"{name}_train_bytes": _train_bytes(layer, in_features) for name, layer in variants.items()}
        backend = functional.backend_name("cpu", variants["csr"].values.dtype)
        # peers get the same pruned weight as the sparse layers
        pruned_linear = _with_weight(variants["dense"], _masked_weight(variants))
        sparseprop = _sparseprop_layer(pruned_linear) if config.peers else None
        for mode, batches in plan:
            for batch in batches:
                bar.set_postfix_str(f"{out_features}x{in_features} s={sparsity} {mode} B={batch}")
                x = torch.randn(batch, in_features, requires_grad=(mode == "train"))
                make_call = inference_call if mode == "inference" else train_call
                for layer in variants.values():
                    layer.train(mode != "inference")
                calls = {name: make_call(layer, x) for name, layer in variants.items()}
                calls["csr_torch"] = _on_torch_backend(calls["csr_torch"])
                peers = {}
                if sparseprop is not None and mode != "train_noinput":
                    sparseprop.train(mode == "train")
                    peers["sparseprop"] = lambda layer=sparseprop: make_call(layer, x)
                if config.peers and mode == "inference":
                    peers.update(openvino_builders(pruned_linear, x, threads))
                rounds = {}
                for _ in range(config.rounds):
                    times = time_round(calls, peers, "csr", config.repeats, config.warmup)
                    for name, ms in times.items():
                        rounds.setdefault(name, []).append((ms, times["dense"]))
                record = summarise_rounds(rounds, {"shape": f"{out_features}x{in_features}", "sparsity": sparsity,
                                                   "mode": mode, "batch": batch, "threads": threads,
                                                   "backend": backend})
                flops = 2.0 * batch * PRODUCTS[mode]
                record["dense_gflops"] = flops * out_features * in_features / record["dense_ms"] / 1e6
                record["csr_gflops"] = flops * variants["csr"].nnz / record["csr_ms"] / 1e6
                record.update(sizes)
                record.update(train_sizes)
                records.append(record)
                bar.update()
    bar.close()
    return records


def _masked_weight(variants: dict) -> torch.Tensor:
    return variants["csr"].weight.to_dense().detach()


def _with_weight(linear: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    copy_ = nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        copy_.weight.copy_(weight)
        copy_.bias.copy_(linear.bias)
    return copy_


def header() -> str:
    """One line naming what the numbers were measured on: CPU, threads, torch, backend."""
    isa = kernels.isa() if kernels.is_available() else "unavailable"
    caches = kernels.cpu_caches()
    return (f"CPU: {kernels.cpu_model()}{f' ({caches})' if caches else ''}; {torch.get_num_threads()} threads; "
            f"torch {torch.__version__}; native kernels: {isa}")


def format_table(records: list[dict]) -> str:
    """A markdown table of speedups (dense ms / variant ms; lowest–highest round) and stored MiB."""
    peers = [name for name in PEERS if any(f"{name}_speedup" in r for r in records)]
    header_ = ("| shape | sparsity | mode | batch | dense ms | masked × | coo × | csr × | csr_torch × "
               + "".join(f"| {name} × " for name in peers)
               + "| dense GFLOP/s | csr GFLOP/s | backend | dense MiB | masked MiB | coo MiB | csr MiB |")
    lines = [header_, "|" + "---|" * (header_.count("|") - 1)]
    for r in records:
        lines.append(
            f"| {r['shape']} | {r['sparsity']:.2f} | {r['mode']} | {r['batch']} | {r['dense_ms']:.2f} "
            + "".join(f"| {ratio_cell(r, name)} " for name in ("masked", "coo", "csr", "csr_torch", *peers))
            + f"| {r['dense_gflops']:.0f} | {r['csr_gflops']:.0f} | {r['backend']} "
            f"| {r['dense_bytes'] / MIB:.2f} | {r['masked_bytes'] / MIB:.2f} "
            f"| {r['coo_bytes'] / MIB:.2f} | {r['csr_bytes'] / MIB:.2f} |"
        )
    return "\n".join(lines)


# Targets from the project's issue for the 4096x4096 layer: (mode, sparsity, batch, minimum speedup).
TARGETS = (
    ("inference", 0.90, 1, 5.0),
    ("inference", 0.90, 16, 6.0),
    ("inference", 0.90, 64, 5.0),
    ("inference", 0.90, 256, 4.0),
    ("train", 0.90, 64, 5.0),
    ("train", 0.90, 128, 4.0),
    ("train", 0.90, 256, 3.5),
    ("train_noinput", 0.90, 128, 5.0),
    ("inference", 0.99, 64, 25.0),
    ("train", 0.99, 64, 30.0),
)
# Ours ÷ SparseProp on the same layer, for every target above.
PEER_TARGET = 1.3


def check_targets(records: list[dict]) -> list[str]:
    """One line per target that the records cover: measured speedups of COO and CSR vs the target."""
    lines = []
    for mode, sparsity, batch, minimum in TARGETS:
        for r in records:
            if (r["shape"], r["mode"], int(r["batch"])) == ("4096x4096", mode, batch) \
                    and abs(float(r["sparsity"]) - sparsity) < 1e-9:
                coo, csr = float(r["coo_speedup"]), float(r["csr_speedup"])
                verdict = "met" if min(coo, csr) >= minimum else "NOT met"
                line = (f"4096x4096 {mode:13s} s={sparsity:.2f} B={batch:<3d} target >= {minimum:.1f}x: "
                        f"coo {coo:.2f}x, csr {csr:.2f}x -> {verdict}")
                if r.get("sparseprop_ms"):
                    versus = versus_peer(r, "sparseprop", "csr")
                    line += (f"; csr ÷ SparseProp {versus:.2f}x "
                             f"({'met' if versus >= PEER_TARGET else 'NOT met'} >= {PEER_TARGET}x)")
                lines.append(line)
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
    parser.add_argument("--noinput-batches", default=DEFAULT_NOINPUT_BATCHES,
                        help="batch sizes for training steps whose input needs no gradient")
    parser.add_argument("--repeats", type=int, default=11, help="timed runs per variant (median reported)")
    parser.add_argument("--rounds", type=int, default=3, help="repeat the whole measurement to show its spread")
    parser.add_argument("--no-peers", action="store_true", help="skip SparseProp and OpenVINO even if installed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: one 256x512 layer at 0.9, few repeats (replaces the list options)")
    parser.add_argument("--csv", default=None, help="also write the records to this CSV file")
    parser.add_argument("--conv", action="store_true",
                        help="benchmark sparse convolutions instead: VGG11's CIFAR conv layers at 0.9 and 0.95, "
                             "B=64, and the whole pruned VGG11_bn (see actuallysparse.bench_conv)")
    parser.add_argument("--conv-width", type=float, default=None,
                        help="with --conv: time every convolution of VGG11, and the whole VGG11_bn, at this width "
                             "(the harness's default model is 0.375) at 0.9, batch 1 and 64, instead of the default "
                             "tables")
    parser.add_argument("--dynamic", action="store_true",
                        help="benchmark dynamic sparse training instead: RigL's amortised step against the "
                             "fixed-pattern sparse step and masked RigL, 4096x4096 and VGG11_bn at 0.9, B=64 "
                             "(see actuallysparse.bench_dynamic)")
    args = parser.parse_args(argv)
    if args.conv:
        return _main_conv(args)
    if args.dynamic:
        return _main_dynamic(args)
    try:
        shapes = _parse_list(args.shapes, _parse_shape, "shapes")
        sparsities = _parse_list(args.sparsities, float, "sparsities")
        batches = _parse_list(args.batches, int, "batches")
        train_batches = _parse_list(args.train_batches, int, "train-batches")
        noinput_batches = _parse_list(args.noinput_batches, int, "noinput-batches")
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    bad = [s for s in sparsities if not 0 <= s < 1]
    if bad:
        parser.error(f"--sparsities must lie in [0, 1), got {bad}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.quick:
        shapes, sparsities, batches, train_batches, noinput_batches = ((256, 512),), (0.9,), (1, 16), (16,), (16,)
        repeats, rounds = 3, 1
    else:
        repeats, rounds = args.repeats, args.rounds
    config = BenchConfig(shapes=shapes, sparsities=sparsities, batches=batches, train_batches=train_batches,
                         noinput_batches=noinput_batches, repeats=repeats, threads=args.threads,
                         rounds=rounds, peers=not args.no_peers)
    records = run_benchmark(config)
    print(header())
    print(f"speedup = dense ms / variant ms (>1: faster than dense), median of {rounds} round(s) "
          f"(lowest–highest round in brackets); MiB = bytes stored by the layer")
    print(format_table(records))
    targets = check_targets(records)
    if targets:
        print("\nTargets (4096x4096):")
        print("\n".join(targets))
    if args.csv:
        _write_csv(args.csv, records)
    return 0


def _main_conv(args) -> int:
    from actuallysparse import bench_conv

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    peers = not args.no_peers
    model = []
    if args.conv_width is not None:
        layers = bench_conv.run_conv_layers(sparsities=bench_conv.WIDTH_CONV_SPARSITIES,
                                            batches=bench_conv.WIDTH_CONV_BATCHES, rounds=args.rounds, peers=peers,
                                            shapes=bench_conv.vgg11_cifar_convs(args.conv_width))
        model = [record for batch in bench_conv.WIDTH_CONV_BATCHES
                 for record in bench_conv.run_conv_model(batch=batch, rounds=args.rounds, peers=peers,
                                                         width=args.conv_width)]
        legend = f"VGG11 convolutions at width {args.conv_width} (every one but the first), and the whole VGG11_bn; "
        title = ""
        checks = bench_conv.check_layers_against_dense(layers) + bench_conv.check_conv_targets([], model)
    else:
        if args.quick:
            layers = bench_conv.run_conv_layers(sparsities=(0.9,), batches=(8,), repeats=2, warmup=1, rounds=1,
                                                peers=peers, shapes=bench_conv.VGG11_CIFAR_CONVS[-1:])
        else:
            layers = bench_conv.run_conv_layers(rounds=args.rounds, peers=peers)
            model = [record for batch in bench_conv.DEFAULT_MODEL_BATCHES
                     for record in bench_conv.run_conv_model(batch=batch, rounds=args.rounds, peers=peers)]
        legend = ""
        title, checks = "Targets (layers at B=64):\n", bench_conv.check_conv_targets(layers, model)
    print(header())
    print(f"{legend}speedup = dense ms / variant ms (>1: faster than dense), median of "
          f"{args.rounds if not args.quick else 1} round(s) (lowest–highest round in brackets); "
          f"model MiB = bytes held training with Adam")
    print(bench_conv.format_conv_tables(layers, model))
    if checks:
        print("\n" + title + "\n".join(checks))
    if args.csv:
        _write_csv(args.csv, layers + model)
    return 0


def _main_dynamic(args) -> int:
    from actuallysparse import bench_dynamic

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    records = bench_dynamic.run(rounds=args.rounds, quick=args.quick)
    print(header())
    print(f"speedup = dense ms / variant ms (>1: faster than dense), median of {1 if args.quick else args.rounds} "
          f"round(s) (lowest–highest round in brackets); MiB = bytes held training with Adam; RigL moves "
          f"{bench_dynamic.DROP_FRACTION:g} of each layer's weights every {bench_dynamic.UPDATE_EVERY} steps")
    print(bench_dynamic.format_table(records))
    print("\nTargets:")
    print("\n".join(bench_dynamic.check_targets(records)))
    if args.csv:
        _write_csv(args.csv, records)
    return 0


def _write_csv(path: str, records: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        fields = list(dict.fromkeys(key for record in records for key in record))
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


if __name__ == "__main__":
    sys.exit(main())
