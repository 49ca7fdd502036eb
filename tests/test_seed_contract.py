"""The original package's public contract (seed README and its test suite's checks).

Written anew here; each test names the original behaviour it keeps. One original
check is deliberately different: CSR layers now train (it was a limitation).
"""
import pytest
import torch
from torch import nn

from actuallysparse import converter, layers
from actuallysparse.converter import convert, convert_model
from actuallysparse.layers import (Pruner, SparseLayer, new_random_basic_coo, new_random_basic_csr,
                                   prune_sparse_model, set_global_k)


@pytest.fixture
def iris():
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_iris()
    x = torch.tensor(data["data"], dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    return x, torch.tensor(data["target"], dtype=torch.long)


def _train(model, optimizer, x, y, steps):
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        start = loss_fn(model(x), y).item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        return start, loss_fn(model(x), y).item()


def test_readme_layer_example():
    layer = SparseLayer(in_features=3, out_features=3, bias=True, csr_mode=False, train_mode=True, k=0.05)
    assert layer(torch.ones(3)).shape == (1, 3)
    layer = SparseLayer(3, 3)
    layer.set_k(0.07)
    layer.prune_smallest_values()
    assert layer.nnz == 9  # floor(0.07 * 9) == 0: nothing to prune yet


def test_readme_model_example():
    classifier = nn.Sequential(SparseLayer(16, 16), nn.ReLU(), SparseLayer(16, 3))
    set_global_k(classifier, 0.07)
    prune_sparse_model(classifier, torch.ones(16))
    assert classifier[0].nnz == 256 - 17 and classifier[2].nnz == 48 - 3


def test_readme_convert_example():
    fc1 = nn.Linear(4, 4)
    assert str(fc1) == "Linear(in_features=4, out_features=4, bias=True)"
    assert str(convert(fc1, "coo")) == "SparseLayer(in_features=4, out_features=4, bias=True, csr_mode=False, k=0.05)"


@pytest.mark.parametrize("constructor", [layers.new_random_basic_coo, layers.new_random_basic_csr])
def test_initialization_size(constructor):
    assert torch.is_same_size(constructor(3, 3).weight.data, torch.zeros(3, 3))


@pytest.mark.parametrize("size", [[1, 3], [3, 1], [2, 3], [3, 2]])
def test_forward_size_of_one_dimensional_input(size):
    assert SparseLayer(size[0], size[1]).forward(torch.rand(size[0])).size()[1] == size[1]


@pytest.mark.parametrize("constructor", [new_random_basic_coo, new_random_basic_csr])
@pytest.mark.parametrize("size", [[3, 1], [3, 2], [3, 4]])
def test_matches_linear_forward_and_backward(constructor, size):
    linear = nn.Linear(size[0], size[1])
    sparse = constructor(size[0], size[1])
    sparse.assign_new_weight(linear.weight.data, linear.bias.data)
    data = torch.tensor([[1., 2., 3.]])
    torch.testing.assert_close(sparse(data), linear(data))
    linear(data).sum().backward()
    sparse(data).sum().backward()
    # values are stored row-major, so their gradient views as the (out, in) weight gradient
    torch.testing.assert_close(sparse.values.grad.view(size[1], size[0]), linear.weight.grad)


@pytest.mark.parametrize("k, kept_in_first_row", [(0.1, 4), (0.33, 2), (0.5, 0)])
def test_pruning_fraction_of_all_weights(k, kept_in_first_row):
    sparse = layers.new_random_basic_coo(5, 2)
    weight = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.6, 0.7, 0.8, 0.9, 1.]])
    sparse.assign_new_weight(weight)
    sparse.prune_smallest_values(k)
    expected = weight.clone()
    expected[0, :5 - kept_in_first_row] = 0
    torch.testing.assert_close(sparse.weight.to_dense(), expected)
    assert len(sparse.weight.coalesce().values()) == 5 + kept_in_first_row


@pytest.mark.parametrize("constructor", [nn.Linear, new_random_basic_coo, new_random_basic_csr])
@pytest.mark.parametrize("target", ["dense", "coo", "csr"])
def test_convert_range(constructor, target):
    data = torch.tensor([[1., 2., 3.]])
    original = constructor(3, 4)
    converted = converter.convert(original, target)
    torch.testing.assert_close(original(data), converted(data))
    torch.testing.assert_close(original.weight.to_dense(), converted.weight.to_dense())


def test_unknown_target_raises_type_error():
    with pytest.raises(TypeError):
        converter.convert(nn.Linear(1, 1), "not_a_type")


@pytest.mark.parametrize("target", ["dense", "coo", "csr"])
def test_convert_with_mask(target):
    mask = torch.tensor([[1., 0., 0.], [0., 0., 0.], [1., 1., 1.], [0., 0., 1.]])
    original = nn.Linear(3, 4)
    new = converter.convert(original, target, mask)
    assert pytest.approx(0.) == float(new.weight.data[1, 1])
    assert original.weight.data[1, 1] != 0.


def test_model_converter_recursion():
    model = nn.Sequential(nn.Linear(30, 5), nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 6), nn.Linear(6, 4)),
                          nn.Linear(5, 4), new_random_basic_coo(4, 1))
    model = convert_model(model, nn.Linear, "coo")
    assert all(type(child) is SparseLayer for child in model[1].children())


@pytest.mark.parametrize("first", [nn.Linear, new_random_basic_coo, new_random_basic_csr])
@pytest.mark.parametrize("second", [nn.Linear, new_random_basic_coo, new_random_basic_csr])
def test_models_of_any_layer_mix_learn(iris, first, second):
    x, y = iris
    model = nn.Sequential(first(4, 32), nn.Sigmoid(), second(32, 3), nn.Softmax(dim=1))
    start, end = _train(model, torch.optim.Adam(model.parameters(), lr=0.001), x, y, 100)
    assert start - end >= 0.01


def test_training_after_convert(iris):
    x, y = iris
    model = nn.Sequential(nn.Linear(4, 32), nn.Sigmoid(), nn.Linear(32, 3), nn.Softmax(dim=1))
    start, mid = _train(model, torch.optim.Adam(model.parameters(), lr=0.001), x, y, 50)
    model = convert_model(model, nn.Linear, "csr")
    mid_again, end = _train(model, torch.optim.Adam(model.parameters(), lr=0.001), x, y, 50)
    assert mid_again == pytest.approx(mid, abs=1e-5)
    assert start - mid >= 0.01 and mid - end >= 0.01


def test_pruner_with_an_optimizer_made_before_pruning(iris):
    x, y = iris
    model = nn.Sequential(new_random_basic_coo(4, 32), nn.Sigmoid(), new_random_basic_coo(32, 3), nn.Softmax(dim=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    set_global_k(model, 0.3)
    values_start = model[0].values
    pruner = Pruner(model)
    pruner(x)
    pruner.remove_hooks()
    start, end = _train(model, optimizer, x, y, 100)
    assert model[0].values.requires_grad
    assert len(values_start) > len(model[0].values)
    assert start - end >= 0.001
