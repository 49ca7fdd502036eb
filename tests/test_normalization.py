"""BatchNorm2d computes nn.BatchNorm2d's outputs, statistics and gradients, on every backend."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actuallysparse.normalization import BatchNorm2d, batch_norm


def _pair(channels, dtype, **kwargs):
    ours, reference = BatchNorm2d(channels, dtype=dtype, **kwargs), nn.BatchNorm2d(channels, dtype=dtype, **kwargs)
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-1, 1)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def _assert_same_step(ours, reference, data, norm=None):
    """One forward and backward of both on ``data``: outputs, input gradients, and the parameters'
    gradients and buffers against ``norm`` (the reference's norm; ``reference`` itself by default).
    Returns our output."""
    norm = reference if norm is None else norm
    x_ours, x_ref = data.clone().requires_grad_(), data.clone().requires_grad_()
    out, expected = ours(x_ours), reference(x_ref)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, norm.get_parameter(name).grad)
    for name, buffer in ours.named_buffers():
        torch.testing.assert_close(buffer, norm.get_buffer(name))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"momentum": None}, {"track_running_stats": False},
                                    {"eps": 1e-3, "momentum": 0.3}])
def test_training_steps_match_nn_batchnorm2d(backend, dtype, kwargs):
    ours, reference = _pair(6, dtype, **kwargs)
    for shape in [(8, 6, 5, 7), (3, 6, 1, 1), (16, 6, 2, 2)]:
        data = torch.randn(*shape, dtype=dtype) * 3 + 5        # a mean far from 0: the variance must survive it
        _assert_same_step(ours, reference, data)
    ours.eval()
    reference.eval()
    _assert_same_step(ours, reference, torch.randn(4, 6, 3, 3, dtype=dtype))


def test_gradients_of_every_order_match_the_dense_reference(backend):
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def normalise(x, weight, bias):
        return batch_norm(x, None, None, weight, bias, training=True)

    torch.autograd.gradcheck(normalise, (x, weight, bias))
    torch.autograd.gradgradcheck(normalise, (x, weight, bias))


def test_forward_mode_and_torch_func_are_exact(backend):
    # without running statistics: torch.func refuses the buffers' in-place update, torch's layer too
    norm = BatchNorm2d(3, dtype=torch.float64, track_running_stats=False)
    x, tangent = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    reference = nn.BatchNorm2d(3, dtype=torch.float64, track_running_stats=False)
    _, jvp = torch.func.jvp(lambda x: norm(x), (x,), (tangent,))
    _, expected = torch.func.jvp(lambda x: reference(x), (x,), (tangent,))
    torch.testing.assert_close(jvp, expected)
    grad = torch.func.grad(lambda x: norm(x).pow(2).sum())(x)
    torch.testing.assert_close(grad, torch.func.grad(lambda x: reference(x).pow(2).sum())(x))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(norm(dual)).tangent, expected)


def test_is_an_nn_batchnorm2d_with_its_name_and_state_dict():
    ours = BatchNorm2d(5)
    assert isinstance(ours, nn.BatchNorm2d) and type(ours).__name__ == "BatchNorm2d"
    assert ours.state_dict().keys() == nn.BatchNorm2d(5).state_dict().keys()
    assert repr(ours) == repr(nn.BatchNorm2d(5))


def test_one_value_per_channel_is_refused_as_torch_refuses_it(backend):
    with pytest.raises(ValueError, match=r"more than 1 value per channel when training, got input size "
                                         r"torch.Size\(\[1, 3, 1, 1\]\)"):
        BatchNorm2d(3)(torch.zeros(1, 3, 1, 1))


def test_the_native_kernel_refuses_what_it_cannot_normalise():
    from actuallysparse import kernels

    if not kernels.is_available():
        pytest.skip("the native kernels could not be built")
    with pytest.raises(RuntimeError, match="takes \\(batch, channels, height, width\\), input is \\[4, 3\\]"):
        kernels.batch_norm_train(torch.zeros(4, 3), None, None, None, None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="weight must be a contiguous \\(3,\\) tensor of Float, got Float \\[4\\]"):
        kernels.batch_norm_train(torch.zeros(2, 3, 2, 2), torch.ones(4), None, None, None, 0.1, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_fused_relu_computes_batch_norm_then_relu(backend, dtype):
    ours, norm = _pair(6, dtype)
    ours.fused_relu = True
    reference = nn.Sequential(norm, nn.ReLU(inplace=True))
    for shape in [(8, 6, 5, 7), (16, 6, 2, 2)]:
        out = _assert_same_step(ours, reference, torch.randn(*shape, dtype=dtype) * 3 + 1, norm)
        assert bool((out >= 0).all()) and bool((out == 0).any())
    ours.eval()
    reference.eval()
    x = torch.randn(4, 6, 3, 3, dtype=dtype)
    torch.testing.assert_close(ours(x), reference(x))
    assert repr(ours) == repr(nn.BatchNorm2d(6)).replace(")", ", fused_relu=True)")


def test_fused_relu_gradients_of_every_order_match_the_dense_reference(backend):
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def normalise(x, weight, bias):
        return batch_norm(x, None, None, weight, bias, training=True, relu=True)

    assert torch.autograd.gradcheck(normalise, (x, weight, bias))
    assert torch.autograd.gradgradcheck(normalise, (x, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [True, False])
def test_a_fused_pool_computes_batch_norm_then_the_pooling(backend, dtype, relu):
    ours, norm = _pair(6, dtype)
    ours.fused_relu, ours.fused_pool = relu, True
    reference = nn.Sequential(norm, *([nn.ReLU()] if relu else []), nn.MaxPool2d(2))
    # odd sizes leave a row and a column no window covers; 2x2 planes are one window
    for shape in [(8, 6, 5, 7), (16, 6, 2, 2), (4, 6, 8, 8)]:
        out = _assert_same_step(ours, reference, torch.randn(*shape, dtype=dtype) * 3 + 1, norm)
        assert out.shape == (shape[0], 6, shape[2] // 2, shape[3] // 2)
    ours.eval()
    reference.eval()
    x = torch.randn(4, 6, 6, 4, dtype=dtype)
    torch.testing.assert_close(ours(x), reference(x))
    expected = ", fused_relu=True, fused_pool=True)" if relu else ", fused_pool=True)"
    assert repr(ours) == repr(nn.BatchNorm2d(6)).replace(")", expected)


def test_a_fused_pool_breaks_ties_and_passes_nan_as_max_pool2d(backend):
    # constant planes normalise to ties everywhere (and, through the relu, to zeros); a NaN wins its window
    ours, norm = _pair(3, torch.float64)
    ours.fused_relu = ours.fused_pool = True
    reference = nn.Sequential(norm, nn.ReLU(), nn.MaxPool2d(2))
    data = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    data[:, 0] = 2.0
    data[1, 1, 2:, :2] = torch.tensor([[1.0, 5.0], [5.0, 1.0]], dtype=torch.float64)
    _assert_same_step(ours, reference, data, norm)
    data[0, 2, 0, 1] = float("nan")
    with torch.no_grad():
        out, expected = ours(data), reference(data)
    torch.testing.assert_close(out, expected, equal_nan=True)
    assert out[0, 2, 0, 0].isnan()


def test_fused_pool_gradients_of_every_order_match_the_dense_reference(backend):
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for relu in (True, False):
        def normalise(x, weight, bias):
            return batch_norm(x, None, None, weight, bias, training=True, relu=relu, pool=True)

        assert torch.autograd.gradcheck(normalise, (x, weight, bias))
        assert torch.autograd.gradgradcheck(normalise, (x, weight, bias))


def test_a_fused_pool_refuses_planes_too_small_to_pool(backend):
    with pytest.raises(ValueError, match=r"pool=True .* at least 2x2, got input shape \(4, 3, 1, 5\)"):
        batch_norm(torch.zeros(4, 3, 1, 5), None, None, training=True, pool=True)


def test_the_native_pooling_norm_refuses_what_it_cannot_compute():
    from actuallysparse import kernels

    if not kernels.is_available():
        pytest.skip("the native kernels could not be built")
    with pytest.raises(RuntimeError, match="needs planes of at least 2x2, got input \\[2, 3, 1, 4\\]"):
        kernels.batch_norm_pool_train(torch.zeros(2, 3, 1, 4), None, None, None, None, 0.1, 1e-5)
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="must have the pooled shape \\[2, 3, 2, 2\\]"):
        kernels.batch_norm_pool_train_backward(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2, dtype=torch.uint8),
                                               torch.zeros(2, 3, 2, 2), x, None, torch.zeros(3), torch.ones(3),
                                               True, False, False)
