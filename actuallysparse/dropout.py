"""Dropout whose mask is one ``rand_like`` draw.

torch 2.14's CPU ``bernoulli_`` took 0.64 ms for one 64x1024 batch, forward and backward,
against 0.20 ms with the mask drawn by ``torch.rand_like``: in a pruned VGG11_bn, whose
convolutions are sparse, the classifier's two dropouts were 5 % of the training step.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Dropout(nn.Dropout):
    r"""``nn.Dropout`` with its mask drawn by ``torch.rand_like``: the same distribution (each
    element kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``), another random
    stream. ``inplace=True`` is accepted and computes out of place.

    Shape:
        - Input: :math:`(*)`. Output: the same shape.

    Example::

        >>> Dropout(0.5).eval()(torch.ones(3))
        tensor([1., 1., 1.])
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Module's name
        if not self.training or self.p == 0:
            return input
        if self.p == 1:
            return input * 0
        keep = torch.rand_like(input) >= self.p
        return input * keep.to(input.dtype).mul_(1 / (1 - self.p))
