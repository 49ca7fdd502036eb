"""``torch-prune``: ``torch.nn.utils.prune.l1_unstructured`` masks to the per-step targets."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from comparison.methods.base import Method, count_zeros


class TorchPrune(Method):
    """PyTorch's built-in magnitude pruning: the weight becomes ``weight_orig * weight_mask``.

    Each step asks ``l1_unstructured`` for the number of additional weights to remove, so the
    layer reaches exactly ``round(target * numel)`` zeros. Repeated calls compose through
    torch's ``PruningContainer``, which ranks only the still-unpruned weights, so nothing
    regrows. ``weight_orig`` is the layer's original Parameter object, so the optimizer keeps
    training it; the masked entries get zero gradient.

    Storage: the dense ``weight_orig``, a float ``weight_mask`` buffer of the same size, and the
    masked ``weight`` recomputed before every forward (a third dense copy).
    """

    name = "torch-prune"
    holds = ("dense weight_orig", "float mask", "materialised masked weight")

    def prepare(self, model: nn.Module, targets: list[str]) -> nn.Module:
        super().prepare(model, targets)
        # What a torch.prune user holds from the first call on: weight_orig, a mask and the
        # masked weight. Starting with an all-ones mask keeps step 0 comparable with NNI's wrap.
        for name in targets:
            torch_prune.identity(model.get_submodule(name), "weight")
        return model

    def prune(self, model: nn.Module, target_sparsity: float, optimizer: torch.optim.Optimizer) -> None:
        for name in self.targets:
            module = model.get_submodule(name)
            total = module.weight.numel()
            # An integer amount counts entries newly masked among the unmasked ones.
            masked_now = total - int(module.weight_mask.sum()) if hasattr(module, "weight_mask") else 0
            additional = round(target_sparsity * total) - masked_now
            if additional > 0:
                torch_prune.l1_unstructured(module, "weight", amount=int(additional))

    def layer_zeros(self, model: nn.Module, name: str) -> tuple[int, int]:
        module = model.get_submodule(name)
        if hasattr(module, "weight_orig"):
            return count_zeros((module.weight_orig * module.weight_mask).detach())
        return count_zeros(module.weight.detach())
