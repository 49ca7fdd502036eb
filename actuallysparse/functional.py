"""The sparse linear and convolution products, and the one place that picks the backend computing them.

The weight is a CSR pattern (``crow``, ``col``) plus a 1-D ``values`` tensor in row-major
order. A layer needs three products, each a plain function of tensors:

* ``forward(x, values, bias, crow, col, out_features)``: ``y = x W^T + b``;
* ``grad_input(grad_out, values, crow, col, t_crow, t_col, perm, in_features)``: ``dx = dy W``;
  ``t_crow, t_col, perm`` are the transposed pattern of a :class:`TransposedPattern` (built
  once per pattern), which the torch backend multiplies with;
* ``grad_values(grad_out, x, crow, col)``: ``dv[k] = sum_b dy[b, row_k] x[b, col_k]``, a
  sampled dense-dense product with exactly ``nnz`` entries;
* ``backward(grad_out, x, values, crow, col, t_crow, t_col, perm, need_input, need_values)``:
  the two gradients a backward needs, together (the native backend packs the output gradient once).

A convolution's weight is the matrix ``(out_channels, in_channels * kh * kw)`` in the same CSR
form, and its geometry ten integers (:data:`CONV_GEOMETRY_FIELDS`). Its products are
``conv_forward(x, values, bias, crow, col, out_channels, geometry)`` and
``conv_backward(grad_out, x, values, crow, col, geometry, need_input, need_values)``; the native
backend convolves directly on the non-zeros, the torch backend scatters them into a dense weight
for ``F.conv2d``.

The pruned models these layers sit in pool with 2x2 windows of stride 2 (VGG); pooling has two
products too, ``max_pool2x2(x, winners=True) -> (out, where)`` (``where``: uint8, which of its
window's four positions, row-major, each output took; empty without ``winners``) and
``max_pool2x2_backward(grad_out, where, height, width)``, on the same two backends
(:mod:`actuallysparse.pooling` wraps them).

Two backends provide them with these signatures: ``native``, the compiled CPU kernels of
:mod:`actuallysparse.kernels` (float32/float64, int32 row pointers, int32 or int16 columns; ``dx``
is scattered along ``W``'s own rows, so no step gathers or copies the values), and ``torch``, built on torch's
sparse CSR operations (MKL on the CPU; any device, dtype and index type). :func:`backend_for`
chooses: native on the CPU, torch for other devices, int64 indices or other dtypes, and torch
(with one warning) when the kernels cannot be built. The environment variable
``ACTUALLYSPARSE_BACKEND`` (``native`` or ``torch``) forces one. :func:`backend_name` names the
choice (``native-avx2``, ``torch``, ...) for benchmarks and result files.

Autograd: :class:`SparseProduct`, :class:`InputGrad` and :class:`ValueGrad` wrap the three
products; each one's derivatives are the other two, so backward, double backward, forward mode
and the ``torch.func`` transforms are exact on both backends. float16 and bfloat16 inputs on the
CPU compute in float32 (:func:`_computes_in_float32`).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch import Tensor

from actuallysparse import kernels

BACKEND_VARIABLE = "ACTUALLYSPARSE_BACKEND"
BACKENDS = ("native", "torch")

# Rows of input up to which ``F.linear`` beats ``addmm`` on a CSR weight (torch backend).
SMALL_BATCH_ROWS = 1


@contextlib.contextmanager
def _quiet_sparse_beta():
    """Silence torch's "sparse CSR is in beta" notices for the calls inside, leaving global filters alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        yield


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


@dataclass(frozen=True)
class InputOffsets:
    """Where each non-zero of a convolution reads its input, for one input size (native kernels).

    Attributes:
        height, width: the input size they are for.
        offsets: ``(nnz,)``, the row of the padded input each non-zero reads
            (:func:`~actuallysparse.kernels.conv_offsets`: 16 bits where they fit, else 32).
    """

    height: int
    width: int
    offsets: Tensor


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
    index_dtype = crow.dtype  # the columns may be int16; pointers and positions need the pointers' type
    return TransposedPattern(
        crow=crow_from_rows(col[order], in_features, index_dtype),
        col=rows[order].to(index_dtype).contiguous(),
        perm=order.to(index_dtype).contiguous(),
    )


def conv_transpose_pattern(crow: Tensor, col: Tensor, in_channels: int, taps: int,
                           column_dtype: torch.dtype) -> TransposedPattern:
    """The pattern of a convolution's weight transposed over channels with its taps flipped.

    Rows are input channels; the non-zero at column ``c * taps + t`` of output channel ``o``
    becomes column ``o * taps + (taps - 1 - t)`` of row ``c`` (``taps = kh * kw``), stored as
    ``column_dtype``. With it, the input gradient of a stride-1 convolution is itself a convolution
    of the output gradient, which the native kernels compute like a forward (done once per pattern,
    not per step).
    """
    rows = rows_from_crow(crow)
    columns = col.long()
    channel, flipped = columns // taps, rows * taps + (taps - 1 - columns % taps)
    order = torch.argsort(channel * ((len(crow) - 1) * taps) + flipped)
    index_dtype = crow.dtype
    return TransposedPattern(
        crow=crow_from_rows(channel[order], in_channels, index_dtype),
        col=flipped[order].to(column_dtype).contiguous(),
        perm=order.to(index_dtype).contiguous(),
    )


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    # torch's CSR tensors take int32 or int64 indices of one type: int16 columns are widened
    return torch.sparse_csr_tensor(crow, col.to(crow.dtype), values, shape, check_invariants=False)


