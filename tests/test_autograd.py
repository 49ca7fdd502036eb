"""Every autograd mode through the sparse layers equals the masked dense layer, on every backend.

First-order gradients are tested beside the kernels (test_kernels, test_conv); here: double
backward (``gradgradcheck``), forward mode, the ``torch.func`` transforms, an exported program
differentiated twice, and half precision.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from actuallysparse.converter import convert
from actuallysparse.functional import sparse_conv2d, sparse_linear, transpose_pattern


def _pruned_pair(kind, dtype=torch.float64, density=0.5):
    """(dense layer, sparse layer) of one weight with about ``1 - density`` of it pruned."""
    if kind == "linear":
        dense = nn.Linear(7, 5, dtype=dtype)
        x = torch.randn(3, 7, dtype=dtype)
    else:
        dense = nn.Conv2d(3, 4, 3, stride=2, padding=1, dtype=dtype)
        x = torch.randn(2, 3, 5, 6, dtype=dtype)
    sparse = convert(dense, "csr")
    sparse.keep_entries(torch.rand(sparse.nnz) < density)
    with torch.no_grad():
        dense.weight.copy_(sparse.dense_weight())
    return dense, sparse, x


def _product(kind, sparse):
    """The layer's product as a function of (x, values, bias), through the public functional API."""
    crow, col = sparse._pattern()
    if kind == "linear":
        transposed = transpose_pattern(crow, col, sparse.in_features)
        return lambda x, values, bias: sparse_linear(x, values, bias, crow, col, sparse._matrix_shape, transposed)
    return lambda x, values, bias: sparse_conv2d(x, values, bias, crow, col, sparse.out_channels, sparse.geometry())


KINDS = ["linear", "conv"]


