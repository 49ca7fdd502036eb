"""BatchNorm folded into the layer before it gives the same outputs, on every backend."""
import copy

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

from actuallysparse.converter import convert
from actuallysparse.fusion import drop_identities, fuse_batchnorm, fuse_pooling, use_native_layers


def _with_statistics(norm):
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        if norm.weight is not None:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-1, 1)
    return norm


def _same_training_step(model, reference, x):
    """One forward (training mode: batch statistics) and backward of both on copies of ``x``: the
    same outputs and input gradients."""
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = model(x_ours), reference(x_ref)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad)


def _model(conv_bias=True, affine=True):
    conv = convert(nn.Conv2d(3, 6, 3, padding=1, bias=conv_bias, dtype=torch.float64), "csr")
    conv.keep_entries(torch.rand(conv.nnz) < 0.4)
    linear = convert(nn.Linear(6 * 4 * 4, 5, dtype=torch.float64), "coo")
    linear.keep_entries(torch.rand(linear.nnz) < 0.3)
    return nn.Sequential(conv, _with_statistics(nn.BatchNorm2d(6, affine=affine, dtype=torch.float64)), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), linear,
                         _with_statistics(nn.BatchNorm1d(5, affine=affine, dtype=torch.float64)))


@pytest.mark.parametrize("conv_bias, affine", [(True, True), (False, True), (True, False)])
def test_folded_model_computes_the_same(backend, conv_bias, affine):
    model = _model(conv_bias, affine).eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    expected = model(x)
    nnz = [model[0].nnz, model[5].nnz]
    assert fuse_batchnorm(model) == 2
    assert isinstance(model[1], nn.Identity) and isinstance(model[6], nn.Identity)
    assert [model[0].nnz, model[5].nnz] == nnz   # the pattern is unchanged
    torch.testing.assert_close(model(x), expected)


def test_training_mode_is_refused_and_nothing_changes():
    model = _model()
    before = model[0].values.detach().clone()
    with pytest.raises(ValueError, match="training mode: call model.eval\\(\\) first"):
        fuse_batchnorm(model)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match="training mode"):
        fuse_batchnorm(model)
    assert torch.equal(model[0].values.detach(), before) and isinstance(model[1], nn.BatchNorm2d)


def test_only_a_batchnorm_right_after_its_layer_is_folded():
    apart = nn.Sequential(convert(nn.Conv2d(3, 4, 3), "csr"), nn.ReLU(), nn.BatchNorm2d(4))
    assert fuse_batchnorm(apart.eval()) == 0
    assert isinstance(apart[-1], nn.BatchNorm2d)


