"""Target-sparsity pruning and optimizers that survive it."""
import math

import pytest
import torch
from torch import nn

from actuallysparse.converter import convert, convert_model
from actuallysparse.layers import SparseLayer, prune_sparse_model, set_global_k
from actuallysparse.optim import remap_orphans
from actuallysparse.pruning import achieved_sparsity, prune_to_sparsity

OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01),
}


def _trained(layer, optimizer, steps=3):
    for _ in range(steps):
        optimizer.zero_grad()
        layer(torch.randn(8, layer.in_features)).pow(2).sum().backward()
        optimizer.step()


@pytest.mark.parametrize("fmt", ["coo", "csr"])
@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_layer_reaches_target_sparsity(fmt, target):
    layer = convert(nn.Linear(40, 25), fmt)
    achieved = prune_to_sparsity(layer, target)
    assert layer.nnz == 1000 - round(target * 1000)
    assert achieved == pytest.approx(target)


def test_pruning_keeps_the_largest_and_never_regrows():
    layer = convert(nn.Linear(20, 10), "csr")
    magnitudes = layer.weight.to_dense().abs()
    prune_to_sparsity(layer, 0.7)
    kept = layer.weight.to_dense() != 0
    assert magnitudes[kept].min() >= magnitudes[~kept].max()
    prune_to_sparsity(layer, 0.5)  # lower target: nothing comes back
    assert torch.equal(layer.weight.to_dense() != 0, kept)


def test_global_scope_uses_one_threshold_across_layers():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    with torch.no_grad():
        model[0].weight.abs_().add_(1.0)  # every weight of the first layer is larger
        model[1].weight.abs_().clamp_(min=1e-3)
    sparse = convert_model(model, nn.Linear, "coo")
    achieved = prune_to_sparsity(sparse, 0.5, scope="global")
    assert achieved == pytest.approx(0.5)
    assert sparse[0].nnz == 100 and sparse[1].nnz == 0
    per_layer = convert_model(model, nn.Linear, "coo")
    prune_to_sparsity(per_layer, 0.5, scope="layer")
    assert per_layer[0].nnz == per_layer[1].nnz == 50


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half"])
def test_bad_target(bad):
    with pytest.raises(ValueError, match="target_sparsity must be"):
        prune_to_sparsity(SparseLayer(3, 3), bad)


def test_bad_scope_and_no_sparse_layer():
    with pytest.raises(ValueError, match="'layer', 'global'"):
        prune_to_sparsity(SparseLayer(3, 3), 0.5, scope="model")
    with pytest.raises(ValueError, match="no sparse layer"):
        prune_to_sparsity(nn.Linear(3, 3), 0.5)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_passed_in_is_updated_on_the_spot(name):
    layer = convert(nn.Linear(16, 8), "csr")
    optimizer = OPTIMIZERS[name](layer.parameters())
    _trained(layer, optimizer)
    old = layer.values
    old_state = {k: v.clone() for k, v in optimizer.state[old].items()}
    rows_before, cols_before = layer._rows_cols()
    prune_to_sparsity(layer, 0.75, optimizer=optimizer)
    new = layer.values
    assert any(p is new for p in optimizer.param_groups[0]["params"])
    assert not any(p is old for p in optimizer.param_groups[0]["params"])
    assert old not in optimizer.state
    # the state kept is the old state at the kept positions
    rows, cols = layer._rows_cols()
    position = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows_before, cols_before))}
    keep = torch.tensor([position[(int(r), int(c))] for r, c in zip(rows, cols)])
    for key, value in old_state.items():
        if value.dim():
            torch.testing.assert_close(optimizer.state[new][key], value[keep])
        else:
            torch.testing.assert_close(optimizer.state[new][key], value)
    before = new.detach().clone()
    _trained(layer, optimizer, steps=1)
    assert not torch.equal(before, layer.values.detach())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_not_told_is_remapped_before_its_next_step(name):
    """The thesis's bug: the optimizer went on stepping the orphaned parameter."""
    layer = convert(nn.Linear(16, 8), "coo")
    optimizer = OPTIMIZERS[name](layer.parameters())
    _trained(layer, optimizer)
    orphan = layer.values
    layer.set_k(0.3)
    layer.prune_smallest_values()
    layer.prune_smallest_values()  # two prunings before a step: the chain is followed
    orphan_before = orphan.detach().clone()
    kept_before = layer.values.detach().clone()
    _trained(layer, optimizer, steps=1)
    assert torch.equal(orphan.detach(), orphan_before), "the orphan must not be stepped"
    assert not torch.equal(layer.values.detach(), kept_before), "the pruned layer must train"
    assert any(p is layer.values for p in optimizer.param_groups[0]["params"])
    assert all(v.shape == layer.values.shape for v in optimizer.state[layer.values].values() if v.dim())


