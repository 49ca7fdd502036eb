"""Reading the results table: final values per cell, mean and spread over seeds, the markdown summary."""

from __future__ import annotations

import math
import re

import pandas as pd

from actuallysparse.memory import MIB
from comparison.data import num_classes
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


def confidence_half_width(std: float, n: int, level: float = 0.95) -> float:
    """Half-width of the Student-t confidence interval of a mean of ``n`` values with sample
    standard deviation ``std``: ``t_{(1+level)/2, n-1} * std / sqrt(n)``; NaN for one value.

    Example (a textbook case: n = 10, s = 2.5, 95 %: t = 2.262, half-width 1.788)::

        >>> round(confidence_half_width(2.5, 10), 3)
        1.788
    """
    if n < 2 or not math.isfinite(std):
        return math.nan
    from scipy.stats import t

    return float(t.ppf((1 + level) / 2, n - 1) * std / math.sqrt(n))


def seed_stats(frame: pd.DataFrame, metric: str, by: tuple[str, ...] = ("method", "target_sparsity")) -> pd.DataFrame:
    """Mean, standard deviation, 95 % interval half-width, min, max and count over seeds of
    ``metric``, grouped by ``by``.

    The standard deviation is 0 and the half-width NaN for a single seed (no spread to show).
    """
    rows = frame[frame["metric"] == metric]
    columns = list(by) + ["mean", "std", "half_width", "min", "max", "n"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    grouped = rows.groupby(list(by))["value"]
    stats = grouped.agg(["mean", "std", "min", "max", "count"]).reset_index()
    stats = stats.rename(columns={"count": "n"})
    stats["std"] = stats["std"].fillna(0.0)
    stats["half_width"] = [confidence_half_width(std, n) for std, n in zip(stats["std"], stats["n"])]
    return stats[columns]


def separation(stats: pd.DataFrame, higher_is_better: bool = True) -> tuple[list[str], list[str]]:
    """Which methods the data cannot tell apart from the best one, and which it can.

    Two methods are told apart when their 95 % intervals do not overlap; with a single seed
    there is no interval, so nothing is told apart.

    Returns:
        ``(indistinguishable, separated)``: methods whose interval overlaps the best method's
        (the best included), and the others.
    """
    if stats.empty:
        return [], []
    ordered = stats.sort_values("mean", ascending=not higher_is_better)
    best = ordered.iloc[0]
    low = best["mean"] - (best["half_width"] if math.isfinite(best["half_width"]) else math.inf)
    high = best["mean"] + (best["half_width"] if math.isfinite(best["half_width"]) else math.inf)
    close, apart = [], []
    for row in ordered.itertuples():
        width = row.half_width if math.isfinite(row.half_width) else math.inf
        (close if row.mean - width <= high and row.mean + width >= low else apart).append(row.method)
    return close, apart


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
        ("test loss", "test_loss", 1.0, 3),
        ("sparsity", "achieved_sparsity", 1.0, 4),
        ("MFLOPs", "flops", 1e6, 1),
        ("theoretical speedup", "theoretical_speedup", 1.0, 2),
        ("measured speedup", "measured_speedup", 1.0, 2),
        ("measured speedup b1", "measured_speedup_batch1", 1.0, 2),
        ("measured speedup train", "measured_speedup_train_step", 1.0, 2),
        ("compression", "compression_ratio", 1.0, 2),
        ("pruned layers MiB", "pruned_layers_bytes", MIB, 2),
        ("model MiB", "stored_bytes", MIB, 2),
        ("optimizer MiB", "optimizer_state_bytes", MIB, 2),
        ("checkpoint MiB", "checkpoint_bytes", MIB, 2),
        ("process +MiB", "model_rss_bytes", MIB, 1),
    ]
    columns += [(f"latency b{size} ms", f"latency_batch{size}_ms", 1.0, 2) for size in batch_sizes]
    columns.append(("train step ms", "train_step_ms", 1.0, 1))
    columns.append(("training s", "training_s", 1.0, 1))
    return columns


# A test loss within this fraction of ln(classes) means the outputs are nearly uniform: whatever the
# accuracy reads (argmax of almost-equal logits can still be right often), the model says little.
NEAR_UNIFORM_FRACTION = 0.05


def near_uniform_cells(final: pd.DataFrame) -> pd.DataFrame:
    """Cells (``method, target_sparsity, seed, test_loss, uniform_loss``) whose final test loss is
    within :data:`NEAR_UNIFORM_FRACTION` of ``ln(number of classes)``, the loss of uniform outputs."""
    losses = final[final["metric"] == "test_loss"]
    columns = ["method", "target_sparsity", "seed", "test_loss", "uniform_loss"]
    if losses.empty:
        return pd.DataFrame(columns=columns)
    uniform = losses["dataset"].map(lambda name: math.log(num_classes(name)))
    near = (losses["value"] - uniform).abs() <= NEAR_UNIFORM_FRACTION * uniform
    flagged = losses[near].assign(test_loss=losses["value"], uniform_loss=uniform)
    return flagged[columns].sort_values(["target_sparsity", "method", "seed"]).reset_index(drop=True)


