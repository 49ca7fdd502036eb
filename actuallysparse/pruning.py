"""Magnitude pruning to a target sparsity, per layer or globally, with physical removal.

A harness that follows a schedule of target sparsities (as NNI's ``sparse_ratio``)
calls :func:`prune_to_sparsity` once per step. Pruned weights never come back.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from actuallysparse.storage import SparseModule, check_finite_values, sparse_modules
from actuallysparse.optim import check_optimizer

PRUNING_SCOPES = ("layer", "global")


def _check_sparsity(target_sparsity) -> float:
    if (isinstance(target_sparsity, bool) or not isinstance(target_sparsity, numbers.Real)
            or not 0 <= target_sparsity <= 1):
        raise ValueError(f"target_sparsity must be a number in [0, 1], the fraction of weights "
                         f"to be zero; got {target_sparsity!r}")
    return float(target_sparsity)


def weights_to_keep(total_weights: int, target_sparsity: float) -> int:
    """How many of ``total_weights`` weights stay at ``target_sparsity`` (rounded to nearest)."""
    return total_weights - int(round(target_sparsity * total_weights))


def achieved_sparsity(module: nn.Module) -> float:
    """Fraction of pruned weights over all sparse layers (linear and convolution) in ``module``."""
    layers = sparse_modules(module)
    total = sum(layer.n_weights for layer in layers)
    if total == 0:
        raise ValueError(f"{type(module).__name__} contains no sparse layer (SparseLayer or SparseConv2d)")
    return 1.0 - sum(layer.nnz for layer in layers) / total


def prune_to_sparsity(module: nn.Module, target_sparsity: float, *, scope: str = "layer",
                      optimizer: torch.optim.Optimizer | None = None) -> float:
    """Prune every sparse layer (linear or convolution) in ``module`` by magnitude to ``target_sparsity``.

    Weights leave storage. A layer already sparser than the target is left alone:
    weights never grow back.

    Args:
        module: a sparse layer or any module containing some.
        target_sparsity: fraction of zeros wanted, in ``[0, 1]``.
        scope: ``"layer"``: each layer reaches the target on its own; ``"global"``:
            one magnitude threshold across all layers, linear and convolution alike, so the target holds overall.
        optimizer: optional optimizer to update on the spot; without it, optimizers
            are remapped before their next step.

    Returns:
        The achieved sparsity over all sparse layers of ``module``.

    Raises:
        ValueError: a bad target or scope, no sparse layer, or a layer holding NaN or
            infinite weights (named, with their count).
    """
    target_sparsity = _check_sparsity(target_sparsity)
    check_optimizer(optimizer)
    if scope not in PRUNING_SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid scopes are {', '.join(map(repr, PRUNING_SCOPES))}")
    layers = sparse_modules(module)
    if not layers:
        raise ValueError(f"{type(module).__name__} contains no sparse layer (SparseLayer or SparseConv2d) to prune")
    for name, layer in module.named_modules():
        if isinstance(layer, SparseModule):
            check_finite_values(layer, name or type(module).__name__)
    if scope == "layer":
        for layer in layers:
            n_keep = weights_to_keep(layer.n_weights, target_sparsity)
            layer.remove_smallest(layer.nnz - n_keep, optimizer=optimizer)
    else:
        _prune_globally(layers, target_sparsity, optimizer)
    return achieved_sparsity(module)


def _prune_globally(layers: list[SparseModule], target_sparsity: float, optimizer) -> None:
    total = sum(layer.n_weights for layer in layers)
    n_keep = weights_to_keep(total, target_sparsity)
    stored = sum(layer.nnz for layer in layers)
    if n_keep >= stored:
        return
    magnitudes = torch.cat([layer.values.detach().abs().float().cpu() for layer in layers])
    kept = torch.zeros(stored, dtype=torch.bool)
    if n_keep:
        kept[torch.topk(magnitudes, n_keep, sorted=False).indices] = True
    start = 0
    for layer in layers:
        layer_kept = kept[start:start + layer.nnz]
        start += layer.nnz
        layer.keep_entries(torch.nonzero(layer_kept).flatten(), optimizer=optimizer)
