"""``dense``: no pruning, the same training epochs (the thesis's "extra trained" baseline)."""

from __future__ import annotations

import torch
from torch import nn

from comparison.methods.base import Method, count_zeros


class Dense(Method):
    """Keeps every weight; trains exactly as long as the pruning methods do.

    Example::

        >>> method = Dense()
        >>> model = method.prepare(nn.Sequential(nn.Linear(4, 2)), ["0"])
        >>> method.prune(model, 0.9, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> method.sparsity_counts(model)[0]
        0
    """

    name = "dense"
    prunes = False
    holds = ("dense weight (nothing is pruned)",)

    def prune(self, model: nn.Module, target_sparsity: float, optimizer: torch.optim.Optimizer) -> None:
        """Does nothing: the dense reference never prunes, whatever the target."""

    def layer_zeros(self, model: nn.Module, name: str) -> tuple[int, int]:
        return count_zeros(model.get_submodule(name).weight.detach())
