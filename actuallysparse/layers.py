"""``SparseLayer``: a drop-in for ``nn.Linear`` that stores only its non-zero weights.

Public API kept from the original ActuallySparse package: :class:`SparseLayer`,
:func:`new_random_basic_coo`, :func:`new_random_basic_csr`, :func:`set_global_k`,
:func:`prune_sparse_model` and :class:`Pruner`.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from actuallysparse import optim as _optim
from actuallysparse.functional import (
    TransposedPattern,
    crow_from_rows,
    rows_from_crow,
    sparse_linear,
    transpose_pattern,
)

_INT32_MAX = 2**31 - 1


def _check_k(k) -> float:
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0 < k <= 1:
        raise ValueError(f"k must be a number in (0, 1], the fraction of all weights to prune; got {k!r}")
    return float(k)


def _check_features(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def index_dtype_for(out_features: int, in_features: int) -> torch.dtype:
    """int32 when every index and row pointer fits (MKL's CSR kernels are fastest with it)."""
    return torch.int32 if out_features * in_features <= _INT32_MAX else torch.int64


class SparseLayer(nn.Module):
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
        indices: COO only, ``(2, nnz)`` row and column of each value (int32 where it fits).
        row_indices, col_indices: CSR only, row pointers ``(out_features + 1,)`` and
            column indices ``(nnz,)``.
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
        self.in_features = _check_features("in_features", in_features)
        self.out_features = _check_features("out_features", out_features)
        self.csr_mode = bool(csr_mode)
        self.k = _check_k(k)
        factory = {"device": device, "dtype": dtype}
        bound = 1 / math.sqrt(self.in_features)
        dense = torch.empty(self.out_features, self.in_features, **factory).uniform_(-bound, bound)
        rows, cols = torch.nonzero(dense, as_tuple=True)
        self._register_storage(rows, cols, dense[rows, cols])
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.train(bool(train_mode))

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
        layer.in_features = _check_features("in_features", in_features)
        layer.out_features = _check_features("out_features", out_features)
        layer.csr_mode = bool(csr_mode)
        layer.k = _check_k(k)
        layer._register_storage(rows, cols, values)
        if bias is None:
            layer.register_parameter("bias", None)
        else:
            layer.bias = nn.Parameter(bias.detach().clone().to(device=values.device, dtype=values.dtype))
        layer.train(True)
        return layer

    # ----------------------------------------------------------------- storage
    def _register_storage(self, rows: Tensor, cols: Tensor, values: Tensor, *, reuse_values: bool = True) -> None:
        """Store a pattern and its values in this layer's format (sorted row-major if needed).

        With ``reuse_values`` the current ``values`` Parameter is written in place when the
        number of entries is unchanged; otherwise a new Parameter replaces it, and any
        optimizer holding the old one is remapped with its state reset.
        """
        # The orphan remap must know every optimizer of a sparse layer from its first step.
        _optim.install_step_hook()
        rows, cols, values = self._checked_entries(rows, cols, values)
        index_dtype = index_dtype_for(self.out_features, self.in_features)
        device = values.device
        rows = rows.to(device=device, dtype=index_dtype)
        cols = cols.to(device=device, dtype=index_dtype)
        for name in ("indices", "row_indices", "col_indices", "_crow"):
            self._buffers.pop(name, None)
        if self.csr_mode:
            self.register_buffer("row_indices", crow_from_rows(rows, self.out_features, index_dtype))
            self.register_buffer("col_indices", cols.contiguous())
            # COO-only compute buffer is absent in CSR mode
            self.register_buffer("_crow", None, persistent=False)
        else:
            self.register_buffer("indices", torch.stack([rows, cols]))
            self.register_buffer("_crow", crow_from_rows(rows, self.out_features, index_dtype),
                                 persistent=False)
        self._transposed: TransposedPattern | None = None
        old = self._parameters.get("values")
        if reuse_values and old is not None and old.shape == values.shape:
            with torch.no_grad():
                old.copy_(values)
            return
        self.values = nn.Parameter(values.detach().clone())
        if old is not None:
            self.values.requires_grad_(old.requires_grad)
            # No entry-by-entry correspondence: an optimizer's state for it starts afresh.
            _optim.record_successor(old, self.values, None)

    def _checked_entries(self, rows: Tensor, cols: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Validate ``(rows, cols, values)`` against the layer's shape; sort them row-major."""
        if not (rows.dim() == cols.dim() == values.dim() == 1 and rows.numel() == cols.numel() == values.numel()):
            raise ValueError(f"rows, cols and values must be 1-D of one length, got shapes {tuple(rows.shape)}, "
                             f"{tuple(cols.shape)} and {tuple(values.shape)}")
        if rows.numel() == 0:
            return rows, cols, values
        rows, cols = rows.long(), cols.long()
        for name, index, bound in (("row", rows, self.out_features), ("column", cols, self.in_features)):
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= bound:
                raise ValueError(f"{name} indices span [{low}, {high}], layer expects [0, {bound - 1}] "
                                 f"(shape {(self.out_features, self.in_features)})")
        key = rows * self.in_features + cols
        if not bool((key[1:] > key[:-1]).all()):
            key, order = torch.sort(key)
            if bool((key[1:] == key[:-1]).any()):
                raise ValueError("the pattern holds the same (row, column) more than once")
            rows, cols, values = rows[order], cols[order], values[order]
        return rows, cols, values

    def _pattern(self) -> tuple[Tensor, Tensor]:
        """CSR view ``(crow, col)`` of the stored pattern, whatever the format."""
        if self.csr_mode:
            return self.row_indices, self.col_indices
        return self._crow, self.indices[1]

    def _rows_cols(self) -> tuple[Tensor, Tensor]:
        if self.csr_mode:
            return rows_from_crow(self.row_indices), self.col_indices.long()
        return self.indices[0].long(), self.indices[1].long()

    def _transposed_pattern(self) -> TransposedPattern:
        """The cached pattern of ``W.T``, built when missing.

        Every change of pattern (``_register_storage``), of device (``_apply``) and ``eval()``
        drops the cache, so a present cache is always current.
        """
        if self._transposed is None:
            crow, col = self._pattern()
            self._transposed = transpose_pattern(crow, col, self.in_features)
        return self._transposed

    def _apply(self, fn, recurse=True):
        # The transposed cache is a plain attribute; rebuild it on the new device/dtype lazily.
        self._transposed = None
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------ properties
    @property
    def nnz(self) -> int:
        """Number of stored (non-pruned) weights."""
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        """Fraction of the ``out_features * in_features`` weights that are pruned."""
        return 1.0 - self.nnz / (self.in_features * self.out_features)

    @property
    def weight(self) -> Tensor:
        """The weight as a sparse tensor, ``(out_features, in_features)``, COO or CSR.

        It shares ``values``, so gradients flow to them through it.
        """
        size = (self.out_features, self.in_features)
        if self.csr_mode:
            return torch.sparse_csr_tensor(self.row_indices, self.col_indices, self.values, size)
        return torch.sparse_coo_tensor(self.indices.long(), self.values, size, is_coalesced=True,
                                       check_invariants=False)

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
        if input.dtype != self.values.dtype:
            raise TypeError(f"input dtype {input.dtype} does not match the layer's {self.values.dtype}; "
                            f"convert one of them with .to()")
        leading = (1,) if input.dim() == 1 else input.shape[:-1]
        x = input.reshape(-1, self.in_features)
        crow, col = self._pattern()
        # Handed over unbuilt: sparse_linear builds the cache only where it can use it.
        transposed = self._transposed_pattern if (torch.is_grad_enabled() and x.requires_grad) else None
        out = sparse_linear(x, self.values, self.bias, crow, col,
                            (self.out_features, self.in_features), transposed)
        return out.reshape(*leading, self.out_features)

    def train(self, mode: bool = True):
        """Set training mode; ``train_mode`` mirrors it (kept from the original API).

        Evaluation mode drops the transposed-pattern cache that only backward needs; the
        next backward rebuilds it.
        """
        super().train(mode)
        self.train_mode = mode
        if not mode:
            self._transposed = None
        return self

    # ------------------------------------------------------- original API
    def set_k(self, k) -> None:
        """Set the fraction of all weights that :meth:`prune_smallest_values` removes."""
        self.k = _check_k(k)

    def is_CSR(self) -> bool:
        """True if the pattern is stored as CSR."""
        return self.csr_mode

    def switch_to_CSR(self) -> None:
        """Store the pattern as CSR. ``values`` stays the same Parameter (same order)."""
        self._switch_format(csr_mode=True)

    def switch_to_COO(self) -> None:
        """Store the pattern as COO. ``values`` stays the same Parameter (same order)."""
        self._switch_format(csr_mode=False)

    def _switch_format(self, csr_mode: bool) -> None:
        if self.csr_mode == csr_mode:
            return
        rows, cols = self._rows_cols()
        self.csr_mode = csr_mode
        self._register_storage(rows, cols, self.values.detach())

    def assign_new_weight(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Replace the weight (and optionally the bias); zeros in ``weight`` are not stored.

        Args:
            weight: dense or sparse, ``(out_features, in_features)``. A non-square
                ``(in_features, out_features)`` weight is transposed, as in the original.
            bias: ``(out_features,)`` or ``None`` to keep the current bias.
        """
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            if tuple(weight.shape) == expected[::-1] and weight.dim() == 2:
                weight = weight.t()
            else:
                raise ValueError(f"weight has shape {tuple(weight.shape)}, layer expects "
                                 f"{expected} (out_features, in_features)")
        if bias is not None:
            if not isinstance(bias, Tensor):
                raise TypeError(f"bias must be a torch.Tensor of shape ({self.out_features},), "
                                f"got {type(bias).__name__}")
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, layer expects ({self.out_features},)")
        if weight.layout != torch.strided:
            weight = weight.to_dense()
        weight = weight.detach()
        rows, cols = torch.nonzero(weight, as_tuple=True)
        values = weight[rows, cols].to(self.values.dtype)
        old = self.values
        # A new weight is a new Parameter: an optimizer's momentum for the old one means nothing.
        self._register_storage(rows, cols, values.to(old.device), reuse_values=False)
        if bias is not None:
            if self.bias is None:
                self.bias = nn.Parameter(bias.detach().clone().to(old.dtype).to(old.device))
            else:
                with torch.no_grad():
                    self.bias.copy_(bias)

    def prune_smallest_values(self, optimizer=None, *, k=None) -> None:
        """Remove ``floor(k * in_features * out_features)`` smallest-magnitude weights.

        The weights leave storage: ``values`` becomes a new, smaller Parameter.

        Args:
            optimizer: an optimizer that trains this layer; its param groups and state
                are updated at once. Without it, any optimizer still holding the old
                ``values`` is remapped before its next ``step()``.
            k: fraction to prune for this call only (default: the layer's ``k``). For
                compatibility a number passed as the first argument is taken as ``k``.
        """
        if isinstance(optimizer, numbers.Real) and not isinstance(optimizer, bool):
            optimizer, k = None, optimizer
        k = self.k if k is None else _check_k(k)
        n_remove = math.floor(k * self.in_features * self.out_features + 1e-9)
        self.remove_smallest(n_remove, optimizer=optimizer)

    # --------------------------------------------------------------- pruning
    def remove_smallest(self, n_remove: int, optimizer=None) -> None:
        """Remove the ``n_remove`` smallest-magnitude stored weights (all if more).

        Raises:
            ValueError: the layer holds NaN or infinite weights, which have no magnitude
                order (a NaN would rank as the largest and never be pruned).
        """
        if n_remove <= 0:
            return
        check_finite_values(self)
        n_keep = max(self.nnz - int(n_remove), 0)
        magnitudes = self.values.detach().abs()
        keep = torch.topk(magnitudes, n_keep, sorted=False).indices if n_keep else magnitudes.new_zeros(0, dtype=torch.long)
        self.keep_entries(keep, optimizer=optimizer)

    def keep_entries(self, keep: Tensor, optimizer=None) -> None:
        """Keep only the stored weights selected by ``keep``; drop the rest for good.

        Args:
            keep: either 1-D integer positions into ``values`` (any order, no duplicates),
                or a boolean mask with one entry per stored weight (``True`` keeps it).
            optimizer: updated at once if given; see :meth:`prune_smallest_values`.

        Raises:
            TypeError: ``keep`` is not a tensor of integers or booleans.
            ValueError: a mask of the wrong length, positions out of range or repeated.
        """
        _optim.check_optimizer(optimizer)
        keep = self._keep_positions(keep)
        if keep.numel() == self.nnz:
            return
        old = self.values
        rows, cols = self._rows_cols()
        with torch.no_grad():
            new_values = old.detach().index_select(0, keep)
        self._register_storage(rows[keep], cols[keep], new_values, reuse_values=False)
        new = self.values
        _optim.record_successor(old, new, keep)
        if optimizer is not None:
            _optim.replace_parameter(optimizer, old, new, keep)
        _optim.remap_known_optimizers()

    def _keep_positions(self, keep) -> Tensor:
        """Sorted int64 positions of the entries ``keep`` selects (see :meth:`keep_entries`)."""
        if not isinstance(keep, Tensor):
            raise TypeError(f"keep must be a torch.Tensor of positions or a boolean mask, got {type(keep).__name__}")
        if keep.dtype == torch.bool:
            if keep.dim() != 1 or keep.numel() != self.nnz:
                raise ValueError(f"a boolean keep mask needs one entry per stored weight: shape ({self.nnz},), "
                                 f"got {tuple(keep.shape)}")
            return torch.nonzero(keep.to(self.values.device)).flatten()
        if keep.dtype.is_floating_point or keep.dtype.is_complex:
            raise TypeError(f"keep must hold integer positions or booleans, got dtype {keep.dtype}")
        if keep.dim() != 1:
            raise ValueError(f"keep positions must be 1-D, got shape {tuple(keep.shape)}")
        keep = torch.sort(keep.to(device=self.values.device, dtype=torch.long)).values
        if keep.numel():
            low, high = int(keep[0]), int(keep[-1])
            if low < 0 or high >= self.nnz:
                raise ValueError(f"keep positions span [{low}, {high}], the layer stores {self.nnz} weights "
                                 f"(valid positions 0 to {self.nnz - 1})")
            if bool((keep[1:] == keep[:-1]).any()):
                repeated = int((keep[1:] == keep[:-1]).sum())
                raise ValueError(f"keep positions repeat {repeated} time(s); give each position once")
        return keep

    # -------------------------------------------------------------- state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # A checkpoint may hold another nnz or the other format: reshape this layer
        # to the stored pattern first, then let nn.Module copy the tensors.
        values = state_dict.get(prefix + "values")
        coo = state_dict.get(prefix + "indices")
        crow = state_dict.get(prefix + "row_indices")
        col = state_dict.get(prefix + "col_indices")
        if values is not None and (coo is not None or (crow is not None and col is not None)):
            if coo is not None:
                rows, cols = coo[0].long(), coo[1].long()
            else:
                if crow.numel() != self.out_features + 1:
                    error_msgs.append(f"{prefix}row_indices has {crow.numel()} entries, layer with "
                                      f"out_features={self.out_features} expects {self.out_features + 1}")
                    return
                rows, cols = rows_from_crow(crow), col.long()
            if rows.numel() != values.numel():
                error_msgs.append(f"{prefix}values has {values.numel()} entries but the indices hold "
                                  f"{rows.numel()}; the checkpoint is inconsistent")
                return
            old = self.values
            try:
                self._register_storage(rows, cols, values.detach().to(dtype=old.dtype, device=old.device))
            except ValueError as error:
                error_msgs.append(f"{prefix or 'layer'}: stored indices do not fit the layer: {error}")
                return
            _optim.remap_known_optimizers()
            state_dict[prefix + "values"] = self.values.detach().clone()  # in the stored (sorted) order
            for key in ("indices", "row_indices", "col_indices"):
                state_dict.pop(prefix + key, None)
            for key, tensor in self._buffers.items():
                if key in self._non_persistent_buffers_set or tensor is None:
                    continue
                state_dict[prefix + key] = tensor.clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)


def check_finite_values(layer: SparseLayer, name: str | None = None) -> None:
    """Raise ``ValueError`` if ``layer`` stores NaN or infinite weights, naming it and how many.

    Magnitude pruning ranks weights by ``abs()``; NaN has no order (``topk`` ranks it as the
    largest), so such a layer cannot be pruned meaningfully.
    """
    bad = int((~torch.isfinite(layer.values.detach())).sum())
    if bad:
        where = f"layer {name!r}" if name else repr(layer)
        raise ValueError(f"{where} holds {bad} NaN or infinite weight(s) of {layer.nnz}; magnitude pruning "
                         f"cannot rank them: fix the weights (e.g. training diverged) before pruning")


def new_random_basic_coo(in_features, out_features, bias=True) -> SparseLayer:
    """A new :class:`SparseLayer` storing its weight as COO."""
    return SparseLayer(in_features, out_features, bias=bias)


def new_random_basic_csr(in_features, out_features, bias=True) -> SparseLayer:
    """A new :class:`SparseLayer` storing its weight as CSR."""
    return SparseLayer(in_features, out_features, bias=bias, csr_mode=True)


def sparse_layers(model: nn.Module) -> list[SparseLayer]:
    """Every :class:`SparseLayer` in ``model`` (at any depth, ``model`` itself included)."""
    return [module for module in model.modules() if isinstance(module, SparseLayer)]


def set_global_k(model: nn.Module, k) -> None:
    """Set ``k`` of every :class:`SparseLayer` in ``model``, at any depth."""
    k = _check_k(k)
    for layer in sparse_layers(model):
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
        self._handles = [layer.register_forward_pre_hook(self._prune_hook) for layer in sparse_layers(model)]

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
                if isinstance(module, SparseLayer):
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
    for layer in sparse_layers(model):
        if id(layer) not in pruner._pruned:
            layer.prune_smallest_values(optimizer=optimizer)
