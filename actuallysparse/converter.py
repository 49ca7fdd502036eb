"""Conversion of linear layers and whole models between dense, COO and CSR.

Zeros are dropped on every conversion to a sparse format, and sparse-to-sparse
conversion never builds the dense weight.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from actuallysparse.layers import SparseLayer

CONVERSION_TARGETS = ("dense", "coo", "csr")
CONVERTIBLE_TYPES = (nn.Linear, SparseLayer)


class UnknownTargetError(TypeError, ValueError):
    """An unknown conversion target. A ``TypeError`` as in the original package."""


def _check_target(target) -> str:
    if target not in CONVERSION_TARGETS:
        valid = ", ".join(repr(t) for t in CONVERSION_TARGETS)
        raise UnknownTargetError(f"unknown conversion target {target!r}; valid targets are {valid}")
    return target


def _entries(layer: nn.Module, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Rows, columns and values of the non-zero weights of ``layer`` (mask applied)."""
    out_features, in_features = layer.out_features, layer.in_features
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor of shape ({out_features}, {in_features}), "
                            f"got {type(mask).__name__}")
        if tuple(mask.shape) != (out_features, in_features):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the weight's shape "
                             f"({out_features}, {in_features})")
    if isinstance(layer, SparseLayer):
        rows, cols = layer._rows_cols()
        values = layer.values.detach().clone()
        if mask is not None:
            values = values * mask.to(values.device)[rows, cols].to(values.dtype)
    else:
        weight = layer.weight.detach()
        if mask is not None:
            weight = weight * mask.to(weight.device).to(weight.dtype)
        rows, cols = torch.nonzero(weight, as_tuple=True)
        values = weight[rows, cols].clone()
    nonzero = values != 0
    rows, cols, values = rows[nonzero], cols[nonzero], values[nonzero]
    not_finite = int((~torch.isfinite(values)).sum())
    if not_finite:
        warnings.warn(f"converting {type(layer).__name__}({layer.in_features}, {layer.out_features}): "
                      f"{not_finite} of its {values.numel()} non-zero weights are NaN or infinite; they are "
                      f"kept as they are, but magnitude pruning will refuse this layer", RuntimeWarning,
                      stacklevel=3)
    return rows, cols, values


def convert(layer: nn.Linear | SparseLayer, target: str, mask: Tensor | None = None) -> nn.Module:
    """Convert one layer to ``"dense"`` (``nn.Linear``), ``"coo"`` or ``"csr"`` (``SparseLayer``).

    The result is a new layer on the same device and dtype; ``layer`` is untouched.

    Args:
        layer: an ``nn.Linear`` or a :class:`SparseLayer`.
        target: one of ``"dense"``, ``"coo"``, ``"csr"``.
        mask: optional ``(out_features, in_features)`` tensor; weights where it is
            zero are dropped.

    Raises:
        TypeError: unknown ``target`` (lists the valid ones) or unsupported layer type.

    Example::

        >>> convert(nn.Linear(4, 4), "coo")
        SparseLayer(in_features=4, out_features=4, bias=True, csr_mode=False, k=0.05)
    """
    target = _check_target(target)
    if not isinstance(layer, CONVERTIBLE_TYPES):
        raise TypeError(f"convert() takes an nn.Linear or a SparseLayer, got {type(layer).__name__}")
    rows, cols, values = _entries(layer, mask)
    has_bias = layer.bias is not None
    factory = {"device": values.device, "dtype": values.dtype}
    if target == "dense":
        converted = nn.Linear(layer.in_features, layer.out_features, bias=has_bias, **factory)
        with torch.no_grad():
            converted.weight.zero_()
            converted.weight[rows, cols] = values
    else:
        k = layer.k if isinstance(layer, SparseLayer) else 0.05
        bias = layer.bias.detach() if has_bias else None
        converted = SparseLayer.from_entries(layer.in_features, layer.out_features, rows, cols,
                                             values, bias=bias, csr_mode=(target == "csr"), k=k)
    if has_bias and target == "dense":
        with torch.no_grad():
            converted.bias.copy_(layer.bias.detach())
    converted.train(layer.training)
    return converted


def convert_model(model: nn.Module, layer_type: type, target: str) -> nn.Module:
    """Return a copy of ``model`` with every submodule of ``layer_type`` converted.

    Works at any depth. ``model`` itself is left untouched.

    Args:
        model: any module.
        layer_type: ``nn.Linear`` or :class:`SparseLayer` (or a subclass).
        target: one of ``"dense"``, ``"coo"``, ``"csr"``.
    """
    target = _check_target(target)
    if not (isinstance(layer_type, type) and issubclass(layer_type, CONVERTIBLE_TYPES)):
        raise TypeError(f"layer_type must be nn.Linear or SparseLayer, got {layer_type!r}")
    if isinstance(model, layer_type):
        return convert(model, target)
    converted = copy.deepcopy(model)
    _convert_children(converted, layer_type, target)
    return converted


def _convert_children(module: nn.Module, layer_type: type, target: str) -> None:
    for name, child in module.named_children():
        if isinstance(child, layer_type):
            setattr(module, name, convert(child, target))
        else:
            _convert_children(child, layer_type, target)