def _csr_times_rows(weight: Tensor, x: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T (+ bias)`` for a CSR ``weight`` and a 2-D dense ``x``."""
    if x.shape[0] <= SMALL_BATCH_ROWS:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.mm(weight, x.t()).t()
    return torch.addmm(bias.unsqueeze(1), weight, x.t()).t()


def torch_forward(x: Tensor, values: Tensor, bias: Tensor | None, crow: Tensor, col: Tensor,
                  out_features: int) -> Tensor:
    """``x @ W.T + bias`` with torch's CSR multiply."""
    if values.numel() == 0:
        out = x.new_zeros(x.shape[0], out_features)
        return out + bias if bias is not None else out
    with _quiet_sparse_beta():
        return _csr_times_rows(_csr(crow, col, values, (out_features, x.shape[1])), x, bias)


def torch_grad_input(grad_out: Tensor, values: Tensor, crow: Tensor, col: Tensor, t_crow: Tensor | None,
                     t_col: Tensor | None, perm: Tensor | None, in_features: int) -> Tensor:
    """``grad_out @ W`` with torch's CSR multiply on the transposed pattern (gathers ``values[perm]``)."""
    if values.numel() == 0:
        return grad_out.new_zeros(grad_out.shape[0], in_features)
    if t_crow is None:
        transposed = transpose_pattern(crow, col, in_features)
        t_crow, t_col, perm = transposed.crow, transposed.col, transposed.perm
    with _quiet_sparse_beta():
        weight_t = _csr(t_crow, t_col, values.index_select(0, perm), (in_features, grad_out.shape[1]))
        return _csr_times_rows(weight_t, grad_out, None).contiguous()


def torch_grad_values(grad_out: Tensor, x: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    """Each non-zero's gradient with ``torch.sparse.sampled_addmm``."""
    if col.numel() == 0:
        return x.new_zeros(0)
    with _quiet_sparse_beta():
        # sampled_addmm multiplies the pattern's values even with beta=0:
        # the pattern must hold zeros, never uninitialized memory.
        pattern = _csr(crow, col, x.new_zeros(col.numel()), (grad_out.shape[1], x.shape[1]))
        return torch.sparse.sampled_addmm(pattern, grad_out.t().contiguous(), x.contiguous(), beta=0.0).values()


def torch_backward(grad_out: Tensor, x: Tensor, values: Tensor, crow: Tensor, col: Tensor, t_crow: Tensor | None,
                   t_col: Tensor | None, perm: Tensor | None, need_input: bool, need_values: bool
                   ) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_input, grad_values)``, ``None`` for a gradient not needed."""
    grad_x = (torch_grad_input(grad_out, values, crow, col, t_crow, t_col, perm, x.shape[1])
              if need_input else None)
    grad_values = torch_grad_values(grad_out, x, crow, col) if need_values else None
    return grad_x, grad_values


# ---------------------------------------------------------------- convolution
# A convolution's geometry travels as ten integers: kernel (kh, kw), stride (sh, sw), dilation
# (dh, dw) and padding (top, bottom, left, right). Its weight matrix is (out_channels,
# in_channels * kh * kw), column c * kh * kw + i * kw + j for tap (i, j) of input channel c.
CONV_GEOMETRY_FIELDS = ("kh", "kw", "stride_h", "stride_w", "dilation_h", "dilation_w",
                        "pad_top", "pad_bottom", "pad_left", "pad_right")


def _conv_dense_weight(values: Tensor, crow: Tensor, col: Tensor, out_channels: int, in_channels: int,
                       geometry: tuple[int, ...]) -> Tensor:
    """The 4-D dense weight of a sparse convolution (the torch backend's operand)."""
    kh, kw = geometry[0], geometry[1]
    dense = values.new_zeros(out_channels, in_channels * kh * kw)
    dense = dense.index_put((rows_from_crow(crow), col.long()), values)
    return dense.reshape(out_channels, in_channels, kh, kw)


def _conv_padded(x: Tensor, geometry: tuple[int, ...]) -> Tensor:
    top, bottom, left, right = geometry[6:10]
    return F.pad(x, (left, right, top, bottom)) if (top or bottom or left or right) else x


def torch_conv_forward(x: Tensor, values: Tensor, bias: Tensor | None, crow: Tensor, col: Tensor,
                       out_channels: int, geometry: tuple[int, ...], relu: bool = False, pool: bool = False) -> Tensor:
    """``conv2d(x, W) + bias`` (then ``relu`` and a 2x2 max-pool, if asked) through torch's dense
    convolution on the scattered weight."""
    weight = _conv_dense_weight(values, crow, col, out_channels, x.shape[1], geometry)
    out = F.conv2d(_conv_padded(x, geometry), weight, bias, stride=tuple(geometry[2:4]),
                   dilation=tuple(geometry[4:6]))
    out = out.relu_() if relu else out
    return F.max_pool2d(out, 2) if pool else out


def torch_conv_backward(grad_out: Tensor, x: Tensor, values: Tensor, crow: Tensor, col: Tensor,
                        geometry: tuple[int, ...], need_input: bool, need_values: bool,
                        transposed: TransposedPattern | None = None) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_input, grad_values)`` of a sparse convolution through torch's dense backward
    (``transposed`` goes unused)."""
    weight = _conv_dense_weight(values, crow, col, grad_out.shape[1], x.shape[1], geometry)
    padded = _conv_padded(x, geometry)
    grad_padded, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_out, padded, weight, None, list(geometry[2:4]), [0, 0], list(geometry[4:6]), False, [0, 0], 1,
        [need_input, need_values, False])
    grad_x = None
    if need_input:
        top, left = geometry[6], geometry[8]
        grad_x = grad_padded[:, :, top:top + x.shape[2], left:left + x.shape[3]].contiguous()
    grad_values = None
    if need_values:
        grad_values = grad_weight.reshape(grad_out.shape[1], -1)[rows_from_crow(crow), col.long()]
    return grad_x, grad_values


def torch_max_pool2x2(x: Tensor, winners: bool = True) -> tuple[Tensor, Tensor]:
    """2x2, stride-2 max pooling of ``(N, C, H, W)`` and each window's winner (uint8: 0 top-left,
    1 top-right, 2 bottom-left, 3 bottom-right), with ``F.max_pool2d``'s choice on ties (the first
    maximum in row-major order) and NaN (a NaN wins over any number); without ``winners``, an
    empty tensor in their place."""
    if not winners:
        return F.max_pool2d(x, 2).contiguous(), torch.empty(0, dtype=torch.uint8, device=x.device)
    height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    window = x[..., :height, :width]
    best = window[..., 0::2, 0::2]
    where = torch.zeros(best.shape, dtype=torch.uint8, device=x.device)
    for code, candidate in ((1, window[..., 0::2, 1::2]), (2, window[..., 1::2, 0::2]), (3, window[..., 1::2, 1::2])):
        wins = (candidate > best) | candidate.isnan()
        best = torch.where(wins, candidate, best)
        where = where.masked_fill(wins, code)
    return best.contiguous(), where


def torch_max_pool2x2_backward(grad_out: Tensor, where: Tensor, height: int, width: int) -> Tensor:
    """The input gradient of :func:`torch_max_pool2x2`: each output's gradient at its window's
    winner, zero elsewhere (and in a last row or column no window covers)."""
    batch, channels, out_h, out_w = grad_out.shape
    codes = torch.arange(4, dtype=torch.uint8, device=grad_out.device)
    spread = torch.where(where.unsqueeze(-1) == codes, grad_out.unsqueeze(-1), grad_out.new_zeros(()))
    windows = spread.view(batch, channels, out_h, out_w, 2, 2).permute(0, 1, 2, 4, 3, 5)
    return F.pad(windows.reshape(batch, channels, 2 * out_h, 2 * out_w), (0, width - 2 * out_w, 0, height - 2 * out_h))


class Backend(NamedTuple):
    """One implementation of the products, under a name.

    ``uses_transposed`` says whether a linear layer's input gradient reads the transposed pattern
    (the native kernels scatter along ``W``'s own rows instead), ``conv_uses_transposed`` whether a
    convolution's does (the native kernels run a stride-1 layer's input gradient as a forward over
    the flipped transposed pattern; torch's dense backward needs none): a layer builds that cache
    only for a backend that reads it. ``conv_offsets`` builds the per-input-size offsets that a
    convolution's forward can be given instead of computing them (``None``: the backend reads none).
    """

    name: str
    forward: Callable[..., Tensor]
    grad_input: Callable[..., Tensor]
    grad_values: Callable[..., Tensor]
    backward: Callable[..., tuple]
    uses_transposed: bool
    conv_forward: Callable[..., Tensor]
    conv_backward: Callable[..., tuple]
    conv_uses_transposed: bool
    max_pool2x2: Callable[..., tuple]
    max_pool2x2_backward: Callable[..., Tensor]
    conv_offsets: Callable[..., Tensor] | None


TORCH_BACKEND = Backend("torch", torch_forward, torch_grad_input, torch_grad_values, torch_backward, True,
                        torch_conv_forward, torch_conv_backward, False, torch_max_pool2x2,
                        torch_max_pool2x2_backward, None)
NATIVE_BACKEND = Backend("native", kernels.forward, kernels.grad_input, kernels.grad_values, kernels.backward, False,
                         kernels.conv_forward, kernels.conv_backward, True, kernels.max_pool2x2,
                         kernels.max_pool2x2_backward, kernels.conv_offsets)

_fallback_warned = False
_override: str | None = None


@contextlib.contextmanager
def use_backend(name: str):
    """Run the code inside on one backend (``native`` or ``torch``), as ``ACTUALLYSPARSE_BACKEND`` would.

    Example::

        >>> with use_backend("torch"):
        ...     y = layer(x)
    """
    global _override
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'native' or 'torch', got {name!r}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``ACTUALLYSPARSE_BACKEND``; ``None`` when neither is."""
    if _override is not None:
        return _override
    forced = os.environ.get(BACKEND_VARIABLE, "").strip().lower()
    if not forced:
        return None
    if forced not in BACKENDS:
        raise ValueError(f"{BACKEND_VARIABLE}={forced!r} is not a backend; use 'native' or 'torch'")
    return forced


def backend_for(x: Tensor, crow: Tensor | None = None) -> Backend:
    """The backend that computes a layer's products for input ``x`` and a pattern indexed like ``crow``
    (``None`` for a product with no pattern, such as pooling).

    Native on the CPU for float32/float64 with int32 row pointers; torch for any other device,
    dtype or index type. Forcing ``native`` where it cannot run raises; where the kernels
    cannot be built, the torch backend runs, after one warning saying why.
    """
    # is_cpu spares the common case building a torch.device (a fifth of a microsecond a call)
    return _choose_backend("cpu" if x.is_cpu else x.device.type, x.dtype,
                           torch.int32 if crow is None else crow.dtype)


def backend_name(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """Where a sparse layer with int32 indices computes for inputs of ``dtype`` on ``device``:
    ``native-<instruction set>`` (e.g. ``native-avx2``) or ``torch``.

    Benchmarks and result files record it: the two backends' timings differ by several times.
    """
    backend = _choose_backend(torch.device(device).type, dtype, torch.int32)
    return f"native-{kernels.isa()}" if backend is NATIVE_BACKEND else backend.name


def _choose_backend(device_type: str, dtype: torch.dtype, index_dtype: torch.dtype) -> Backend:
    global _fallback_warned
    forced = forced_backend()
    if forced == "torch":
        return TORCH_BACKEND
    if device_type != "cpu" or dtype not in (torch.float32, torch.float64) or index_dtype != torch.int32:
        if forced == "native":
            raise RuntimeError(f"{BACKEND_VARIABLE}=native, but the native kernels need a CPU float32/float64 "
                               f"input and int32 indices; got {device_type} {dtype} and {index_dtype}")
        return TORCH_BACKEND
    if forced == "native":
        kernels.load()
        return NATIVE_BACKEND
    if kernels.is_available():
        return NATIVE_BACKEND
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(f"actuallysparse: the compiled CPU kernels are unavailable ({kernels.load_error_summary()}); "
                      f"sparse layers use the slower torch backend. Install a C++ compiler (g++ or clang) and "
                      f"ninja to build them, or set {BACKEND_VARIABLE}=torch to choose that backend "
                      f"without this warning.", RuntimeWarning, stacklevel=4)
    return TORCH_BACKEND


# ---------------------------------------------------------------- autograd
# A layer's output is bilinear in its input and its values: y = P(x, v) (+ bias). Its two
# gradients are bilinear too, and each one's derivatives are again the three products:
#   P(x, v)           d/dx: I(g, v)   d/dv: V(g, x)
#   I(g, v) = dy W    d/dg: P(u, v)   d/dv: V(g, u)
#   V(g, x) = dW|nnz  d/dg: P(x, u)   d/dx: I(g, u)
# (u is the gradient arriving at that product's output). So three Functions whose backwards call
# each other give every order of derivative, on every backend, from the first-order kernels:
# double backward, gradient penalties and Hessian-vector products are exact, not silently zero.
# Forward-mode AD (jvp) follows from bilinearity alone: dP = P(dx, v) + P(x, dv).

@dataclass(frozen=True, eq=False)
class LinearProducts:
    """The three products of a sparse linear layer on one backend and one pattern."""

    backend: Backend
    crow: Tensor
    col: Tensor
    transposed: TransposedPattern | None
    shape: tuple[int, int]

    def apply(self, x: Tensor, values: Tensor, bias: Tensor | None = None) -> Tensor:
        return self.backend.forward(x, values, bias, self.crow, self.col, self.shape[0])

    def input_grad(self, grad_out: Tensor, values: Tensor, x_shape: torch.Size) -> Tensor:
        t_crow, t_col, perm = _transposed_parts(self.transposed)
        return self.backend.grad_input(grad_out, values, self.crow, self.col, t_crow, t_col, perm, self.shape[1])

    def value_grad(self, grad_out: Tensor, x: Tensor) -> Tensor:
        return self.backend.grad_values(grad_out, x, self.crow, self.col)

    def both_grads(self, grad_out: Tensor, x: Tensor, values: Tensor, need_input: bool, need_values: bool):
        t_crow, t_col, perm = _transposed_parts(self.transposed)
        return self.backend.backward(grad_out, x, values, self.crow, self.col, t_crow, t_col, perm,
                                     need_input, need_values)

    @staticmethod
    def bias_grad(grad_out: Tensor) -> Tensor:
        return grad_out.sum(0)

    @staticmethod
    def broadcast_bias(bias: Tensor) -> Tensor:
        return bias


@dataclass(frozen=True, eq=False)
class ConvProducts:
    """The three products of a sparse convolution on one backend, one pattern and one geometry."""

    backend: Backend
    crow: Tensor
    col: Tensor
    out_channels: int
    geometry: tuple[int, ...]
    transposed: TransposedPattern | None = None

    def apply(self, x: Tensor, values: Tensor, bias: Tensor | None = None) -> Tensor:
        return self.backend.conv_forward(x, values, bias, self.crow, self.col, self.out_channels, self.geometry)

    def input_grad(self, grad_out: Tensor, values: Tensor, x_shape: torch.Size) -> Tensor:
        x = grad_out.new_empty(x_shape)  # only its shape is read
        return self.both_grads(grad_out, x, values, True, False)[0]

    def value_grad(self, grad_out: Tensor, x: Tensor) -> Tensor:
        values = x.new_empty(self.col.numel())  # only its shape is read
        return self.both_grads(grad_out, x, values, False, True)[1]

    def both_grads(self, grad_out: Tensor, x: Tensor, values: Tensor, need_input: bool, need_values: bool):
        return self.backend.conv_backward(grad_out, x, values, self.crow, self.col, self.geometry,
                                          need_input, need_values, self.transposed)

    @staticmethod
    def bias_grad(grad_out: Tensor) -> Tensor:
        # Over the batch first (whole planes added at once), then each channel's plane: torch's
        # one reduction over (0, 2, 3) walks 2x2 to 16x16 planes at a time. Measured (Intel Xeon,
        # VGG11's seven convolution gradients at B=64, out of cache): 3.8 ms against 2.3. Summing
        # it while the backward packs grad_out (which reads it anyway) would save at most this
        # pass: the pruned VGG11_bn's SGD step with these sums skipped altogether ran level with
        # them (same Xeon, interleaved in one process, 234.0 against 235.8 ms), so not done.
        return grad_out.sum(0).flatten(1).sum(1)

    @staticmethod
    def broadcast_bias(bias: Tensor) -> Tensor:
        return bias.view(-1, 1, 1)


def _transposed_parts(transposed: TransposedPattern | None):
    return (None, None, None) if transposed is None else (transposed.crow, transposed.col, transposed.perm)


def _added(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _product_rule(apply: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor, a_tangent: Tensor | None,
                  b_tangent: Tensor | None) -> Tensor | None:
    """The tangent of a bilinear ``apply(a, b)``: ``apply(da, b) + apply(a, db)`` (``None`` for none).

    ``apply`` goes through the Functions, not the raw products, so that an outer transform
    (``vmap``) sees their rules.
    """
    out = apply(a_tangent, b) if a_tangent is not None else None
    return _added(out, apply(a, b_tangent)) if b_tangent is not None else out


def _vmap_by_loop(function, info, in_dims, args):
    """A ``torch.func.vmap`` rule for a Function of the products: one call per batch entry.

    The kernels have no batch dimension of their own; correctness first, and the common case (only
    a layer's input batched) has a faster rule in :meth:`SparseProduct.vmap`.
    """
    outputs = []
    for i in range(info.batch_size):
        outputs.append(function.apply(*(arg.select(dim, i) if isinstance(arg, Tensor) and dim is not None else arg
                                        for arg, dim in zip(args, in_dims))))
    return torch.stack(outputs), 0


class SparseProduct(torch.autograd.Function):
    """``y = P(x, values) + bias``: a sparse layer's output (:class:`LinearProducts` or :class:`ConvProducts`)."""

    @staticmethod
    def forward(x, values, bias, products):  # noqa: D102
        # A view returned from a custom Function may not be modified in place later (an
        # in-place ReLU after the layer would fail), so return a tensor of its own.
        return products.apply(x, values, bias).contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D102
        x, values, bias, products = inputs
        ctx.save_for_backward(x, values)
        ctx.save_for_forward(x, values)
        ctx.products = products

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, values = ctx.saved_tensors
        products = ctx.products
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: the gradients must be differentiable themselves
            return *differentiable_gradients(grad_out, x, values, products, *needs), None
        # first order only: both gradients in one call (the native kernels pack grad_out once)
        grad_x, grad_values = products.both_grads(grad_out, x, values, needs[0], needs[1])
        return grad_x, grad_values, products.bias_grad(grad_out) if needs[2] else None, None

    @staticmethod
    def vmap(info, in_dims, x, values, bias, products):  # noqa: D102
        if in_dims[1] is None and in_dims[2] is None:  # only the input is batched: fold it into the batch
            x = x.movedim(in_dims[0], 0)
            out = SparseProduct.apply(x.flatten(0, 1), values, bias, products)
            return out.unflatten(0, x.shape[:2]), 0
        return _vmap_by_loop(SparseProduct, info, in_dims, (x, values, bias, products))

    @staticmethod
    def jvp(ctx, x_tangent, values_tangent, bias_tangent, _):  # noqa: D102
        x, values = ctx.saved_tensors
        products = ctx.products
        out = _product_rule(lambda a, b: SparseProduct.apply(a, b, None, products), x, values, x_tangent,
                            values_tangent)
        if bias_tangent is not None:
            out = _added(out, products.broadcast_bias(bias_tangent))
        return out


def differentiable_gradients(grad_out: Tensor, x: Tensor, values: Tensor, products, need_input: bool,
                             need_values: bool, need_bias: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(grad_x, grad_values, grad_bias)`` of a sparse layer as differentiable functions of
    ``grad_out``, ``x`` and ``values`` (what a backward with ``create_graph`` returns); ``None``
    for a gradient not needed."""
    return (InputGrad.apply(grad_out, values, x.shape, products) if need_input else None,
            ValueGrad.apply(grad_out, x, products) if need_values else None,
            products.bias_grad(grad_out) if need_bias else None)


class InputGrad(torch.autograd.Function):
    """``dx = I(grad_out, values)``: the input gradient of a sparse layer, differentiable again."""

    @staticmethod
    def forward(grad_out, values, x_shape, products):  # noqa: D102
        return products.input_grad(grad_out, values, x_shape).contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D102
        grad_out, values, x_shape, products = inputs
        ctx.save_for_backward(grad_out, values)
        ctx.save_for_forward(grad_out, values)
        ctx.x_shape = x_shape
        ctx.products = products

    @staticmethod
    def backward(ctx, upstream):  # noqa: D102
        grad_out, values = ctx.saved_tensors
        products = ctx.products
        d_grad_out = SparseProduct.apply(upstream, values, None, products) if ctx.needs_input_grad[0] else None
        d_values = ValueGrad.apply(grad_out, upstream, products) if ctx.needs_input_grad[1] else None
        return d_grad_out, d_values, None, None

    @staticmethod
    def vmap(info, in_dims, grad_out, values, x_shape, products):  # noqa: D102
        return _vmap_by_loop(InputGrad, info, in_dims, (grad_out, values, x_shape, products))

    @staticmethod
    def jvp(ctx, grad_out_tangent, values_tangent, _, __):  # noqa: D102
        grad_out, values = ctx.saved_tensors
        return _product_rule(lambda a, b: InputGrad.apply(a, b, ctx.x_shape, ctx.products), grad_out, values,
                             grad_out_tangent, values_tangent)


class ValueGrad(torch.autograd.Function):
    """``dv = V(grad_out, x)``: the gradient of each stored weight, differentiable again."""

    @staticmethod
    def forward(grad_out, x, products):  # noqa: D102
        return products.value_grad(grad_out, x)

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D102
        grad_out, x, products = inputs
        ctx.save_for_backward(grad_out, x)
        ctx.save_for_forward(grad_out, x)
        ctx.products = products

    @staticmethod
    def backward(ctx, upstream):  # noqa: D102
        grad_out, x = ctx.saved_tensors
        products = ctx.products
        d_grad_out = SparseProduct.apply(x, upstream, None, products) if ctx.needs_input_grad[0] else None
        d_x = InputGrad.apply(grad_out, upstream, x.shape, products) if ctx.needs_input_grad[1] else None
        return d_grad_out, d_x, None

    @staticmethod
    def vmap(info, in_dims, grad_out, x, products):  # noqa: D102
        return _vmap_by_loop(ValueGrad, info, in_dims, (grad_out, x, products))

    @staticmethod
    def jvp(ctx, grad_out_tangent, x_tangent, _):  # noqa: D102
        grad_out, x = ctx.saved_tensors
        return _product_rule(lambda a, b: ValueGrad.apply(a, b, ctx.products), grad_out, x, grad_out_tangent,
                             x_tangent)


# ---------------------------------------------------------------- custom operators
# The same products as PyTorch operators, so torch.compile(fullgraph=True) sees one opaque call
# per layer (no graph break) and torch.export records it in the graph. The fake
# implementations give shapes only; autograd is registered on the forward operator. Eager
# calls skip them (their dispatch costs ~20-45 us, a few per cent of a batch-1 layer).

@torch.library.custom_op("actuallysparse::linear", mutates_args=())
def linear_op(x: Tensor, values: Tensor, bias: Optional[Tensor], crow: Tensor, col: Tensor,
              t_crow: Optional[Tensor], t_col: Optional[Tensor], perm: Optional[Tensor],
              out_features: int) -> Tensor:
    """``x @ W.T + bias`` as an operator; ``t_crow, t_col, perm`` are kept for its backward."""
    return backend_for(x, crow).forward(x, values, bias, crow, col, out_features).contiguous()


@linear_op.register_fake
def _linear_fake(x, values, bias, crow, col, t_crow, t_col, perm, out_features):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("actuallysparse::linear_backward", mutates_args=())
def linear_backward_op(grad_out: Tensor, x: Tensor, values: Tensor, crow: Tensor, col: Tensor,
                       t_crow: Optional[Tensor], t_col: Optional[Tensor], perm: Optional[Tensor],
                       need_input: bool, need_values: bool) -> tuple[Tensor, Tensor]:
    """``(grad_input, grad_values)`` as an operator; a gradient not needed comes back empty."""
    grad_x, grad_values = backend_for(x, crow).backward(grad_out, x, values, crow, col, t_crow, t_col, perm,
                                                        need_input, need_values)
    return (grad_x.contiguous() if grad_x is not None else x.new_empty(0),
            grad_values if grad_values is not None else values.new_empty(0))


@linear_backward_op.register_fake
def _linear_backward_fake(grad_out, x, values, crow, col, t_crow, t_col, perm, need_input, need_values):
    return (x.new_empty(x.shape) if need_input else x.new_empty(0),
            values.new_empty(values.shape) if need_values else values.new_empty(0))


def _linear_setup_context(ctx, inputs, output):
    x, values, bias, crow, col, t_crow, t_col, perm, _ = inputs
    ctx.save_for_backward(x, values, crow, col, t_crow, t_col, perm)


def _linear_backward(ctx, grad_out):
    x, values, crow, col, t_crow, t_col, perm = ctx.saved_tensors
    need_input, need_values, need_bias = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled() and not _traced(grad_out):
        # create_graph on an eagerly run graph (an exported program, say): differentiable gradients
        transposed = None if t_crow is None else TransposedPattern(t_crow, t_col, perm)
        products = LinearProducts(backend_for(x, crow), crow, col, transposed, (grad_out.shape[1], x.shape[1]))
        return (*differentiable_gradients(grad_out, x, values, products, need_input, need_values, need_bias),
                None, None, None, None, None, None)
    grad_x, grad_values = torch.ops.actuallysparse.linear_backward(
        grad_out, x, values, crow, col, t_crow, t_col, perm, need_input, need_values)
    grad_bias = grad_out.sum(0) if need_bias else None
    return (grad_x if need_input else None, grad_values if need_values else None, grad_bias,
            None, None, None, None, None, None)


linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def _computes_in_float32(x: Tensor) -> bool:
    """float16 and bfloat16 on the CPU compute in float32 and round the result back: neither
    backend has half-precision CPU products (torch's CSR multiply refuses them), and float32
    accumulation is what a half-precision layer wants anyway. The layer still stores half values."""
    return x.dtype in HALF_DTYPES and x.device.type == "cpu"


def _needs_autograd(x: Tensor, values: Tensor, bias: Tensor | None) -> bool:
    """Whether a product must run as an autograd Function: a gradient is wanted (backward or
    forward mode) or a ``torch.func`` transform is active; otherwise the plain call is cheaper."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    tensors = (x, values) if bias is None else (x, values, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    # Tangents live only inside a dual level; outside one, the three lookups (a fifth of a small
    # layer's call) are skipped. Without torch's level counter every call looks them up.
    if getattr(forward_ad, "_current_level", 0) < 0:
        return False
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def eager_reverse_mode_only(*tensors: Tensor | None) -> bool:
    """True when only eager reverse-mode autograd can reach ``tensors``: no ``torch.func`` transform
    is active, none carries a forward-mode tangent, and no compiler or exporter traces them. There
    a Function with a first-order backward (and a differentiable fallback for create_graph) is exact."""
    present = [t for t in tensors if t is not None]
    return (torch._C._functorch.peek_interpreter_stack() is None and not any(_traced(t) for t in present)
            and all(forward_ad.unpack_dual(t).tangent is None for t in present))


def runs_natively(x: Tensor, *others: Tensor | None) -> bool:
    """True where an operation on ``x`` (and ``others``, ``None`` skipped) can run on the native
    kernels with a first-order Function: ``x`` goes to the native backend, the others share its
    dtype and device and are contiguous, and only eager reverse-mode autograd can reach them
    (:func:`eager_reverse_mode_only`)."""
    if backend_for(x) is not NATIVE_BACKEND:
        return False
    present = [t for t in others if t is not None]
    return (all(t.dtype == x.dtype and t.device == x.device and t.is_contiguous() for t in present)
            and eager_reverse_mode_only(x, *present))


def _traced(x: Tensor) -> bool:
    """True while torch.compile or torch.export traces (fake or functional tensors, or dynamo)."""
    return torch.compiler.is_compiling() or (type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter))


def sparse_linear(
    x: Tensor,
    values: Tensor,
    bias: Tensor | None,
    crow: Tensor,
    col: Tensor,
    shape: tuple[int, int],
    transposed: TransposedPattern | Callable[[], TransposedPattern] | None = None,
) -> Tensor:
    """Apply a sparse linear map to a 2-D input ``x`` of shape ``(batch, in_features)``.

    Args:
        x: dense input, ``(batch, in_features)``.
        values: the ``nnz`` non-zeros of ``W`` in row-major order.
        bias: ``(out_features,)`` or ``None``.
        crow, col: CSR pattern of ``W`` (int32 or int64 row pointers; columns of that type or int16).
        shape: ``(out_features, in_features)``.
        transposed: cached pattern of ``W.T``, or a function returning it (called in eager
            mode only, and only for a backend that reads it: while torch.compile or torch.export
            trace, the pattern is left out of the graph and the torch backend builds it in
            backward); built on the fly when missing.

    Returns:
        ``(batch, out_features)``, equal to ``F.linear(x, W_dense, bias)``.
    """
    if _computes_in_float32(x):
        out = sparse_linear(x.float(), values.float(), None if bias is None else bias.float(), crow, col, shape,
                            transposed)
        return out.to(x.dtype)
    if _traced(x):
        t_crow, t_col, perm = (None, None, None) if transposed is None or callable(transposed) else (
            transposed.crow, transposed.col, transposed.perm)
        return torch.ops.actuallysparse.linear(x, values, bias, crow, col, t_crow, t_col, perm, shape[0])
    backend = backend_for(x, crow)
    if callable(transposed):
        transposed = transposed() if backend.uses_transposed else None
    if not _needs_autograd(x, values, bias):
        return backend.forward(x, values, bias, crow, col, shape[0])
    return SparseProduct.apply(x, values, bias, LinearProducts(backend, crow, col, transposed, tuple(shape)))


@torch.library.custom_op("actuallysparse::conv2d", mutates_args=())
def conv2d_op(x: Tensor, values: Tensor, bias: Optional[Tensor], crow: Tensor, col: Tensor, out_channels: int,
              geometry: list[int]) -> Tensor:
    """``conv2d(x, W) + bias`` as an operator (see :data:`CONV_GEOMETRY_FIELDS` for ``geometry``)."""
    return backend_for(x, crow).conv_forward(x, values, bias, crow, col, out_channels, tuple(geometry))


def conv_output_size(size: int, kernel: int, stride: int, dilation: int, pad_before: int, pad_after: int) -> int:
    """Output length of a convolution along one axis."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


@conv2d_op.register_fake
def _conv2d_fake(x, values, bias, crow, col, out_channels, geometry):
    kh, kw, sh, sw, dh, dw, top, bottom, left, right = geometry
    return x.new_empty(x.shape[0], out_channels, conv_output_size(x.shape[2], kh, sh, dh, top, bottom),
                       conv_output_size(x.shape[3], kw, sw, dw, left, right))


@torch.library.custom_op("actuallysparse::conv2d_backward", mutates_args=())
def conv2d_backward_op(grad_out: Tensor, x: Tensor, values: Tensor, crow: Tensor, col: Tensor, geometry: list[int],
                       need_input: bool, need_values: bool) -> tuple[Tensor, Tensor]:
    """``(grad_input, grad_values)`` of a sparse convolution; a gradient not needed comes back empty."""
    grad_x, grad_values = backend_for(x, crow).conv_backward(grad_out, x, values, crow, col, tuple(geometry),
                                                             need_input, need_values)
    return (grad_x if grad_x is not None else x.new_empty(0),
            grad_values if grad_values is not None else values.new_empty(0))


@conv2d_backward_op.register_fake
def _conv2d_backward_fake(grad_out, x, values, crow, col, geometry, need_input, need_values):
    return (x.new_empty(x.shape) if need_input else x.new_empty(0),
            values.new_empty(values.shape) if need_values else values.new_empty(0))


def _conv2d_setup_context(ctx, inputs, output):
    x, values, bias, crow, col, out_channels, geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(x, values, crow, col)


def _conv2d_backward(ctx, grad_out):
    x, values, crow, col = ctx.saved_tensors
    need_input, need_values, need_bias = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled() and not _traced(grad_out):
        # create_graph on an eagerly run graph (an exported program, say): differentiable gradients
        products = ConvProducts(backend_for(x, crow), crow, col, grad_out.shape[1], tuple(ctx.geometry))
        return (*differentiable_gradients(grad_out, x, values, products, need_input, need_values, need_bias),
                None, None, None, None)
    grad_x, grad_values = torch.ops.actuallysparse.conv2d_backward(
        grad_out, x, values, crow, col, ctx.geometry, need_input, need_values)
    grad_bias = ConvProducts.bias_grad(grad_out) if need_bias else None
    return (grad_x if need_input else None, grad_values if need_values else None, grad_bias,
            None, None, None, None)


conv2d_op.register_autograd(_conv2d_backward, setup_context=_conv2d_setup_context)


def sparse_conv2d(x: Tensor, values: Tensor, bias: Tensor | None, crow: Tensor, col: Tensor, out_channels: int,
                  geometry: tuple[int, ...],
                  transposed: TransposedPattern | Callable[[], TransposedPattern] | None = None,
                  offsets: Callable[[Callable[..., Tensor], int, int], Tensor] | None = None,
                  relu: bool = False, pool: bool = False) -> Tensor:
    """Apply a sparse 2-D convolution to a 4-D input ``(batch, in_channels, height, width)``.

    Args:
        x: dense input.
        values: the non-zeros of the weight matrix ``(out_channels, in_channels * kh * kw)``,
            row-major.
        bias: ``(out_channels,)`` or ``None``.
        crow, col: CSR pattern of that matrix.
        out_channels: rows of the matrix.
        geometry: ten integers, :data:`CONV_GEOMETRY_FIELDS`.
        transposed: cached :func:`conv_transpose_pattern` of the pattern, or a function returning
            it (called in eager mode only, and only for a backend that reads it). With it the
            native backend computes a stride-1 layer's input gradient as a forward convolution;
            without it the input gradient is scattered (the same numbers, slower).
        offsets: a function ``(build, height, width)`` returning the input offsets for an input
            of that size, from a cache or made by ``build(col, in_channels, height, width,
            geometry)`` (:func:`~actuallysparse.kernels.conv_offsets`). Called in eager mode
            without a graph, and only for a backend that reads offsets; spares each call the pass
            that computes them.
        relu: return ``relu(conv2d(x, W) + bias)``; without a graph the forward writes it so
            (no second pass over the output), otherwise a ReLU follows the product.
        pool: return the 2x2, stride-2 max-pool of that (``F.max_pool2d(out, 2)``); without a
            graph the native forward pools as it writes where the batch fills its vectors (the
            full-size output is never stored), otherwise the pooling follows.

    Returns:
        ``(batch, out_channels, out_h, out_w)``, equal to ``F.conv2d`` with the dense weight
        (followed by ``F.relu`` with ``relu``), or ``(batch, out_channels, out_h // 2, out_w // 2)``
        with ``pool``.
    """
    if _computes_in_float32(x):
        out = sparse_conv2d(x.float(), values.float(), None if bias is None else bias.float(), crow, col,
                            out_channels, geometry, transposed, relu=relu, pool=pool)
        return out.to(x.dtype)
    if _traced(x):
        out = torch.ops.actuallysparse.conv2d(x, values, bias, crow, col, out_channels, list(geometry))
        return _relu_pool(out, relu, pool)
    backend = backend_for(x, crow)
    if not _needs_autograd(x, values, bias):
        cached = {}
        if offsets is not None and backend.conv_offsets is not None:
            cached["offsets"] = offsets(backend.conv_offsets, x.shape[2], x.shape[3])
        return backend.conv_forward(x, values, bias, crow, col, out_channels, geometry, relu=relu, pool=pool,
                                    **cached)
    if callable(transposed):
        transposed = transposed() if backend.conv_uses_transposed else None
    out = SparseProduct.apply(x, values, bias, ConvProducts(backend, crow, col, out_channels, tuple(geometry),
                                                            transposed))
    return _relu_pool(out, relu, pool)


def _relu_pool(out: Tensor, relu: bool, pool: bool) -> Tensor:
    """What a convolution with a fused ReLU or pooling returns when they follow the product."""
    out = F.relu(out) if relu else out
    return F.max_pool2d(out, 2) if pool else out
