"""NNI 3.0's methods (the only module that imports nni).

``nni``: ``LevelPruner`` masks to the per-step targets (unstructured, masked).
``nni-structured``: ``L1NormPruner`` channel pruning followed by ``ModelSpeedup``, so the model
physically shrinks (structured, dense).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from typing import Any

import torch
from torch import nn

from comparison.methods.base import Method, count_zeros


def _nni(name: str) -> Any:
    """``nni.compression.pruning.<name>`` or ``nni.compression.speedup.<name>``, imported on first use.

    nni takes about a second to import, its import paths changed between releases, and nothing
    else in the harness should depend on it being installed.
    """
    try:
        with warnings.catch_warnings():
            # NNI 3.0 registers torch.fx's immutable collections through a pytree function torch
            # has deprecated, over torch's own registration: four warnings at import that a user
            # can do nothing about, printed across the progress bars
            warnings.filterwarnings("ignore", message=".*_register_pytree_node", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*already registered as pytree node", category=UserWarning)
            from nni.compression import pruning, speedup
    except ImportError as error:
        raise ImportError(
            f"the NNI methods need NNI 3.0 (`pip install 'nni>=3.0,<3.1'`); importing it failed: {error}"
        ) from error
    logging.getLogger("nni").setLevel(logging.ERROR)  # NNI logs per wrapped module; keep bars readable
    return getattr(pruning, name, None) or getattr(speedup, name)


class _NoReplacerNeeded(logging.Filter):
    """``ModelSpeedup`` logs an error (a paragraph) for every leaf layer it has no replacer for, at
    every channel-pruning step. The harness's ``MaxPool2x2`` and the ``nn.Identity`` left where a
    batch norm computes the ReLU keep their channels and need none; other layers still show."""

    KEEP_CHANNELS = ("MaxPool2x2", "Identity")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f"replacing module with type: {name}," in message for name in self.KEEP_CHANNELS)


def _quiet_logger() -> logging.Logger:
    logger = logging.getLogger("comparison.nni_speedup")
    logger.setLevel(logging.ERROR)
    if not any(isinstance(existing, _NoReplacerNeeded) for existing in logger.filters):
        logger.addFilter(_NoReplacerNeeded())
    return logger


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

    def __init__(self, scope: str = "classifier", seed: int = 0) -> None:
        super().__init__(scope, seed)
        self.pruner: Any = None

    def prepare(self, model: nn.Module, targets: list[str]) -> nn.Module:
        super().prepare(model, targets)
        config_list = [{"op_names": list(targets), "sparse_ratio": 0.0, "target_names": ["weight"]}]
        self.pruner = _nni("LevelPruner")(model, config_list)
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


class NNIStructured(Method):
    """Channel pruning with NNI's ``L1NormPruner``, then ``ModelSpeedup``: a smaller dense model.

    Each ``prune`` removes whole output channels (convolutions) or neurons (hidden Linear
    layers) with the smallest L1 norm, the same fraction in every target layer except the last
    (its outputs are the classes), and ``ModelSpeedup`` rebuilds the model without them, which
    also shrinks the inputs of the layers that follow. The fraction is chosen so that the
    removed share of the target layers' original weights reaches the step's target: with a
    fraction ``r`` of channels gone, a middle layer keeps ``(1 - r)^2`` of its weights.

    The pruned parameters are new objects after a speedup, so ``prune`` returns a new optimizer
    of the same kind and settings (its state starts afresh). ``ModelSpeedup`` traces the model
    with ``torch.fx.symbolic_trace``: NNI 3.0's own tracer fails on VGG11_bn with torch 2.x.
    """

    name = "nni-structured"
    runtime_modules = ()
    holds = ("a smaller dense weight (whole channels removed)",)

    def __init__(self, scope: str = "classifier", seed: int = 0) -> None:
        super().__init__(scope, seed)
        self.original_sizes: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, int]] = {}

    def prepare(self, model: nn.Module, targets: list[str]) -> nn.Module:
        super().prepare(model, targets)
        modules = dict(model.named_modules())
        self.original_sizes = {name: modules[name].weight.numel() for name in targets}
        self.shapes = {name: _channels(modules[name]) for name in targets}
        return model

    def channel_fraction(self, target_sparsity: float) -> float:
        """The fraction of channels to remove in every prunable layer so that ``target_sparsity``
        of the target layers' original weights are gone (bisection on the exact shapes)."""
        names = list(self.original_sizes)
        total = sum(self.original_sizes.values())

        def removed(fraction: float) -> float:
            kept = 0
            for index, name in enumerate(names):
                outputs, inputs = self.shapes[name]
                out_kept = outputs if index == len(names) - 1 else _keep(outputs, fraction)
                in_kept = inputs if index == 0 else _keep(self.shapes[names[index - 1]][0], fraction)
                kept += self.original_sizes[name] * (out_kept / outputs) * (in_kept / inputs)
            return 1.0 - kept / total

        low, high = 0.0, 1.0
        for _ in range(50):
            middle = (low + high) / 2
            low, high = (middle, high) if removed(middle) < target_sparsity else (low, middle)
        return high

    def prune(self, model: nn.Module, target_sparsity: float, optimizer: torch.optim.Optimizer):
        fraction = self.channel_fraction(target_sparsity)
        modules = dict(model.named_modules())
        config_list = []
        for name in self.targets[:-1]:
            outputs = _channels(modules[name])[0]
            wanted = _keep(self.shapes[name][0], fraction)
            if wanted < outputs:
                config_list.append({"op_names": [name], "sparse_ratio": 1.0 - wanted / outputs,
                                    "target_names": ["weight", "bias"]})
        if not config_list:
            return None
        was_training = model.training
        model.eval()
        pruner = _nni("L1NormPruner")(model, config_list)
        _, masks = pruner.compress()
        pruner.unwrap_model()
        device = next(model.parameters()).device
        dummy = torch.zeros(2, 3, 32, 32, device=device)
        layers = {name: (type(module), getattr(module, "fused_relu", False)) for name, module in model.named_modules()}
        with contextlib.redirect_stdout(io.StringIO()):  # ModelSpeedup prints its progress
            _nni("ModelSpeedup")(model, dummy, masks, graph_module=_traced(model),
                                 logger=_quiet_logger()).speedup_model()
        _restore_subclasses(model, layers)
        model.train(was_training)
        return type(optimizer)(model.parameters(), **optimizer.defaults)

    def layer_zeros(self, model: nn.Module, name: str) -> tuple[int, int]:
        # A removed weight is gone from the model: it counts as a zero of the original layer.
        return self.original_sizes[name] - model.get_submodule(name).weight.numel(), self.original_sizes[name]


