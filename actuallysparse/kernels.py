"""The compiled CPU kernels: built from ``actuallysparse/csrc`` on first use, never at import.

Plain functions with the same signatures as the pure-torch path in
:mod:`actuallysparse.functional`:

* :func:`forward` ``(x, values, bias, crow, col, out_features) -> y``, ``y = x W^T + b``;
* :func:`grad_input` ``(grad_out, values, crow, col, t_crow, t_col, perm, in_features) -> dx = dy W``,
  scattered through ``W``'s own rows, so the values are read in their stored order and the
  transposed pattern (``t_crow, t_col, perm``, which the torch backend needs) goes unused;
* :func:`grad_values` ``(grad_out, x, crow, col) -> dv``, ``dv[k] = sum_b dy[b, row_k] x[b, col_k]``;
* :func:`backward` ``(grad_out, x, values, crow, col, t_crow, t_col, perm, need_input, need_values)``:
  whichever of the two gradients are needed, in one call;
* :func:`conv_forward` and :func:`conv_backward`: the same for a direct sparse 2-D convolution
  (``csrc/conv_impl.h``);
* :func:`max_pool2x2` and :func:`max_pool2x2_backward`: 2x2, stride-2 max pooling (``csrc/pooling.cpp``);
* :func:`batch_norm_train` and :func:`batch_norm_train_backward`: training-mode batch
  normalisation of 4-D inputs (``csrc/normalization.cpp``); :func:`batch_norm_pool_train` and
  its backward, the same with the output max-pooled as it is computed;
* :func:`dropout` and :func:`dropout_backward`: dropout with its mask drawn by a counter-based
  generator from a given seed, on every thread (``csrc/dropout.cpp``).

They take float32 or float64 CPU tensors and int32 indices. The sources are compiled by
``torch.utils.cpp_extension`` (ninja) into torch's extension cache (``TORCH_EXTENSIONS_DIR``
when set, else ``~/.cache/torch_extensions``); the first call builds them (about a minute on two
cores), later processes load the cached library. The instruction set is the best the CPU has
(``avx512``, ``avx2`` or ``scalar``) unless the environment variable ``ACTUALLYSPARSE_ISA``
names one; with ``avx512``, a convolution of one image whose output fits one AVX2 vector (a 2x2
output) runs AVX2's kernel, which is faster there. Threads follow ``torch.get_num_threads()``.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import threading
from pathlib import Path

import torch
from torch import Tensor

ISA_VARIABLE = "ACTUALLYSPARSE_ISA"
ISAS = ("avx512", "avx2", "scalar")
SOURCE_DIR = Path(__file__).with_name("csrc")
SOURCES = ("bindings.cpp", "kernels_scalar.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp", "pooling.cpp",
           "normalization.cpp", "dropout.cpp")
EXTENSION_NAME = "actuallysparse_kernels"


def _build_name() -> str:
    """The extension's name in the cache, tagged with a digest of every source and header.

    torch rebuilds when a listed source changes, but not when only a header does; the digest
    makes any change to ``csrc`` a new build instead of a stale library.
    """
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"{EXTENSION_NAME}_{digest.hexdigest()[:12]}"

_lock = threading.Lock()
_loaded = False
_load_error: Exception | None = None


def load() -> None:
    """Build (first time) and load the kernels; raise ``RuntimeError`` saying why when that fails."""
    global _loaded, _load_error
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        if _load_error is not None:
            raise RuntimeError(f"the compiled kernels could not be built: {_load_error}") from _load_error
        try:
            # On a CUDA build of torch without a GPU, importing cpp_extension logs "No CUDA runtime
            # is found": true and irrelevant for CPU kernels, so it is kept out of users' output.
            extension_logger = logging.getLogger("torch.utils.cpp_extension")
            level = extension_logger.level
            extension_logger.setLevel(logging.ERROR)
            try:
                from torch.utils import cpp_extension
            finally:
                extension_logger.setLevel(level)

            cpp_extension.load(
                name=_build_name(),
                sources=[str(SOURCE_DIR / name) for name in SOURCES],
                extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
        except Exception as error:  # no compiler, no ninja, a failed build: all mean "not available"
            _load_error = error
            raise RuntimeError(f"the compiled kernels could not be built: {error}") from error
        _loaded = True


def load_error_summary() -> str:
    """One line saying why the kernels could not be built ("" when they were)."""
    if _load_error is None:
        return ""
    lines = [line.strip() for line in str(_load_error).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors[1] if len(errors) > 1 else (errors or lines or [type(_load_error).__name__])[0])[:300]


def is_available() -> bool:
    """True once the kernels are built and loaded (builds them if needed; never raises)."""
    try:
        load()
    except RuntimeError:
        return False
    return True


def _first_cpu_fields() -> dict[str, str]:
    """The first processor's fields in Linux's ``/proc/cpuinfo`` (empty elsewhere)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name (Linux's ``/proc/cpuinfo``; ``platform.processor()`` elsewhere).

    Benchmarks print it beside every figure: speed ratios hold for one kind of CPU only.
    """
    name = _first_cpu_fields().get("model name")
    if name:
        return name
    import platform

    return platform.processor() or platform.machine()


def cpu_caches() -> str:
    """The CPU's family and model numbers and its data caches, one line (``family 26, model 2;
    L1d 48K, L2 1024K, L3 32768K``, each cache's size as Linux's sysfs gives it for the first
    CPU), or ``""`` where Linux does not say.

    "AMD EPYC" names several generations whose kernels' speed differs with the cache that holds
    a tile (Zen 3 has 512 KiB of L2 a core, Zen 4 and Zen 5 1 MiB): benchmarks print this beside
    the model name.
    """
    fields = _first_cpu_fields()
    numbers = [f"{name} {fields[key]}" for key, name in (("cpu family", "family"), ("model", "model")) if key in fields]
    caches = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            caches.append(f"L{level}{'d' if kind == 'Data' else ''} {size}")
    return "; ".join(", ".join(part) for part in (numbers, caches) if part)


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """The instruction sets this CPU can run, best first (loads the kernels; asked once, as every
    product needs it and the answer cannot change)."""
    return tuple(isa for isa in ISAS if _ops().isa_supported(isa))


def isa() -> str:
    """The instruction set the kernels use: ``ACTUALLYSPARSE_ISA`` if set, else the best available.

    The kernels themselves read the variable at every call (``getenv``, a few dozen nanoseconds
    against 0.6 us for ``os.environ``), so this asks them, and a change to ``os.environ`` takes
    effect at the next product.

    Raises:
        ValueError: the variable names no instruction set.
        RuntimeError: it names one this CPU does not support.
    """
    return _ops().chosen_isa("")


def _ops():
    load()
    return torch.ops.actuallysparse_kernels


def forward(x: Tensor, values: Tensor, bias: Tensor | None, crow: Tensor, col: Tensor,
            out_features: int) -> Tensor:
    """``x @ W.T + bias`` for ``W`` given by its CSR pattern and values; ``x`` is ``(batch, in)``."""
    return _ops().spmm(x, values, bias, crow, col, out_features, "")


def backward(grad_out: Tensor, x: Tensor, values: Tensor, crow: Tensor, col: Tensor, t_crow: Tensor | None,
             t_col: Tensor | None, perm: Tensor | None, need_input: bool, need_values: bool
             ) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_input, grad_values)`` over ``W``'s rows, sharing the packed output gradient; ``None`` for a
    gradient not needed.

    The input gradient is scattered along ``W``'s own rows, so the values are read in their
    stored order and the transposed pattern (``t_crow, t_col, perm``) goes unused.
    """
    grad_x, grad_values = _ops().backward(grad_out, x, values, crow, col, need_input, need_values, "")
    return (grad_x if need_input else None), (grad_values if need_values else None)


