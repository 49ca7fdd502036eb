"""Conversion of linear and convolution layers, and whole models, between dense, COO and CSR.

Zeros are dropped on every conversion to a sparse format, and sparse-to-sparse
conversion never builds the dense weight.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from actuallysparse.conv import SparseConv2d
from actuallysparse.layers import SparseLayer
from actuallysparse.storage import SparseModule

CONVERSION_TARGETS = ("dense", "coo", "csr")
CONVERTIBLE_TYPES = (nn.Linear, SparseLayer, nn.Conv2d, SparseConv2d)


class UnknownTargetError(TypeError, ValueError):
    """An unknown conversion target. A ``TypeError`` as in the original package."""


def _check_target(target) -> str:
    if target not in CONVERSION_TARGETS:
        valid = ", ".join(repr(t) for t in CONVERSION_TARGETS)
        raise UnknownTargetError(f"unknown conversion target {target!r}; valid targets are {valid}")
    return target


def _dense_shape(layer: nn.Module) -> tuple[int, ...]:
    return tuple(layer._dense_shape) if isinstance(layer, SparseModule) else tuple(layer.weight.shape)


def _entries(layer: nn.Module, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Rows, columns and values of the non-zeros of ``layer``'s weight matrix (mask applied).

    The matrix has one row per output; a convolution's columns run over (input channel, kh, kw).
    """
    shape = _dense_shape(layer)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor of shape {shape}, got {type(mask).__name__}")
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the weight's shape {shape}")
        mask = mask.reshape(shape[0], -1)
    if isinstance(layer, SparseModule):
        rows, cols = layer._rows_cols()
        values = layer.values.detach().clone()
        if mask is not None:
            values = values * mask.to(values.device)[rows, cols].to(values.dtype)
    else:
        weight = layer.weight.detach().reshape(shape[0], -1)
        if mask is not None:
            weight = weight * mask.to(weight.device).to(weight.dtype)
        rows, cols = torch.nonzero(weight, as_tuple=True)
        values = weight[rows, cols].clone()
    nonzero = values != 0
    rows, cols, values = rows[nonzero], cols[nonzero], values[nonzero]
    not_finite = int((~torch.isfinite(values)).sum())
    if not_finite:
        warnings.warn(f"converting {type(layer).__name__} with weight {shape}: "
                      f"{not_finite} of its {values.numel()} non-zero weights are NaN or infinite; they are "
                      f"kept as they are, but magnitude pruning will refuse this layer", RuntimeWarning,
                      stacklevel=3)
    return rows, cols, values


def _linear(layer, target: str, rows: Tensor, cols: Tensor, values: Tensor, bias: Tensor | None,
            k: float) -> nn.Module:
    if target == "dense":
        dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=values.device,
                          dtype=values.dtype)
        _fill_dense(dense, rows, cols, values, bias)
        return dense
    return SparseLayer.from_entries(layer.in_features, layer.out_features, rows, cols, values, bias=bias,
                                    csr_mode=(target == "csr"), k=k)


def _conv(layer, target: str, rows: Tensor, cols: Tensor, values: Tensor, bias: Tensor | None,
          k: float) -> nn.Module:
    geometry = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
    if target == "dense":
        dense = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, bias=bias is not None,
                          device=values.device, dtype=values.dtype, **geometry)
        _fill_dense(dense, rows, cols, values, bias)
        return dense
    # SparseConv2d refuses, naming the argument, the groups and padding modes it does not support
    return SparseConv2d.from_entries(layer.in_channels, layer.out_channels, layer.kernel_size, rows, cols, values,
                                     bias, csr_mode=(target == "csr"), k=k, groups=layer.groups,
                                     padding_mode=layer.padding_mode, **geometry)


def _fill_dense(dense: nn.Module, rows: Tensor, cols: Tensor, values: Tensor, bias: Tensor | None) -> None:
    with torch.no_grad():
        matrix = dense.weight.view(dense.weight.shape[0], -1)
        matrix.zero_()
        matrix[rows, cols] = values
        if bias is not None:
            dense.bias.copy_(bias)


