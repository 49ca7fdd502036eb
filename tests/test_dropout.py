"""Dropout keeps each element with probability 1 - p, scaled, as nn.Dropout does, on both backends."""
import pytest
import torch

from actuallysparse import functional, kernels
from actuallysparse.dropout import Dropout, dropout


@pytest.fixture(params=["torch", "native"])
def backend_name(request, monkeypatch):
    if request.param == "native" and not kernels.is_available():
        pytest.skip(f"the native kernels could not be built: {kernels.load_error_summary()}")
    monkeypatch.setenv(functional.BACKEND_VARIABLE, request.param)
    return request.param


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
def test_dropout_keeps_each_element_with_probability_one_minus_p_scaled(backend_name, p):
    layer = Dropout(p)
    x = torch.ones(200, 500, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    kept = out != 0
    if 0 < p < 1:
        assert abs(kept.double().mean().item() - (1 - p)) < 0.01      # 100 000 draws: sd 0.0016
        torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    else:
        assert kept.all() if p == 0 else not kept.any()
    out.backward(torch.full_like(out, 2.0))
    torch.testing.assert_close(x.grad, out.detach() * 2)              # the gradient passes where kept
    assert torch.equal(layer.eval()(x), x)


@pytest.mark.parametrize("p", [0.1, 0.9])
def test_the_native_mask_keeps_one_minus_p_in_float32_and_is_unbiased_across_positions(p):
    out = kernels.dropout(torch.ones(1000, 1001), p, 7)[0]
    kept = (out != 0).double()
    assert abs(kept.mean().item() - (1 - p)) < 0.003                   # 1 001 000 draws: sd <= 0.0005
    # even and odd positions take the two halves of one 64-bit draw: both keep 1 - p
    flat = kept.flatten()
    for half in (flat[0::2], flat[1::2]):
        assert abs(half.mean().item() - (1 - p)) < 0.004
    assert torch.all(out[out != 0] == torch.tensor(1 / (1 - p), dtype=torch.float32))


def test_the_native_mask_depends_on_the_seed_alone_not_on_threads():
    x = torch.randn(300, 333)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.dropout(x, 0.5, 12345)
        torch.set_num_threads(max(2, threads))
        many = kernels.dropout(x, 0.5, 12345)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    assert not torch.equal(kernels.dropout(x, 0.5, 12346)[1], one[1])


def test_torch_manual_seed_repeats_the_native_dropout():
    x = torch.randn(64, 100)
    torch.manual_seed(3)
    first = dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.5), first)
    assert not torch.equal(dropout(x, 0.5), first)                     # the generator moved on


def test_a_dropped_nan_or_infinity_gives_nan_as_the_mask_product_does(backend_name):
    x = torch.tensor([float("nan"), float("inf"), 1.0] * 400)
    out = dropout(x, 0.5)
    assert torch.isnan(out[0::3]).all()                                 # NaN, kept or dropped
    infinite = out[1::3]                                                # inf kept, NaN dropped (inf * 0)
    assert torch.isinf(infinite).any() and torch.isnan(infinite).any()
    assert (torch.isinf(infinite) | torch.isnan(infinite)).all()
    assert set(out[2::3].tolist()) == {0.0, 2.0}


def test_dropout_gradients_match_a_fixed_mask_in_float64(backend_name):
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)

    def seeded(t):
        torch.manual_seed(11)
        return dropout(t, 0.4)

    assert torch.autograd.gradcheck(seeded, (x,))
    assert torch.autograd.gradgradcheck(seeded, (x,))
    mask = (seeded(x) != 0).to(x.dtype)
    (grad,) = torch.autograd.grad(seeded(x), x, torch.full_like(x, 3.0))
    torch.testing.assert_close(grad, mask * 3.0 / 0.6)


def test_the_native_dropout_keeps_one_byte_an_element_for_its_backward():
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    x = torch.randn(64, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        dropout(x, 0.5)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.uint8, x.shape)]


def test_dropout_refuses_a_probability_outside_zero_to_one():
    with pytest.raises(ValueError, match="between 0 and 1, but got 1.5"):
        dropout(torch.ones(3), 1.5)
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\) here, got 1"):
        kernels.dropout(torch.ones(3), 1.0, 0)
    with pytest.raises(RuntimeError, match="must be float32 or float64, got Long"):
        kernels.dropout(torch.ones(3, dtype=torch.int64), 0.5, 0)
    with pytest.raises(RuntimeError, match=r"uint8 of the gradient's shape \[3\], got Float"):
        kernels.dropout_backward(torch.ones(3), torch.ones(3), 2.0)


def test_dropout_under_torch_func_and_forward_mode_uses_torch():
    x = torch.randn(5, 4)
    grads = torch.func.grad(lambda t: dropout(t, 0.5).sum())(x)
    assert set(grads.unique().tolist()) <= {0.0, 2.0}
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        tangent = torch.autograd.forward_ad.unpack_dual(dropout(dual, 0.5)).tangent
    assert set(tangent.unique().tolist()) <= {0.0, 2.0}
