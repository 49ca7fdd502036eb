"""Reading the results table: final values per cell, mean and spread over seeds, the markdown summary."""

from __future__ import annotations

import math
import re

import pandas as pd

from actuallysparse.memory import MIB
from comparison.records import FAILED_METRIC
_LATENCY = re.compile(r"^latency_batch(\d+)_ms$")


def failed_cells(table: pd.DataFrame) -> pd.DataFrame:
    """One row per failed cell: method, target_sparsity, seed, step, note (the reason)."""
    failed = table[table["metric"] == FAILED_METRIC]
    return failed[["method", "target_sparsity", "seed", "step", "note"]].reset_index(drop=True)


def final_values(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of each successful cell's last step (failed cells are left out)."""
    failed = failed_cells(table)
    keys = ["method", "target_sparsity", "seed"]
    ok = table
    if len(failed):
        bad = set(map(tuple, failed[keys].itertuples(index=False, name=None)))
        ok = table[[key not in bad for key in table[keys].itertuples(index=False, name=None)]]
    if ok.empty:
        return ok
    last = ok.groupby(keys)["step"].transform("max")
    return ok[ok["step"] == last]


def seed_stats(frame: pd.DataFrame, metric: str, by: tuple[str, ...] = ("method", "target_sparsity")) -> pd.DataFrame:
    """Mean, standard deviation, min, max and count over seeds of ``metric``, grouped by ``by``.

    The standard deviation is 0 for a single seed (there is no spread to show).
    """
    rows = frame[frame["metric"] == metric]
    columns = list(by) + ["mean", "std", "min", "max", "n"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    grouped = rows.groupby(list(by))["value"]
    stats = grouped.agg(["mean", "std", "min", "max", "count"]).reset_index()
    stats = stats.rename(columns={"count": "n"})
    stats["std"] = stats["std"].fillna(0.0)
    return stats[columns]


def is_reference(table: pd.DataFrame, method: str) -> bool:
    """True for a method that was only measured unpruned (target 0): the reference line."""
    targets = table.loc[table["method"] == method, "target_sparsity"]
    return bool(len(targets)) and bool((targets == 0).all())


def latency_batch_sizes(table: pd.DataFrame) -> list[int]:
    """Batch sizes at which latency was recorded, ascending."""
    sizes = {int(match.group(1)) for metric in table["metric"].unique() if (match := _LATENCY.match(str(metric)))}
    return sorted(sizes)


# (heading, metric, scale, decimals); bytes are shown in MiB.
def _columns(batch_sizes: list[int]) -> list[tuple[str, str, float, int]]:
    columns = [
        ("accuracy", "test_accuracy", 1.0, 4),
        ("sparsity", "achieved_sparsity", 1.0, 4),
        ("pruned layers MiB", "pruned_layers_bytes", MIB, 2),
        ("model MiB", "stored_bytes", MIB, 2),
        ("optimizer MiB", "optimizer_state_bytes", MIB, 2),
        ("checkpoint MiB", "checkpoint_bytes", MIB, 2),
        ("process +MiB", "model_rss_bytes", MIB, 1),
    ]
    columns += [(f"latency b{size} ms", f"latency_batch{size}_ms", 1.0, 2) for size in batch_sizes]
    columns.append(("train step ms", "train_step_ms", 1.0, 1))
    return columns


def summary_markdown(table: pd.DataFrame) -> str:
    """A markdown summary: for each target sparsity, every method's final values beside dense's.

    Values are means over seeds, with ``± std`` when there is more than one seed. "process
    +MiB" is what loading and running the model added to a fresh process's peak memory.
    """
    if table.empty:
        return "No finished cells yet."
    final = final_values(table)
    columns = _columns(latency_batch_sizes(table))
    stats = {metric: seed_stats(final, metric) for _, metric, _, _ in columns}
    header = "| target | method | " + " | ".join(name for name, _, _, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    methods = list(dict.fromkeys(table["method"]))
    targets = sorted(t for t in final["target_sparsity"].unique() if t > 0) or [0.0]
    references = {method for method in methods if is_reference(final, method)}
    for target in targets:
        for method in methods:
            method_target = 0.0 if method in references else target
            cells = []
            for _, metric, scale, decimals in columns:
                frame = stats[metric]
                hit = frame[(frame["method"] == method) & (frame["target_sparsity"] == method_target)]
                cells.append(_format_stat(hit, scale, decimals))
            if all(cell == "–" for cell in cells):
                continue
            label = "(reference)" if method in references else f"{target:g}"
            lines.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
    seeds = sorted(table["seed"].unique())
    run_ids = ", ".join(sorted(map(str, table["run_id"].unique())))
    meta = table.iloc[0]
    parts = [
        f"## Summary (run {run_ids}, {meta['dataset']}, {meta['device']} {meta['device_name']}, "
        f"{meta['threads']} threads, seeds {', '.join(map(str, seeds))})",
        "",
        *lines,
    ]
    failed = failed_cells(table)
    if len(failed):
        parts += ["", "Failed cells:"]
        parts += [f"- {row.method} @ {row.target_sparsity:g}, seed {row.seed}, step {row.step}: {row.note}"
                  for row in failed.itertuples()]
    return "\n".join(parts)


def _format_stat(hit: pd.DataFrame, scale: float, decimals: int) -> str:
    if hit.empty or not math.isfinite(float(hit["mean"].iloc[0])):
        return "–"
    mean = float(hit["mean"].iloc[0]) / scale
    std = float(hit["std"].iloc[0]) / scale
    text = f"{mean:.{decimals}f}"
    if int(hit["n"].iloc[0]) > 1:
        text += f" ± {std:.{decimals}f}"
    return text
