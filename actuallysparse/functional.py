"""The sparse linear kernel: forward and backward that never build the dense weight.

The weight is a CSR pattern (``crow``, ``col``) plus a 1-D ``values`` tensor in
row-major order. Forward multiplies through a CSR view of it; backward computes

* ``d(values)`` as a sampled dense-dense product (``torch.sparse.sampled_addmm``)
  restricted to the pattern, so the gradient has exactly ``nnz`` entries;
* ``d(input)`` with the transposed pattern, kept in a :class:`TransposedPattern`
  built once per pattern; each step only re-gathers the values into it.

Which MKL call is fastest depends on the batch (see ``shared/MEASURED.md``):
``F.linear(x, W_csr)`` wins for a single row, ``addmm(b, W_csr, x.T)`` otherwise.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows of input up to which ``F.linear`` beats ``addmm`` on a CSR weight.
SMALL_BATCH_ROWS = 1

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


@dataclass(frozen=True)
class TransposedPattern:
    """The CSR pattern of ``W.T`` and where each of its entries sits in ``W``'s values.

    Attributes:
        crow: ``(in_features + 1,)`` row pointers of ``W.T``.
        col: ``(nnz,)`` column indices of ``W.T`` (the rows of ``W``).
        perm: ``(nnz,)`` positions in ``W``'s values, so ``values[perm]`` are ``W.T``'s values.
    """

    crow: Tensor
    col: Tensor
    perm: Tensor


def rows_from_crow(crow: Tensor) -> Tensor:
    """Expand CSR row pointers into one row index per non-zero (int64)."""
    counts = (crow[1:] - crow[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(counts), device=crow.device), counts)


def crow_from_rows(rows: Tensor, n_rows: int, dtype: torch.dtype) -> Tensor:
    """Row pointers of a row-sorted pattern whose row index per non-zero is ``rows``."""
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    if rows.numel():
        crow[1:] = torch.cumsum(torch.bincount(rows.long(), minlength=n_rows), 0)
    return crow.to(dtype)


def transpose_pattern(crow: Tensor, col: Tensor, in_features: int) -> TransposedPattern:
    """Build the CSR pattern of the transposed matrix (done once per pattern, not per step)."""
    rows = rows_from_crow(crow)
    order = torch.argsort(col.long() * (len(crow) - 1) + rows, stable=True)
    index_dtype = col.dtype
    return TransposedPattern(
        crow=crow_from_rows(col[order], in_features, index_dtype),
        col=rows[order].to(index_dtype).contiguous(),
        perm=order.to(index_dtype).contiguous(),
    )


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _csr_times_rows(weight: Tensor, x: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T (+ bias)`` for a CSR ``weight`` and a 2-D dense ``x``."""
    if x.shape[0] <= SMALL_BATCH_ROWS:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.mm(weight, x.t()).t()
    return torch.addmm(bias.unsqueeze(1), weight, x.t()).t()


class SparseLinearFunction(torch.autograd.Function):
    """``y = x @ W.T + b`` with ``W`` given as a CSR pattern and its ``values``."""

    @staticmethod
    def forward(ctx, x, values, bias, crow, col, transposed, shape):  # noqa: D102
        out_features, in_features = shape
        ctx.save_for_backward(x, values)
        ctx.pattern = (crow, col, transposed, shape)
        if values.numel() == 0:
            out = x.new_zeros(x.shape[0], out_features)
            return out + bias if bias is not None else out
        # A view made inside a custom Function may not be modified in place later (an
        # in-place ReLU after the layer would fail), so return a tensor of its own.
        return _csr_times_rows(_csr(crow, col, values, shape), x, bias).contiguous()

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, values = ctx.saved_tensors
        crow, col, transposed, (out_features, in_features) = ctx.pattern
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            if values.numel() == 0:
                grad_x = grad_out.new_zeros(grad_out.shape[0], in_features)
            else:
                if transposed is None:
                    transposed = transpose_pattern(crow, col, in_features)
                weight_t = _csr(transposed.crow, transposed.col,
                                values.index_select(0, transposed.perm),
                                (in_features, out_features))
                grad_x = _csr_times_rows(weight_t, grad_out, None)
        if ctx.needs_input_grad[1]:
            if values.numel() == 0:
                grad_values = values.new_zeros(0)
            else:
                # sampled_addmm multiplies the pattern's values even with beta=0:
                # the pattern must hold zeros, never uninitialized memory.
                pattern = _csr(crow, col, torch.zeros_like(values), (out_features, in_features))
                grad_values = torch.sparse.sampled_addmm(
                    pattern, grad_out.t().contiguous(), x.contiguous(), beta=0.0
                ).values()
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(0)
        return grad_x, grad_values, grad_bias, None, None, None, None


def sparse_linear(
    x: Tensor,
    values: Tensor,
    bias: Tensor | None,
    crow: Tensor,
    col: Tensor,
    shape: tuple[int, int],
    transposed: TransposedPattern | None = None,
) -> Tensor:
    """Apply a sparse linear map to a 2-D input ``x`` of shape ``(batch, in_features)``.

    Args:
        x: dense input, ``(batch, in_features)``.
        values: the ``nnz`` non-zeros of ``W`` in row-major order.
        bias: ``(out_features,)`` or ``None``.
        crow, col: CSR pattern of ``W`` (int32 or int64).
        shape: ``(out_features, in_features)``.
        transposed: cached pattern of ``W.T``; built on the fly when missing.

    Returns:
        ``(batch, out_features)``, equal to ``F.linear(x, W_dense, bias)``.
    """
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not needs_grad:
        if values.numel() == 0:
            out = x.new_zeros(x.shape[0], shape[0])
            return out + bias if bias is not None else out
        return _csr_times_rows(_csr(crow, col, values, shape), x, bias)
    return SparseLinearFunction.apply(x, values, bias, crow, col, transposed, shape)
