"""Bad input to the library gets a clear error, never a silent wrong answer."""
import warnings

import pytest
import torch
from torch import nn

from actuallysparse.converter import convert
from actuallysparse.pruning import prune_to_sparsity


def _layer(nnz_fraction=1.0):
    layer = convert(nn.Linear(6, 5), "csr")
    if nnz_fraction < 1:
        prune_to_sparsity(layer, 1 - nnz_fraction)
    return layer


def test_keep_entries_takes_a_boolean_mask():
    layer = _layer()
    mask = torch.zeros(layer.nnz, dtype=torch.bool)
    mask[[0, 3, 7]] = True
    expected = layer.values.detach()[mask].clone()
    layer.keep_entries(mask)
    assert layer.nnz == 3
    torch.testing.assert_close(layer.values.detach(), expected)


def test_keep_entries_positions_and_mask_agree():
    a, b = _layer(), _layer()
    b.load_state_dict(a.state_dict())
    positions = torch.tensor([9, 2, 4])
    mask = torch.zeros(a.nnz, dtype=torch.bool)
    mask[positions] = True
    a.keep_entries(positions)
    b.keep_entries(mask)
    torch.testing.assert_close(a.weight.to_dense(), b.weight.to_dense())


@pytest.mark.parametrize("keep, error, words", [
    (torch.tensor([0, 30]), ValueError, "span [0, 30]"),
    (torch.tensor([-1, 2]), ValueError, "span [-1, 2]"),
    (torch.tensor([1, 1, 2]), ValueError, "repeat"),
    (torch.tensor([0.0, 1.0]), TypeError, "dtype torch.float32"),
    (torch.ones(3, dtype=torch.bool), ValueError, "one entry per stored weight"),
    (torch.tensor([[0, 1]]), ValueError, "1-D"),
    ([0, 1], TypeError, "list"),
])
def test_keep_entries_refuses_bad_selections(keep, error, words):
    layer = _layer()
    before = layer.values.detach().clone()
    with pytest.raises(error) as caught:
        layer.keep_entries(keep)
    assert words in str(caught.value)
    torch.testing.assert_close(layer.values.detach(), before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_convert_warns_about_non_finite_weights(bad):
    dense = nn.Linear(4, 3)
    with torch.no_grad():
        dense.weight[0, 0] = bad
        dense.weight[1, 2] = bad
    with pytest.warns(RuntimeWarning, match="2 of its 12 non-zero weights are NaN or infinite"):
        convert(dense, "coo")


def test_convert_of_finite_weights_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(nn.Linear(4, 3), "csr")


def test_magnitude_pruning_refuses_nan_and_names_the_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning):
        sparse = nn.Sequential(convert(model[0], "csr"), nn.ReLU(), convert(model[2], "csr"))
    before = [layer.nnz for layer in (sparse[0], sparse[2])]
    for scope in ("layer", "global"):
        with pytest.raises(ValueError, match=r"layer '2' holds 1 NaN or infinite weight"):
            prune_to_sparsity(sparse, 0.5, scope=scope)
    assert [layer.nnz for layer in (sparse[0], sparse[2])] == before
    with pytest.raises(ValueError, match="NaN or infinite"):
        sparse[2].prune_smallest_values(k=0.5)