class _TorchLayerLeaves(torch.fx.Tracer):
    """``torch.fx``'s tracer, with every pooling, batch norm and dropout layer a leaf: the harness's
    VGG pools and normalises with subclasses of ``nn.MaxPool2d``, ``nn.AdaptiveAvgPool2d`` and
    ``nn.BatchNorm2d`` that fx would otherwise trace into (autograd Functions and a branch on the
    input's size, which it cannot trace), and drops out with a subclass of ``nn.Dropout`` whose
    training-mode branch fx would bake into the graph; as leaves they are nodes that NNI
    propagates masks through like the torch layers they are."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm2d, nn.Dropout))
                or super().is_leaf_module(module, qualified_name))


def _restore_subclasses(model: nn.Module, layers: dict[str, tuple[type, bool]]) -> None:
    """Give every layer ``ModelSpeedup`` rebuilt as a torch class (a narrower ``nn.BatchNorm2d``)
    the subclass it had before, and the relu it computed (``fused_relu``): the harness's VGG
    normalises with the library's faster ``BatchNorm2d``, whose only state beyond torch's is that
    flag, and every method must run the same layers."""
    for name, module in model.named_modules():
        before, fused_relu = layers.get(name, (None, False))
        if before is not None and before is not type(module) and issubclass(before, type(module)):
            module.__class__ = before
            if fused_relu:
                module.fused_relu = True


def _traced(model: nn.Module) -> torch.fx.GraphModule:
    """``model`` traced by ``torch.fx`` for ``ModelSpeedup`` (NNI 3.0's own tracer fails on VGG11_bn)."""
    return torch.fx.GraphModule(model, _TorchLayerLeaves().trace(model))


def _channels(module: nn.Module) -> tuple[int, int]:
    """``(outputs, inputs)`` of a Conv2d or Linear layer."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels
    return module.out_features, module.in_features


def _keep(channels: int, fraction: float) -> int:
    """Channels kept when ``fraction`` of ``channels`` are removed (at least one)."""
    return max(1, channels - math.floor(fraction * channels + 1e-9))
