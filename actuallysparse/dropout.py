"""Dropout whose mask is drawn on every thread (the native kernel) or by one ``rand_like``.

torch 2.14's CPU ``bernoulli_`` took 0.64 ms for one 64x1024 batch, forward and backward,
against 0.20 ms with the mask drawn by ``torch.rand_like``: in a pruned VGG11_bn, whose
convolutions are sparse, the classifier's two dropouts were 5 % of the training step. ``rand_like``
itself draws one element at a time on one thread (0.75 ms for 64x4096 on an AVX-512 EPYC); the
native kernel draws the mask from a counter-based generator on every thread, 0.14 ms for the same
batch, and keeps it as one byte an element for the backward (the float mask took four).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from actuallysparse import functional, kernels

_SEED_BOUND = 2**62


class _NativeDropout(torch.autograd.Function):
    """Dropout on the native kernel: the mask from a seed drawn from torch's generator."""

    @staticmethod
    def forward(ctx, x, p):  # noqa: D102
        # one draw from torch's generator per call: torch.manual_seed repeats a run
        seed = int(torch.randint(_SEED_BOUND, (), dtype=torch.int64))
        out, keep = kernels.dropout(x, p, seed)
        ctx.save_for_backward(keep)
        ctx.scale = 1 / (1 - p)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        (keep,) = ctx.saved_tensors
        return _ScaleKept.apply(grad_out, keep, ctx.scale), None


class _ScaleKept(torch.autograd.Function):
    """``grad * keep * scale``, linear in ``grad``: its own backward is the same product."""

    @staticmethod
    def forward(ctx, grad, keep, scale):  # noqa: D102
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return kernels.dropout_backward(grad, keep, scale)

    @staticmethod
    def backward(ctx, upstream):  # noqa: D102
        (keep,) = ctx.saved_tensors
        return _ScaleKept.apply(upstream, keep, ctx.scale), None, None


def dropout(input: Tensor, p: float = 0.5, training: bool = True) -> Tensor:  # noqa: A002 - F.dropout's name
    """``F.dropout(input, p, training)``: each element kept with probability ``1 - p`` and scaled
    by ``1 / (1 - p)``, from another random stream than torch's (drawn from torch's generator, so
    ``torch.manual_seed`` repeats it).

    Example::

        >>> dropout(torch.ones(3), 0.5, training=False)
        tensor([1., 1., 1.])
    """
    if not 0 <= p <= 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0:
        return input
    if p == 1:
        return input * 0
    if functional.runs_natively(input):
        return _NativeDropout.apply(input, p)
    keep = torch.rand_like(input) >= p
    return input * keep.to(input.dtype).mul_(1 / (1 - p))


class Dropout(nn.Dropout):
    r"""``nn.Dropout`` with its mask drawn by the native kernel on the CPU (:func:`dropout`), else
    by ``torch.rand_like``: the same distribution (each element kept with probability ``1 - p``
    and scaled by ``1 / (1 - p)``), another random stream. ``inplace=True`` is accepted and
    computes out of place.

    Shape:
        - Input: :math:`(*)`. Output: the same shape.

    Example::

        >>> Dropout(0.5).eval()(torch.ones(3))
        tensor([1., 1., 1.])
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Module's name
        return dropout(input, self.p, self.training)
