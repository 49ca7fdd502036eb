"""2x2, stride-2 max pooling on the backends of the sparse products.

A pruned VGG's sparse convolutions leave the rest of the model as the cost: torch 2.14's CPU
``max_pool2d`` on a contiguous (NCHW) tensor runs 10-20x slower than one pass over its input,
and took a fifth of a pruned quarter-width VGG11_bn's training step. :class:`MaxPool2x2` is
``nn.MaxPool2d(2, 2)`` with the same outputs and gradients (ties to the first maximum in
row-major order, NaN propagated), computed by the native kernel on the CPU and by torch
elsewhere (:func:`actuallysparse.functional.backend_for` chooses); ``torch.func`` transforms,
forward mode and tracing get ``F.max_pool2d`` itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actuallysparse import functional


def _window_gather(x: Tensor, where: Tensor) -> Tensor:
    """``x``'s entry at each window's winner: pooling with the winners fixed (linear in ``x``)."""
    batch, channels, out_h, out_w = where.shape
    windows = x[..., :2 * out_h, :2 * out_w].reshape(batch, channels, out_h, 2, out_w, 2)
    windows = windows.permute(0, 1, 2, 4, 3, 5).reshape(batch, channels, out_h, out_w, 4)
    return windows.gather(-1, where.long().unsqueeze(-1)).squeeze(-1)


class _Unpool(torch.autograd.Function):
    """The pooling's input gradient: each output gradient at its window's winner, zero elsewhere.
    Linear in the output gradient; its own derivative gathers at the winners again."""

    @staticmethod
    def forward(ctx, grad_out, where, height, width):  # noqa: D102
        ctx.save_for_backward(where)
        return functional.backend_for(grad_out).max_pool2x2_backward(grad_out.contiguous(), where, height, width)

    @staticmethod
    def backward(ctx, upstream):  # noqa: D102
        (where,) = ctx.saved_tensors
        return _window_gather(upstream, where), None, None, None


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: D102
        out, where = functional.backend_for(x).max_pool2x2(x.contiguous())
        ctx.save_for_backward(where)
        ctx.input_size = x.shape[-2:]
        ctx.mark_non_differentiable(where)
        return out, where

    @staticmethod
    def backward(ctx, grad_out, _):  # noqa: D102
        (where,) = ctx.saved_tensors
        return _Unpool.apply(grad_out, where, *ctx.input_size)


def max_pool2x2(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 2)`` for a ``(N, C, H, W)`` or ``(C, H, W)`` input, on the sparse layers' backend.

    Example::

        >>> max_pool2x2(torch.arange(16.0).view(1, 1, 4, 4))
        tensor([[[[ 5.,  7.],
                  [13., 15.]]]])
    """
    if x.dim() == 3:
        return max_pool2x2(x.unsqueeze(0)).squeeze(0)
    if x.dim() != 4:
        raise ValueError(f"max_pool2x2 takes a (N, C, H, W) or (C, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[-2] < 2 or x.shape[-1] < 2:
        raise ValueError(f"max_pool2x2 needs planes of at least 2x2, got {x.shape[-2]}x{x.shape[-1]}")
    if not functional.eager_reverse_mode_only(x):  # torch.func, forward mode, tracing: torch's own
        return F.max_pool2d(x, 2)
    if not (torch.is_grad_enabled() and x.requires_grad):  # no graph to record: the maxima alone
        return functional.backend_for(x).max_pool2x2(x.contiguous(), winners=False)[0]
    return _MaxPool2x2.apply(x)[0]


class MaxPool2x2(nn.MaxPool2d):
    r"""``nn.MaxPool2d(kernel_size=2, stride=2)``: the same outputs and gradients, computed by
    :func:`max_pool2x2` (the native kernel on the CPU, 4 to 10 times faster than torch 2.14's).

    A subclass, so code that inspects a model's modules (tracers, pruning tools) sees the pooling
    it knows.

    Shape:
        - Input: :math:`(N, C, H, W)` or :math:`(C, H, W)`.
        - Output: :math:`(N, C, \lfloor H/2 \rfloor, \lfloor W/2 \rfloor)` or without the batch.

    Example::

        >>> MaxPool2x2()(torch.zeros(8, 3, 32, 32)).shape
        torch.Size([8, 3, 16, 16])
    """

    def __init__(self) -> None:
        super().__init__(kernel_size=2, stride=2)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Module's name
        return max_pool2x2(input)


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    r"""``nn.AdaptiveAvgPool2d``, which hands back its input itself, as ``nn.Identity`` does, when
    the input already has the output's size: a mean over windows of one element each.

    A VGG with a CIFAR head averages its last 1x1 feature map into 1x1, and torch's pooling runs
    a mean there all the same, four operators in all: 9 us of the 0.3 ms a pruned quarter-width
    VGG11_bn takes for one image (AVX-512 EPYC), against 0.5 us for the size check. Any other
    input is pooled by torch.

    Example::

        >>> x = torch.randn(2, 8, 1, 1)
        >>> AdaptiveAvgPool2d((1, 1))(x) is x, AdaptiveAvgPool2d(1)(torch.ones(2, 8, 4, 4)).shape
        (True, torch.Size([2, 8, 1, 1]))
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Module's name
        size = self.output_size
        height, width = (size, size) if isinstance(size, int) else size
        if input.dim() in (3, 4) and height in (None, input.shape[-2]) and width in (None, input.shape[-1]):
            return input
        return super().forward(input)
