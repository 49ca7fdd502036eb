"""VGG11_bn with the CIFAR head: names and size match PyTorch_CIFAR10, width scales it, --init loads."""

import pytest
import torch

from comparison.models import VGG, load_init, vgg11_bn


def test_full_width_matches_pytorch_cifar10_vgg11_bn():
    model = VGG(num_classes=10, width=1.0)
    assert sum(p.numel() for p in model.parameters()) == 28_149_514
    names = set(model.state_dict())
    convs = [0, 4, 8, 11, 15, 18, 22, 25]
    for index in convs:
        assert f"features.{index}.weight" in names and f"features.{index + 1}.running_mean" in names
    for index in (0, 3, 6):
        assert f"classifier.{index}.weight" in names
    assert model.classifier[0].weight.shape == (4096, 512)
    assert model.classifier[6].weight.shape == (10, 4096)


@pytest.mark.parametrize("width", [0.0625, 0.125, 0.5])
def test_width_scales_channels_and_classifier(width):
    model = vgg11_bn(num_classes=7, width=width)
    assert model.features[0].out_channels == round(64 * width)
    assert model.classifier[3].weight.shape == (round(4096 * width),) * 2
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_seed_fixes_the_initial_weights():
    a, b, c = vgg11_bn(10, 0.125, seed=1), vgg11_bn(10, 0.125, seed=1), vgg11_bn(10, 0.125, seed=2)
    assert torch.equal(a.classifier[0].weight, b.classifier[0].weight)
    assert not torch.equal(a.classifier[0].weight, c.classifier[0].weight)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="width"):
        VGG(width=0)
    with pytest.raises(ValueError, match="num_classes"):
        VGG(num_classes=0)


def test_load_init_round_trip_and_lightning_prefix(tmp_path):
    source = vgg11_bn(10, 0.125, seed=3)
    plain, lightning = tmp_path / "plain.pt", tmp_path / "lightning.pt"
    torch.save(source.state_dict(), plain)
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, lightning)
    for path in (plain, lightning):
        target = vgg11_bn(10, 0.125, seed=4)
        load_init(target, path)
        assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))


def test_load_init_mismatch_says_what_fits(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(vgg11_bn(10, 0.25).state_dict(), path)
    with pytest.raises(ValueError, match="shape mismatch.*--width 1.0"):
        load_init(vgg11_bn(10, 0.125), path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_init(vgg11_bn(10, 0.125), tmp_path / "missing.pt")


def test_width_is_read_from_the_init_checkpoint(tmp_path):
    from comparison.config import ConfigError, RunConfig
    from comparison.models import checkpoint_width

    path = tmp_path / "half.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in vgg11_bn(10, 0.5).state_dict().items()}}, path)
    assert checkpoint_width(path) == 0.5
    assert RunConfig().width == 0.375
    assert RunConfig(init=str(path)).width == 0.5
    assert RunConfig.from_mapping({"init": str(path)}).width == 0.5
    # an explicit width is kept, so loading the checkpoint later keeps its clear error
    explicit = RunConfig.from_mapping({"init": str(path), "width": "0.125"})
    assert explicit.width == 0.125
    with pytest.raises(ValueError, match="shape mismatch"):
        load_init(vgg11_bn(10, explicit.width), path)
    torch.save({"classifier.0.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="no features.0.weight.*give --width explicitly"):
        RunConfig(init=str(tmp_path / "other.pt"))


def test_every_vgg_pooling_and_dropout_is_the_fast_one():
    from actuallysparse.pooling import MaxPool2x2
    from actuallysparse.dropout import Dropout

    modules = list(vgg11_bn(10, 0.125).modules())
    assert all(isinstance(m, MaxPool2x2) for m in modules if isinstance(m, torch.nn.MaxPool2d))
    assert all(isinstance(m, Dropout) for m in modules if isinstance(m, torch.nn.Dropout))
    assert sum(isinstance(m, MaxPool2x2) for m in modules) == 5 and sum(isinstance(m, Dropout) for m in modules) == 2


