"""Metric collection: bytes held by masked and sparse models, latency, checkpoint size, a child's peak memory."""

import io

import pytest
import torch
from torch import nn

from comparison.config import RunConfig
from comparison.methods import make_method
from comparison.metrics import (
    checkpoint_bytes,
    latency_metric,
    latency_ms,
    memory_measurements,
    probe_process_memory,
)
from comparison.training import make_optimizer

IN, OUT = 256, 128
WEIGHT_BYTES = IN * OUT * 4
BIAS_BYTES = OUT * 4


def _pruned(name, target=0.9):
    """A one-layer model pruned by ``name`` to ``target``, trained one step, with its Adam optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT))
    method = make_method(name)
    model = method.prepare(model, ["0"])
    optimizer = make_optimizer(model.parameters(), RunConfig())
    method.prune(model, target, optimizer)
    loss = model(torch.randn(8, IN)).square().mean()
    loss.backward()
    optimizer.step()
    return method, model, optimizer


def _by_metric(measurements):
    return {m.metric: m.value for m in measurements}


def test_dense_model_holds_its_weight_and_bias_once():
    method, model, optimizer = _pruned("dense")
    values = _by_metric(memory_measurements(model, optimizer, method.pruned_modules(model)))
    # after a step every parameter also holds a gradient as large as itself
    assert values["stored_bytes_gradients"] == WEIGHT_BYTES + BIAS_BYTES
    assert values["stored_bytes"] == 2 * (WEIGHT_BYTES + BIAS_BYTES)
    assert values["stored_bytes_parameters"] == WEIGHT_BYTES
    assert values["pruned_layers_bytes"] == values["stored_bytes"]
    # Adam: two moments per parameter entry (plus a scalar step per tensor)
    assert 2 * (WEIGHT_BYTES + BIAS_BYTES) <= values["optimizer_state_bytes"] <= 2 * (WEIGHT_BYTES + BIAS_BYTES) + 64


def test_nni_model_counts_weight_mask_and_copy():
    method, model, optimizer = _pruned("nni")
    values = _by_metric(memory_measurements(model, optimizer, method.pruned_modules(model)))
    assert values["stored_bytes_parameters"] == WEIGHT_BYTES  # the wrapper's trained weight
    assert values["stored_bytes_masks"] == WEIGHT_BYTES  # float32 weight_mask
    assert values["stored_bytes_copies"] == WEIGHT_BYTES  # the layer's `weight` buffer
    assert values["stored_bytes_gradients"] == WEIGHT_BYTES + BIAS_BYTES  # a dense gradient
    assert values["stored_bytes"] == 4 * WEIGHT_BYTES + 2 * BIAS_BYTES
    # masking saves nothing in the optimizer either
    assert values["optimizer_state_bytes"] >= 2 * WEIGHT_BYTES


def test_torch_prune_model_counts_orig_mask_and_materialised_weight():
    method, model, optimizer = _pruned("torch-prune")
    values = _by_metric(memory_measurements(model, optimizer, method.pruned_modules(model)))
    assert values["stored_bytes_parameters"] == WEIGHT_BYTES  # weight_orig
    assert values["stored_bytes_masks"] == WEIGHT_BYTES  # weight_mask
    assert values["stored_bytes_copies"] == WEIGHT_BYTES  # the materialised `weight` attribute
    assert values["stored_bytes_gradients"] == WEIGHT_BYTES + BIAS_BYTES
    assert values["stored_bytes"] == 4 * WEIGHT_BYTES + 2 * BIAS_BYTES


def test_actuallysparse_model_holds_only_the_survivors():
    method, model, optimizer = _pruned("actuallysparse", 0.9)
    values = _by_metric(memory_measurements(model, optimizer, method.pruned_modules(model)))
    nnz = round(0.1 * IN * OUT)
    assert values["stored_bytes_values"] == nnz * 4
    assert values["stored_bytes_gradients"] == (nnz + OUT) * 4  # the gradient is as sparse as the weight
    assert values["stored_bytes_masks"] == 0 and values["stored_bytes_parameters"] == 0
    assert values["stored_bytes"] < 0.4 * (WEIGHT_BYTES + BIAS_BYTES)
    assert values["optimizer_state_bytes"] < 0.3 * 2 * WEIGHT_BYTES


def test_memory_of_pruned_layers_is_a_part_of_the_whole():
    model = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, 10))
    method = make_method("nni")
    model = method.prepare(model, ["0"])
    values = _by_metric(memory_measurements(model, None, method.pruned_modules(model)))
    assert values["pruned_layers_bytes"] == 3 * WEIGHT_BYTES + BIAS_BYTES
    assert values["stored_bytes"] == values["pruned_layers_bytes"] + (OUT * 10 + 10) * 4
    assert values["optimizer_state_bytes"] == 0


def test_latency_is_a_positive_median_and_restores_the_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    model.train()
    value = latency_ms(model, 4, repeats=3, warmup=1)
    assert value > 0
    assert model.training
    assert latency_metric(64) == "latency_batch64_ms"


def test_checkpoint_bytes_is_the_size_of_the_saved_state_dict(tmp_path):
    _, model, _ = _pruned("nni")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    size = checkpoint_bytes(model, tmp_path)
    assert size == pytest.approx(len(buffer.getvalue()), rel=0.01)
    assert size > 3 * WEIGHT_BYTES  # weight, mask and copy are all in NNI's state dict
    assert list(tmp_path.iterdir()) == []  # scratch files removed


def test_child_process_peak_memory_sees_the_model(tmp_path):
    # 3072 x 2048 float32: 24 MiB that the child must hold after loading.
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2048, bias=False))
    rows = {m.metric: m for m in probe_process_memory(model, batch_size=2, threads=1, directory=tmp_path)}
    model_bytes = 3 * 32 * 32 * 2048 * 4
    assert rows["model_rss_bytes"].value >= 0.9 * model_bytes
    assert rows["peak_rss_bytes"].value > rows["model_rss_bytes"].value
    assert list(tmp_path.iterdir()) == []


def test_child_process_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "")
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="memory probe exited"):
        probe_process_memory(model, batch_size=1, threads=1, directory=tmp_path, input_shape=(3,))


def test_flops_of_a_small_network_equal_a_hand_count():
    import torch.nn.utils.prune as torch_prune
    from torch import nn

    from actuallysparse.converter import convert_model
    from actuallysparse.pruning import prune_to_sparsity
    from comparison.metrics import forward_flops

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    conv = 2 * 4 * 3 * 9 * 32 * 32           # 2 per multiply-add, every output pixel
    linears = 2 * 4 * 8 + 2 * 8 * 2
    assert forward_flops(dense) == conv + linears
    masked = convert_model(dense, nn.Linear, "dense")
    torch_prune.l1_unstructured(masked[4], "weight", amount=0.5)
    assert forward_flops(masked) == conv + linears  # a mask saves no work
    sparse = convert_model(dense, nn.Linear, "csr")
    prune_to_sparsity(sparse, 0.75)
    assert sparse[4].nnz == 8 and sparse[6].nnz == 4
    assert forward_flops(sparse) == conv + 2 * (8 + 4)  # 2 per stored weight
    shrunk = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    assert forward_flops(shrunk) == 2 * 2 * 3 * 9 * 32 * 32 + 2 * 2 * 4 + 2 * 4 * 2
    assert isinstance(sparse[4], type(sparse[6]))  # counting left the model as it was
    sparse_conv = convert_model(sparse, nn.Conv2d, "csr")
    prune_to_sparsity(sparse_conv[0], 0.5)
    assert forward_flops(sparse_conv) == 2 * sparse_conv[0].nnz * 32 * 32 + 2 * (8 + 4)  # per output pixel
