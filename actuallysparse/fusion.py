"""The rest of a pruned model: eval-mode BatchNorm folded into the layer before it, for
inference; max-pooling handed to the sparse convolution before it; and the library's pooling,
batch norm (with the ReLU after it) and dropout put in place of torch's.

In evaluation a BatchNorm is an affine map per channel, ``y = (x - mean) / sqrt(var + eps) *
gamma + beta``. After a sparse layer it folds into that layer: each output row's stored values
are scaled by ``gamma / sqrt(var + eps)`` and the bias becomes ``(bias - mean) * scale + beta``.
The pattern does not change, so the folded model stores exactly as many weights and runs one
pass fewer over its activations (BatchNorm was about an eighth of a pruned VGG11_bn's inference).
A dense ``nn.Conv2d`` or ``nn.Linear`` (a pruned model's first convolution is often kept dense)
folds the same way, its weight scaled per output channel.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from actuallysparse.conv import SparseConv2d
from actuallysparse.dropout import Dropout
from actuallysparse.layers import SparseLayer
from actuallysparse.normalization import BatchNorm2d
from actuallysparse.pooling import AdaptiveAvgPool2d, MaxPool2x2
from actuallysparse.storage import SparseModule

# which BatchNorms (torch's class or the library's) may follow which layer
_NORMS_2D, _NORMS_1D = (nn.BatchNorm2d, BatchNorm2d), (nn.BatchNorm1d,)
_PAIRS = ((SparseConv2d, _NORMS_2D), (SparseLayer, _NORMS_1D), (nn.Conv2d, _NORMS_2D), (nn.Linear, _NORMS_1D))


def fuse_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a sparse layer (or a dense ``nn.Conv2d`` or
    ``nn.Linear`` whose weight is a plain Parameter: not one masked by ``torch.nn.utils.prune`` or
    parametrized) inside an ``nn.Sequential`` into that layer, and put ``nn.Identity`` in its
    place. In place; exact up to float rounding.

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
        >>> fuse_batchnorm(model)       # 8 for a VGG11_bn: seven sparse convolutions and the dense first
        8
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
        # A norm that computed its relu (use_native_layers) or pooled its output (fuse_pooling)
        # hands both to a sparse convolution, which writes them with its output; before a dense
        # layer the library's pooling and an in-place relu take its place. The relu follows the
        # pooling, which it commutes with (the maximum is monotone, NaN stays NaN): on a quarter
        # of the elements, in place on the pooling's own output (a copy costs a pass).
        relu, pool = getattr(norm, "fused_relu", False), getattr(norm, "fused_pool", False)
        if isinstance(layer, SparseConv2d):
            layer.fused_relu = layer.fused_relu or relu
            layer.fused_pool = layer.fused_pool or pool
            parent._modules[name] = nn.Identity()
        else:
            kept = ([MaxPool2x2()] if pool else []) + ([nn.ReLU(inplace=True)] if relu else []) or [nn.Identity()]
            parent._modules[name] = kept[0] if len(kept) == 1 else nn.Sequential(*kept)
    return len(pairs)


def fuse_pooling(model: nn.Module) -> int:
    """Hand every 2x2, stride-2 max-pool that follows a sparse convolution or the library's
    :class:`~actuallysparse.normalization.BatchNorm2d` inside an ``nn.Sequential`` (right after
    it, or after ``nn.Identity`` and ``nn.ReLU`` modules, which commute with the maximum) to that
    layer (``fused_pool``), and put ``nn.Identity`` in the pool's place. In place; exact, in
    training as in evaluation. :func:`fuse_batchnorm` hands a norm's pooling on to the
    convolution it folds into.

    Without a graph the convolution then pools as it writes, so its full-size output is never
    stored and read again: the pruned VGG11_bn's inference at batch 64 went from 35.7 to 33.8 ms
    (AVX-512 EPYC, 2 threads, both models folded, calls interleaved, medians of 40). A norm
    pools as it normalises, in training too: its full output is never stored, and its backward
    builds no full-size gradient for the pooling.

    Args:
        model: any model; pools of other shapes (``nn.MaxPool2d`` other than kernel and stride 2,
            no padding, dilation 1, floor mode, no indices) stay as they are.

    Returns:
        How many poolings were handed over.

    Example::

        >>> model = nn.Sequential(SparseConv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        >>> fuse_pooling(model)
        1
        >>> model[0].fused_pool, type(model[2]).__name__
        (True, 'Identity')
    """
    fused = 0
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for at, name in enumerate(names):
            layer = parent._modules[name]
            if not isinstance(layer, (SparseConv2d, BatchNorm2d)) or layer.fused_pool:
                continue
            for later in names[at + 1:]:
                module = parent._modules[later]
                if isinstance(module, nn.MaxPool2d) and _is_2x2_pooling(module):
                    layer.fused_pool = True
                    parent._modules[later] = nn.Identity()
                    fused += 1
                if type(module) not in (nn.Identity, nn.ReLU):
                    break
    return fused


def drop_identities(model: nn.Module) -> int:
    """Take every ``nn.Identity`` out of the ``nn.Sequential`` containers of ``model``: the places
    :func:`fuse_batchnorm`, :func:`fuse_pooling` and :func:`use_native_layers` hold, as torch's
    own fusions do, so that a module keeps its position. Each costs a module call (about 1 us)
    and does nothing; a folded VGG11_bn has 20, 5 % of its time for one image at width 0.25.

    The other modules keep their names, so ``state_dict`` keys do not change; positions do
    (``model.features[4]`` may name another module afterwards). In place.

    Returns:
        How many were taken out.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Identity(), nn.ReLU())
        >>> drop_identities(model), list(model._modules)
        (1, ['0', '2'])
    """
    dropped = 0
    for parent in list(model.modules()):
        if isinstance(parent, nn.Sequential):
            for name in [name for name, module in parent._modules.items() if type(module) is nn.Identity]:
                del parent._modules[name]
                dropped += 1
    return dropped


def _neighbours(model: nn.Module):
    """``(sequential, name of the second, first, second)`` for every two consecutive modules of
    every ``nn.Sequential`` in ``model`` (taken as a list first, so the caller may replace the second)."""
    found = []
    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            found += [(parent, second, parent._modules[first], parent._modules[second])
                      for first, second in zip(names, names[1:])]
    return found


def _foldable_pairs(model: nn.Module) -> list[tuple[nn.Sequential, str, nn.Module, nn.Module]]:
    """``(sequential, name of the norm in it, layer, norm)`` for each sparse layer, or plain dense
    one, directly followed by its kind of BatchNorm."""
    return [(parent, name, layer, norm) for parent, name, layer, norm in _neighbours(model)
            if any(isinstance(layer, layer_type) and type(norm) in norm_types for layer_type, norm_types in _PAIRS)
            and (isinstance(layer, SparseModule) or _plain_weight(layer))]


def _plain_weight(layer: nn.Module) -> bool:
    """Whether a dense layer's weight is its own Parameter, so scaling it scales what it computes."""
    return isinstance(layer._parameters.get("weight"), nn.Parameter) and not parametrize.is_parametrized(layer)


