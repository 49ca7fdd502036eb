"""``actuallysparse``: target layers become sparse (``SparseLayer``, ``SparseConv2d``) and lose pruned weights for good."""

from __future__ import annotations

import torch
from torch import nn

from actuallysparse.converter import convert
from actuallysparse.storage import SparseModule
from actuallysparse.optim import abandon_successor, orphan_remapping_disabled
from actuallysparse.pruning import prune_to_sparsity, weights_to_keep
from comparison.data import derive_seed
from comparison.methods.base import Method, count_zeros, replace_module


class ActuallySparse(Method):
    """Physical pruning with the ``actuallysparse`` library.

    ``prepare`` converts every target ``nn.Linear`` to a :class:`~actuallysparse.layers.SparseLayer`
    and every target ``nn.Conv2d`` to a :class:`~actuallysparse.conv.SparseConv2d`, stored as
    :attr:`layout` (CSR by default: the layout the library's kernels compute with; a subclass with
    ``layout = "coo"`` compares the COO storage). The conversion keeps every weight. ``prune``
    calls :func:`actuallysparse.pruning.prune_to_sparsity` on each of them with the optimizer,
    so pruned weights leave ``values``, the index arrays and the optimizer state at once, and
    training continues on the survivors with their optimizer state intact.
    """

    name = "actuallysparse"
    runtime_modules = ("actuallysparse.layers", "actuallysparse.conv")
    layout = "csr"
    holds = ("sparse values", "int32 indices")

    def prepare(self, model: nn.Module, targets: list[str]) -> nn.Module:
        super().prepare(model, targets)
        for name in targets:
            module = model.get_submodule(name)
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise TypeError(f"layer {name} is a {type(module).__name__}; actuallysparse prunes Linear and Conv2d")
            replace_module(model, name, convert(module, self.layout))
        return model

    def prune(self, model: nn.Module, target_sparsity: float, optimizer: torch.optim.Optimizer) -> None:
        for name in self.targets:
            self._prune_sparse(name, model.get_submodule(name), target_sparsity, optimizer)

    def _prune_sparse(self, name: str, layer: SparseModule, target_sparsity: float, optimizer) -> None:
        """Remove the smallest-magnitude stored weights of ``layer`` down to ``target_sparsity``."""
        prune_to_sparsity(layer, target_sparsity, optimizer=optimizer)

    def layer_zeros(self, model: nn.Module, name: str) -> tuple[int, int]:
        module = model.get_submodule(name)
        if isinstance(module, SparseModule):
            return module.n_weights - int(torch.count_nonzero(module.values.detach())), module.n_weights
        return count_zeros(module.weight.detach())

    def dense_stored_layers(self, model: nn.Module) -> list[str]:
        return [name for name in self.targets if not isinstance(model.get_submodule(name), SparseModule)]

    def storage_note(self) -> str:
        return super().storage_note() + f" ({self.layout.upper()}); pruned weights are gone"


class RandomSparse(ActuallySparse):
    """Unstructured pruning of weights chosen at random, stored like ``actuallysparse``.

    The baseline that magnitude pruning must beat: the same storage, schedule and targets, but
    the weights to remove are drawn uniformly (seeded by the cell's seed, the layer and the
    step) from those still stored, so nothing regrows.
    """

    name = "random"

    def _generator(self, name: str, target_sparsity: float) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, f"random-prune/{name}", round(target_sparsity * 1e6)))

    def _prune_sparse(self, name: str, layer: SparseModule, target_sparsity: float, optimizer) -> None:
        n_keep = weights_to_keep(layer.n_weights, target_sparsity)
        if n_keep >= layer.nnz:
            return
        order = torch.randperm(layer.nnz, generator=self._generator(name, target_sparsity))
        layer.keep_entries(order[:n_keep].to(layer.values.device), optimizer=optimizer)


class ActuallySparseCOO(ActuallySparse):
    """The same physical pruning with the pattern stored as COO (row and column per value)."""

    name = "actuallysparse-coo"
    variant_of = "actuallysparse"
    layout = "coo"


class ActuallySparseOrphaned(ActuallySparse):
    """The thesis's original training loop, bug included: pruning does not tell the optimizer.

    Each pruning gives the layers new ``values`` Parameters while the optimizer made before
    goes on stepping the old, detached ones, so the pruned layers stop learning. The library
    would remap the optimizer before its next step; this variant abandons the old parameters'
    successor records so that the remap cannot find them. Only to show the bug: never train
    like this.
    """

    name = "actuallysparse-orphaned"
    variant_of = "actuallysparse"
    holds = ActuallySparse.holds + ("(the optimizer steps orphaned copies: the thesis's bug)",)

    def prune(self, model: nn.Module, target_sparsity: float, optimizer: torch.optim.Optimizer) -> None:
        layers = [module for module in self.pruned_modules(model).values() if isinstance(module, SparseModule)]
        before = [layer.values for layer in layers]
        with orphan_remapping_disabled():
            for layer in layers:
                prune_to_sparsity(layer, target_sparsity)
        for old in before:
            abandon_successor(old)
