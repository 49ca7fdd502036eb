"""Each method's prepare and pruning step on a narrow VGG11_bn: sparsity reached, layers still train."""

import copy
import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actuallysparse.conv import SparseConv2d
from actuallysparse.layers import SparseLayer
from actuallysparse.normalization import BatchNorm2d
from actuallysparse.storage import SparseModule
from comparison.config import RunConfig
from comparison.methods import available_methods, make_method, target_layer_names
from comparison.models import vgg11_bn
from comparison.training import make_optimizer

PRUNING = ["actuallysparse", "nni", "torch-prune", "random"]


@pytest.fixture(scope="module")
def baseline():
    return vgg11_bn(10, 0.125, seed=0)


def _prepared(baseline, name, scope="classifier"):
    method = make_method(name, scope)
    model = copy.deepcopy(baseline)
    model = method.prepare(model, target_layer_names(model, scope))
    optimizer = make_optimizer(model.parameters(), RunConfig(lr=1e-2))
    return method, model, optimizer


def _train(model, optimizer, steps=3):
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (16,), generator=generator)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _effective_weights(method, model):
    """Dense copies of what each target layer computes with, by name."""
    weights = {}
    for name in method.targets:
        module = model.get_submodule(name)
        if isinstance(module, SparseModule):
            weights[name] = module.dense_weight().clone()
        elif hasattr(module, "_nni_wrapper"):
            weights[name] = (module._nni_wrapper.weight * module._nni_wrapper.weight_mask).detach().clone()
        elif hasattr(module, "weight_orig"):
            weights[name] = (module.weight_orig * module.weight_mask).detach().clone()
        else:
            weights[name] = module.weight.detach().clone()
    return weights


def test_registry_and_unknown_method():
    assert set(available_methods()) == {"dense", "actuallysparse", "nni", "torch-prune", "actuallysparse-coo",
                                        "actuallysparse-orphaned", "random", "nni-structured", "set", "rigl"}
    with pytest.raises(ValueError, match="unknown method 'magic'.*actuallysparse, actuallysparse-coo, actuallysparse-orphaned, dense, nni"):
        make_method("magic")
    with pytest.raises(ValueError, match="classifier, all"):
        make_method("dense", scope="everything")


def test_target_layers_by_scope(baseline):
    assert target_layer_names(baseline, "classifier") == ["classifier.0", "classifier.3", "classifier.6"]
    all_layers = target_layer_names(baseline, "all")
    assert len(all_layers) == 10 and all_layers[0] == "features.4"   # the first convolution stays dense


def test_dense_never_prunes(baseline):
    method, model, optimizer = _prepared(baseline, "dense")
    method.prune(model, 0.9, optimizer)
    _train(model, optimizer)
    assert method.sparsity_counts(model)[0] == 0


@pytest.mark.parametrize("scope", ["classifier", "all"])
@pytest.mark.parametrize("name", PRUNING)
def test_step_reaches_each_target_in_every_layer(baseline, name, scope):
    method, model, optimizer = _prepared(baseline, name, scope)
    for target in (0.5, 0.9, 0.99):
        method.prune(model, target, optimizer)
        for layer in method.targets:
            zeros, total = method.layer_zeros(model, layer)
            assert abs(zeros - target * total) <= max(1, 0.002 * total), (layer, zeros, total)
        _train(model, optimizer, steps=1)


@pytest.mark.parametrize("scope", ["classifier", "all"])
@pytest.mark.parametrize("name", PRUNING)
def test_pruned_layers_train_and_pruned_weights_stay_zero(baseline, name, scope):
    method, model, optimizer = _prepared(baseline, name, scope)
    method.prune(model, 0.8, optimizer)
    before = _effective_weights(method, model)
    _train(model, optimizer, steps=3)
    after = _effective_weights(method, model)
    for layer in method.targets:
        pruned = before[layer] == 0
        kept = ~pruned
        assert pruned.float().mean() > 0.75
        assert torch.all(after[layer][pruned] == 0), f"{name}: pruned weights of {layer} came back"
        # Every target layer trains: its kept weights move (the thesis's loop froze them).
        assert not torch.allclose(after[layer][kept], before[layer][kept]), f"{name}: {layer} did not train"


@pytest.mark.parametrize("name", ["actuallysparse", "torch-prune", "random"])
def test_pruning_never_regrows(baseline, name):
    method, model, optimizer = _prepared(baseline, name)
    method.prune(model, 0.5, optimizer)
    _train(model, optimizer)
    zeros_before = {k: v == 0 for k, v in _effective_weights(method, model).items()}
    method.prune(model, 0.9, optimizer)
    for layer, weight in _effective_weights(method, model).items():
        assert torch.all(weight[zeros_before[layer]] == 0)


def test_nni_optimizer_holds_the_wrapped_weights_and_biases_are_not_masked(baseline):
    method, model, optimizer = _prepared(baseline, "nni")
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in method.targets:
        module = model.get_submodule(layer)
        assert id(module._nni_wrapper.weight) in optimized
        assert not hasattr(module._nni_wrapper, "bias_mask")
    method.prune(model, 0.9, optimizer)
    masks = method.masks()
    weights_before = {layer: model.get_submodule(layer)._nni_wrapper.weight.detach().clone() for layer in masks}
    _train(model, optimizer, steps=2)
    for layer, mask in masks.items():
        now = model.get_submodule(layer)._nni_wrapper.weight.detach()
        assert not torch.equal(now[mask.bool()], weights_before[layer][mask.bool()])


