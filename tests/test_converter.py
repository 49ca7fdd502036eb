"""convert / convert_model: every pair of formats, masks, zeros dropped, models copied."""
import pytest
import torch
from torch import nn

from actuallysparse.converter import CONVERSION_TARGETS, convert, convert_model
from actuallysparse.layers import SparseLayer, new_random_basic_coo, new_random_basic_csr
from actuallysparse.pruning import prune_to_sparsity

CONSTRUCTORS = {"dense": nn.Linear, "coo": new_random_basic_coo, "csr": new_random_basic_csr}


def _pruned(kind, in_features=6, out_features=5, sparsity=0.5):
    layer = CONSTRUCTORS[kind](in_features, out_features)
    if kind != "dense":
        prune_to_sparsity(layer, sparsity)
    return layer


def _dense_weight(layer):
    return layer.weight.detach().to_dense() if isinstance(layer, SparseLayer) else layer.weight.detach()


@pytest.mark.parametrize("source", CONSTRUCTORS)
@pytest.mark.parametrize("target", CONVERSION_TARGETS)
def test_conversion_keeps_function_and_weights(source, target):
    original = _pruned(source)
    converted = convert(original, target)
    expected_type = nn.Linear if target == "dense" else SparseLayer
    assert type(converted) is expected_type
    if target != "dense":
        assert converted.is_CSR() == (target == "csr")
    x = torch.randn(3, 6)
    torch.testing.assert_close(converted(x), original(x))
    torch.testing.assert_close(_dense_weight(converted), _dense_weight(original))


@pytest.mark.parametrize("target", ["coo", "csr"])
def test_zeros_are_dropped(target):
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight[0] = 0
        linear.weight[2, 1] = 0
    converted = convert(linear, target)
    assert converted.nnz == 12 - 5
    assert torch.count_nonzero(converted.values) == converted.nnz


@pytest.mark.parametrize("source", CONSTRUCTORS)
@pytest.mark.parametrize("target", CONVERSION_TARGETS)
def test_mask_removes_weights_and_leaves_original(source, target):
    original = CONSTRUCTORS[source](3, 4)
    mask = torch.tensor([[1., 0., 0.], [0., 0., 0.], [1., 1., 1.], [0., 0., 1.]])
    converted = convert(original, target, mask)
    weight = _dense_weight(converted)
    assert torch.all(weight[mask == 0] == 0)
    torch.testing.assert_close(weight[mask == 1], _dense_weight(original)[mask == 1])
    assert _dense_weight(original)[1, 1] != 0


def test_mask_that_is_not_a_tensor():
    with pytest.raises(TypeError, match="mask must be a torch.Tensor of shape \\(4, 3\\), got list"):
        convert(nn.Linear(3, 4), "csr", [[1.0]])


def test_mask_of_wrong_shape():
    with pytest.raises(ValueError, match=r"mask has shape \(3, 4\), expected the weight's shape \(4, 3\)"):
        convert(nn.Linear(3, 4), "coo", torch.ones(3, 4))


def test_unknown_target_is_a_type_error_listing_valid_targets():
    with pytest.raises(TypeError, match="'dense', 'coo', 'csr'"):
        convert(nn.Linear(1, 1), "not_a_type")
    with pytest.raises(TypeError, match="valid targets"):
        convert_model(nn.Sequential(nn.Linear(1, 1)), nn.Linear, "bsr")


def test_unsupported_layer_type():
    with pytest.raises(TypeError, match="Conv1d"):
        convert(nn.Conv1d(1, 1, 1), "coo")
    with pytest.raises(TypeError, match="layer_type"):
        convert_model(nn.Sequential(nn.Conv1d(1, 1, 1)), nn.Conv1d, "coo")
    with pytest.raises(ValueError, match="groups=2"):
        convert(nn.Conv2d(2, 2, 1, groups=2), "csr")
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        convert(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "coo")


def test_k_dtype_and_mode_carry_over():
    layer = SparseLayer(4, 3, k=0.2).double()
    layer.eval()
    converted = convert(layer, "csr")
    assert converted.k == 0.2 and converted.values.dtype == torch.float64 and not converted.training
    assert convert(layer, "dense").weight.dtype == torch.float64


def test_convert_model_is_recursive_and_leaves_original_untouched():
    model = nn.Sequential(nn.Linear(30, 5), nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 5)),
                          nn.Linear(5, 4), new_random_basic_coo(4, 1))
    x = torch.randn(2, 30)
    expected = model(x)
    converted = convert_model(model, nn.Linear, "csr")
    assert converted is not model
    assert [type(m) for m in converted.modules()].count(SparseLayer) == 5
    assert [type(m) for m in model.modules()].count(nn.Linear) == 4
    torch.testing.assert_close(converted(x), expected)
    back = convert_model(converted, SparseLayer, "dense")
    assert not any(isinstance(m, SparseLayer) for m in back.modules())
    torch.testing.assert_close(back(x), expected)


def test_seed_readme_example_prints_as_documented():
    classifier = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    assert str(convert_model(classifier, nn.Linear, "coo")) == (
        "Sequential(\n"
        "  (0): SparseLayer(in_features=16, out_features=16, bias=True, csr_mode=False, k=0.05)\n"
        "  (1): ReLU()\n"
        "  (2): SparseLayer(in_features=16, out_features=3, bias=True, csr_mode=False, k=0.05)\n"
        ")"
    )
