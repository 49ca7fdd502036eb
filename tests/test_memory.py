"""stored_bytes: every tensor held, counted once, sorted into categories."""
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from actuallysparse.converter import convert
from actuallysparse.memory import CATEGORIES, stored_bytes, tensor_bytes
from actuallysparse.pruning import prune_to_sparsity


def test_dense_linear():
    report = stored_bytes(nn.Linear(100, 50))
    assert report.by_category["parameters"] == 100 * 50 * 4
    assert report.by_category["bias"] == 50 * 4
    assert report.total_bytes == 100 * 50 * 4 + 50 * 4
    assert set(report.by_category) == set(CATEGORIES)


def test_csr_and_coo_layers_count_values_and_16_bit_indices():
    linear = nn.Linear(200, 100)
    csr = convert(linear, "csr")
    coo = convert(linear, "coo")
    for layer in (csr, coo):
        prune_to_sparsity(layer, 0.9)
    nnz = 2000
    csr_report, coo_report = stored_bytes(csr), stored_bytes(coo)
    assert csr_report.by_category["values"] == coo_report.by_category["values"] == nnz * 4
    assert csr_report.by_category["indices"] == nnz * 2 + 101 * 4     # int16 columns, int32 row pointers
    # COO holds row and column per value, and caches the row pointers it computes with
    assert coo_report.by_category["indices"] == 2 * nnz * 2
    assert coo_report.by_category["caches"] == 101 * 4
    assert csr_report.total_bytes < stored_bytes(linear).total_bytes / 4


def test_transposed_cache_is_counted_once_built():
    from actuallysparse.functional import use_backend

    layer = convert(nn.Linear(50, 40), "csr")
    prune_to_sparsity(layer, 0.5)
    assert stored_bytes(layer).by_category["caches"] == 0
    x = torch.randn(3, 50, requires_grad=True)
    with use_backend("torch"):  # the torch backend's input gradient reads the transposed pattern
        layer(x).sum().backward()
    assert stored_bytes(layer).by_category["caches"] == 51 * 4 + 2 * layer.nnz * 4
    layer.eval()  # inference needs no transposed pattern
    assert stored_bytes(layer).by_category["caches"] == 0


def test_the_native_backend_builds_no_transposed_pattern():
    from actuallysparse.functional import use_backend

    layer = convert(nn.Linear(50, 40), "csr")
    prune_to_sparsity(layer, 0.5)
    with use_backend("native"):  # scatters along W's own rows: 8 bytes per weight saved
        layer(torch.randn(3, 50, requires_grad=True)).sum().backward()
    assert stored_bytes(layer).by_category["caches"] == 0


def test_torch_prune_counts_orig_mask_and_materialised_copy():
    layer = nn.Linear(100, 50)
    torch_prune.l1_unstructured(layer, "weight", amount=0.9)
    report = stored_bytes(layer)
    weight_bytes = 100 * 50 * 4
    assert report.by_category["parameters"] == weight_bytes   # weight_orig
    assert report.by_category["masks"] == weight_bytes        # weight_mask (float)
    assert report.by_category["copies"] == weight_bytes       # weight = orig * mask
    assert report.total_bytes == 3 * weight_bytes + 50 * 4


def test_shared_and_viewed_storage_counted_once():
    shared = nn.Linear(10, 10)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert stored_bytes(model).total_bytes == stored_bytes(shared).total_bytes
    base = torch.zeros(1000)
    assert tensor_bytes(base[10:20]) == 4000


def test_optimizer_state_bytes_shrink_with_pruning():
    layer = convert(nn.Linear(64, 32), "csr")
    optimizer = torch.optim.Adam(layer.parameters())
    layer(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    dense_state = stored_bytes(layer, optimizer).optimizer_state_bytes
    assert dense_state >= 2 * (64 * 32 + 32) * 4
    prune_to_sparsity(layer, 0.9, optimizer=optimizer)
    sparse_state = stored_bytes(layer, optimizer).optimizer_state_bytes
    assert 2 * (layer.nnz + 32) * 4 <= sparse_state < dense_state / 4


def test_sparse_tensor_components_and_the_to_sparse_csr_trap():
    t = torch.eye(5).to_sparse_csr()
    # col_indices() of to_sparse_csr() is a view into a 2 x nnz int64 COO index array,
    # which it keeps alive: the whole array is held, so the whole array is counted
    assert tensor_bytes(t) == 6 * 8 + 2 * 5 * 8 + 5 * 4
    cloned = torch.sparse_csr_tensor(t.crow_indices().clone(), t.col_indices().clone(), t.values().clone())
    assert tensor_bytes(cloned) == 6 * 8 + 5 * 8 + 5 * 4
