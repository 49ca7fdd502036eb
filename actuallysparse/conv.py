"""``SparseConv2d``: a drop-in for ``nn.Conv2d`` that stores only its non-zero weights."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from actuallysparse.functional import (InputOffsets, TransposedPattern, conv_output_size, conv_transpose_pattern,
                                       sparse_conv2d)
from actuallysparse.storage import SparseModule, check_k, check_positive, column_dtype_for

PADDING_STRINGS = ("same", "valid")
_GEOMETRY_ATTRIBUTES = frozenset({"kernel_size", "stride", "padding", "dilation"})


def _pair(name: str, value, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (each >= ``minimum``) as a pair, else ``ValueError`` naming ``name``."""
    pair = (value, value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum for v in pair)):
        low = "non-negative" if minimum == 0 else "positive"
        raise ValueError(f"{name} must be a {low} integer or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _output_size(geometry: tuple[int, ...], height: int, width: int) -> tuple[int, int]:
    """``(H_out, W_out)`` of a convolution of ``geometry`` (:meth:`SparseConv2d.geometry`) on ``height x width``."""
    kh, kw, sh, sw, dh, dw, top, bottom, left, right = geometry
    return conv_output_size(height, kh, sh, dh, top, bottom), conv_output_size(width, kw, sw, dw, left, right)


class SparseConv2d(SparseModule):
    r"""A 2-D convolution whose weight holds only its non-zeros.

    The weight ``(out_channels, in_channels, kh, kw)`` is stored as a matrix of
    ``out_channels`` rows and ``in_channels * kh * kw`` columns (column ``c * kh * kw + i * kw + j``
    for tap ``(i, j)`` of input channel ``c``), of which only the non-zeros are kept: ``values``,
    its gradient and any optimizer state have exactly ``nnz`` entries. Forward and backward run
    directly on the sparse weight (no im2col matrix; see :mod:`actuallysparse.functional`).
    Pruning, format switches, ``state_dict`` and the optimizer remapping are those of
    :class:`~actuallysparse.layers.SparseLayer`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as in
            ``nn.Conv2d``; ``padding`` is an int, a pair, ``"same"`` or ``"valid"``.
        groups: only ``1``; anything else raises ``ValueError``.
        padding_mode: only ``"zeros"``; anything else raises ``ValueError``.
        csr_mode, train_mode, k: as in :class:`~actuallysparse.layers.SparseLayer`.

    Shape:
        - Input: ``(N, in_channels, H, W)`` or ``(in_channels, H, W)``.
        - Output: ``(N, out_channels, H_out, W_out)`` or ``(out_channels, H_out, W_out)``.

    Example::

        >>> conv = SparseConv2d(3, 8, 3, padding=1)
        >>> conv
        SparseConv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), csr_mode=False, k=0.05)
        >>> conv(torch.ones(2, 3, 5, 5)).shape
        torch.Size([2, 8, 5, 5])

    In evaluation mode, on the native kernels and without a graph, the layer keeps where each
    non-zero reads its input for the last input size (2 bytes a non-zero, counted by
    :func:`~actuallysparse.memory.stored_bytes` as a cache), so repeated calls skip that pass;
    ``train()`` drops it.

    Attributes:
        fused_relu: return ``relu(conv2d(x, W) + b)``, written so by the forward where no graph
            is recorded (one pass fewer over the output). :func:`~actuallysparse.fusion.fuse_batchnorm`
            sets it where it folds a norm that computed the ReLU after it; ``False`` by default.
        fused_pool: return the 2x2, stride-2 max-pool of that output (``F.max_pool2d(out, 2)``,
            half the height and width), pooled by the native forward as it writes where no graph
            is recorded and the batch fills its vectors (the full-size output is never stored).
            :func:`~actuallysparse.fusion.fuse_pooling` sets it; ``False`` by default.
    """

    _INFERENCE_CACHES = ("_offsets",)
    _offsets: InputOffsets | None = None
    _geometry: tuple[int, ...] | None = None
    fused_relu = False
    fused_pool = False

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in _GEOMETRY_ATTRIBUTES:
            # what the products take, and the offsets made from it, follow a new setting
            self._geometry = None
            self._offsets = None

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", csr_mode=False, train_mode=True, k=0.05, *, device=None,
                 dtype=None):
        super().__init__()
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        check_k(k)
        factory = {"device": device, "dtype": dtype}
        # nn.Conv2d's initialisation: kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        dense = torch.empty(self._matrix_shape, **factory).uniform_(-bound, bound)
        rows, cols = torch.nonzero(dense, as_tuple=True)
        bias_values = torch.empty(self.out_channels, **factory).uniform_(-bound, bound) if bias else None
        self._init_storage(rows, cols, dense[rows, cols], bias_values, csr_mode, k, train_mode)

    @classmethod
    def from_entries(cls, in_channels: int, out_channels: int, kernel_size, rows: Tensor, cols: Tensor,
                     values: Tensor, bias: Tensor | None = None, *, stride=1, padding=0, dilation=1, groups=1,
                     padding_mode="zeros", csr_mode: bool = False, k: float = 0.05) -> "SparseConv2d":
        """Build a convolution from the non-zeros of its weight matrix, without a dense intermediate.

        Args:
            rows: output channel of each non-zero.
            cols: its column ``c * kh * kw + i * kw + j`` (input channel ``c``, tap ``(i, j)``).
            values: the non-zeros; they set dtype and device.
            The others as in the constructor.
        """
        conv = cls.__new__(cls)
        nn.Module.__init__(conv)
        conv._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        conv._init_storage(rows, cols, values, bias, csr_mode, k)
        return conv

    def _set_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                      padding_mode) -> None:
        self.in_channels = check_positive("in_channels", in_channels)
        self.out_channels = check_positive("out_channels", out_channels)
        self.kernel_size = _pair("kernel_size", kernel_size, minimum=1)
        self.stride = _pair("stride", stride, minimum=1)
        self.dilation = _pair("dilation", dilation, minimum=1)
        if isinstance(groups, bool) or groups != 1:
            raise ValueError(f"SparseConv2d supports groups=1 only, got groups={groups!r}")
        if padding_mode != "zeros":
            raise ValueError(f"SparseConv2d supports padding_mode='zeros' only, got padding_mode={padding_mode!r}")
        self.groups = 1
        self.padding_mode = "zeros"
        if isinstance(padding, str):
            if padding not in PADDING_STRINGS:
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1 (as in nn.Conv2d), got stride={self.stride}")
            self.padding = padding
        else:
            self.padding = _pair("padding", padding, minimum=0)

    @property
    def _matrix_shape(self) -> tuple[int, int]:
        return self.out_channels, self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    @property
    def _dense_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels) + tuple(self.kernel_size)

    def _padding_sides(self) -> tuple[int, int, int, int]:
        """Padding as (top, bottom, left, right); ``"same"`` puts the odd one after, as torch does."""
        if self.padding == "valid":
            return 0, 0, 0, 0
        if self.padding == "same":
            sides = []
            for kernel, dilation in zip(self.kernel_size, self.dilation):
                total = dilation * (kernel - 1)
                sides += [total // 2, total - total // 2]
            return tuple(sides)
        return self.padding[0], self.padding[0], self.padding[1], self.padding[1]

    def _transposed_pattern(self) -> TransposedPattern:
        """The cached pattern of the weight transposed over channels, taps flipped
        (:func:`~actuallysparse.functional.conv_transpose_pattern`), built when missing; dropped
        with every change of pattern or device and by ``eval()``, as the linear layer's is."""
        if self._transposed is None:
            crow, col = self._pattern()
            taps = self.kernel_size[0] * self.kernel_size[1]
            self._transposed = conv_transpose_pattern(
                crow, col, self.in_channels, taps, column_dtype_for(self.in_channels, self.out_channels * taps, True))
        return self._transposed

    def _input_offsets(self, build, height: int, width: int) -> Tensor:
        """Where each non-zero reads a ``height x width`` input (``build``: the backend's
        ``conv_offsets``), cached for the last input size while in evaluation mode: at one image
        the pass that makes them costs a large share of the product. The cache holds 2 bytes a
        non-zero (4 for an input of more than 65536 padded rows over all channels); ``train()``
        drops it, as does every change of pattern or device."""
        cache = self._offsets
        if cache is None or (cache.height, cache.width) != (height, width):
            cache = InputOffsets(height, width, build(self._pattern()[1], self.in_channels, height, width,
                                                      self.geometry()))
            self._offsets = cache
        return cache.offsets

    def geometry(self) -> tuple[int, ...]:
        """The ten integers the products take: kernel, stride, dilation, padding (top, bottom, left, right).

        Kept until one of those settings changes: every call needs it, and building it took
        half a microsecond, a few % of a small layer's call for one image."""
        if self._geometry is None:
            self._geometry = tuple(self.kernel_size) + tuple(self.stride) + tuple(self.dilation) + self._padding_sides()
        return self._geometry

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H_out, W_out)`` for an input of ``height x width``."""
        return _output_size(self.geometry(), height, width)

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding!r}" if isinstance(self.padding, str) else f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        text += f", csr_mode={self.csr_mode}, k={self.k}"
        text += ", fused_relu=True" if self.fused_relu else ""
        return text + (", fused_pool=True" if self.fused_pool else "")

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"SparseConv2d expects a torch.Tensor input, got {type(input).__name__}")
        if input.dim() not in (3, 4) or input.shape[-3] != self.in_channels:
            raise ValueError(f"SparseConv2d expects (N, {self.in_channels}, H, W) or ({self.in_channels}, H, W) "
                             f"input, got shape {tuple(input.shape)}")
        values, bias = self._operands()
        if input.dtype != values.dtype:
            raise TypeError(f"input dtype {input.dtype} does not match the layer's {values.dtype}; "
                            f"convert one of them with .to()")
        x = input.unsqueeze(0) if input.dim() == 3 else input
        geometry = self.geometry()
        kh, kw, _, _, dh, dw, top, bottom, left, right = geometry
        if x.shape[2] + top + bottom <= dh * (kh - 1) or x.shape[3] + left + right <= dw * (kw - 1):
            for name, size, span, pad in (("height", x.shape[2], dh * (kh - 1) + 1, top + bottom),
                                          ("width", x.shape[3], dw * (kw - 1) + 1, left + right)):
                if size + pad < span:
                    raise ValueError(f"input {name} {size} (padded {size + pad}) is smaller than the dilated "
                                     f"kernel's {span} (input shape {tuple(input.shape)})")
        if self.fused_pool:
            out_h, out_w = _output_size(geometry, x.shape[2], x.shape[3])
            if min(out_h, out_w) < 2:
                raise ValueError(f"this layer pools 2x2 windows of its output (fused_pool), which is {out_h}x{out_w} "
                                 f"for input shape {tuple(input.shape)}; it needs at least 2x2")
        crow, col = self._pattern()
        # the input gradient's pattern, built once per pattern, only where a backward will read it
        transposed = self._transposed_pattern if (torch.is_grad_enabled() and x.requires_grad) else None
        offsets = None if self.training else self._input_offsets
        out = sparse_conv2d(x, values, bias, crow, col, self.out_channels, geometry, transposed, offsets,
                            relu=self.fused_relu, pool=self.fused_pool)
        return out.squeeze(0) if input.dim() == 3 else out
