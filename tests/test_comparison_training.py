"""The training loop's helpers: BatchNorm statistics re-estimated after pruning."""

import pytest
import torch
from torch import nn

from comparison.data import ImageSplit, train_batches
from comparison.training import recalibrate_batchnorm


def _split(n=40):
    return ImageSplit(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.arange(n) % 10)


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(),
                         nn.Linear(4 * 30 * 30, 10))


def test_running_statistics_become_the_average_over_the_batches():
    split, model = _split(), _model()
    model.eval()
    norm = model[1]
    norm.running_mean.fill_(5.0)
    norm.running_var.fill_(7.0)
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items() if "running" not in name and "num_batches" not in name}

    used = recalibrate_batchnorm(model, split, batches=3, batch_size=8, seed=1, step=2)

    assert used == 3
    batches = [images for images, _ in train_batches(split, 8, 1, "bn-recalibration", 2)][:3]
    with torch.no_grad():
        activations = [model[0](images) for images in batches]
    means = torch.stack([a.mean((0, 2, 3)) for a in activations])
    variances = torch.stack([a.var((0, 2, 3), unbiased=True) for a in activations])
    torch.testing.assert_close(norm.running_mean, means.mean(0))
    torch.testing.assert_close(norm.running_var, variances.mean(0))
    assert norm.momentum == 0.1 and not model.training
    for name, tensor in model.state_dict().items():
        if name in weights:
            assert torch.equal(tensor, weights[name]), name


def test_nothing_changes_without_batches_or_batchnorm():
    split, model = _split(), _model()
    before = model[1].running_mean.clone()
    assert recalibrate_batchnorm(model, split, batches=0, batch_size=8, seed=0, step=1) == 0
    assert torch.equal(model[1].running_mean, before)
    assert recalibrate_batchnorm(nn.Linear(3, 2), split, batches=4, batch_size=8, seed=0, step=1) == 0


def test_fewer_batches_than_asked_uses_what_there_is():
    assert recalibrate_batchnorm(_model(), _split(16), batches=10, batch_size=8, seed=0, step=1) == 2
