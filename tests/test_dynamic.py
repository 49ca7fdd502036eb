"""Dynamic sparse training: make_sparse, SET and RigL against dense references, on every backend."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actuallysparse.conv import SparseConv2d
from actuallysparse.dynamic import SET, RigL, layer_densities, make_sparse
from actuallysparse.layers import SparseLayer


def _model(dtype=torch.float32):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 20), nn.ReLU(inplace=True), nn.Linear(20, 10)).to(dtype)


def _batch(dtype=torch.float32):
    return torch.randn(4, 3, 6, 6, dtype=dtype), torch.randint(0, 10, (4,))


def _train_step(model, optimizer, updater=None, batch=None):
    x, y = batch or _batch(next(model.parameters()).dtype)
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return updater.step() if updater is not None else 0


def _keys(layer):
    rows, cols = layer._rows_cols()
    return set((rows * layer._matrix_shape[1] + cols).tolist())


# ----------------------------------------------------------------- allocation
def test_uniform_gives_every_layer_the_same_density():
    assert layer_densities([(10, 20), (5, 5, 3, 3)], 0.75, "uniform") == [0.25, 0.25]


def test_erk_meets_the_budget_and_favours_small_layers():
    shapes = [(64, 3, 3, 3), (128, 64, 3, 3), (256, 128, 3, 3), (10, 256)]
    densities = layer_densities(shapes, 0.9, "erk")
    sizes = [math.prod(shape) for shape in shapes]
    assert sum(d * n for d, n in zip(densities, sizes)) == pytest.approx(0.1 * sum(sizes))
    assert densities[0] == 1.0  # the tiny first convolution would exceed 1: kept whole
    assert densities[1] > densities[2]  # larger layers are sparser
    expected_ratio = (sum(shapes[1]) / sizes[1]) / (sum(shapes[2]) / sizes[2])
    assert densities[1] / densities[2] == pytest.approx(expected_ratio)


def test_make_sparse_stores_the_initial_values_at_the_allocated_density():
    torch.manual_seed(0)
    model = _model()
    dense_weights = {name: module.weight.detach().clone() for name, module in model.named_modules()
                     if isinstance(module, (nn.Linear, nn.Conv2d))}
    make_sparse(model, 0.8, "uniform", seed=3)
    layers = {name: module for name, module in model.named_modules() if hasattr(module, "nnz")}
    assert isinstance(layers["0"], SparseConv2d) and isinstance(layers["3"], SparseLayer)
    assert not any(isinstance(module, (nn.Linear, nn.Conv2d)) for module in model.modules())
    for name, layer in layers.items():
        assert layer.nnz == round(0.2 * layer.n_weights)
        rows, cols = layer._rows_cols()
        torch.testing.assert_close(layer.values.detach(), dense_weights[name].reshape(len(layer.bias), -1)[rows, cols])
        counts = torch.bincount(rows, minlength=layer._matrix_shape[0])
        assert int(counts.max() - counts.min()) <= 1  # spread evenly over the rows
    again = make_sparse(_model(), 0.8, "uniform", seed=3)
    assert _keys(again[3]) == _keys(layers["3"])


def test_make_sparse_converts_only_the_named_layers():
    model = make_sparse(_model(), 0.9, layers=["3"])
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[3], SparseLayer) and isinstance(model[5], nn.Linear)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=0.0), r"sparsity must be a number in \(0, 1\).*got 0.0"),
    (dict(sparsity=1), r"sparsity must be a number in \(0, 1\).*got 1"),
    (dict(sparsity=0.9, distribution="er"), "distribution must be one of 'erk', 'uniform', got 'er'"),
    (dict(sparsity=0.9, layers=["1"]), "'1' is ReLU"),
])
def test_make_sparse_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_sparse(_model(), **kwargs)


# ----------------------------------------------------------------- updates
def test_the_drop_fraction_decays_by_a_cosine_to_zero_at_end_step():
    model = make_sparse(_model(), 0.8)
    updater = SET(model, torch.optim.SGD(model.parameters(), lr=0.1), update_every=10, drop_fraction=0.4,
                  end_step=100)
    assert updater.current_drop_fraction(0) == pytest.approx(0.4)
    assert updater.current_drop_fraction(50) == pytest.approx(0.2)
    assert updater.current_drop_fraction(100) == 0.0
    assert [step for step in range(0, 121) if updater.is_update_step(step)] == list(range(10, 100, 10))


@pytest.mark.parametrize("kind", [SET, RigL])
def test_an_update_moves_weights_keeping_nnz_values_and_optimizer_state(backend, kind):
    torch.manual_seed(0)
    model = make_sparse(_model(), 0.8, "erk")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    updater = kind(model, optimizer, update_every=2, drop_fraction=0.3, end_step=100)
    assert _train_step(model, optimizer, updater) == 0
    layers = [module for module in model.modules() if hasattr(module, "nnz")]
    before = []
    for layer in layers:
        state = optimizer.state[layer.values]
        rows, cols = layer._rows_cols()
        keys = (rows * layer._matrix_shape[1] + cols).tolist()
        before.append({key: (float(v), float(m), float(s)) for key, v, m, s in
                       zip(keys, layer.values.detach(), state["exp_avg"], state["exp_avg_sq"])})
    x, y = _batch()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after_step = [{key: (float(v), float(m), float(s)) for key, v, m, s in zip(
        (layer._rows_cols()[0] * layer._matrix_shape[1] + layer._rows_cols()[1]).tolist(), layer.values.detach(),
        optimizer.state[layer.values]["exp_avg"], optimizer.state[layer.values]["exp_avg_sq"])} for layer in layers]
    moved = updater.step()
    assert moved == sum(min(round(updater.current_drop_fraction(2) * len(b)), layer.n_weights - len(b))
                        for b, layer in zip(before, layers))
    for layer, old in zip(layers, after_step):
        state = optimizer.state[layer.values]
        assert sum(param is layer.values for param in optimizer.param_groups[0]["params"]) == 1
        rows, cols = layer._rows_cols()
        keys = (rows * layer._matrix_shape[1] + cols).tolist()
        assert layer.nnz == len(old) and len(set(keys)) == len(keys)
        new = [key for key in keys if key not in old]
        assert len(new) == len(old) - len(set(keys) & set(old))
        for key, value, m, s in zip(keys, layer.values.detach(), state["exp_avg"], state["exp_avg_sq"]):
            if key in old:
                assert (float(value), float(m), float(s)) == old[key]   # bit for bit
            else:
                assert float(value) == float(m) == float(s) == 0.0
        # the dropped ones were the smallest stored magnitudes
        dropped = [abs(old[key][0]) for key in old if key not in keys]
        kept = [abs(old[key][0]) for key in old if key in keys]
        if dropped:
            assert max(dropped) <= min(kept)
    _train_step(model, optimizer, updater)  # trains on after the move


def _dense_gradient(layer, x, grad_output):
    """The dense fp64 reference of dL/dW for one layer."""
    if isinstance(layer, SparseConv2d):
        weight = layer.dense_weight().double().requires_grad_()
        out = F.conv2d(x.double(), weight, None, layer.stride, layer.padding, layer.dilation)
    else:
        weight = layer.dense_weight().double().requires_grad_()
        out = x.double() @ weight.T
    out.backward(grad_output.double())
    return weight.grad.reshape(layer._matrix_shape[0], -1)


@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
def test_rigl_regrows_where_the_dense_gradient_is_largest(backend, layer_kind, monkeypatch):
    torch.manual_seed(1)
    if layer_kind == "linear":
        model = make_sparse(nn.Sequential(nn.Linear(13, 9, dtype=torch.float64)), 0.7, "uniform")
        x = torch.randn(5, 13, dtype=torch.float64)
    else:
        model = make_sparse(nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1, dtype=torch.float64)), 0.7,
                            "uniform")
        x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    # small gradient blocks, so the merge across blocks is exercised
    monkeypatch.setattr("actuallysparse.dynamic.GRADIENT_BLOCK_ELEMENTS", 30)
    layer = model[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # no weight changes: only the move
    rigl = RigL(model, optimizer, update_every=1, drop_fraction=0.25, end_step=10)
    out = model(x)
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    optimizer.step()
    old_keys = _keys(layer)
    gradient = _dense_gradient(layer, x, grad_output).abs().flatten()
    k = round(rigl.current_drop_fraction(1) * layer.nnz)
    gradient[list(old_keys)] = -1
    expected = set(torch.sort(gradient, descending=True, stable=True).indices[:k].tolist())
    assert rigl.step() == k
    assert _keys(layer) - old_keys == expected


def test_rigl_breaks_ties_by_the_lower_position():
    model = make_sparse(nn.Sequential(nn.Linear(6, 4, dtype=torch.float64)), 0.5, "uniform")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    rigl = RigL(model, optimizer, update_every=1, drop_fraction=0.5, end_step=10)
    model(torch.zeros(3, 6, dtype=torch.float64)).sum().backward()  # every gradient is 0: all tie
    old = _keys(model[0])
    k = round(rigl.current_drop_fraction(1) * model[0].nnz)
    rigl.step()
    absent = sorted(set(range(24)) - old)
    assert _keys(model[0]) - old == set(absent[:k])


def test_set_is_seeded_and_reproducible():
    def run(seed):
        torch.manual_seed(0)
        model = make_sparse(_model(), 0.8, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        updater = SET(model, optimizer, update_every=1, drop_fraction=0.3, end_step=10, seed=seed)
        torch.manual_seed(5)
        for _ in range(3):
            _train_step(model, optimizer, updater)
        return [_keys(layer) for layer in model.modules() if hasattr(layer, "nnz")]

    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize("kind", [SET, RigL])
def test_nothing_moves_when_nothing_is_left_to_regrow_or_to_drop(kind):
    model = nn.Sequential(SparseLayer(4, 3), nn.ReLU(), make_sparse(nn.Sequential(nn.Linear(3, 2)), 0.5)[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    full = _keys(model[0])
    updater = kind(model, optimizer, update_every=1, drop_fraction=0.0, end_step=5)
    batch = (torch.randn(2, 4), torch.tensor([0, 1]))
    assert _train_step(model, optimizer, updater, batch) == 0       # a drop fraction of 0
    updater.drop_fraction = 0.5
    assert _train_step(model, optimizer, updater, batch) > 0
    assert _keys(model[0]) == full                                   # the whole layer: nothing absent
    for _ in range(5):
        _train_step(model, optimizer, updater, batch)
    before = _keys(model[2])
    assert updater.step_count >= 5 and _train_step(model, optimizer, updater, batch) == 0  # past end_step
    assert _keys(model[2]) == before


def test_rigl_without_a_captured_batch_says_what_to_do():
    model = make_sparse(_model(), 0.8)
    rigl = RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), update_every=1, drop_fraction=0.3, end_step=10)
    with pytest.raises(RuntimeError, match="call rigl.step\\(\\) once per training step, after loss.backward"):
        rigl.step()


@pytest.mark.parametrize("kwargs, message", [
    (dict(update_every=0), "update_every must be a positive integer"),
    (dict(end_step=-3), "end_step must be a positive integer"),
    (dict(drop_fraction=1.5), r"drop_fraction must be a number in \[0, 1\], got 1.5"),
])
def test_bad_arguments_are_refused(kwargs, message):
    model = make_sparse(_model(), 0.8)
    settings = dict(update_every=10, drop_fraction=0.3, end_step=100) | kwargs
    with pytest.raises(ValueError, match=message):
        RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), **settings)


def test_a_model_without_sparse_layers_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="Sequential has none: call make_sparse"):
        SET(model, torch.optim.SGD(model.parameters(), lr=0.1), end_step=10)


def test_top_k_positions_is_a_stable_selection():
    from actuallysparse.dynamic import top_k_positions

    scores = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, 0.0, 2.0])
    assert top_k_positions(scores, 2).tolist() == [0, 2]           # a three-way tie: the lower two
    assert top_k_positions(scores, 4).tolist() == [0, 2, 3, 4]
    assert top_k_positions(scores, 0).tolist() == []
    assert top_k_positions(scores, 9).tolist() == list(range(7))
    many = torch.randint(0, 5, (1000,)).double()
    for k in (1, 17, 500, 999):
        expected = sorted(torch.sort(many, descending=True, stable=True).indices[:k].tolist())
        assert top_k_positions(many, k).tolist() == expected


def test_move_entries_refuses_positions_taken_repeated_or_outside():
    layer = make_sparse(nn.Sequential(nn.Linear(5, 4)), 0.5, "uniform")[0]
    rows, cols = layer._rows_cols()
    absent = (layer.dense_weight() == 0).nonzero()
    keep = torch.arange(layer.nnz - 1)
    with pytest.raises(ValueError, match="already stored"):
        layer.move_entries(keep, rows[:1], cols[:1])
    with pytest.raises(ValueError, match="repeat"):
        layer.move_entries(keep, absent[[0, 0], 0], absent[[0, 0], 1])
    with pytest.raises(ValueError, match="must lie in the 4 x 5 weight matrix"):
        layer.move_entries(keep, torch.tensor([4]), torch.tensor([0]))
    before = layer.nnz
    layer.move_entries(keep, absent[:1, 0], absent[:1, 1])
    assert layer.nnz == before and float(layer.dense_weight()[absent[0, 0], absent[0, 1]]) == 0.0