@pytest.mark.parametrize("bias", [True, False])
def test_a_dense_layer_folds_its_batchnorm_unless_its_weight_is_masked(bias):
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=bias, dtype=torch.float64),
                         _with_statistics(nn.BatchNorm2d(4, dtype=torch.float64)), nn.ReLU()).eval()
    linear = nn.Sequential(nn.Linear(6, 5, bias=bias, dtype=torch.float64),
                           _with_statistics(nn.BatchNorm1d(5, dtype=torch.float64))).eval()
    for model, x in ((conv, torch.randn(2, 3, 5, 5, dtype=torch.float64)),
                     (linear, torch.randn(3, 6, dtype=torch.float64))):
        expected = model(x)
        assert fuse_batchnorm(model) == 1
        assert isinstance(model[1], nn.Identity)
        torch.testing.assert_close(model(x), expected)
    # a dense convolution has no relu of its own: a norm that computed one leaves it in its place
    native = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=bias, dtype=torch.float64),
                           _with_statistics(nn.BatchNorm2d(4, dtype=torch.float64)), nn.ReLU())
    use_native_layers(native)
    native.eval()
    expected = native(x := torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert fuse_batchnorm(native) == 1 and type(native[1]) is nn.ReLU
    torch.testing.assert_close(native(x), expected)
    # a weight recomputed from weight_orig * mask before every call would undo the scaling
    masked = nn.Sequential(nn.Conv2d(3, 4, 3), _with_statistics(nn.BatchNorm2d(4))).eval()
    torch.nn.utils.prune.random_unstructured(masked[0], "weight", amount=0.5)
    assert fuse_batchnorm(masked) == 0
    assert isinstance(masked[1], nn.BatchNorm2d)


def test_a_batchnorm_without_running_statistics_is_refused():
    model = nn.Sequential(convert(nn.Conv2d(3, 4, 3), "csr"), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="keeps no running statistics"):
        fuse_batchnorm(model)


def test_native_layers_take_torch_s_pooling_and_norms_and_compute_the_same(backend):
    from actuallysparse.fusion import use_native_layers
    from actuallysparse.normalization import BatchNorm2d
    from actuallysparse.pooling import MaxPool2x2

    from actuallysparse.dropout import Dropout

    model = _model().train()
    model.append(nn.Sequential(nn.MaxPool2d(3), nn.MaxPool2d(2, 1), nn.MaxPool2d((2, 2), ceil_mode=True)))
    model.append(nn.Dropout(0.3))
    reference = copy.deepcopy(model)
    # the BatchNorm2d, the ReLU after it (fused into the norm), the 2x2 pooling of stride 2, dropout
    assert use_native_layers(model) == 4
    assert type(model[8]) is Dropout and model[8].p == 0.3
    assert type(model[1]) is BatchNorm2d and type(model[3]) is MaxPool2x2
    assert model[1].fused_relu and type(model[2]) is nn.Identity and "fused_relu=True" in repr(model[1])
    assert all(type(pool) is nn.MaxPool2d for pool in model[7])     # other poolings are left as they are
    assert type(model[6]) is nn.BatchNorm1d
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    _same_training_step(model[:7], reference[:7], x)
    torch.testing.assert_close(model[1].weight.grad, reference[1].weight.grad)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    model.eval()
    reference.eval()
    assert fuse_batchnorm(model) == 2                     # the library's norm folds like torch's
    # and hands the relu it computed to the convolution, which writes it with its output
    assert type(model[1]) is nn.Identity and model[0].fused_relu and "fused_relu=True" in repr(model[0])
    torch.testing.assert_close(model[:7](x), reference[:7](x))


def test_native_layers_can_leave_the_relus_alone():
    from actuallysparse.fusion import use_native_layers

    model = _model()
    assert use_native_layers(model, fuse_relu=False) == 2
    assert not model[1].fused_relu and type(model[2]) is nn.ReLU


def test_pooling_after_a_sparse_convolution_is_handed_to_it(backend):
    from actuallysparse.fusion import fuse_pooling

    model = _model().eval()
    model[3] = nn.MaxPool2d((2, 2), stride=2)
    follow = nn.Sequential(convert(nn.Conv2d(6, 4, 3, padding=1, dtype=torch.float64), "coo"), nn.MaxPool2d(3),
                           convert(nn.Conv2d(4, 4, 1, dtype=torch.float64), "csr"), nn.MaxPool2d(2, 1),
                           nn.Conv2d(4, 4, 1, dtype=torch.float64), nn.MaxPool2d(2))
    model.insert(4, follow)
    model[6] = convert(nn.Linear(16, 5, dtype=torch.float64), "coo")   # 4 channels x 2 x 2 after the blocks
    reference = copy.deepcopy(model)
    # through the norm? no: a BatchNorm2d stands between the first convolution and its pooling
    assert fuse_pooling(model) == 0
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    assert fuse_batchnorm(model) == 2 and fuse_pooling(model) == 1   # then through Identity and ReLU
    assert model[0].fused_relu is False and model[0].fused_pool and type(model[3]) is nn.Identity
    assert type(model[2]) is nn.ReLU and "fused_pool=True" in repr(model[0])
    # pools of other shapes, and after a dense convolution, stay
    assert [type(module) for module in follow] == [type(module) for module in reference[4]]
    assert fuse_pooling(model) == 0                                    # nothing left to hand over
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_dropping_identities_keeps_every_other_module_s_name_and_the_outputs(backend):
    model = _model().eval()
    model.insert(4, nn.Sequential(nn.Identity(), nn.AdaptiveAvgPool2d(4), nn.Identity()))
    reference = copy.deepcopy(model)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    assert use_native_layers(model) == 4      # norm, its relu, the 2x2 pooling and the average pooling
    assert fuse_batchnorm(model) == 2 and fuse_pooling(model) == 1
    before = model.state_dict()
    # the relu's place (the norm had it, then the convolution), the norm's, the pool's, two nested ones
    # and the BatchNorm1d's at the end
    assert drop_identities(model) == 6
    assert not any(type(module) is nn.Identity for module in model.modules())
    assert list(model._modules) == ["0", "4", "5", "6"] and list(model[1]._modules) == ["1"]
    assert model.state_dict().keys() == before.keys()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    assert drop_identities(model) == 0


def test_a_norm_takes_the_pooling_after_it_and_hands_it_on_when_folded(backend):
    dense_block = [nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64),
                   _with_statistics(nn.BatchNorm2d(4, dtype=torch.float64)), nn.ReLU(), nn.MaxPool2d(2)]
    sparse_conv = convert(nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64), "csr")
    sparse_conv.keep_entries(torch.rand(sparse_conv.nnz) < 0.4)
    sparse_block = [sparse_conv, _with_statistics(nn.BatchNorm2d(6, dtype=torch.float64)), nn.ReLU(),
                    nn.MaxPool2d(2)]
    model = nn.Sequential(*dense_block, *sparse_block, nn.Flatten()).train()
    reference = copy.deepcopy(model)
    use_native_layers(model)
    assert fuse_pooling(model) == 2
    assert model[1].fused_pool and model[5].fused_pool and type(model[3]) is nn.Identity
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    _same_training_step(model, reference, x)
    torch.testing.assert_close(model[4].values.grad, reference[4].values.grad)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    model.eval()
    reference.eval()
    assert fuse_batchnorm(model) == 2
    # the sparse convolution writes relu and pooling with its output; the dense one is followed by
    # both, the relu on the pooled output
    assert model[4].fused_relu and model[4].fused_pool and type(model[5]) is nn.Identity
    assert [type(module).__name__ for module in model[1]] == ["MaxPool2x2", "ReLU"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
