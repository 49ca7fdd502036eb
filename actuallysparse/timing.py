"""Timing helpers of the benchmarks: the calls they time, medians of calls measured side by side,
and ratio cells."""
from __future__ import annotations

import copy
import math
import random
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn


def inference_call(module: nn.Module, x: torch.Tensor):
    """A call running ``module(x)`` without gradients."""
    def call():
        with torch.no_grad():
            module(x)
    return call


def train_call(module: nn.Module, x: torch.Tensor):
    """A call running forward and backward of ``module(x).sum()`` (gradients reset first)."""
    def call():
        x.grad = None
        for param in module.parameters():
            param.grad = None
        module(x).sum().backward()
    return call


def optimizer_step_call(model: nn.Module, optimizer, x: torch.Tensor, y, loss_fn=F.cross_entropy):
    """A call running one training step: gradients reset, ``loss_fn(model(x), y)`` backward, the
    optimizer's step."""
    def call():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    return call


def openvino_builders(model: nn.Module, x: torch.Tensor, threads: int) -> dict:
    """Builders of OpenVINO inference calls on ``model`` (its dense mode, and its sparse-weight
    decompression), or an empty dict when OpenVINO is not installed.

    Each builds its compiled model only when called: a live OpenVINO model keeps worker threads
    that would slow the torch variants timed before it. Conversion traces the model with
    ``torch.jit.trace``; its deprecation warnings are about OpenVINO's converter, so they are
    silenced there alone.
    """
    try:
        import openvino
    except ImportError:
        return {}
    settings = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}

    def builder(extra):
        def build():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                converted = openvino.convert_model(copy.deepcopy(model).eval(), example_input=x.detach())
            request = openvino.Core().compile_model(converted, "CPU", {**settings, **extra}).create_infer_request()
            data = x.detach().numpy()
            return lambda: request.infer({0: data})
        return build

    return {"openvino": builder({}), "openvino_sparse": builder({"CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE": 0.5})}


def time_interleaved(calls: dict[str, callable], repeats: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of each call, all measured in every repeat so drift hits all alike.

    Each repeat runs the calls in a new (seeded) random order. A call pays for the caches its
    predecessor evicted: after the masked layer (three dense-sized tensors) a 0.99-sparse layer at
    batch 1 ran 2x slower than after another sparse one. A fixed or rotated order would give each
    call the same predecessor every time and bias it; shuffled, the median sees typical ones.
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples = {name: [] for name in calls}
    order = list(calls)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            calls[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def time_block(call, repeats: int, warmup: int) -> float:
    """Median milliseconds of ``call`` timed alone, back to back."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


# Seconds a block waits before it starts and after it ends, for the other thread pool's workers to go idle.
PEER_PAUSE_S = 0.2


def time_round(calls: dict[str, callable], peers: dict[str, callable], ours: str, repeats: int,
               warmup: int) -> dict[str, float]:
    """One round of a benchmark: median milliseconds of the torch variants ``calls`` interleaved
    (:func:`time_interleaved`), then, where there are ``peers``, of ``calls[ours]`` timed in a
    block as ``<ours>_block`` and of each peer (``peers``: name -> function building its call)
    built and timed in a block of its own.

    A peer runs its own thread pool, and interleaving calls across thread pools slows both, so
    a peer is timed back to back. Back to back, a call finds its weights in the caches that an
    interleaved call finds evicted by its predecessor (at batch 1 a pruned VGG11_bn ran 5.5-6.2
    times dense so, against 4.4-4.9 interleaved), so ours is compared with a peer block against
    block, never block against interleaved.
    """
    times = time_interleaved(calls, repeats, warmup)
    if not peers:
        return times
    blocks = {f"{ours}_block": lambda: calls[ours], **peers}
    for name, build in blocks.items():
        call = build()
        time.sleep(PEER_PAUSE_S)
        times[name] = time_block(call, repeats, warmup)
        del call
        time.sleep(PEER_PAUSE_S)
    return times


def versus_peer(record: dict, peer: str, ours: str) -> float:
    """How many times faster ``ours`` ran than ``peer`` in ``record``: block against block where
    ours was also timed in a block (:func:`time_round`)."""
    return record[f"{peer}_ms"] / record.get(f"{ours}_block_ms", record[f"{ours}_ms"])


def ratio_cell(record: dict, name: str) -> str:
    """``median (lowest–highest)`` of ``<name>_speedup`` in ``record``, or ``–`` when absent."""
    if f"{name}_speedup" not in record or record[f"{name}_speedup"] in ("", None):
        return "–"
    value, lo, hi = (float(record[f"{name}_speedup{suffix}"]) for suffix in ("", "_lo", "_hi"))
    if math.isclose(lo, hi, rel_tol=0.005):
        return f"{value:.2f}"
    return f"{value:.2f} ({lo:.2f}–{hi:.2f})"


def summarise_rounds(rounds: dict[str, list[tuple[float, float]]], record: dict) -> dict:
    """Add ``<name>_ms``, ``<name>_speedup`` (median) and ``_lo``/``_hi`` (extreme rounds) to ``record``."""
    for name, samples in rounds.items():
        ratios = [dense_ms / ms for ms, dense_ms in samples]
        record[f"{name}_ms"] = statistics.median(ms for ms, _ in samples)
        record[f"{name}_speedup"] = statistics.median(ratios)
        record[f"{name}_speedup_lo"] = min(ratios)
        record[f"{name}_speedup_hi"] = max(ratios)
    return record