def grad_input(grad_out: Tensor, values: Tensor, crow: Tensor, col: Tensor, t_crow: Tensor | None,
               t_col: Tensor | None, perm: Tensor | None, in_features: int) -> Tensor:
    """``grad_out @ W``, scattered along ``W``'s rows (the transposed pattern is not needed)."""
    x = grad_out.new_empty(grad_out.shape[0], in_features)  # only its shape is read
    return backward(grad_out, x, values, crow, col, t_crow, t_col, perm, True, False)[0]


def grad_values(grad_out: Tensor, x: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    """The gradient of each non-zero: ``sum_b grad_out[b, row_k] * x[b, col_k]``."""
    values = x.new_empty(col.numel())  # only its shape is read
    return backward(grad_out, x, values, crow, col, None, None, None, False, True)[1]


def conv_forward(x: Tensor, values: Tensor, bias: Tensor | None, crow: Tensor, col: Tensor, out_channels: int,
                 geometry: tuple[int, ...], offsets: Tensor | None = None, relu: bool = False,
                 pool: bool = False) -> Tensor:
    """A direct sparse convolution of a 4-D input (``geometry`` as in :mod:`actuallysparse.functional`).

    ``offsets``, from :func:`conv_offsets` for this pattern and the input's size, spares the call
    the pass that computes them; ``relu`` writes ``max(output, 0)``; ``pool`` returns the output's
    2x2, stride-2 max-pool, computed as the output is written where the batch fills vectors.
    """
    return _ops().conv2d(x, values, bias, crow, col, out_channels, list(geometry), "", 0, offsets, relu, pool)


def conv_offsets(col: Tensor, channels: int, height: int, width: int, geometry: tuple[int, ...]) -> Tensor:
    """Where each non-zero's input row sits in the padded input of ``channels x height x width``,
    one per non-zero (``csrc/conv_impl.h`` describes the layout): int16 holding them unsigned where
    the padded input has at most 65536 rows, else int32."""
    return _ops().conv_offsets(col, channels, height, width, list(geometry))


def conv_backward(grad_out: Tensor, x: Tensor, values: Tensor, crow: Tensor, col: Tensor, geometry: tuple[int, ...],
                  need_input: bool, need_values: bool, transposed=None) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_input, grad_values)`` of a sparse convolution; ``None`` for a gradient not needed.

    ``transposed`` (a :class:`~actuallysparse.functional.TransposedPattern` of the flipped
    transposed weight, :func:`~actuallysparse.functional.conv_transpose_pattern`) lets a stride-1
    layer compute its input gradient as a forward convolution of the output gradient instead of
    scattering; without it, or for other strides, the scatter runs.
    """
    parts = (None, None, None) if transposed is None else (transposed.crow, transposed.col, transposed.perm)
    grad_x, grad_values = _ops().conv2d_backward(grad_out, x, values, crow, col, list(geometry), need_input,
                                                 need_values, "", 0, *parts)
    return (grad_x if need_input else None), (grad_values if need_values else None)


def max_pool2x2(x: Tensor, winners: bool = True) -> tuple[Tensor, Tensor]:
    """2x2, stride-2 max pooling of ``(N, C, H, W)``: the output and each window's winner (uint8,
    row-major), or without ``winners`` an empty tensor in their place (a faster pass)."""
    return _ops().max_pool2x2(x, winners)


def max_pool2x2_backward(grad_out: Tensor, where: Tensor, height: int, width: int) -> Tensor:
    """The input gradient (``height x width`` planes) of :func:`max_pool2x2`, given its winners."""
    return _ops().max_pool2x2_backward(grad_out, where, height, width)


def batch_norm_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                     running_var: Tensor | None, momentum: float, eps: float, relu: bool = False
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch norm of ``(N, C, H, W)``: ``(y, mean, invstd)``; the running statistics,
    when given, are updated in place as ``F.batch_norm`` updates them. With ``relu``, ``y`` is the
    normalised output's relu."""
    return _ops().batch_norm_train(x, weight, bias, running_mean, running_var, momentum, eps, relu)


