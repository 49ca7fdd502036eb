"""``actuallysparse``: target Linear layers become ``SparseLayer`` (CSR) and lose pruned weights for good."""

from __future__ import annotations

import torch
from torch import nn

from actuallysparse.converter import convert
from actuallysparse.layers import SparseLayer
from actuallysparse.optim import abandon_successor, orphan_remapping_disabled
from actuallysparse.pruning import prune_to_sparsity, weights_to_keep
from comparison.data import derive_seed
from comparison.methods.base import Method, count_zeros, magnitude_keep_mask, replace_module


class ActuallySparse(Method):
    """Physical pruning with the ``actuallysparse`` library.

    ``prepare`` converts every target ``nn.Linear`` to a :class:`SparseLayer` stored as
    :attr:`layout` (CSR by default: the layout the library's kernels compute with; a subclass
    with ``layout = "coo"`` compares the COO storage). The conversion keeps every weight.
    ``prune`` calls :func:`actuallysparse.pruning.prune_to_sparsity` on each of them with the
    optimizer, so pruned weights leave ``values``, the index arrays and the optimizer state
    at once, and training continues on the survivors with their optimizer state intact.

    The library has no sparse ``Conv2d``. Under ``scope="all"`` convolutions are pruned by
    magnitude in place: their zeros stay in the dense weight, a bool ``weight_mask`` buffer
    (1 byte per weight) remembers them, and an optimizer step hook puts them back to zero
    after every update. The records say how many pruned layers are stored dense this way.
    """

    name = "actuallysparse"
    runtime_modules = ("actuallysparse.layers",)
    layout = "csr"
    holds = ("sparse values", "int32 indices")

    def __init__(self, scope: str = "classifier", seed: int = 0) -> None:
        super().__init__(scope, seed)
        self._hooked_optimizers: dict[int, object] = {}

    def prepare(self, model: nn.Module, targets: list[str]) -> nn.Module:
        super().prepare(model, targets)
        for name in targets:
            module = model.get_submodule(name)
            if isinstance(module, nn.Linear):
                replace_module(model, name, convert(module, self.layout))
            elif not isinstance(module, nn.Conv2d):
                raise TypeError(f"layer {name} is a {type(module).__name__}; actuallysparse prunes Linear and Conv2d")
        return model

    def prune(self, model: nn.Module, target_sparsity: float, optimizer: torch.optim.Optimizer) -> None:
        for name in self.targets:
            module = model.get_submodule(name)
            if isinstance(module, SparseLayer):
                self._prune_sparse(name, module, target_sparsity, optimizer)
            else:
                self._prune_dense_in_place(name, module, target_sparsity)
        if self.dense_stored_layers(model) and id(optimizer) not in self._hooked_optimizers:
            # An update moves zeroed weights (Adam's momentum alone does); re-zero after each step.
            self._hooked_optimizers[id(optimizer)] = optimizer.register_step_post_hook(
                lambda *_: self._reapply_masks(model)
            )

    def _prune_sparse(self, name: str, layer: SparseLayer, target_sparsity: float, optimizer) -> None:
        """Remove the smallest-magnitude stored weights of ``layer`` down to ``target_sparsity``."""
        prune_to_sparsity(layer, target_sparsity, optimizer=optimizer)

    def _scores(self, name: str, weight: torch.Tensor, target_sparsity: float) -> torch.Tensor:
        """What ranks the weights of a dense-stored layer: the largest scores stay."""
        return weight.detach().abs()

    def _prune_dense_in_place(self, name: str, module: nn.Module, target_sparsity: float) -> None:
        current = module._buffers.get("weight_mask")
        keep = magnitude_keep_mask(self._scores(name, module.weight, target_sparsity), target_sparsity, current)
        if current is None:
            module.register_buffer("weight_mask", keep)
        else:
            module.weight_mask = keep
        with torch.no_grad():
            module.weight.mul_(keep)

    def _reapply_masks(self, model: nn.Module) -> None:
        with torch.no_grad():
            for name in self.dense_stored_layers(model):
                module = model.get_submodule(name)
                if "weight_mask" in module._buffers:
                    module.weight.mul_(module.weight_mask)

    def layer_zeros(self, model: nn.Module, name: str) -> tuple[int, int]:
        module = model.get_submodule(name)
        if isinstance(module, SparseLayer):
            total = module.in_features * module.out_features
            return total - int(torch.count_nonzero(module.values.detach())), total
        return count_zeros(module.weight.detach())

    def dense_stored_layers(self, model: nn.Module) -> list[str]:
        return [name for name in self.targets if not isinstance(model.get_submodule(name), SparseLayer)]

    def storage_note(self) -> str:
        note = super().storage_note() + f" ({self.layout.upper()}); pruned weights are gone"
        if self.scope == "all":
            return f"{note}; Conv2d kept dense with zeros and a bool mask: actuallysparse has no sparse Conv2d"
        return note


class RandomSparse(ActuallySparse):
    """Unstructured pruning of weights chosen at random, stored like ``actuallysparse``.

    The baseline that magnitude pruning must beat: the same storage, schedule and targets, but
    the weights to remove are drawn uniformly (seeded by the cell's seed, the layer and the
    step) from those still stored, so nothing regrows.
    """

    name = "random"

    def _generator(self, name: str, target_sparsity: float) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, f"random-prune/{name}", round(target_sparsity * 1e6)))

    def _prune_sparse(self, name: str, layer: SparseLayer, target_sparsity: float, optimizer) -> None:
        n_keep = weights_to_keep(layer.in_features * layer.out_features, target_sparsity)
        if n_keep >= layer.nnz:
            return
        order = torch.randperm(layer.nnz, generator=self._generator(name, target_sparsity))
        layer.keep_entries(order[:n_keep].to(layer.values.device), optimizer=optimizer)

    def _scores(self, name: str, weight: torch.Tensor, target_sparsity: float) -> torch.Tensor:
        generator = self._generator(name, target_sparsity)
        return torch.rand(weight.shape, generator=generator).to(weight.device)


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
        layers = [module for module in self.pruned_modules(model).values() if isinstance(module, SparseLayer)]
        before = [layer.values for layer in layers]
        with orphan_remapping_disabled():
            for layer in layers:
                prune_to_sparsity(layer, target_sparsity)
        for old in before:
            abandon_successor(old)
