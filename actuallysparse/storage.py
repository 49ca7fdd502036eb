"""``SparseModule``: the storage of non-zero weights that every sparse layer family shares.

A sparse layer sees its weight as a matrix of ``rows x cols``: ``(out_features, in_features)``
for :class:`~actuallysparse.layers.SparseLayer`, ``(out_channels, in_channels * kh * kw)`` for
:class:`~actuallysparse.conv.SparseConv2d`. This module holds what does not depend on the
family: the ``values`` Parameter and its pattern (COO ``indices`` or CSR ``row_indices`` +
``col_indices``), the pattern caches, format switches, magnitude pruning, the optimizer
remapping and ``state_dict`` loading. A family adds its geometry (``_matrix_shape``,
``_dense_shape``) and its products (``forward``), the way ``torch.nn``'s ``_ConvNd`` carries
what ``Conv1d/2d/3d`` share. Pruning, :func:`~actuallysparse.memory.stored_bytes` and the
converter see this class, not each family.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from actuallysparse import optim as _optim
from actuallysparse.functional import TransposedPattern, crow_from_rows, rows_from_crow, transpose_pattern

_INT32_MAX = 2**31 - 1


def check_k(k) -> float:
    """``k`` as a float in ``(0, 1]``, or ``ValueError`` naming what was given."""
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0 < k <= 1:
        raise ValueError(f"k must be a number in (0, 1], the fraction of all weights to prune; got {k!r}")
    return float(k)


def check_positive(name: str, value) -> int:
    """``value`` as an int if it is a positive integer, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def index_dtype_for(rows: int, cols: int) -> torch.dtype:
    """int32 when every index and row pointer of a ``rows x cols`` matrix fits, else int64."""
    return torch.int32 if rows * cols <= _INT32_MAX else torch.int64


# int16 holds the indices 0..32767
_INT16_INDICES = 1 << 15


def column_dtype_for(rows: int, cols: int, csr: bool) -> torch.dtype:
    """The dtype of a pattern's column indices (and, in COO, of its row indices, stored beside
    them): int16 where every index fits, so a float32 non-zero costs 6 bytes instead of 8 in CSR
    (8 instead of 12 in COO); else :func:`index_dtype_for`. Row pointers keep the latter."""
    fits = cols <= _INT16_INDICES and (csr or rows <= _INT16_INDICES)
    return torch.int16 if fits else index_dtype_for(rows, cols)