def batch_norm_train_backward(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
                              need_input: bool, need_weight: bool, need_bias: bool,
                              relu_output: Tensor | None = None
                              ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(grad_input, grad_weight, grad_bias)`` of :func:`batch_norm_train`; ``None`` for a gradient not
    needed. ``relu_output``: the output of a ``relu=True`` forward, through whose relu ``grad_out`` passes."""
    grads = _ops().batch_norm_train_backward(grad_out, x, weight, mean, invstd, need_input, need_weight, need_bias,
                                             relu_output)
    return tuple(grad if need else None for grad, need in zip(grads, (need_input, need_weight, need_bias)))


def batch_norm_pool_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                          running_var: Tensor | None, momentum: float, eps: float, relu: bool = False
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`batch_norm_train` whose output is max-pooled (2x2, stride 2) as it is computed:
    ``(pooled, where, mean, invstd)``, ``where`` the winners as :func:`max_pool2x2` gives them; the
    full output is never stored."""
    return _ops().batch_norm_pool_train(x, weight, bias, running_mean, running_var, momentum, eps, relu)


def batch_norm_pool_train_backward(grad_out: Tensor, where: Tensor, pooled: Tensor, x: Tensor, weight: Tensor | None,
                                   mean: Tensor, invstd: Tensor, need_input: bool, need_weight: bool,
                                   need_bias: bool, relu: bool = False
                                   ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(grad_input, grad_weight, grad_bias)`` of :func:`batch_norm_pool_train` from the pooled
    output's gradient; ``None`` for a gradient not needed."""
    grads = _ops().batch_norm_pool_train_backward(grad_out, where, pooled, x, weight, mean, invstd, need_input,
                                                  need_weight, need_bias, relu)
    return tuple(grad if need else None for grad, need in zip(grads, (need_input, need_weight, need_bias)))


def dropout(x: Tensor, p: float, seed: int) -> tuple[Tensor, Tensor]:
    """``(out, keep)``: ``out = x * keep / (1 - p)``, each element kept (``keep``, uint8) with
    probability ``1 - p`` (``0 <= p < 1``) by a draw that depends on ``seed`` and its position alone."""
    return _ops().dropout(x, p, seed)


def dropout_backward(grad: Tensor, keep: Tensor, scale: float) -> Tensor:
    """``grad * keep * scale``: the input gradient of :func:`dropout` (``scale = 1 / (1 - p)``)."""
    return _ops().dropout_backward(grad, keep, scale)