@pytest.mark.parametrize("kind", KINDS)
def test_gradgradcheck(backend, kind):
    _, sparse, x = _pruned_pair(kind)
    inputs = (x.requires_grad_(), sparse.values.detach().clone().requires_grad_(),
              sparse.bias.detach().clone().requires_grad_())
    assert torch.autograd.gradgradcheck(_product(kind, sparse), inputs)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_mode_gradcheck(backend, kind):
    _, sparse, x = _pruned_pair(kind)
    inputs = (x.requires_grad_(), sparse.values.detach().clone().requires_grad_(),
              sparse.bias.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(_product(kind, sparse), inputs, check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_penalty_equals_masked_dense(backend, kind):
    """The issue's attack: a second-order values.grad of norm 0 where the dense twin's was 527."""
    dense, sparse, x = _pruned_pair(kind)
    rows, cols = sparse._rows_cols()
    results = []
    for layer in (dense, sparse):
        layer.zero_grad()
        x_in = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(layer(x_in).pow(2).sum(), x_in, create_graph=True)
        grad_x.pow(2).sum().backward()
        results.append((x_in.grad, layer.bias.grad,
                        layer.weight.grad.reshape(len(layer.bias), -1)[rows, cols] if layer is dense
                        else layer.values.grad))
    for dense_grad, sparse_grad in zip(*results):
        assert float(dense_grad.norm()) > 0
        torch.testing.assert_close(sparse_grad, dense_grad)


@pytest.mark.parametrize("kind", KINDS)
def test_dual_numbers_carry_the_tangent(backend, kind):
    dense, sparse, x = _pruned_pair(kind)
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        sparse_out = fwAD.unpack_dual(sparse(fwAD.make_dual(x, tangent))).tangent
        dense_out = fwAD.unpack_dual(dense(fwAD.make_dual(x, tangent))).tangent
    torch.testing.assert_close(sparse_out, dense_out)


@pytest.mark.parametrize("kind", KINDS)
def test_a_tangent_alone_is_carried_without_a_graph(backend, kind):
    # frozen weights, no graph recorded: only the input's tangent asks for the differentiable path
    dense, sparse, x = _pruned_pair(kind)
    dense.requires_grad_(False)
    sparse.requires_grad_(False)
    tangent = torch.randn_like(x)
    with torch.no_grad(), fwAD.dual_level():
        sparse_out = fwAD.unpack_dual(sparse(fwAD.make_dual(x, tangent))).tangent
        dense_out = fwAD.unpack_dual(dense(fwAD.make_dual(x, tangent))).tangent
    assert sparse_out is not None
    torch.testing.assert_close(sparse_out, dense_out)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_transforms_equal_masked_dense(backend, kind):
    dense, sparse, x = _pruned_pair(kind)
    sparse_params = {"values": sparse.values.detach(), "bias": sparse.bias.detach()}
    dense_params = {"weight": dense.weight.detach(), "bias": dense.bias.detach()}

    def loss(layer, params):
        return lambda x: torch.func.functional_call(layer, params, (x,)).pow(3).sum()

    sparse_loss, dense_loss = loss(sparse, sparse_params), loss(dense, dense_params)
    torch.testing.assert_close(torch.func.grad(sparse_loss)(x), torch.func.grad(dense_loss)(x))
    torch.testing.assert_close(torch.func.hessian(sparse_loss)(x), torch.func.hessian(dense_loss)(x))
    tangent = torch.randn_like(x)
    torch.testing.assert_close(torch.func.jvp(sparse_loss, (x,), (tangent,))[1],
                               torch.func.jvp(dense_loss, (x,), (tangent,))[1])
    batch = torch.stack([x, 2 * x])
    torch.testing.assert_close(torch.func.vmap(sparse)(batch), torch.func.vmap(dense)(batch))

    # per-sample gradients of the stored weights: vmap over grad with respect to the values
    def value_loss(values, sample):
        params = {"values": values, "bias": sparse_params["bias"]}
        return torch.func.functional_call(sparse, params, (sample.unsqueeze(0),)).pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(value_loss), in_dims=(None, 0))(sparse_params["values"], x)
    for i in range(x.shape[0]):
        expected = torch.func.grad(value_loss)(sparse_params["values"], x[i])
        torch.testing.assert_close(per_sample[i], expected)


@pytest.mark.parametrize("kind", KINDS)
def test_exported_program_differentiates_twice(backend, kind):
    dense, sparse, x = _pruned_pair(kind)
    program = torch.export.export(nn.Sequential(sparse), (x,)).module()
    results = []
    for model in (program, dense):
        x_in = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(model(x_in).pow(2).sum(), x_in, create_graph=True)
        (second,) = torch.autograd.grad(grad_x.pow(2).sum(), x_in)
        results.append(second)
    assert float(results[1].norm()) > 0
    torch.testing.assert_close(*results)


HALF_TOLERANCE = {torch.float16: {"atol": 2e-2, "rtol": 2e-2}, torch.bfloat16: {"atol": 1e-1, "rtol": 5e-2}}


@pytest.mark.parametrize("dtype", list(HALF_TOLERANCE))
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_forward_and_backward(backend, kind, dtype):
    """float16/bfloat16 layers match the float64 dense layer within the dtype's rounding."""
    dense, sparse, x = _pruned_pair(kind, dtype=torch.float32, density=0.6)
    sparse = sparse.to(dtype)
    dense = dense.to(dtype).to(torch.float64)          # the same (rounded) weights, exact arithmetic
    x = x.to(dtype)
    x_half, x_exact = x.clone().requires_grad_(), x.to(torch.float64).requires_grad_()
    out = sparse(x_half)
    expected = dense(x_exact)
    assert out.dtype == dtype
    out.float().pow(2).sum().backward()
    expected.pow(2).sum().backward()
    rows, cols = sparse._rows_cols()
    tolerance = HALF_TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, **tolerance)
    assert x_half.grad.dtype == sparse.values.grad.dtype == dtype
    torch.testing.assert_close(x_half.grad.double(), x_exact.grad, **tolerance)
    torch.testing.assert_close(sparse.values.grad.double(),
                               dense.weight.grad.reshape(len(dense.bias), -1)[rows, cols], **tolerance)
