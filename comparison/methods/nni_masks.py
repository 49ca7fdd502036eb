"""``nni``: NNI 3.0 ``LevelPruner`` masks to the per-step targets (the only module that imports nni)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from comparison.methods.base import Method, count_zeros


def _level_pruner_class() -> type:
    # Imported on first use: nni takes about a second to import, its import paths changed between
    # releases, and nothing else in the harness should depend on it being installed.
    try:
        from nni.compression.pruning import LevelPruner
    except ImportError as error:
        raise ImportError(
            f"the 'nni' method needs NNI 3.0 (`pip install 'nni>=3.0,<3.1'`); importing it failed: {error}"
        ) from error
    return LevelPruner


class NNIMasks(Method):
    """Magnitude masks from NNI's ``LevelPruner``, trained with the masks applied in forward.

    ``prepare`` wraps the target layers once (ratio 0: all-ones masks). Each ``prune`` sets the
    step's ``sparse_ratio`` on every target space and regenerates the masks, the way NNI's own
    scheduled pruners (``LinearPruner``, ``AGPPruner``) do between iterations. The wrap is
    never undone during training, so the Parameters the optimizer holds stay the ones NNI
    trains. The NNI traps this avoids (described in ``docs/NNI.md``):

    - wrapping replaces the targeted ``weight`` Parameters with new objects: the harness makes
      the optimizer after :meth:`prepare`, never before;
    - without ``target_names: ['weight']`` NNI would mask the biases too;
    - ``unwrap_model()`` does not apply the masks: :meth:`unwrap` multiplies them in.

    NNI ranks the raw weights each time masks are generated, so an entry masked at one step can
    in principle come back at a later one; the recorded sparsity is counted from
    ``weight * mask``.

    Storage: the trained ``_nni_wrapper.weight`` Parameter, a float32 ``weight_mask`` of the
    same size, and a ``weight`` buffer on the layer (a clone at wrap time, then the masked
    weight of the last forward).
    """

    name = "nni"
    runtime_modules = ("nni.compression.pruning",)
    holds = ("dense weight", "float32 mask", "weight buffer copy")

    def __init__(self, scope: str = "classifier") -> None:
        super().__init__(scope)
        self.pruner: Any = None

    def prepare(self, model: nn.Module, targets: list[str]) -> nn.Module:
        super().prepare(model, targets)
        # NNI logs a warning per wrapped module at INFO/WARNING level; keep progress bars readable.
        logging.getLogger("nni").setLevel(logging.ERROR)
        config_list = [{"op_names": list(targets), "sparse_ratio": 0.0, "target_names": ["weight"]}]
        self.pruner = _level_pruner_class()(model, config_list)
        return model

    def prune(self, model: nn.Module, target_sparsity: float, optimizer: torch.optim.Optimizer) -> None:
        if self.pruner is None:
            raise RuntimeError("NNIMasks.prune called before prepare")
        for spaces in self.pruner._target_spaces.values():
            for space in spaces.values():
                space.sparse_ratio = float(target_sparsity)
        self.pruner.update_masks(self.pruner.generate_masks())

    def layer_zeros(self, model: nn.Module, name: str) -> tuple[int, int]:
        module = model.get_submodule(name)
        wrapper = getattr(module, "_nni_wrapper", None)
        if wrapper is None:
            return count_zeros(module.weight.detach())
        return count_zeros((wrapper.weight * wrapper.weight_mask).detach())

    def masks(self) -> dict[str, torch.Tensor]:
        """The current weight mask of every target layer, by layer name."""
        return {name: masks["weight"] for name, masks in self.pruner.get_masks().items()}

    def unwrap(self, model: nn.Module) -> nn.Module:
        """Remove NNI's wrappers and leave plain layers whose weights have the masks applied."""
        masks = self.masks()
        self.pruner.unwrap_model()
        with torch.no_grad():
            for name, mask in masks.items():
                model.get_submodule(name).weight.mul_(mask.to(model.get_submodule(name).weight.dtype))
        self.pruner = None
        return model
