"""Timing helpers of the benchmarks: medians of calls measured side by side, and ratio cells."""
from __future__ import annotations

import math
import statistics
import time


def time_interleaved(calls: dict[str, callable], repeats: int, warmup: int) -> dict[str, float]:
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


def ratio_cell(record: dict, name: str) -> str:
    """``median (lowest–highest)`` of ``<name>_speedup`` in ``record``, or ``–`` when absent."""
    if f"{name}_speedup" not in record or record[f"{name}_speedup"] in ("", None):
        return "–"
    value, lo, hi = (float(record[f"{name}_speedup{suffix}"]) for suffix in ("", "_lo", "_hi"))
    if math.isclose(lo, hi, rel_tol=0.005):
        return f"{value:.2f}"
    return f"{value:.2f} ({lo:.2f}–{hi:.2f})"
