"""The small interface every compared method implements, and helpers they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch
from torch import nn

SCOPE_LAYER_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "classifier": (nn.Linear,),
    "all": (nn.Linear, nn.Conv2d),
}
SCOPES = tuple(SCOPE_LAYER_TYPES)


def target_layer_names(model: nn.Module, scope: str) -> list[str]:
    """Names (as in ``model.named_modules()``) of the layers a method prunes under ``scope``.

    ``classifier``: every ``nn.Linear`` (VGG11_bn has them only in its classifier);
    ``all``: every ``nn.Linear`` and every ``nn.Conv2d`` but the first, the one that reads the
    image. That convolution stays dense for every method, as is usual in the pruning literature:
    it holds a tiny share of the weights (3 x 3 x 3 per filter, 0.02 % of VGG11_bn's), pruning its
    few inputs costs accuracy out of proportion, and at 0.9 a sparse kernel would keep about
    three weights per filter, too little work to beat a dense convolution. Call it on the plain
    model, before a method has converted or wrapped anything.
    """
    if scope not in SCOPE_LAYER_TYPES:
        raise ValueError(f"unknown scope {scope!r}; valid choices: {', '.join(SCOPE_LAYER_TYPES)}")
    layer_types = SCOPE_LAYER_TYPES[scope]
    names = [name for name, module in model.named_modules() if isinstance(module, layer_types)]
    convolutions = [name for name in names if isinstance(model.get_submodule(name), nn.Conv2d)]
    return [name for name in names if not convolutions or name != convolutions[0]]


def count_zeros(weight: torch.Tensor) -> tuple[int, int]:
    """``(zeros, total)`` entries of a dense tensor."""
    return int(weight.numel() - torch.count_nonzero(weight)), int(weight.numel())


class Method(ABC):
    r"""A way of pruning a model during training, as the harness drives it.

    The harness gives every method the same baseline model, the same per-step target
    sparsities, the same batches and the same optimizer settings. A method only decides how
    the pruned layers are represented and how a target sparsity is reached.

    Lifecycle of one cell::

        method = SomeMethod(scope)
        model = method.prepare(model, targets)       # convert / wrap; no pruning yet
        optimizer = make_optimizer(model.parameters(), config)  # always after prepare
        for target in schedule:
            optimizer = method.prune(model, target, optimizer) or optimizer  # reach `target`
            ... fine-tune with optimizer ...

    Class attributes:
        name: the name used on the command line and in the results table.
        runtime_modules: modules a fresh process must import before it can unpickle a model
            prepared by this method (imported before the process's memory baseline is taken).
        prunes: ``False`` for a reference that never prunes: it runs one cell per seed, at
            target 0, and summaries and plots show it as the reference line.
        variant_of: for a variant kept for one experiment (another storage layout, a reproduced
            bug), the method it varies; variants are not in the default grid.
        holds: what the method keeps for each pruned layer, in words (a dense weight, a mask,
            a weight copy, sparse values and indices); summaries and notes read it, so no code
            needs to know a method by name.
        from_scratch: ``True`` for a method that trains sparse from the seed's random
            initialisation (dynamic sparse training) instead of pruning the pretrained baseline;
            the harness then trains it through the pretraining epochs too.

    Attributes:
        target_sparsity: the cell's final target, set by the harness before :meth:`prepare`
            (a method that is sparse from the start needs it there).

    Args:
        scope: ``classifier`` or ``all`` (see :func:`target_layer_names`).
        seed: the cell's seed, for methods that draw random numbers.
    """

    name: ClassVar[str]
    runtime_modules: ClassVar[tuple[str, ...]] = ()
    prunes: ClassVar[bool] = True
    variant_of: ClassVar[str | None] = None
    holds: ClassVar[tuple[str, ...]] = ("dense weight",)
    from_scratch: ClassVar[bool] = False
    target_sparsity: float = 0.0

    def __init__(self, scope: str = "classifier", seed: int = 0) -> None:
        if scope not in SCOPE_LAYER_TYPES:
            raise ValueError(f"unknown scope {scope!r}; valid choices: {', '.join(SCOPE_LAYER_TYPES)}")
        self.scope = scope
        self.seed = seed
        self.targets: list[str] = []

    def prepare(self, model: nn.Module, targets: list[str]) -> nn.Module:
        """Make ``model`` ready for pruning its ``targets`` layers; returns the model to train.

        May modify ``model`` in place or return a new one. Called once per cell, before the
        optimizer exists.
        """
        self.targets = list(targets)
        return model

    @abstractmethod
    def prune(self, model: nn.Module, target_sparsity: float,
              optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
        """Prune every target layer until ``target_sparsity`` of its weights are zero (or gone).

        Called with non-decreasing targets; the optimizer must go on training the kept weights.
        A method that replaces the model's parameters returns a new optimizer of the same kind
        and settings for them; otherwise it returns ``None`` and ``optimizer`` stays in use.
        """

    def start_training(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, total_steps: int,
                       steps_per_epoch: int) -> Callable[[], object] | None:
        """Called once the optimizer exists, before any training; returns what to call after every
        optimizer step (dynamic sparse training's update), or ``None``.

        Args:
            total_steps: optimizer steps the cell will take in all.
            steps_per_epoch: optimizer steps of one epoch.
        """
        return None

    @abstractmethod
    def layer_zeros(self, model: nn.Module, name: str) -> tuple[int, int]:
        """``(zeros, total)`` of the weight the layer ``name`` effectively computes with."""

    def pruned_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """The modules that hold the target layers now (after conversion or wrapping)."""
        modules = dict(model.named_modules())
        return {name: modules[name] for name in self.targets}

    def sparsity_counts(self, model: nn.Module) -> tuple[int, int]:
        """``(zeros, total)`` over all target layers, counted from their weights."""
        zeros = total = 0
        for name in self.targets:
            layer_zeros, layer_total = self.layer_zeros(model, name)
            zeros += layer_zeros
            total += layer_total
        return zeros, total

    def dense_stored_layers(self, model: nn.Module) -> list[str]:
        """Target layers whose zeros are still stored (a dense weight, with or without a mask)."""
        return list(self.targets)

    def storage_note(self) -> str:
        """One sentence on how this method stores pruned layers (recorded beside the counts)."""
        return f"{self.name} holds per pruned layer: {', '.join(self.holds)}"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name`` (dotted path) in ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
