"""Per-step target sparsities: the same list for every method of a cell."""

from __future__ import annotations


def sparsity_schedule(target: float, steps: int, kind: str = "cubic", initial: float = 0.0) -> list[float]:
    r"""Target sparsity after each of ``steps`` pruning steps, ending exactly at ``target``.

    ``cubic`` is the gradual schedule of Zhu & Gupta (2017),
    :math:`s_t = s_f + (s_i - s_f)(1 - t/n)^3` for :math:`t = 1 \dots n`: large steps while many
    redundant weights remain, small ones near the target. ``linear`` spaces the steps evenly.

    Args:
        target: final sparsity :math:`s_f`, in [0, 1).
        steps: number of pruning steps :math:`n` (>= 1).
        kind: ``cubic`` or ``linear``.
        initial: sparsity :math:`s_i` before the first step (e.g. 0.9 when continuing from a
            model already pruned to 0.9); must not exceed ``target``.

    Returns:
        ``steps`` non-decreasing floats; the last equals ``target``.

    Example::

        >>> [round(s, 4) for s in sparsity_schedule(0.9, 3)]
        [0.6333, 0.8667, 0.9]
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (0.0 <= initial <= target < 1.0):
        raise ValueError(f"need 0 <= initial <= target < 1, got initial={initial}, target={target}")
    if kind == "cubic":
        fractions = [1.0 - (1.0 - t / steps) ** 3 for t in range(1, steps + 1)]
    elif kind == "linear":
        fractions = [t / steps for t in range(1, steps + 1)]
    else:
        raise ValueError(f"unknown schedule {kind!r}; valid choices: cubic, linear")
    schedule = [initial + (target - initial) * fraction for fraction in fractions]
    schedule[-1] = target  # exact, whatever the rounding of the last fraction
    return schedule
