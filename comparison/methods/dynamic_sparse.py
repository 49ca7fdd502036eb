"""``set`` and ``rigl``: sparse from the first step (:mod:`actuallysparse.dynamic`), never a dense weight.

They do not prune the pretrained baseline: they start from the seed's random initialisation
(the one the baseline started from), sparse at the cell's target with the ERK allocation, and
train through the baseline's pretraining epochs and every fine-tuning epoch with the same
optimizer and batches, moving weights as they go. What they hold is what ``actuallysparse``
holds: values and int32 indices, no mask, no dense copy.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from actuallysparse import dynamic
from comparison.data import derive_seed
from comparison.methods.actually_sparse import ActuallySparse

# RigL's published setting, with the update interval in epochs (an epoch of the default run is
# 23 steps; RigL's 100 steps would allow only three updates in its 368).
DROP_FRACTION = 0.3
END_FRACTION = 0.75
UPDATE_EVERY_EPOCHS = 1
DISTRIBUTION = "erk"


class DynamicSparse(ActuallySparse):
    """What ``set`` and ``rigl`` share; ``updater`` is the :class:`~actuallysparse.dynamic.DynamicSparsity`
    class that moves the weights."""

    from_scratch = True
    updater: type[dynamic.DynamicSparsity]
    holds = ("sparse values", "int32 indices (the pattern moves while training)")

    def prepare(self, model: nn.Module, targets: list[str]) -> nn.Module:
        self.targets = list(targets)
        return dynamic.make_sparse(model, self.target_sparsity, DISTRIBUTION, layers=targets,
                                   seed=derive_seed(self.seed, f"{self.name}/pattern"))

    def start_training(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, total_steps: int,
                       steps_per_epoch: int) -> Callable[[], object]:
        self.moves = self.updater(model, optimizer, update_every=max(1, UPDATE_EVERY_EPOCHS * steps_per_epoch),
                                  drop_fraction=DROP_FRACTION, end_step=max(1, round(END_FRACTION * total_steps)),
                                  seed=derive_seed(self.seed, f"{self.name}/moves"))
        return self.moves.step

    def prune(self, model: nn.Module, target_sparsity: float, optimizer: torch.optim.Optimizer) -> None:
        """Nothing: the model is at its target from the first step; the schedule's targets only
        place the measurements."""

    def storage_note(self) -> str:
        return (f"{self.name} holds per layer: {', '.join(self.holds)}; sparse from initialisation "
                f"({DISTRIBUTION.upper()} allocation), never dense")


class SETMethod(DynamicSparse):
    """SET (Mocanu et al. 2018): drop the smallest weights, regrow at random, once an epoch."""

    name = "set"
    updater = dynamic.SET


class RigLMethod(DynamicSparse):
    """RigL (Evci et al. 2020): drop the smallest weights, regrow where the gradient is largest."""

    name = "rigl"
    updater = dynamic.RigL
