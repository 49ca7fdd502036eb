"""Bytes a module really holds, tensor by tensor, and the bytes of its optimizer state.

Counting non-zeros says nothing about memory: a masked model holds its dense weight,
a mask as large, and often copies. :func:`stored_bytes` walks every parameter,
buffer and plain tensor attribute of every submodule, counts each underlying
storage once (views and shared tensors are not counted twice), and sorts the bytes
into categories:

``values``      non-zero weights of sparse layers
``indices``     their index arrays (COO indices, CSR row pointers and columns)
``caches``      derived data kept for speed (the transposed pattern of a sparse layer)
``bias``        biases
``parameters``  other parameters: dense weights, ``weight_orig`` of ``torch.nn.utils.prune``,
                the weight NNI moves into its wrapper
``masks``       pruning masks (``*_mask`` buffers of NNI and ``torch.nn.utils.prune``)
``copies``      duplicate weights: NNI's ``weight`` buffer, ``torch.nn.utils.prune``'s
                materialised ``weight`` attribute
``buffers``     every other buffer (BatchNorm statistics, ...)
``gradients``   the ``.grad`` of every parameter that has one (as sparse as the parameter)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from actuallysparse.storage import SparseModule

MIB = 2**20
"""Bytes in a mebibyte: every MiB figure of the package and its harness divides by this."""

CATEGORIES = ("values", "indices", "caches", "bias", "parameters", "masks", "copies", "buffers", "gradients")
_SPARSE_INDEX_NAMES = {"indices", "row_indices", "col_indices"}
_WEIGHT_NAMES = {"weight", "bias"}


@dataclass(frozen=True)
class MemoryReport:
    """What a module holds, in bytes.

    Attributes:
        by_category: bytes per category (see the module docstring), every category present.
        optimizer_state_bytes: bytes of the optimizer state kept for the module's parameters.
        tensors: ``(qualified name, category, bytes)`` of each counted tensor.
    """

    by_category: dict[str, int]
    optimizer_state_bytes: int = 0
    tensors: tuple[tuple[str, str, int], ...] = field(default=(), repr=False)

    @property
    def total_bytes(self) -> int:
        """Bytes of every tensor the module holds (optimizer state excluded)."""
        return sum(self.by_category.values())

    @property
    def training_bytes(self) -> int:
        """Bytes held while training: every tensor of the module plus its optimizer state."""
        return self.total_bytes + self.optimizer_state_bytes

    def as_dict(self) -> dict[str, int]:
        """Flat dict: one entry per category plus ``total`` and ``optimizer_state``."""
        return {**self.by_category, "total": self.total_bytes,
                "optimizer_state": self.optimizer_state_bytes}


def _storages(tensor: Tensor) -> list[tuple[tuple, int]]:
    """``(identity, bytes)`` of every storage behind ``tensor`` (several for sparse tensors)."""
    if tensor.layout == torch.sparse_coo:
        return _storages(tensor._indices()) + _storages(tensor._values())
    if tensor.layout in (torch.sparse_csr, torch.sparse_bsr):
        return (_storages(tensor.crow_indices()) + _storages(tensor.col_indices())
                + _storages(tensor.values()))
    if tensor.layout in (torch.sparse_csc, torch.sparse_bsc):
        return (_storages(tensor.ccol_indices()) + _storages(tensor.row_indices())
                + _storages(tensor.values()))
    storage = tensor.untyped_storage()
    return [((str(tensor.device), storage.data_ptr(), storage.nbytes()), storage.nbytes())]


def tensor_bytes(tensor: Tensor) -> int:
    """Bytes of the storage(s) a tensor keeps alive (a view keeps its whole base)."""
    return sum(nbytes for _, nbytes in _storages(tensor))


def _classify(module: nn.Module, name: str, kind: str) -> str:
    if isinstance(module, SparseModule):
        if name == "values":
            return "values"
        if name in _SPARSE_INDEX_NAMES:
            return "indices"
        if name == "bias":
            return "bias"
        if name.startswith("_"):
            return "caches"
    if name.endswith("_mask"):
        return "masks"
    if kind == "attribute":
        return "copies"
    if kind == "buffer":
        # A weight held as a buffer is a copy made by a masking tool (NNI keeps one).
        return "copies" if name in _WEIGHT_NAMES else "buffers"
    if name == "bias" or name == "bias_orig":
        return "bias"
    return "parameters"


def _module_tensors(module: nn.Module):
    for name, tensor in module._parameters.items():
        if tensor is not None:
            yield name, tensor, "parameter"
            if tensor.grad is not None:
                yield f"{name}.grad", tensor.grad, "gradient"
    for name, tensor in module._buffers.items():
        if tensor is not None:
            yield name, tensor, "buffer"
    for name, value in vars(module).items():
        if isinstance(value, Tensor) and name not in module._parameters and name not in module._buffers:
            yield name, value, "attribute"
    if isinstance(module, SparseModule):
        for cache_name, cache in module._caches():
            for part in dataclasses.fields(cache):
                value = getattr(cache, part.name)
                if isinstance(value, Tensor):
                    yield f"{cache_name}.{part.name}", value, "cache"


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None, params) -> int:
    """Bytes of ``optimizer``'s state for ``params`` (each storage once)."""
    if optimizer is None:
        return 0
    seen, total = set(), 0
    for param in params:
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, Tensor):
                for identity, nbytes in _storages(value):
                    if identity not in seen:
                        seen.add(identity)
                        total += nbytes
    return total


def stored_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Count the bytes ``module`` holds, broken down by category.

    Args:
        module: any module (a layer or a whole model, masked or sparse).
        optimizer: if given, also count its state for ``module``'s parameters.

    Returns:
        A :class:`MemoryReport`.

    Example::

        >>> report = stored_bytes(convert(nn.Linear(512, 512), "csr"))
        >>> report.by_category["values"], report.by_category["indices"]
        (1048576, 1050628)
    """
    by_category = dict.fromkeys(CATEGORIES, 0)
    counted, seen = [], set()
    for module_name, submodule in module.named_modules():
        for name, tensor, kind in _module_tensors(submodule):
            category = {"cache": "caches", "gradient": "gradients"}.get(kind) or _classify(submodule, name, kind)
            nbytes = 0
            for identity, storage_bytes in _storages(tensor):
                if identity not in seen:
                    seen.add(identity)
                    nbytes += storage_bytes
            by_category[category] += nbytes
            qualified = f"{module_name}.{name}" if module_name else name
            counted.append((qualified, category, nbytes))
    return MemoryReport(
        by_category=by_category,
        optimizer_state_bytes=optimizer_state_bytes(optimizer, module.parameters()),
        tensors=tuple(counted),
    )