def near_uniform_lines(final: pd.DataFrame) -> list[str]:
    """One line per (target, method) with near-uniform outputs, naming the seeds; none if no cell is."""
    flagged = near_uniform_cells(final)
    lines = []
    for (target, method), rows in flagged.groupby(["target_sparsity", "method"], sort=True):
        seeds = ", ".join(str(seed) for seed in rows["seed"])
        lines.append(f"- Outputs near uniform: {method} @ {target:g} (seed {seeds}): test loss "
                     f"{rows['test_loss'].mean():.2f} is within {NEAR_UNIFORM_FRACTION:.0%} of ln(classes) = "
                     f"{rows['uniform_loss'].iloc[0]:.2f}, whatever its accuracy reads.")
    return lines


def summary_markdown(table: pd.DataFrame) -> str:
    """A markdown summary: for each target sparsity, every method's final values beside dense's.

    Values are means over seeds, with ``± h`` (the half-width of the 95 % Student-t interval)
    when there are several seeds. Below the table, for each target, a sentence says which
    methods accuracy cannot tell apart. "process +MiB" is what loading and running the model
    added to a fresh process's peak memory; speedups and compression are dense ÷ the method,
    measured in the same cell; "training s" is all the training that made the final model,
    the baseline's pretraining included for a method that starts from it.
    """
    if table.empty:
        return "No finished cells yet."
    final = final_values(table)
    columns = [column for column in _columns(latency_batch_sizes(table)) if (final["metric"] == column[1]).any()]
    stats = {metric: seed_stats(final, metric) for _, metric, _, _ in columns}
    header = "| target | method | " + " | ".join(name for name, _, _, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    methods = list(dict.fromkeys(table["method"]))
    targets = sorted(t for t in final["target_sparsity"].unique() if t > 0) or [0.0]
    references = {method for method in methods if is_reference(final, method)}
    uniform = near_uniform_cells(final)
    flagged = set(zip(uniform["method"], uniform["target_sparsity"]))
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
            name = f"{method} (outputs near uniform)" if (method, method_target) in flagged else method
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    seeds = sorted(table["seed"].unique())
    run_ids = ", ".join(sorted(map(str, table["run_id"].unique())))
    meta = table.iloc[0]
    spread = (f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± half-width of the 95 % confidence "
              f"interval (Student t)" if len(seeds) > 1 else f"1 seed ({seeds[0]}), no interval")
    parts = [
        f"## Summary (run {run_ids}, {meta['dataset']}, {meta['device']} {meta['device_name']}, "
        f"{meta['threads']} threads; {spread})",
        "",
        *lines,
        "",
        *accuracy_verdicts(final, targets, references),
        *near_uniform_lines(final),
    ]
    if note := mixed_nodes_note(table):
        parts += ["", note]
    failed = failed_cells(table)
    if len(failed):
        parts += ["", "Failed cells:"]
        parts += [f"- {row.method} @ {row.target_sparsity:g}, seed {row.seed}, step {row.step}: {row.note}"
                  for row in failed.itertuples()]
    return "\n".join(parts)


def accuracy_verdicts(final: pd.DataFrame, targets: list[float], references: set[str]) -> list[str]:
    """One sentence per target: which methods' accuracies the seeds cannot tell apart."""
    stats = seed_stats(final, "test_accuracy")
    lines = []
    for target in targets:
        at = stats[(stats["target_sparsity"] == target) & ~stats["method"].isin(references)]
        if len(at) < 2:
            continue
        if (at["n"] < 2).all():
            lines.append(f"- At {target:g}: 1 seed, no interval; accuracy differences between methods are not "
                         f"shown to be real.")
            continue
        close, apart = separation(at)
        sentence = f"- At {target:g}: accuracy does not separate {', '.join(close)} (95 % intervals overlap: " \
                   f"indistinguishable at this size)" if len(close) > 1 else \
                   f"- At {target:g}: {close[0]} has the highest accuracy, its interval clear of the others'"
        if apart and len(close) > 1:
            sentence += (f"; {', '.join(apart)} {'is' if len(apart) == 1 else 'are'} below {close[0]}, "
                         f"{'its interval' if len(apart) == 1 else 'their intervals'} apart from {close[0]}'s")
        lines.append(sentence + ".")
    return lines


def mixed_nodes_note(table: pd.DataFrame) -> str | None:
    """A warning line when the rows were measured on more than one kind of node (CPU or GPU model,
    threads), e.g. a grid run on a mixed Ray cluster; ``None`` when they all come from one kind."""
    kinds = table[["device", "device_name", "threads"]].drop_duplicates()
    if len(kinds) < 2:
        return None
    listed = "; ".join(f"{row.device} {row.device_name}, {row.threads} threads" for row in kinds.itertuples())
    return (f"Note: the rows were measured on {len(kinds)} kinds of node ({listed}); latencies and times "
            f"compare only between rows of one kind (the host, device_name and threads columns say which).")


def _format_stat(hit: pd.DataFrame, scale: float, decimals: int) -> str:
    if hit.empty or not math.isfinite(float(hit["mean"].iloc[0])):
        return "–"
    mean = float(hit["mean"].iloc[0]) / scale
    half_width = float(hit["half_width"].iloc[0]) / scale
    text = f"{mean:.{decimals}f}"
    if int(hit["n"].iloc[0]) > 1 and math.isfinite(half_width):
        text += f" ± {half_width:.{decimals}f}"
    return text
