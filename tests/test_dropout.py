"""Dropout keeps each element with probability 1 - p, scaled, as nn.Dropout does."""
import pytest
import torch

from actuallysparse.dropout import Dropout


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
def test_dropout_keeps_each_element_with_probability_one_minus_p_scaled(p):
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