@torch.no_grad()
def _fold(layer: nn.Module, norm: nn.Module) -> None:
    weights = layer.values if isinstance(layer, SparseModule) else layer.weight
    scale = torch.rsqrt(norm.running_var.to(weights.dtype) + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.to(weights.dtype)
    shift = -norm.running_mean.to(weights.dtype) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.to(weights.dtype)
    if isinstance(layer, SparseModule):
        rows, _ = layer._rows_cols()
        weights.mul_(scale[rows.to(weights.device)])
    else:   # output channels lead the dense weight
        weights.mul_(scale.view(-1, *[1] * (weights.dim() - 1)))
    if layer.bias is None:
        layer.bias = nn.Parameter(shift.clone())
    else:
        layer.bias.copy_(layer.bias * scale + shift)


def use_native_layers(model: nn.Module, *, fuse_relu: bool = True) -> int:
    """Give every ``nn.MaxPool2d(2, 2)``, ``nn.BatchNorm2d``, ``nn.Dropout`` and
    ``nn.AdaptiveAvgPool2d`` of ``model`` the library's class:
    :class:`~actuallysparse.pooling.MaxPool2x2` and
    :class:`~actuallysparse.normalization.BatchNorm2d` (the same numbers and state on native
    kernels), :class:`~actuallysparse.dropout.Dropout` (the same distribution, another random
    stream) and :class:`~actuallysparse.pooling.AdaptiveAvgPool2d` (its input itself where that
    already has the output's size). With ``fuse_relu``, a ``nn.ReLU`` right after such a batch norm in an
    ``nn.Sequential`` becomes ``nn.Identity`` and the norm computes it (``fused_relu``): the same
    numbers, one pass over the activations fewer each way. In place (the modules keep their
    parameters and buffers; the state_dict is unchanged); returns how many layers changed class,
    fused ReLUs included.

    Once the convolutions are sparse, torch's CPU pooling, training-mode batch norm, ReLU and
    dropout are a large share of what is left of a VGG's step; a dense model gains from this too.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        >>> use_native_layers(model)
        3
        >>> model[1].fused_relu, type(model[2]).__name__
        (True, 'Identity')
    """
    changed = 0
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = BatchNorm2d
            changed += 1
        elif type(module) is nn.MaxPool2d and _is_2x2_pooling(module):
            module.__class__ = MaxPool2x2
            changed += 1
        elif type(module) is nn.Dropout:
            module.__class__ = Dropout
            changed += 1
        elif type(module) is nn.AdaptiveAvgPool2d:
            module.__class__ = AdaptiveAvgPool2d
            changed += 1
    if fuse_relu:
        for parent, name, norm, relu in _neighbours(model):
            if type(norm) is BatchNorm2d and not norm.fused_relu and type(relu) is nn.ReLU:
                norm.fused_relu = True
                parent._modules[name] = nn.Identity()
                changed += 1
    return changed


def _is_2x2_pooling(pool: nn.MaxPool2d) -> bool:
    def pair(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

    return (pair(pool.kernel_size) == (2, 2) and pair(pool.stride or pool.kernel_size) == (2, 2)
            and pair(pool.padding) == (0, 0) and pair(pool.dilation) == (1, 1) and not pool.ceil_mode
            and not pool.return_indices)
