"""Training-mode batch normalisation on the products' backends.

Once a VGG11_bn's convolutions are sparse, what is left of its training step is the rest of the
model, and torch 2.14's CPU batch norm is the largest part: 0.66 ms forward and 0.42 ms backward
for a 64x16x32x32 batch on 2 threads, where one pass over its 4 MiB takes 0.04 ms.
:class:`BatchNorm2d` is ``nn.BatchNorm2d`` (same arguments, buffers, state_dict and numbers to
float rounding) whose training-mode forward and backward run on the native kernel
(``csrc/normalization.cpp``) for CPU float32/float64 inputs; evaluation, other devices and
dtypes, ``torch.func`` transforms, forward mode and tracing use ``F.batch_norm`` itself, which
is also what double backward differentiates. Where a 2x2 max-pool follows the norm (and its
relu), the norm can pool its output as it computes it (``fused_pool``): in training its full
output is then neither stored nor read again, nor is a full-size gradient built for it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actuallysparse import functional, kernels
from actuallysparse.pooling import max_pool2x2


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm on the native kernel, through its relu with ``relu``, its output
    max-pooled (2x2, stride 2) as it is computed with ``pool``."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, relu, pool):  # noqa: D102
        if pool:
            # the pooled output says whether each window's winner passed the relu
            out, where, mean, invstd = kernels.batch_norm_pool_train(x, weight, bias, running_mean, running_var,
                                                                     momentum, eps, relu)
            ctx.save_for_backward(x, weight, bias, mean, invstd, out, where)
        else:
            out, mean, invstd = kernels.batch_norm_train(x, weight, bias, running_mean, running_var, momentum, eps,
                                                         relu)
            # a fused relu's backward reads the output, as torch's relu does
            ctx.save_for_backward(x, weight, bias, mean, invstd, out if relu else None, None)
        ctx.eps, ctx.relu, ctx.pool = eps, relu, pool
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, weight, bias, mean, invstd, out, where = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: the gradients must be differentiable themselves
            grads = _differentiable_gradients(grad_out, x, weight, bias, ctx.eps, ctx.relu, needs, ctx.pool)
        elif ctx.pool:
            grads = kernels.batch_norm_pool_train_backward(grad_out, where, out, x, weight, mean, invstd, *needs,
                                                           ctx.relu)
        else:
            grads = kernels.batch_norm_train_backward(grad_out, x, weight, mean, invstd, *needs, out)
        return (*grads, None, None, None, None, None, None)


def _differentiable_gradients(grad_out: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                              relu: bool, needs: tuple[bool, bool, bool], pool: bool = False
                              ) -> tuple[Tensor | None, ...]:
    """The three gradients as torch's own batch norm (and relu, and max pooling) give them, with
    their graph (double backward)."""
    inputs = [t for t, need in zip((x, weight, bias), needs) if need]
    with torch.enable_grad():
        out = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
        if relu:
            out = F.relu(out)
        if pool:
            out = F.max_pool2d(out, 2)
        grads = iter(torch.autograd.grad(out, inputs, grad_out, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
               bias: Tensor | None = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               relu: bool = False, pool: bool = False) -> Tensor:
    """``F.batch_norm`` with the same arguments, followed by ``F.relu`` when ``relu`` is set and by
    ``F.max_pool2d(out, 2)`` when ``pool`` is; training mode on a 4-D CPU float32/float64 input
    runs on the native kernel, the relu and the pooling in the same pass (the running statistics
    are updated in place as ``F.batch_norm`` does).

    Example::

        >>> x = torch.randn(8, 3, 4, 4)
        >>> torch.testing.assert_close(batch_norm(x, None, None, training=True, relu=True),
        ...                            F.relu(F.batch_norm(x, None, None, training=True)))
    """
    if pool and input.dim() == 4 and min(input.shape[-2:]) < 2:
        raise ValueError(f"batch_norm with pool=True pools 2x2 windows of its output and needs planes of at least "
                         f"2x2, got input shape {tuple(input.shape)}")
    if not training or input.dim() != 4 or not functional.runs_natively(input, weight, bias, running_mean, running_var):
        out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        out = F.relu(out) if relu else out
        return max_pool2x2(out) if pool else out
    if input.numel() // input.shape[1] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    return _BatchNormTrain.apply(input, weight, bias, running_mean, running_var, momentum, eps, relu, pool)


class BatchNorm2d(nn.BatchNorm2d):
    r"""``nn.BatchNorm2d`` whose training-mode normalisation runs on the native kernel on the CPU.

    The same arguments, buffers, ``state_dict`` and numbers (to float rounding: the statistics
    are summed in double); the class keeps torch's name, so tools that look layers up by class
    name (NNI's model speed-up) treat it as the layer it is.

    ``fused_relu`` (``False`` unless set; :func:`~actuallysparse.fusion.use_native_layers` sets it
    where a ``nn.ReLU`` followed the norm, and puts ``nn.Identity`` in the ReLU's place) makes the
    layer return the relu of its output, computed in the same pass: in training the separate
    ReLU's pass over the activations and its backward's disappear. ``fused_pool`` (``False``
    unless set; :func:`~actuallysparse.fusion.fuse_pooling` sets it where a 2x2, stride-2
    max-pool followed the norm) makes it return the pooled output (``F.max_pool2d(out, 2)``,
    half the height and width), pooled as it is computed: in training the full output is never
    stored, and the backward works from the pooled gradient and the winners alone.

    Shape:
        - Input: :math:`(N, C, H, W)`
        - Output: :math:`(N, C, H, W)` (same shape as input), or :math:`(N, C, \lfloor H/2 \rfloor, \lfloor W/2 \rfloor)`
          with ``fused_pool``

    Example::

        >>> norm = BatchNorm2d(16)
        >>> norm(torch.randn(8, 16, 4, 4)).shape
        torch.Size([8, 16, 4, 4])
    """

    fused_relu = False
    fused_pool = False

    def extra_repr(self) -> str:
        return (super().extra_repr() + (", fused_relu=True" if self.fused_relu else "")
                + (", fused_pool=True" if self.fused_pool else ""))

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Module's name
        # nn.BatchNorm2d's own choice of statistics and averaging factor, then this module's batch_norm
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return batch_norm(input, self.running_mean if track else None, self.running_var if track else None,
                          self.weight, self.bias, use_batch_statistics, factor, self.eps, relu=self.fused_relu,
                          pool=self.fused_pool)