class SparseModule(nn.Module):
    """Base of the sparse layer families: the non-zeros of one weight matrix and their pattern.

    Subclasses set their geometry before calling :meth:`_init_storage`, and define
    ``_matrix_shape`` (the weight as a matrix), ``_dense_shape`` (the weight as the dense
    layer holds it) and ``forward``.

    Attributes:
        values: the learnable non-zero weights, ``(nnz,)``, in row-major order of the matrix.
        indices: COO only, ``(2, nnz)`` row and column of each value (int16 where both fit, else
            int32 where it fits, else int64: :func:`column_dtype_for`).
        row_indices, col_indices: CSR only, row pointers ``(rows + 1,)`` (int32 where they fit)
            and columns ``(nnz,)`` (int16 where the row's width fits).
        csr_mode: whether the pattern is stored as CSR.
        k: the fraction of all weights one :meth:`prune_smallest_values` removes.
    """

    # Caches of the pattern: attributes built on first use, None when absent, counted by
    # stored_bytes as caches. Every change of pattern (_register_storage) or device (_apply) drops
    # them all; eval() drops those only a backward reads, train() those only a graph-free forward
    # in evaluation mode reads.
    _TRAINING_CACHES: tuple[str, ...] = ("_transposed",)
    _INFERENCE_CACHES: tuple[str, ...] = ()

    def _drop_caches(self, names: tuple[str, ...] | None = None) -> None:
        for name in self._TRAINING_CACHES + self._INFERENCE_CACHES if names is None else names:
            setattr(self, name, None)

    def _caches(self):
        """``(name, cache)`` for each cache held now."""
        for name in self._TRAINING_CACHES + self._INFERENCE_CACHES:
            cache = getattr(self, name, None)
            if cache is not None:
                yield name, cache

    @property
    def _matrix_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def _dense_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _init_storage(self, rows: Tensor, cols: Tensor, values: Tensor, bias: Tensor | None, csr_mode: bool,
                      k: float, train_mode: bool = True) -> None:
        """Set format, ``k``, the non-zeros and the bias of a module whose geometry is set."""
        self.csr_mode = bool(csr_mode)
        self.k = check_k(k)
        self._register_storage(rows, cols, values)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone().to(device=values.device, dtype=values.dtype))
        self.train(bool(train_mode))

    # ----------------------------------------------------------------- storage
    def _register_storage(self, rows: Tensor, cols: Tensor, values: Tensor, *, reuse_values: bool = True) -> None:
        """Store a pattern and its values in this module's format (sorted row-major if needed).

        With ``reuse_values`` the current ``values`` Parameter is written in place when the
        number of entries is unchanged; otherwise a new Parameter replaces it, and any
        optimizer holding the old one is remapped with its state reset.
        """
        # The orphan remap must know every optimizer of a sparse layer from its first step.
        _optim.install_step_hook()
        rows, cols, values = self._checked_entries(rows, cols, values)
        n_rows, n_cols = self._matrix_shape
        index_dtype = index_dtype_for(n_rows, n_cols)
        column_dtype = column_dtype_for(n_rows, n_cols, self.csr_mode)
        device = values.device
        rows = rows.to(device=device)
        cols = cols.to(device=device)
        for name in ("indices", "row_indices", "col_indices", "_crow"):
            self._buffers.pop(name, None)
        if self.csr_mode:
            self.register_buffer("row_indices", crow_from_rows(rows, n_rows, index_dtype))
            self.register_buffer("col_indices", cols.to(column_dtype).contiguous())
            # COO-only compute buffer is absent in CSR mode
            self.register_buffer("_crow", None, persistent=False)
        else:
            self.register_buffer("indices", torch.stack([rows.to(column_dtype), cols.to(column_dtype)]))
            self.register_buffer("_crow", crow_from_rows(rows, n_rows, index_dtype), persistent=False)
        self._drop_caches()
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
        """Validate ``(rows, cols, values)`` against the matrix shape; sort them row-major."""
        if not (rows.dim() == cols.dim() == values.dim() == 1 and rows.numel() == cols.numel() == values.numel()):
            raise ValueError(f"rows, cols and values must be 1-D of one length, got shapes {tuple(rows.shape)}, "
                             f"{tuple(cols.shape)} and {tuple(values.shape)}")
        if rows.numel() == 0:
            return rows, cols, values
        n_rows, n_cols = self._matrix_shape
        rows, cols = rows.long(), cols.long()
        for name, index, bound in (("row", rows, n_rows), ("column", cols, n_cols)):
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= bound:
                raise ValueError(f"{name} indices span [{low}, {high}], layer expects [0, {bound - 1}] "
                                 f"(shape {(n_rows, n_cols)})")
        key = rows * n_cols + cols
        if not bool((key[1:] > key[:-1]).all()):
            key, order = torch.sort(key)
            if bool((key[1:] == key[:-1]).any()):
                raise ValueError("the pattern holds the same (row, column) more than once")
            rows, cols, values = rows[order], cols[order], values[order]
        return rows, cols, values

    def _pattern(self) -> tuple[Tensor, Tensor]:
        """CSR view ``(crow, col)`` of the stored pattern, whatever the format."""
        # read from the buffer table itself: every product asks, and a module attribute lookup
        # for a buffer is a slow path (1.35 against 0.09 us a call, a few % of a small layer's)
        buffers = self._buffers
        if self.csr_mode:
            return buffers["row_indices"], buffers["col_indices"]
        return buffers["_crow"], buffers["indices"][1]

    def _operands(self) -> tuple[Tensor, Tensor | None]:
        """``(values, bias)`` from the parameter table itself, for the products: as with
        :meth:`_pattern`, a module attribute lookup per parameter (about 0.5 us each) is a few %
        of a small layer's call."""
        parameters = self._parameters
        return parameters["values"], parameters["bias"]

    def _rows_cols(self) -> tuple[Tensor, Tensor]:
        if self.csr_mode:
            return rows_from_crow(self.row_indices), self.col_indices.long()
        return self.indices[0].long(), self.indices[1].long()

    def _transposed_pattern(self) -> TransposedPattern:
        """The cached pattern of the transposed matrix, built when missing.

        Every change of pattern (``_register_storage``), of device (``_apply``) and ``eval()``
        drops the cache (``_drop_caches``), so a present cache is always current.
        """
        if self._transposed is None:
            crow, col = self._pattern()
            self._transposed = transpose_pattern(crow, col, self._matrix_shape[1])
        return self._transposed

    def _apply(self, fn, recurse=True):
        # The caches are plain attributes; rebuild them on the new device/dtype lazily.
        self._drop_caches()
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------ properties
    @property
    def nnz(self) -> int:
        """Number of stored (non-pruned) weights."""
        return self.values.numel()

    @property
    def n_weights(self) -> int:
        """Number of weights the dense layer has (stored or pruned)."""
        n_rows, n_cols = self._matrix_shape
        return n_rows * n_cols

    @property
    def sparsity(self) -> float:
        """Fraction of the layer's weights that are pruned."""
        return 1.0 - self.nnz / self.n_weights

    @property
    def weight(self) -> Tensor:
        """The weight matrix as a sparse tensor (COO or CSR), shape ``_matrix_shape``.

        It shares ``values``, so gradients flow to them through it.
        """
        if self.csr_mode:
            return torch.sparse_csr_tensor(self.row_indices, self.col_indices.to(self.row_indices.dtype), self.values,
                                           self._matrix_shape, check_invariants=False)
        return torch.sparse_coo_tensor(self.indices.long(), self.values, self._matrix_shape, is_coalesced=True,
                                       check_invariants=False)

    def dense_weight(self) -> Tensor:
        """The weight as the dense layer holds it (zeros where pruned), detached."""
        rows, cols = self._rows_cols()
        dense = self.values.new_zeros(self._matrix_shape)
        dense[rows, cols] = self.values.detach()
        return dense.reshape(self._dense_shape)

    def train(self, mode: bool = True):
        """Set training mode; ``train_mode`` mirrors it (kept from the original API).

        Evaluation mode drops the caches that only backward reads (the transposed pattern),
        training mode those that only an evaluation-mode forward reads (a convolution's input
        offsets); the next call that needs one rebuilds it.
        """
        super().train(mode)
        self.train_mode = mode
        self._drop_caches(self._INFERENCE_CACHES if mode else self._TRAINING_CACHES)
        return self

    # ------------------------------------------------------- original API
    def set_k(self, k) -> None:
        """Set the fraction of all weights that :meth:`prune_smallest_values` removes."""
        self.k = check_k(k)

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

    def _weight_matrix(self, weight: Tensor) -> Tensor:
        """``weight`` checked against ``_dense_shape`` and seen as the weight matrix."""
        if tuple(weight.shape) != tuple(self._dense_shape):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, layer expects {tuple(self._dense_shape)}")
        return weight.reshape(self._matrix_shape)

    def assign_new_weight(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Replace the weight (and optionally the bias); zeros in ``weight`` are not stored.

        Args:
            weight: dense or sparse, in the dense layer's weight shape.
            bias: one entry per output, or ``None`` to keep the current bias.
        """
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        n_out = self._matrix_shape[0]
        if bias is not None:
            if not isinstance(bias, Tensor):
                raise TypeError(f"bias must be a torch.Tensor of shape ({n_out},), got {type(bias).__name__}")
            if tuple(bias.shape) != (n_out,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, layer expects ({n_out},)")
        if weight.layout != torch.strided:
            weight = weight.to_dense()
        weight = self._weight_matrix(weight.detach())
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
        """Remove ``floor(k * n_weights)`` smallest-magnitude weights.

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
        k = self.k if k is None else check_k(k)
        n_remove = math.floor(k * self.n_weights + 1e-9)
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
        keep = (torch.topk(magnitudes, n_keep, sorted=False).indices if n_keep
                else magnitudes.new_zeros(0, dtype=torch.long))
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

    def move_entries(self, keep: Tensor, new_rows: Tensor, new_cols: Tensor, optimizer=None) -> None:
        """Keep the stored weights at positions ``keep`` and add zeros at ``(new_rows, new_cols)``.

        What dynamic sparse training does at an update: the pattern changes, kept weights keep
        their values and their optimizer state (momentum, Adam's moments), new weights and their
        state start at zero. ``values`` becomes a new Parameter, remapped in optimizers as
        pruning does.

        Args:
            keep: positions into ``values`` or a boolean mask, as in :meth:`keep_entries`.
            new_rows, new_cols: 1-D matrix positions of the new weights, none of them stored now.
            optimizer: updated at once if given; see :meth:`prune_smallest_values`.

        Raises:
            ValueError: a new position is outside the matrix, repeated, or already stored.
        """
        _optim.check_optimizer(optimizer)
        keep = self._keep_positions(keep)
        if new_rows.dim() != 1 or new_rows.shape != new_cols.shape:
            raise ValueError(f"new_rows and new_cols must be 1-D of one length, got shapes {tuple(new_rows.shape)} "
                             f"and {tuple(new_cols.shape)}")
        n_rows, n_cols = self._matrix_shape
        device = self.values.device
        new_rows, new_cols = new_rows.to(device=device, dtype=torch.long), new_cols.to(device=device, dtype=torch.long)
        if new_rows.numel() and (int(new_rows.min()) < 0 or int(new_rows.max()) >= n_rows or
                                 int(new_cols.min()) < 0 or int(new_cols.max()) >= n_cols):
            raise ValueError(f"new positions must lie in the {n_rows} x {n_cols} weight matrix")
        stored = rows_cols_key(*self._rows_cols(), n_cols)  # ascending: the storage is row-major
        new_keys = torch.sort(rows_cols_key(new_rows, new_cols, n_cols)).values
        if bool((new_keys[1:] == new_keys[:-1]).any()):
            raise ValueError("new positions repeat; give each position once")
        if stored.numel() and new_keys.numel():
            nearest = stored[torch.searchsorted(stored, new_keys).clamp(max=stored.numel() - 1)]
            if bool((nearest == new_keys).any()):
                raise ValueError("a new position is already stored; new weights must go where none is")
        # merge two ascending lists (the kept keys and the new ones) without sorting them together
        kept_keys = stored.index_select(0, keep)
        kept_at = torch.arange(kept_keys.numel(), device=device) + torch.searchsorted(new_keys, kept_keys)
        new_at = torch.arange(new_keys.numel(), device=device) + torch.searchsorted(kept_keys, new_keys)
        keys = torch.empty(kept_keys.numel() + new_keys.numel(), dtype=torch.long, device=device)
        source = torch.empty_like(keys)
        keys[kept_at], keys[new_at] = kept_keys, new_keys
        source[kept_at], source[new_at] = keep, -1
        old = self.values
        with torch.no_grad():
            new_values = _optim.gather_entries(old.detach(), source)
        self._register_storage(keys // n_cols, keys % n_cols, new_values, reuse_values=False)
        new = self.values
        _optim.record_successor(old, new, source)
        if optimizer is not None:
            _optim.replace_parameter(optimizer, old, new, source)
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
            n_rows = self._matrix_shape[0]
            if coo is not None:
                rows, cols = coo[0].long(), coo[1].long()
            else:
                if crow.numel() != n_rows + 1:
                    error_msgs.append(f"{prefix}row_indices has {crow.numel()} entries, the layer's weight has "
                                      f"{n_rows} rows and expects {n_rows + 1}")
                    return
                problem = row_pointer_problem(crow, col.numel())
                if problem:
                    error_msgs.append(f"{prefix}row_indices are not valid CSR row pointers: {problem}")
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


def rows_cols_key(rows: Tensor, cols: Tensor, n_cols: int) -> Tensor:
    """One int64 per position, ``row * n_cols + col``: row-major order, comparable across patterns."""
    return rows.long() * n_cols + cols.long()


def row_pointer_problem(crow: Tensor, nnz: int) -> str:
    """What is wrong with CSR row pointers ``crow`` for ``nnz`` stored weights ("" if nothing).

    Valid pointers start at 0, never decrease, and end at ``nnz``.
    """
    crow = crow.long()
    first, last = int(crow[0]), int(crow[-1])
    if first != 0:
        return f"they must start at 0, got {first}"
    steps = crow[1:] - crow[:-1]
    if bool((steps < 0).any()):
        row = int(torch.nonzero(steps < 0)[0])
        return (f"they must never decrease, but row {row} ends before it starts "
                f"(pointer {int(crow[row])} then {int(crow[row + 1])})")
    if last != nnz:
        return f"they must end at the number of stored weights, {nnz}, got {last}"
    return ""


def check_finite_values(module: SparseModule, name: str | None = None) -> None:
    """Raise ``ValueError`` if ``module`` stores NaN or infinite weights, naming it and how many.

    Magnitude pruning ranks weights by ``abs()``; NaN has no order (``topk`` ranks it as the
    largest), so such a layer cannot be pruned meaningfully.
    """
    bad = int((~torch.isfinite(module.values.detach())).sum())
    if bad:
        where = f"layer {name!r}" if name else repr(module)
        raise ValueError(f"{where} holds {bad} NaN or infinite weight(s) of {module.nnz}; magnitude pruning "
                         f"cannot rank them: fix the weights (e.g. training diverged) before pruning")


def sparse_modules(model: nn.Module) -> list[SparseModule]:
    """Every sparse layer (linear or convolution) in ``model``, at any depth, ``model`` included."""
    return [module for module in model.modules() if isinstance(module, SparseModule)]
