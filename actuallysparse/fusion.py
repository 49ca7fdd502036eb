"""Folding eval-mode BatchNorm into the sparse layer before it, for inference.

In evaluation a BatchNorm is an affine map per channel, ``y = (x - mean) / sqrt(var + eps) *
gamma + beta``. After a sparse layer it folds into that layer: each output row's stored values
are scaled by ``gamma / sqrt(var + eps)`` and the bias becomes ``(bias - mean) * scale + beta``.
The pattern does not change, so the folded model stores exactly as many weights and runs one
pass fewer over its activations (BatchNorm was about an eighth of a pruned VGG11_bn's inference).
"""
from __future__ import annotations

import torch
from torch import nn

from actuallysparse.conv import SparseConv2d
from actuallysparse.layers import SparseLayer
from actuallysparse.storage import SparseModule

# which BatchNorm may follow which sparse layer
_PAIRS = ((SparseConv2d, nn.BatchNorm2d), (SparseLayer, nn.BatchNorm1d))


def fuse_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a sparse layer inside an ``nn.Sequential`` into
    that layer, and put ``nn.Identity`` in its place. In place; exact up to float rounding.

    Only for inference: the folded layer no longer normalises with batch statistics, so
    training it afterwards is not training the same model.

    Args:
        model: a model in evaluation mode (``model.eval()``).

    Returns:
        How many BatchNorm layers were folded.

    Raises:
        ValueError: ``model`` (or a BatchNorm to fold) is in training mode, or a BatchNorm to
            fold keeps no running statistics.

    Example::

        >>> model.eval()
        >>> fuse_batchnorm(model)       # e.g. 7 for a pruned VGG11_bn
        7
    """
    pairs = _foldable_pairs(model)
    if model.training or any(norm.training for _, _, _, norm in pairs):
        raise ValueError("fuse_batchnorm folds the running statistics that only evaluation uses; the model is in "
                         "training mode: call model.eval() first")
    for _, _, layer, norm in pairs:
        if norm.running_mean is None or norm.running_var is None:
            raise ValueError(f"{norm} keeps no running statistics (track_running_stats=False), so it normalises "
                             f"with each batch's own and cannot be folded")
    for parent, name, layer, norm in pairs:
        _fold(layer, norm)
        parent._modules[name] = nn.Identity()
    return len(pairs)


def _foldable_pairs(model: nn.Module) -> list[tuple[nn.Sequential, str, SparseModule, nn.Module]]:
    """``(sequential, name of the norm in it, sparse layer, norm)`` for each sparse layer directly
    followed by its kind of BatchNorm."""
    pairs = []
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            layer, norm = parent._modules[first], parent._modules[second]
            if any(isinstance(layer, layer_type) and type(norm) is norm_type for layer_type, norm_type in _PAIRS):
                pairs.append((parent, second, layer, norm))
    return pairs


@torch.no_grad()
def _fold(layer: SparseModule, norm: nn.Module) -> None:
    values = layer.values
    scale = torch.rsqrt(norm.running_var.to(values.dtype) + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.to(values.dtype)
    shift = -norm.running_mean.to(values.dtype) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.to(values.dtype)
    rows, _ = layer._rows_cols()
    values.mul_(scale[rows.to(values.device)])
    if layer.bias is None:
        layer.bias = nn.Parameter(shift.clone())
    else:
        layer.bias.copy_(layer.bias * scale + shift)
