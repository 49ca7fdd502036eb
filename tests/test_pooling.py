"""MaxPool2x2 gives nn.MaxPool2d(2, 2)'s outputs and gradients exactly, on every backend."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actuallysparse.pooling import AdaptiveAvgPool2d, MaxPool2x2, max_pool2x2

SHAPES = [(4, 3, 8, 6), (2, 5, 7, 9), (3, 6, 4), (1, 1, 2, 2), (2, 3, 33, 3), (64, 2, 4, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_and_gradients_equal_max_pool2d(backend, shape, dtype):
    for data in (torch.randn(*shape, dtype=dtype),
                 torch.randint(0, 3, shape).to(dtype)):        # many ties: the first maximum wins
        ours, reference = data.clone().requires_grad_(), data.clone().requires_grad_()
        out, expected = MaxPool2x2()(ours), F.max_pool2d(reference, 2, 2)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        grad = torch.randn_like(expected)
        out.backward(grad)
        expected.backward(grad)
        torch.testing.assert_close(ours.grad, reference.grad, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_without_a_graph_the_maxima_alone_equal_max_pool2d(backend, shape, dtype):
    # no graph to record: the pass that keeps no winners (random data, many ties, NaN, -0.0 against 0.0)
    data = torch.randn(*shape, dtype=dtype)
    ties = torch.randint(0, 3, shape).to(dtype)
    signed_zeros = torch.where(torch.rand(shape) < 0.5, -0.0, 0.0).to(dtype)
    data.view(-1)[::7] = float("nan")
    for x in (data, ties, signed_zeros):
        with torch.no_grad():
            out = max_pool2x2(x)
        expected = F.max_pool2d(x, 2, 2)
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(torch.signbit(out), torch.signbit(expected))
    out, where = backend.max_pool2x2(data.reshape(-1, *shape[-3:]) if len(shape) == 3 else data, winners=False)
    assert where.numel() == 0


def test_nan_wins_its_window_as_in_max_pool2d(backend):
    data = torch.randn(2, 2, 4, 6)
    data[0, 0, 1, 1] = data[1, 1, 0, 0] = data[1, 1, 1, 1] = data[0, 1, 2, 5] = float("nan")
    ours, reference = data.clone().requires_grad_(), data.clone().requires_grad_()
    out, expected = max_pool2x2(ours), F.max_pool2d(reference, 2, 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(ours.grad, reference.grad, rtol=0, atol=0)


def test_gradients_of_every_order_match_the_dense_reference(backend):
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(max_pool2x2, (x,))
    torch.autograd.gradgradcheck(max_pool2x2, (x,))
    grad = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(max_pool2x2(x), x, grad, create_graph=True)[0]
    reference = torch.autograd.grad(F.max_pool2d(x, 2), x, grad, create_graph=True)[0]
    weights = torch.randn_like(x)
    torch.testing.assert_close(torch.autograd.grad((ours * weights).sum(), grad)[0],
                               torch.autograd.grad((reference * weights).sum(), grad)[0], rtol=0, atol=0)


def test_forward_mode_and_torch_func_are_exact(backend):
    x, tangent = torch.randn(2, 3, 4, 6, dtype=torch.float64), torch.randn(2, 3, 4, 6, dtype=torch.float64)
    _, jvp = torch.func.jvp(max_pool2x2, (x,), (tangent,))
    _, expected = torch.func.jvp(lambda x: F.max_pool2d(x, 2), (x,), (tangent,))
    torch.testing.assert_close(jvp, expected, rtol=0, atol=0)
    grad = torch.func.grad(lambda x: max_pool2x2(x).pow(2).sum())(x)
    torch.testing.assert_close(grad, torch.func.grad(lambda x: F.max_pool2d(x, 2).pow(2).sum())(x), rtol=0, atol=0)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(max_pool2x2(dual)).tangent, expected)


def test_is_an_nn_max_pool2d_with_its_settings():
    assert isinstance(MaxPool2x2(), nn.MaxPool2d)
    assert MaxPool2x2().extra_repr() == nn.MaxPool2d(2, 2).extra_repr()


def test_bad_input_says_what_was_given():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) or \(C, H, W\) input, got shape \(5, 4\)"):
        max_pool2x2(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="planes of at least 2x2, got 7x1"):
        max_pool2x2(torch.zeros(2, 3, 7, 1))


def test_the_native_kernel_refuses_what_it_cannot_pool():
    from actuallysparse import kernels

    if not kernels.is_available():
        pytest.skip("the native kernels could not be built")
    with pytest.raises(RuntimeError, match="float32 or float64, input is Half"):
        kernels.max_pool2x2(torch.zeros(1, 1, 2, 2, dtype=torch.half))
    out, where = kernels.max_pool2x2(torch.zeros(1, 1, 4, 4))
    with pytest.raises(RuntimeError, match="an input of 6x4 pools to 3x2, but the output gradient is 2x2"):
        kernels.max_pool2x2_backward(out, where, 6, 4)


@pytest.mark.parametrize("output_size, shape", [((1, 1), (2, 5, 1, 1)), (1, (5, 1, 1)), ((None, 3), (2, 5, 4, 3)),
                                                 ((1, 1), (2, 5, 3, 3)), (2, (2, 5, 5, 4)), ((None, 1), (5, 2, 3))])
def test_adaptive_average_pooling_equals_torch_s_and_skips_only_a_mean_of_single_elements(output_size, shape):
    pool, reference = AdaptiveAvgPool2d(output_size), nn.AdaptiveAvgPool2d(output_size)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = pool(x)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    unchanged = tuple(out.shape) == shape
    assert (out is x) == unchanged
    torch.autograd.gradcheck(pool, (x,))
    assert isinstance(pool, nn.AdaptiveAvgPool2d) and repr(pool) == repr(reference)


def test_adaptive_average_pooling_leaves_other_inputs_to_torch():
    with pytest.raises(IndexError, match="out of range"):
        AdaptiveAvgPool2d(1)(torch.ones(3))
    x = torch.ones(1, 1)                    # torch takes a 2-D input for one plane; so does the subclass
    assert AdaptiveAvgPool2d(1)(x) is not x and AdaptiveAvgPool2d(1)(x).shape == (1, 1)
