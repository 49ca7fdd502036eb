"""PNG plots drawn from the results table alone (never from live models): mean and spread over seeds."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import pandas as pd  # noqa: E402

from actuallysparse.memory import MIB  # noqa: E402
from comparison.summary import final_values, is_reference, latency_batch_sizes, seed_stats  # noqa: E402

# A method's look follows from its name's place in the sorted list of known names, so it is the
# same in every plot of every run. Masking methods often hold identical bytes; distinct markers
# and dashes keep overlapping lines visible.
_COLORS = ["tab:green", "tab:orange", "tab:blue", "tab:red", "tab:purple", "tab:brown", "tab:pink",
           "tab:olive", "tab:cyan", "tab:gray"]
_STYLES = [("o", "-"), ("^", "-"), ("v", "--"), ("s", "-."), ("D", ":"), ("P", "--")]


def plot_all(table: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Draw every plot of ``table`` into ``out_dir``; returns the files written.

    Plots whose metrics are absent (e.g. a table with only dense cells) are skipped.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = final_values(table)
    written = []
    for name, draw in (
        ("overview.png", lambda: plot_overview(final)),
        ("accuracy_vs_sparsity.png", lambda: plot_accuracy_vs_sparsity(final)),
        ("latency_vs_sparsity.png", lambda: plot_latency_vs_sparsity(final, latency_batch_sizes(table))),
        ("stored_bytes_vs_sparsity.png", lambda: plot_bytes_vs_sparsity(final)),
        ("accuracy_vs_bytes.png", lambda: plot_accuracy_vs_bytes(final)),
        ("accuracy_vs_training_time.png", lambda: plot_accuracy_vs_training_time(final)),
        ("training_curves.png", lambda: plot_training_curves(table)),
        ("speedup_measured_vs_theoretical.png", lambda: plot_speedup_measured_vs_theoretical(final)),
    ):
        figure = draw()
        if figure is None:
            continue
        path = out_dir / name
        figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def _method_index(method: str) -> int:
    from comparison.methods import available_methods

    names = sorted(name for name, cls in available_methods().items() if cls.prunes)
    return names.index(method) if method in names else len(names) + sum(map(ord, method))


def method_color(method: str, reference: bool = False) -> str:
    """The colour of ``method`` in every plot (black for a reference that never prunes)."""
    return "black" if reference else _COLORS[_method_index(method) % len(_COLORS)]


def method_style(method: str) -> tuple[str, str]:
    """``(marker, linestyle)`` of ``method`` in every plot."""
    return _STYLES[_method_index(method) % len(_STYLES)]


def _against_sparsity(axis, final: pd.DataFrame, metric: str, scale: float = 1.0) -> bool:
    """Mean ± std over seeds of ``metric`` against target sparsity; dense as a horizontal line."""
    stats = seed_stats(final, metric)
    if stats.empty:
        return False
    methods = list(dict.fromkeys(final["method"]))
    for method in methods:
        rows = stats[stats["method"] == method].sort_values("target_sparsity")
        if rows.empty:
            continue
        reference = is_reference(final, method)
        color = method_color(method, reference)
        if reference:
            mean = rows["mean"].iloc[0] / scale
            axis.axhline(mean, color=color, linestyle="--", label=f"{method} (unpruned)")
            continue
        rows = rows[rows["target_sparsity"] > 0]
        marker, linestyle = method_style(method)
        axis.errorbar(rows["target_sparsity"], rows["mean"] / scale, yerr=_error(rows) / scale,
                      marker=marker, linestyle=linestyle, capsize=3, color=color, label=method)
    _sparsity_axis(axis, final)
    axis.set_xlabel("target sparsity (fraction of pruned-layer weights that are zero)")
    axis.grid(True, which="both", alpha=0.3)
    return True


def _error(stats: pd.DataFrame) -> pd.Series:
    """Error bars: the 95 % confidence half-width over seeds (none for a single seed)."""
    return stats["half_width"].fillna(0.0)


def _legend(axis, **kwargs) -> None:
    if axis.get_legend_handles_labels()[0]:
        axis.legend(**kwargs)


def _sparsity_axis(axis, final: pd.DataFrame) -> None:
    # Sparsities crowd near 1 (0.9, 0.99, 0.999): a logit axis spaces them evenly.
    targets = sorted(final.loc[final["target_sparsity"] > 0, "target_sparsity"].unique())
    if not targets:
        return
    axis.set_xscale("logit")
    low, high = targets[0], targets[-1]
    axis.set_xlim(low / (low + (1 - low) * 1.5), 1 - (1 - high) / 1.5)
    axis.set_xticks(targets, [f"{t:g}" for t in targets])
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def plot_overview(final: pd.DataFrame):
    """The trade-off in one figure: accuracy, measured training-step speedup and bytes held, each
    against target sparsity, every method in the same colours (mean and 95 % interval over seeds)."""
    figure = _sparsity_panels(final, [
        ("test_accuracy", 1.0, "test accuracy", "Accuracy", False),
        ("measured_speedup_train_step", 1.0, "dense step time ÷ method's (>1: faster)",
         "Training-step speedup, whole model", False),
        ("stored_bytes", MIB, "MiB held by the model (every tensor once)", "Bytes held", True)],
        figsize=(17.0, 4.6), legends=False)
    if figure is None:
        return None
    axes = figure.axes
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=max(len(labels), 1), bbox_to_anchor=(0.5, -0.04),
                  frameon=False)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    return figure


def plot_accuracy_vs_sparsity(final: pd.DataFrame):
    """Test accuracy at the last step against target sparsity."""
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    if not _against_sparsity(axis, final, "test_accuracy"):
        plt.close(figure)
        return None
    axis.set_ylabel("test accuracy")
    axis.set_title("Accuracy after pruning and fine-tuning")
    _legend(axis)
    return figure


def plot_latency_vs_sparsity(final: pd.DataFrame, batch_sizes: list[int]):
    """Inference latency (median) against target sparsity, one panel per batch size."""
    if not batch_sizes:
        return None
    figure, axes = plt.subplots(1, len(batch_sizes), figsize=(6.0 * len(batch_sizes), 4.4), squeeze=False)
    for axis, size in zip(axes[0], batch_sizes):
        _against_sparsity(axis, final, f"latency_batch{size}_ms")
        axis.set_ylabel("latency (ms, median)")
        axis.set_title(f"Inference latency, batch {size}")
        _legend(axis)
    return figure


def plot_bytes_vs_sparsity(final: pd.DataFrame):
    """Bytes held (log scale), whole model and pruned layers alone, against target sparsity."""
    return _sparsity_panels(final, [
        (metric, MIB, "MiB held (every tensor, counted once)", f"Stored bytes, {title}", True)
        for metric, title in (("stored_bytes", "whole model"), ("pruned_layers_bytes", "pruned layers only"))],
        figsize=(12.0, 4.4))


def _sparsity_panels(final: pd.DataFrame, panels: list[tuple[str, float, str, str, bool]], *,
                     figsize: tuple[float, float], legends: bool = True):
    """One panel per ``(metric, scale, y label, title, log scale)`` against target sparsity, side by
    side; ``None`` when no panel has data."""
    figure, axes = plt.subplots(1, len(panels), figsize=figsize)
    drawn = False
    for axis, (metric, scale, label, title, log) in zip(axes, panels):
        drawn |= _against_sparsity(axis, final, metric, scale=scale)
        if log:
            axis.set_yscale("log")
        axis.set_ylabel(label)
        axis.set_title(title)
        if legends:
            _legend(axis)
    if not drawn:
        plt.close(figure)
        return None
    return figure


def plot_accuracy_vs_bytes(final: pd.DataFrame):
    """Test accuracy against the model's stored bytes (log scale): the trade-off in one picture."""
    accuracy = seed_stats(final, "test_accuracy")
    size = seed_stats(final, "stored_bytes")
    if accuracy.empty or size.empty:
        return None
    merged = accuracy.merge(size, on=["method", "target_sparsity"], suffixes=("_acc", "_bytes"))
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    methods = list(dict.fromkeys(final["method"]))
    for method in methods:
        rows = merged[merged["method"] == method].sort_values("target_sparsity")
        if rows.empty:
            continue
        marker, linestyle = method_style(method)
        axis.errorbar(rows["mean_bytes"] / MIB, rows["mean_acc"], xerr=rows["half_width_bytes"].fillna(0) / MIB,
                      yerr=rows["half_width_acc"].fillna(0), marker=marker, capsize=3, color=method_color(method, is_reference(final, method)),
                      label=method, linestyle=linestyle if len(rows) > 1 else "none")
        for row in rows.itertuples():
            axis.annotate(f"{row.target_sparsity:g}", (row.mean_bytes / MIB, row.mean_acc),
                          textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("model MiB held (log)")
    axis.set_ylabel("test accuracy")
    axis.set_title("Accuracy against memory (labels: target sparsity)")
    axis.grid(True, which="both", alpha=0.3)
    _legend(axis)
    return figure


def _paired_stats(final: pd.DataFrame, first: str, second: str, suffixes: tuple[str, str]) -> pd.DataFrame | None:
    """The seed statistics of two metrics side by side per method and target (columns suffixed),
    or ``None`` when either is absent."""
    one, two = seed_stats(final, first), seed_stats(final, second)
    if one.empty or two.empty:
        return None
    return one.merge(two, on=["method", "target_sparsity"], suffixes=suffixes)


def plot_accuracy_vs_training_time(final: pd.DataFrame):
    """Test accuracy against the training seconds that made each final model (the baseline's
    pretraining included for methods that start from it): what sparse-from-scratch training saves."""
    both = _paired_stats(final, "test_accuracy", "training_s", ("", "_s"))
    if both is None:
        return None
    figure, axis = plt.subplots(figsize=(6.8, 4.6))
    for method in dict.fromkeys(final["method"]):
        rows = both[both["method"] == method].sort_values("target_sparsity")
        if rows.empty:
            continue
        reference = is_reference(final, method)
        marker, linestyle = ("*", "") if reference else method_style(method)
        axis.errorbar(rows["mean_s"], rows["mean"], xerr=rows["half_width_s"].fillna(0.0), yerr=_error(rows),
                      marker=marker, linestyle=linestyle or "none", capsize=3,
                      color=method_color(method, reference), label=method)
        for row in rows.itertuples():
            if row.target_sparsity > 0:
                axis.annotate(f"{row.target_sparsity:g}", (row.mean_s, row.mean), fontsize=7,
                              xytext=(3, 3), textcoords="offset points")
    axis.set_xlabel("training seconds that made the model (pretraining included)")
    axis.set_ylabel("test accuracy")
    axis.set_title("Accuracy against training time (labels: target sparsity)")
    axis.grid(True, alpha=0.3)
    _legend(axis)
    return figure


def plot_speedup_measured_vs_theoretical(final: pd.DataFrame):
    """Measured speedup (dense latency ÷ latency, inference at the run's batch size) against the
    theoretical one (dense FLOPs ÷ FLOPs), one point per method and target, the diagonal drawn:
    points below it lose to overheads what their FLOPs promise."""
    merged = _paired_stats(final, "theoretical_speedup", "measured_speedup", ("_flops", "_time"))
    if merged is None:
        return None
    figure, axis = plt.subplots(figsize=(6.4, 4.8))
    for method in dict.fromkeys(merged["method"]):
        rows = merged[merged["method"] == method].sort_values("target_sparsity")
        marker, _ = method_style(method)
        axis.errorbar(rows["mean_flops"], rows["mean_time"], yerr=rows["half_width_time"].fillna(0), marker=marker,
                      linestyle="none", capsize=3, color=method_color(method, is_reference(final, method)),
                      label=method)
        for row in rows.itertuples():
            axis.annotate(f"{row.target_sparsity:g}", (row.mean_flops, row.mean_time), textcoords="offset points",
                          xytext=(4, 4), fontsize=8)
    top = max(float(merged["mean_flops"].max()), float(merged["mean_time"].max()), 1.0) * 1.3
    bottom = min(float(merged["mean_flops"].min()), float(merged["mean_time"].min()), 1.0) / 1.3
    axis.plot([bottom, top], [bottom, top], color="gray", linestyle=":", label="measured = theoretical")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("theoretical speedup (dense FLOPs / FLOPs)")
    axis.set_ylabel("measured speedup (dense latency / latency)")
    axis.set_title("What the FLOPs promise and what the clock says (labels: target)")
    axis.grid(True, which="both", alpha=0.3)
    _legend(axis, fontsize=8)
    return figure


def plot_training_curves(table: pd.DataFrame):
    """Per method: test accuracy and train loss against pruning step, one line per target, seeds shaded."""
    steps = table[table["metric"].isin(["test_accuracy", "train_loss"])]
    if steps.empty:
        return None
    methods = list(dict.fromkeys(steps["method"]))
    figure, axes = plt.subplots(2, len(methods), figsize=(4.2 * len(methods), 6.4), squeeze=False, sharey="row")
    targets = sorted(steps["target_sparsity"].unique())
    cmap = plt.get_cmap("viridis")
    for column, method in enumerate(methods):
        for row, metric in enumerate(["test_accuracy", "train_loss"]):
            axis = axes[row][column]
            stats = seed_stats(steps[steps["method"] == method], metric, by=("target_sparsity", "step"))
            for index, target in enumerate(targets):
                line = stats[stats["target_sparsity"] == target].sort_values("step")
                if line.empty:
                    continue
                color = cmap(index / max(len(targets) - 1, 1))
                axis.plot(line["step"], line["mean"], marker="o", color=color, label=f"target {target:g}")
                axis.fill_between(line["step"], line["min"], line["max"], color=color, alpha=0.2)
            axis.grid(True, alpha=0.3)
            axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            if row == 0:
                axis.set_title(method)
            else:
                axis.set_xlabel("pruning step (0 = baseline)")
            if column == 0:
                axis.set_ylabel("test accuracy" if metric == "test_accuracy" else "train loss (last epoch of step)")
            _legend(axis, fontsize=8)
    figure.suptitle("Training curves (mean over seeds, band: min to max)")
    figure.tight_layout()
    return figure
