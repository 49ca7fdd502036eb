"""Keeping optimizers in step with layers whose parameters shrink.

Pruning a :class:`~actuallysparse.layers.SparseLayer` gives it a new, smaller
``values`` Parameter. An optimizer built before that still holds the old one; left
alone it would go on stepping an orphan while the layer never trains again (the
thesis's training loop lost 8 accuracy points this way). Two remedies:

* pass ``optimizer=`` when pruning: :func:`replace_parameter` swaps the parameter
  in its param groups and compacts its per-parameter state on the spot;
* otherwise every pruned parameter records its successor, and a global optimizer
  step pre-hook remaps any orphan before the step runs. The hook is installed when the
  first sparse layer is built (or by :func:`install_step_hook`), never on import: importing
  the package changes no global state.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

_SUCCESSOR_ATTR = "_actuallysparse_successor"
_hook_handle = None
# False inside orphan_remapping_disabled: the hook stays installed but remaps nothing.
_remapping_enabled = True
# Optimizers that have stepped at least once: remapped as soon as a parameter they hold is
# replaced, so that their state_dict() or a GradScaler never meets a stale parameter. One that
# has never stepped holds no state and is remapped before its first step.
_known_optimizers: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


def check_optimizer(optimizer) -> None:
    """Raise a ``TypeError`` unless ``optimizer`` is ``None`` or a ``torch.optim.Optimizer``."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")


def replace_parameter(
    optimizer: torch.optim.Optimizer, old: Tensor, new: Tensor, keep_index: Tensor
) -> bool:
    """Make ``optimizer`` train ``new`` where it trained ``old``.

    Per-parameter state tensors shaped like ``old`` (momentum, Adam's moments, ...)
    are compacted to the entries ``keep_index`` kept, and start at zero for the entries it marks
    new (``-1``, a weight regrown by dynamic sparse training); other state (``step``) is kept.
    With ``keep_index=None`` (a new weight, not a pruned one) the state is dropped.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        old: the parameter that was replaced.
        new: its replacement, ``new[i] == old[keep_index[i]]`` at the time of replacement (and
            ``new[i] == 0`` where ``keep_index[i] == -1``).
        keep_index: 1-D int64, for each entry of ``new`` its position in ``old`` or ``-1``, or
            ``None`` when the entries do not correspond.

    Returns:
        True if ``optimizer`` held ``old``.
    """
    found = False
    for group in optimizer.param_groups:
        params = group["params"]
        for position, param in enumerate(params):
            if param is old:
                params[position] = new
                found = True
    if not found:
        return False
    state = optimizer.state.pop(old, None)
    if state and keep_index is not None:
        keep_index = keep_index.to(old.device)
        compacted = {}
        for key, value in state.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape == old.shape:
                compacted[key] = gather_entries(value, keep_index.to(value.device))
            else:
                compacted[key] = value
        optimizer.state[new] = compacted
    return True


def gather_entries(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]``, with zero where ``index`` is ``-1`` (an entry that is new)."""
    fresh = index < 0
    gathered = values.index_select(0, index.clamp(min=0))
    return gathered.masked_fill_(fresh, 0) if bool(fresh.any()) else gathered


def record_successor(old: Tensor, new: Tensor, keep_index: Tensor | None) -> None:
    """Note on ``old`` that ``new`` replaced it, keeping the entries ``keep_index`` (``None``: none match)."""
    setattr(old, _SUCCESSOR_ATTR, (new, keep_index))


def abandon_successor(param: Tensor) -> None:
    """Forget that ``param`` was replaced, so no optimizer holding it is ever remapped.

    Only to reproduce the thesis's orphaned-optimizer bug: an optimizer holding ``param`` then
    steps a copy the layer no longer uses.
    """
    if hasattr(param, _SUCCESSOR_ATTR):
        delattr(param, _SUCCESSOR_ATTR)


def remap_known_optimizers() -> None:
    """Remap orphans in every optimizer that has stepped (see :data:`_known_optimizers`)."""
    if not _remapping_enabled:
        return
    for optimizer in list(_known_optimizers):
        remap_orphans(optimizer)


def latest_successor(param: Tensor) -> tuple[Tensor, Tensor] | None:
    """Follow the chain of replacements from ``param``.

    Returns:
        ``(newest, keep_index)`` with ``newest == param[keep_index]`` (as of the
        pruning; ``-1`` marks entries added since), or ``None`` if ``param`` was never replaced.
    """
    successor = getattr(param, _SUCCESSOR_ATTR, None)
    if successor is None:
        return None
    current, keep_index = successor
    while (successor := getattr(current, _SUCCESSOR_ATTR, None)) is not None:
        current, step_keep = successor
        if keep_index is None or step_keep is None:
            keep_index = None
        else:
            step_keep = step_keep.to(keep_index.device)
            composed = keep_index.index_select(0, step_keep.clamp(min=0))
            keep_index = composed.masked_fill_(step_keep < 0, -1)
    return current, keep_index


def remap_orphans(optimizer: torch.optim.Optimizer) -> int:
    """Replace every pruned-away parameter that ``optimizer`` still holds.

    Returns:
        How many parameters were remapped.
    """
    orphans = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            successor = latest_successor(param)
            if successor is not None:
                orphans.append((param, *successor))
    for old, new, keep_index in orphans:
        replace_parameter(optimizer, old, new, keep_index)
    return len(orphans)


def _remap_before_step(optimizer, args, kwargs):
    _known_optimizers.add(optimizer)
    if _remapping_enabled:
        remap_orphans(optimizer)


def install_step_hook() -> None:
    """Install the global pre-step hook that remaps orphans (idempotent).

    :class:`~actuallysparse.layers.SparseLayer` calls it when a layer is built, so that an
    optimizer made for a sparse layer is known to the remap from its first step on.
    """
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_pre_hook(_remap_before_step)


class orphan_remapping_disabled:
    """Context manager that switches the automatic remap off, to reproduce the thesis's bug.

    Inside it, an optimizer that was not told about a pruning goes on stepping the
    orphaned parameter while the pruned layer stops learning, exactly as the original
    training loop did. Only for demonstrations: never train like this.

    Example::

        >>> with orphan_remapping_disabled():
        ...     layer.prune_smallest_values()
        ...     optimizer.step()          # steps the old, detached values
    """

    def __enter__(self):
        global _remapping_enabled
        self._was_enabled = _remapping_enabled
        _remapping_enabled = False
        return self

    def __exit__(self, *exc_info):
        global _remapping_enabled
        _remapping_enabled = self._was_enabled
        return False