def test_nni_unwrap_applies_the_masks(baseline):
    method, model, optimizer = _prepared(baseline, "nni")
    method.prune(model, 0.9, optimizer)
    _train(model, optimizer, steps=1)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    plain = method.unwrap(model)
    assert not any("_nni_wrapper" in name for name, _ in plain.named_parameters())
    for layer in ("classifier.0", "classifier.3"):
        weight = plain.get_submodule(layer).weight
        assert isinstance(weight, nn.Parameter)
        assert (weight == 0).float().mean() >= 0.89
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected)


def test_actuallysparse_converts_linear_and_shrinks_optimizer_state(baseline):
    method, model, optimizer = _prepared(baseline, "actuallysparse")
    assert all(isinstance(model.get_submodule(layer), SparseLayer) for layer in method.targets)
    _train(model, optimizer, steps=1)
    method.prune(model, 0.9, optimizer)
    for layer in method.targets:
        module = model.get_submodule(layer)
        state = optimizer.state[module.values]
        assert state["exp_avg"].numel() == module.nnz == round(0.1 * module.in_features * module.out_features)


def test_actuallysparse_scope_all_makes_every_target_convolution_sparse(baseline):
    method, model, optimizer = _prepared(baseline, "actuallysparse", "all")
    _train(model, optimizer, steps=1)
    method.prune(model, 0.9, optimizer)
    assert method.dense_stored_layers(model) == []
    convolutions = [name for name in method.targets if name.startswith("features.")]
    assert len(convolutions) == 7 and "features.0" not in method.targets   # the first stays dense
    assert type(model.get_submodule("features.0")) is nn.Conv2d
    for name in convolutions:
        module = model.get_submodule(name)
        assert isinstance(module, SparseConv2d)
        assert module.nnz == round(0.1 * module.n_weights)
        assert optimizer.state[module.values]["exp_avg"].numel() == module.nnz
    _train(model, optimizer, steps=1)   # still trains after the values were replaced


@pytest.mark.parametrize("scope", ["classifier", "all"])
def test_random_differs_from_magnitude_and_is_seeded(baseline, scope):
    kept = {}
    for name, seed in (("actuallysparse", 0), ("random", 0), ("random", 0), ("random", 1)):
        method = make_method(name, scope, seed)
        model = method.prepare(copy.deepcopy(baseline), target_layer_names(baseline, scope))
        method.prune(model, 0.9, make_optimizer(model.parameters(), RunConfig()))
        kept.setdefault(name, []).append({k: v != 0 for k, v in _effective_weights(method, model).items()})
    magnitude, (first, again, other) = kept["actuallysparse"][0], kept["random"]
    for layer in magnitude:
        assert torch.equal(first[layer], again[layer])          # same seed, same choice
        assert not torch.equal(first[layer], magnitude[layer])  # not the magnitude choice
        assert not torch.equal(first[layer], other[layer])      # another seed, another choice
        assert abs(first[layer].float().mean() - 0.1) < 0.01


@pytest.mark.parametrize("scope", ["classifier", "all"])
def test_nni_structured_shrinks_the_model_to_each_target(baseline, scope, caplog):
    caplog.set_level(logging.ERROR)
    method, model, optimizer = _prepared(baseline, "nni-structured", scope)
    dense_weights = sum(model.get_submodule(name).weight.numel() for name in method.targets)
    for target in (0.5, 0.9):
        optimizer = method.prune(model, target, optimizer) or optimizer
        zeros, total = method.sparsity_counts(model)
        assert abs(zeros / total - target) <= 0.05, (target, zeros / total)
        # the optimizer it hands back trains the new, smaller parameters
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert held == {id(p) for p in model.parameters()}
        before = [p.detach().clone() for p in model.parameters()]
        _train(model, optimizer, steps=1)
        assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    # the weights are gone from the model, not zeroed
    assert sum(model.get_submodule(name).weight.numel() for name in method.targets) < 0.15 * dense_weights
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # the rebuilt batch norms are the library's again and still compute the relu after them
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    assert norms and all(type(norm) is BatchNorm2d and norm.fused_relu for norm in norms)
    # no paragraph about layers that keep their channels (pooling, the Identity a fused ReLU leaves)
    assert not [record for record in caplog.records if "replacing module with type" in record.getMessage()]


def test_nni_structured_speedup_computes_what_the_masked_model_computed():
    from comparison.methods import nni_masks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    method = make_method("nni-structured", "all")
    method.prepare(model, target_layer_names(model, "all"))
    x = torch.randn(5, 3, 32, 32)
    fraction = method.channel_fraction(0.6)
    masked = copy.deepcopy(model)
    with torch.no_grad():  # what the pruner's masks compute: the smallest-L1 channels zeroed
        for name in method.targets[:-1]:
            layer = masked.get_submodule(name)
            outputs = layer.weight.shape[0]
            norms = layer.weight.abs().flatten(1).sum(1)
            dropped = torch.topk(norms, outputs - nni_masks._keep(outputs, fraction), largest=False).indices
            layer.weight[dropped] = 0
            layer.bias[dropped] = 0
    method.prune(model, 0.6, torch.optim.SGD(model.parameters(), lr=0.1))
    assert model[0].out_channels == 8 and model[2].out_channels < 8 and model[6].out_features < 16  # first conv kept
    torch.testing.assert_close(model(x), masked(x), atol=1e-5, rtol=1e-5)


def test_importing_nni_prints_none_of_its_pytree_warnings():
    # NNI is imported once per process, so a fresh one shows what a run's first NNI cell prints
    code = ("import warnings; warnings.simplefilter('always')\n"
            "from comparison.methods.nni_masks import _nni\n"
            "_nni('LevelPruner')\n"
            "import nni.compression.speedup.utils  # imported: the warnings' source ran\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "pytree" not in result.stderr, result.stderr