def convert(layer: nn.Module, target: str, mask: Tensor | None = None) -> nn.Module:
    """Convert one layer to ``"dense"``, ``"coo"`` or ``"csr"``.

    ``nn.Linear`` and :class:`SparseLayer` convert into each other, ``nn.Conv2d`` and
    :class:`SparseConv2d` likewise. The result is a new layer on the same device and dtype;
    ``layer`` is untouched.

    Args:
        layer: an ``nn.Linear``, ``nn.Conv2d``, :class:`SparseLayer` or :class:`SparseConv2d`.
        target: one of ``"dense"``, ``"coo"``, ``"csr"``.
        mask: optional tensor of the weight's shape; weights where it is zero are dropped.

    Raises:
        TypeError: unknown ``target`` (lists the valid ones) or unsupported layer type.
        ValueError: an ``nn.Conv2d`` the sparse convolution does not support (groups, padding mode).

    Example::

        >>> convert(nn.Linear(4, 4), "coo")
        SparseLayer(in_features=4, out_features=4, bias=True, csr_mode=False, k=0.05)
    """
    target = _check_target(target)
    if not isinstance(layer, CONVERTIBLE_TYPES):
        raise TypeError(f"convert() takes an nn.Linear, nn.Conv2d, SparseLayer or SparseConv2d, "
                        f"got {type(layer).__name__}")
    return with_entries(layer, target, *_entries(layer, mask))


def with_entries(layer: nn.Module, target: str, rows: Tensor, cols: Tensor, values: Tensor) -> nn.Module:
    """A layer of ``target``'s format with ``layer``'s geometry, bias, ``k`` and mode, whose weight
    matrix holds ``values`` at ``(rows, cols)`` (one row per output) and nothing else.

    :func:`convert` calls it with ``layer``'s own non-zeros; dynamic sparse training, with a
    pattern it chose.
    """
    target = _check_target(target)
    relu, pool = getattr(layer, "fused_relu", False), getattr(layer, "fused_pool", False)
    if relu and target == "dense":
        raise ValueError(f"{layer} computes the ReLU after it (fused_relu, set by fuse_batchnorm), which an "
                         f"nn.Conv2d cannot; convert the model before fuse_batchnorm, or add an nn.ReLU after the "
                         f"dense layer yourself")
    if pool and target == "dense":
        raise ValueError(f"{layer} pools its output (fused_pool, set by fuse_pooling), which an nn.Conv2d cannot; "
                         f"convert the model before fuse_pooling, or add an nn.MaxPool2d(2) after the dense layer "
                         f"yourself")
    bias = layer.bias.detach() if layer.bias is not None else None
    build = _conv if isinstance(layer, (nn.Conv2d, SparseConv2d)) else _linear
    k = layer.k if isinstance(layer, SparseModule) else 0.05  # the sparse layers' default
    converted = build(layer, target, rows, cols, values, bias, k)
    if relu:
        converted.fused_relu = True
    if pool:
        converted.fused_pool = True
    converted.train(layer.training)
    return converted


def convert_model(model: nn.Module, layer_type: type, target: str) -> nn.Module:
    """Return a copy of ``model`` with every submodule of ``layer_type`` converted.

    Works at any depth. ``model`` itself is left untouched.

    Args:
        model: any module.
        layer_type: ``nn.Linear``, ``nn.Conv2d``, :class:`SparseLayer` or :class:`SparseConv2d`
            (or a subclass).
        target: one of ``"dense"``, ``"coo"``, ``"csr"``.
    """
    target = _check_target(target)
    if not (isinstance(layer_type, type) and issubclass(layer_type, CONVERTIBLE_TYPES)):
        raise TypeError(f"layer_type must be nn.Linear, nn.Conv2d, SparseLayer or SparseConv2d, got {layer_type!r}")
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
