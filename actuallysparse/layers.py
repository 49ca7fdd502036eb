"""``SparseLayer``: a drop-in for ``nn.Linear`` that stores only its non-zero weights.

Public API kept from the original ActuallySparse package: :class:`SparseLayer`,
:func:`new_random_basic_coo`, :func:`new_random_basic_csr`, :func:`set_global_k`,
:func:`prune_sparse_model` and :class:`Pruner`. The storage, pruning and state handling it
shares with the sparse convolution live in :mod:`actuallysparse.storage`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from actuallysparse.functional import sparse_linear
from actuallysparse.storage import SparseModule, check_k, check_positive, sparse_modules


class SparseLayer(SparseModule):
    r"""A linear layer ``y = x W^T + b`` whose weight ``W`` holds only its non-zeros.

    Pruned weights are removed from storage, not masked: the ``values`` Parameter,
    its gradient and any optimizer state for it have exactly ``nnz`` entries. Forward
    and backward run on the sparse weight (CSR kernels, see
    :mod:`actuallysparse.functional`), in training as in evaluation.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if ``False``, the layer learns no additive bias. Default: ``True``.
        csr_mode: store the pattern as CSR (``row_indices`` + ``col_indices``) instead
            of COO (``indices``). Both formats train and compute with the same kernel.
            Default: ``False``.
        train_mode: start in training mode (``.train()``) or not (``.eval()``).
            Default: ``True``.
        k: fraction of *all* ``in_features * out_features`` weights that one call of
            :meth:`prune_smallest_values` removes, in ``(0, 1]``. Default: ``0.05``.

    Shape:
        - Input: ``(*, in_features)``; a 1-D input ``(in_features,)`` gives ``(1, out_features)``
          as in the original package.
        - Output: ``(*, out_features)``.

    Attributes:
        values: the learnable non-zero weights, shape ``(nnz,)``, in row-major order.
        bias: the learnable bias, shape ``(out_features,)``, or ``None``.
        indices: COO only, ``(2, nnz)`` row and column of each value (int16 where both fit).
        row_indices, col_indices: CSR only, row pointers ``(out_features + 1,)`` (int32) and
            column indices ``(nnz,)`` (int16 where ``in_features`` fits, else int32).
        weight: the weight as a torch sparse tensor (COO or CSR), ``(out_features, in_features)``.

    A new layer starts fully dense with ``nn.Linear``'s initialisation; convert a
    trained ``nn.Linear`` with :func:`actuallysparse.converter.convert` and prune it.

    Example::

        >>> layer = SparseLayer(4, 4)
        >>> layer
        SparseLayer(in_features=4, out_features=4, bias=True, csr_mode=False, k=0.05)
        >>> layer.set_k(0.5)
        >>> layer.prune_smallest_values()
        >>> layer.nnz
        8
        >>> layer(torch.ones(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(self, in_features, out_features, bias=True, csr_mode=False, train_mode=True, k=0.05,
                 *, device=None, dtype=None):
        super().__init__()
        self.in_features = check_positive("in_features", in_features)
        self.out_features = check_positive("out_features", out_features)
        check_k(k)
        factory = {"device": device, "dtype": dtype}
        bound = 1 / math.sqrt(self.in_features)
        dense = torch.empty(self.out_features, self.in_features, **factory).uniform_(-bound, bound)
        rows, cols = torch.nonzero(dense, as_tuple=True)
        bias_values = torch.empty(self.out_features, **factory).uniform_(-bound, bound) if bias else None
        self._init_storage(rows, cols, dense[rows, cols], bias_values, csr_mode, k, train_mode)

    @classmethod
    def from_entries(cls, in_features: int, out_features: int, rows: Tensor, cols: Tensor,
                     values: Tensor, bias: Tensor | None = None, csr_mode: bool = False,
                     k: float = 0.05) -> "SparseLayer":
        """Build a layer from the non-zeros of its weight, without a dense intermediate.

        Args:
            in_features, out_features: the weight's shape is ``(out_features, in_features)``.
            rows, cols: 1-D row and column of each non-zero, sorted row-major, no duplicates.
            values: the non-zeros, in the same order; they set the layer's dtype and device.
            bias: ``(out_features,)`` or ``None`` for a layer without bias.
            csr_mode, k: as in the constructor.
        """
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features = check_positive("in_features", in_features)
        layer.out_features = check_positive("out_features", out_features)
        layer._init_storage(rows, cols, values, bias, csr_mode, k)
        return layer

    @property
    def _matrix_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def _dense_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, csr_mode={self.csr_mode}, k={self.k}")

    # --------------------------------------------------------------- forward
    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"SparseLayer expects a torch.Tensor input, got {type(input).__name__}")
        if input.dim() == 0 or input.shape[-1] != self.in_features:
            features = "a 0-d tensor" if input.dim() == 0 else f"{input.shape[-1]} features"
            raise ValueError(f"input has {features}, layer expects {self.in_features} "
                             f"(input shape {tuple(input.shape)})")
        if input.is_sparse or input.layout != torch.strided:
            input = input.to_dense()
        values, bias = self._operands()
        if input.dtype != values.dtype:
            raise TypeError(f"input dtype {input.dtype} does not match the layer's {values.dtype}; "
                            f"convert one of them with .to()")
        # a batch of rows goes as it is: two reshapes were 1.5 us of a small layer's call
        flat = input.dim() == 2
        x = input if flat else input.reshape(-1, self.in_features)
        crow, col = self._pattern()
        # Handed over unbuilt: sparse_linear builds the cache only where it can use it.
        transposed = self._transposed_pattern if (torch.is_grad_enabled() and x.requires_grad) else None
        out = sparse_linear(x, values, bias, crow, col,
                            (self.out_features, self.in_features), transposed)
        if flat:
            return out
        return out.reshape(*((1,) if input.dim() == 1 else input.shape[:-1]), self.out_features)

    def _weight_matrix(self, weight: Tensor) -> Tensor:
        # Kept from the original: a non-square (in_features, out_features) weight is transposed.
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) == expected[::-1] and weight.dim() == 2 and expected[0] != expected[1]:
            return weight.t()
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, layer expects "
                             f"{expected} (out_features, in_features)")
        return weight