def test_remap_orphans_reports_count():
    layer = SparseLayer(6, 6)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.prune_smallest_values()
    assert remap_orphans(optimizer) == 1
    assert remap_orphans(optimizer) == 0


def test_training_after_pruning_lowers_the_loss():
    """The actually-sparse loop with one optimizer made before the loop keeps learning."""
    torch.manual_seed(1)
    x = torch.randn(256, 20)
    y = (x[:, :3].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
    sparse = convert_model(model, nn.Linear, "coo")
    optimizer = torch.optim.Adam(sparse.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        start = loss_fn(sparse(x), y).item()
    for target in (0.3, 0.5, 0.7):
        prune_to_sparsity(sparse, target)  # optimizer not told
        for _ in range(30):
            optimizer.zero_grad()
            loss_fn(sparse(x), y).backward()
            optimizer.step()
    with torch.no_grad():
        end = loss_fn(sparse(x), y).item()
    assert achieved_sparsity(sparse) == pytest.approx(0.7, abs=1e-3)
    assert end < 0.5 * start


def test_prune_sparse_model_and_set_global_k_reach_nested_layers():
    model = nn.Sequential(SparseLayer(16, 16), nn.ReLU(), nn.Sequential(SparseLayer(16, 3)))
    set_global_k(model, 0.25)
    assert model[0].k == model[2][0].k == 0.25
    prune_sparse_model(model, torch.ones(16))
    assert model[0].nnz == 256 - 64
    assert model[2][0].nnz == 48 - math.floor(0.25 * 48)


def test_prune_sparse_model_updates_a_given_optimizer():
    model = nn.Sequential(SparseLayer(8, 8), nn.ReLU(), SparseLayer(8, 2))
    optimizer = torch.optim.Adam(model.parameters())
    prune_sparse_model(model, torch.ones(8), optimizer=optimizer)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model[0].values) in held and id(model[2].values) in held


def test_disabling_the_remap_reproduces_the_thesis_bug():
    from actuallysparse.optim import orphan_remapping_disabled

    layer = convert(nn.Linear(16, 8), "coo")
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.01)
    _trained(layer, optimizer)
    with orphan_remapping_disabled():
        prune_to_sparsity(layer, 0.5)
        kept_before = layer.values.detach().clone()
        _trained(layer, optimizer, steps=2)
        assert torch.equal(layer.values.detach(), kept_before), "the pruned layer is never trained"
    _trained(layer, optimizer, steps=1)  # the hook is back: the orphan is remapped now
    assert not torch.equal(layer.values.detach(), kept_before)


def test_assigning_a_new_weight_reaches_an_earlier_optimizer_with_fresh_state():
    layer = SparseLayer(6, 4)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.01)
    _trained(layer, optimizer)
    layer.assign_new_weight(torch.eye(4, 6))
    assert layer.nnz == 4
    before = layer.values.detach().clone()
    _trained(layer, optimizer, steps=1)
    assert not torch.equal(layer.values.detach(), before)
    # Adam restarted for the new weight: one step, not four
    assert int(optimizer.state[layer.values]["step"]) == 1


def test_loading_a_checkpoint_of_other_nnz_reaches_an_earlier_optimizer():
    source = convert(nn.Linear(8, 5), "csr")
    prune_to_sparsity(source, 0.6)
    layer = SparseLayer(8, 5, csr_mode=True)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    _trained(layer, optimizer)
    layer.load_state_dict(source.state_dict())
    assert any(p is layer.values for p in optimizer.param_groups[0]["params"])


def test_an_optimizer_that_stepped_is_remapped_at_once():
    """Its state_dict() right after pruning (a checkpoint) must not hold the stale parameter."""
    layer = convert(nn.Linear(8, 4), "coo")
    optimizer = torch.optim.Adam(layer.parameters())
    _trained(layer, optimizer)
    prune_to_sparsity(layer, 0.5)
    assert any(p is layer.values for p in optimizer.param_groups[0]["params"])
    state = optimizer.state_dict()
    fresh = torch.optim.Adam(layer.parameters())
    fresh.load_state_dict(state)
    _trained(layer, fresh, steps=1)


def test_optimizer_argument_is_checked():
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer or None, got str"):
        prune_to_sparsity(SparseLayer(4, 4), 0.5, optimizer="adam")


def test_prune_sparse_model_leaves_batchnorm_statistics_alone():
    model = nn.Sequential(SparseLayer(4, 4), nn.BatchNorm1d(4))
    model.train()
    mean_before = model[1].running_mean.clone()
    prune_sparse_model(model, torch.randn(8, 4) + 5)
    assert torch.equal(model[1].running_mean, mean_before)
    assert model.training and model[0].training and model[0].train_mode