def new_random_basic_coo(in_features, out_features, bias=True) -> SparseLayer:
    """A new :class:`SparseLayer` storing its weight as COO."""
    return SparseLayer(in_features, out_features, bias=bias)


def new_random_basic_csr(in_features, out_features, bias=True) -> SparseLayer:
    """A new :class:`SparseLayer` storing its weight as CSR."""
    return SparseLayer(in_features, out_features, bias=bias, csr_mode=True)


def set_global_k(model: nn.Module, k) -> None:
    """Set ``k`` of every :class:`SparseLayer` in ``model``, at any depth."""
    k = check_k(k)
    for layer in sparse_modules(model):
        layer.set_k(k)


class Pruner:
    """Prunes every :class:`SparseLayer` of a model once, when a forward pass reaches it.

    Kept from the original package. Each layer removes its own ``k`` share.

    Args:
        model: the model whose sparse layers to prune.
        optimizer: optional optimizer to update on the spot.

    Example::

        >>> pruner = Pruner(model)
        >>> pruner(dummy_input)
        >>> pruner.remove_hooks()
    """

    def __init__(self, model: nn.Module, optimizer=None):
        self.model = model
        self.optimizer = optimizer
        self._pruned: set[int] = set()
        self._handles = [layer.register_forward_pre_hook(self._prune_hook) for layer in sparse_modules(model)]

    def _prune_hook(self, layer, args):
        if id(layer) not in self._pruned:
            self._pruned.add(id(layer))
            layer.prune_smallest_values(optimizer=self.optimizer)

    def __call__(self, dummy_input: Tensor):
        # In eval mode, so the pass leaves BatchNorm statistics and dropout RNG alone.
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad():
                return self.model(dummy_input)
        finally:
            for module, mode in modes.items():
                module.training = mode
                if isinstance(module, SparseModule):
                    module.train_mode = mode

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def prune_sparse_model(model: nn.Module, dummy_input: Tensor, optimizer=None) -> None:
    """Prune every :class:`SparseLayer` in ``model`` by its own ``k``.

    ``dummy_input`` is passed through the model once (without gradients) and each
    sparse layer is pruned as the pass reaches it, as in the original package; layers
    the pass does not reach are pruned afterwards.

    Args:
        model: any module containing sparse layers.
        dummy_input: an input the model accepts.
        optimizer: optional optimizer to update on the spot (see
            :meth:`SparseLayer.prune_smallest_values`).
    """
    pruner = Pruner(model, optimizer=optimizer)
    try:
        pruner(dummy_input)
    finally:
        pruner.remove_hooks()
    for layer in sparse_modules(model):
        if id(layer) not in pruner._pruned:
            layer.prune_smallest_values(optimizer=optimizer)
