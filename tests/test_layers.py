"""SparseLayer: forward/backward against a masked dense reference, errors, state."""
import io
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from actuallysparse.converter import convert
from actuallysparse.layers import SparseLayer, new_random_basic_coo, new_random_basic_csr
from actuallysparse.memory import stored_bytes

FORMATS = ["coo", "csr"]
SHAPES = [(1, 1), (3, 1), (1, 5), (12, 7), (33, 64)]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch", [1, 5])
def test_forward_and_backward_match_masked_dense(sparse_pair, fmt, shape, sparsity, batch):
    dense, sparse = sparse_pair(*shape, fmt=fmt, sparsity=sparsity, dtype=torch.float64)
    x_dense = torch.randn(batch, shape[0], dtype=torch.float64, requires_grad=True)
    x_sparse = x_dense.detach().clone().requires_grad_()
    grad_out = torch.randn(batch, shape[1], dtype=torch.float64)
    out_dense, out_sparse = dense(x_dense), sparse(x_sparse)
    torch.testing.assert_close(out_sparse, out_dense)
    out_dense.backward(grad_out)
    out_sparse.backward(grad_out)
    torch.testing.assert_close(x_sparse.grad, x_dense.grad)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad)
    # d(values) has exactly nnz entries: the dense gradient read at the kept pattern
    assert sparse.values.grad.shape == (sparse.nnz,)
    rows, cols = sparse._rows_cols()
    torch.testing.assert_close(sparse.values.grad, dense.weight.grad[rows, cols])


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck_float64(sparse_pair, fmt):
    _, sparse = sparse_pair(9, 6, fmt=fmt, sparsity=0.6, dtype=torch.float64)
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)

    def apply(x, values, bias):
        sparse.values, sparse.bias = values, bias
        return sparse(x)

    values = nn.Parameter(sparse.values.detach().clone())
    bias = nn.Parameter(sparse.bias.detach().clone())
    assert torch.autograd.gradcheck(apply, (x, values, bias))


@pytest.mark.parametrize("fmt", FORMATS)
def test_leading_dimensions_work_like_linear(sparse_pair, fmt):
    dense, sparse = sparse_pair(6, 4, fmt=fmt)
    x = torch.randn(2, 3, 5, 6)
    out = sparse(x)
    assert out.shape == (2, 3, 5, 4)
    torch.testing.assert_close(out, dense(x))


def test_one_dimensional_input_gives_one_row():
    layer = SparseLayer(3, 3)
    assert layer(torch.ones(3)).shape == (1, 3)


def test_no_bias(sparse_pair):
    dense, sparse = sparse_pair(5, 4, bias=False)
    assert sparse.bias is None
    x = torch.randn(3, 5)
    torch.testing.assert_close(sparse(x), dense(x))


def test_repr_matches_original():
    assert repr(SparseLayer(4, 4)) == "SparseLayer(in_features=4, out_features=4, bias=True, csr_mode=False, k=0.05)"
    assert repr(SparseLayer(2, 3, bias=False, csr_mode=True, k=0.1)) == (
        "SparseLayer(in_features=2, out_features=3, bias=False, csr_mode=True, k=0.1)")


@pytest.mark.parametrize("constructor, layout", [(new_random_basic_coo, torch.sparse_coo),
                                                 (new_random_basic_csr, torch.sparse_csr)])
def test_weight_is_sparse_out_by_in(constructor, layout):
    layer = constructor(3, 5)
    assert layer.weight.layout == layout
    assert layer.weight.shape == (5, 3)


def _index_dtypes(layer):
    return {name: t.dtype for name, t in layer.named_buffers() if t is not None}


@pytest.mark.parametrize("fmt", FORMATS)
def test_compact_indices_where_they_fit(fmt):
    # 16-bit columns (and COO rows) where every index fits, int32 row pointers
    expected = ({"row_indices": torch.int32, "col_indices": torch.int16} if fmt == "csr"
                else {"indices": torch.int16, "_crow": torch.int32})
    assert _index_dtypes(SparseLayer(8, 8, csr_mode=(fmt == "csr"))) == expected
    assert stored_bytes(SparseLayer(8, 8, csr_mode=(fmt == "csr"))).by_category["indices"] == (
        9 * 4 + 64 * 2 if fmt == "csr" else 2 * 64 * 2)        # COO's pointers are a compute cache


@pytest.mark.parametrize("fmt", FORMATS)
def test_indices_widen_to_int32_only_where_a_width_needs_it(fmt):
    wide = convert(nn.Linear(32769, 2), fmt)                   # column 32768 does not fit int16
    tall = convert(nn.Linear(2, 32769), fmt)                   # rows only: CSR keeps 16-bit columns
    assert wide.col_indices.dtype == torch.int32 if fmt == "csr" else wide.indices.dtype == torch.int32
    assert tall.col_indices.dtype == torch.int16 if fmt == "csr" else tall.indices.dtype == torch.int32
    x = torch.randn(3, 32769)
    torch.testing.assert_close(wide(x), x @ wide.dense_weight().T + wide.bias)


def test_a_state_dict_saved_with_int32_indices_loads_into_compact_ones(sparse_pair):
    _, pruned = sparse_pair(10, 6, fmt="csr", sparsity=0.7)
    state = {key: value.to(torch.int32) if key.endswith("indices") else value
             for key, value in pruned.state_dict().items()}       # as this package stored them before
    assert state["col_indices"].dtype == torch.int32
    fresh = SparseLayer(10, 6, csr_mode=True)
    fresh.load_state_dict(state)
    assert fresh.col_indices.dtype == torch.int16
    assert torch.equal(fresh.weight.to_dense(), pruned.weight.to_dense())


class TestPruning:
    def test_removes_floor_k_times_all_weights(self):
        layer = SparseLayer(10, 7, k=0.33)
        layer.prune_smallest_values()
        assert layer.nnz == 70 - math.floor(0.33 * 70)
        layer.prune_smallest_values()
        assert layer.nnz == 70 - 2 * math.floor(0.33 * 70)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_removes_the_smallest_magnitudes(self, fmt):
        layer = SparseLayer(5, 2, csr_mode=(fmt == "csr"), k=0.3)
        weight = torch.tensor([[0.1, -0.2, 0.3, 0.4, 0.5], [-0.6, 0.7, 0.8, 0.9, 1.0]])
        layer.assign_new_weight(weight)
        layer.prune_smallest_values()
        expected = weight.clone()
        expected[0, :3] = 0
        torch.testing.assert_close(layer.weight.to_dense(), expected)

    def test_pruning_gives_a_new_smaller_parameter(self):
        layer = SparseLayer(6, 6, k=0.5)
        before = layer.values
        layer.prune_smallest_values()
        assert len(before) > len(layer.values) == 18
        assert layer.values.requires_grad

    def test_prune_everything_then_forward_is_bias(self):
        layer = SparseLayer(4, 3, k=1.0)
        layer.prune_smallest_values()
        assert layer.nnz == 0
        x = torch.randn(2, 4, requires_grad=True)
        out = layer(x)
        torch.testing.assert_close(out, layer.bias.expand(2, 3))
        out.sum().backward()
        assert torch.count_nonzero(x.grad) == 0

    def test_k_as_first_positional_argument_is_accepted(self):
        layer = SparseLayer(5, 2)
        layer.prune_smallest_values(0.5)
        assert layer.nnz == 5


class TestErrors:
    def test_wrong_feature_count(self):
        with pytest.raises(ValueError, match="input has 7 features, layer expects 3"):
            SparseLayer(3, 2)(torch.ones(4, 7))

    def test_non_tensor_input(self):
        with pytest.raises(TypeError, match="list"):
            SparseLayer(3, 2)([1.0, 2.0, 3.0])

    @pytest.mark.parametrize("k", [0, -0.1, 1.5, "0.1", True])
    def test_k_outside_unit_interval(self, k):
        with pytest.raises(ValueError, match="k must be"):
            SparseLayer(3, 2, k=k)
        with pytest.raises(ValueError, match="k must be"):
            SparseLayer(3, 2).set_k(k)

    def test_weight_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"weight has shape \(4, 4\), layer expects \(2, 3\)"):
            SparseLayer(3, 2).assign_new_weight(torch.ones(4, 4))

    def test_bias_shape_mismatch(self):
        with pytest.raises(ValueError, match="bias has shape"):
            SparseLayer(3, 2).assign_new_weight(torch.ones(2, 3), torch.ones(5))
        with pytest.raises(TypeError, match="bias must be a torch.Tensor of shape \\(2,\\), got list"):
            SparseLayer(3, 2).assign_new_weight(torch.ones(2, 3), [1.0, 2.0])

    @pytest.mark.parametrize("rows, cols, message", [
        ([0, 3], [0, 1], r"row indices span \[0, 3\], layer expects \[0, 1\]"),
        ([0, 1], [-1, 1], r"column indices span \[-1, 1\]"),
        ([1, 1], [2, 2], "more than once"),
        ([0], [0, 1], "one length"),
    ])
    def test_from_entries_validates_the_pattern(self, rows, cols, message):
        with pytest.raises(ValueError, match=message):
            SparseLayer.from_entries(3, 2, torch.tensor(rows), torch.tensor(cols), torch.ones(len(cols)))

    def test_from_entries_sorts_an_unsorted_pattern(self):
        layer = SparseLayer.from_entries(3, 2, torch.tensor([1, 0, 1]), torch.tensor([2, 1, 0]),
                                         torch.tensor([3.0, 1.0, 2.0]), csr_mode=True)
        expected = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]])
        torch.testing.assert_close(layer.weight.to_dense(), expected)
        torch.testing.assert_close(layer(torch.eye(3)), expected.t())

    @pytest.mark.parametrize("bad", [0, -3, 2.5])
    def test_bad_feature_counts(self, bad):
        with pytest.raises(ValueError, match="in_features must be a positive integer"):
            SparseLayer(bad, 2)


class TestFormats:
    @pytest.mark.parametrize("start", FORMATS)
    def test_switch_keeps_values_and_function(self, sparse_pair, start):
        _, layer = sparse_pair(8, 5, fmt=start, sparsity=0.5)
        values = layer.values
        x = torch.randn(3, 8)
        expected = layer(x)
        layer.switch_to_CSR()
        assert layer.is_CSR() and layer.weight.layout == torch.sparse_csr
        layer.switch_to_COO()
        assert not layer.is_CSR() and layer.weight.layout == torch.sparse_coo
        layer.switch_to_CSR()
        assert layer.values is values
        torch.testing.assert_close(layer(x), expected)

    def test_train_mode_mirrors_train_and_eval(self):
        layer = SparseLayer(3, 3, train_mode=False)
        assert not layer.training and not layer.train_mode
        layer.train()
        assert layer.training and layer.train_mode
        layer.eval()
        assert not layer.train_mode


class TestState:
    @pytest.mark.parametrize("src_fmt", FORMATS)
    @pytest.mark.parametrize("dst_fmt", FORMATS)
    def test_state_dict_into_fresh_layer_of_other_nnz(self, sparse_pair, src_fmt, dst_fmt):
        _, pruned = sparse_pair(10, 6, fmt=src_fmt, sparsity=0.8)
        fresh = SparseLayer(10, 6, csr_mode=(dst_fmt == "csr"))
        assert fresh.nnz != pruned.nnz
        fresh.load_state_dict(pruned.state_dict())
        assert fresh.nnz == pruned.nnz and fresh.is_CSR() == (dst_fmt == "csr")
        torch.testing.assert_close(fresh.weight.to_dense(), pruned.weight.to_dense())
        x = torch.randn(4, 10)
        torch.testing.assert_close(fresh(x), pruned(x))

    def test_load_rejects_indices_outside_the_shape(self, sparse_pair):
        _, pruned = sparse_pair(10, 6, fmt="coo", sparsity=0.5)
        with pytest.raises(RuntimeError, match=r"column indices span \[0, 9\], layer expects \[0, 4\]"):
            SparseLayer(5, 6).load_state_dict(pruned.state_dict())

    @pytest.mark.parametrize("pointers, problem", [
        ([0, 5, 3, 12], r"row_indices are not valid CSR row pointers: they must never decrease, but row 1 ends "
                        r"before it starts \(pointer 5 then 3\)"),
        ([1, 4, 8, 12], "row_indices are not valid CSR row pointers: they must start at 0, got 1"),
        ([0, 4, 8, 11], "row_indices are not valid CSR row pointers: they must end at the number of stored "
                        "weights, 12, got 11"),
    ])
    def test_load_names_row_pointers_that_are_not_csr(self, pointers, problem):
        state = SparseLayer(4, 3, csr_mode=True).state_dict()
        state["row_indices"] = torch.tensor(pointers, dtype=torch.int32)
        with pytest.raises(RuntimeError, match=problem):
            SparseLayer(4, 3, csr_mode=True).load_state_dict(state)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_torch_save_load_round_trip(self, sparse_pair, fmt):
        _, pruned = sparse_pair(10, 6, fmt=fmt, sparsity=0.7)
        buffer = io.BytesIO()
        torch.save(pruned.state_dict(), buffer)
        buffer.seek(0)
        fresh = SparseLayer(10, 6, csr_mode=(fmt == "csr"))
        fresh.load_state_dict(torch.load(buffer))
        assert torch.equal(fresh.weight.to_dense(), pruned.weight.to_dense())
        buffer = io.BytesIO()
        torch.save(pruned, buffer)
        buffer.seek(0)
        whole = torch.load(buffer, weights_only=False)
        assert torch.equal(whole.values, pruned.values)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_to_dtype(self, sparse_pair, fmt):
        dense, layer = sparse_pair(6, 4, fmt=fmt, sparsity=0.5)
        layer.to(torch.float64)
        assert layer.values.dtype == torch.float64 and layer.bias.dtype == torch.float64
        assert _index_dtypes(layer) == ({"row_indices": torch.int32, "col_indices": torch.int16} if fmt == "csr"
                                        else {"indices": torch.int16, "_crow": torch.int32})
        x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
        layer(x).sum().backward()
        torch.testing.assert_close(layer(x), dense.double()(x))
        layer.to(torch.float32)
        assert layer(torch.randn(2, 6)).dtype == torch.float32

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_to_cuda_trains(self, sparse_pair, fmt):
        dense, layer = sparse_pair(64, 32, fmt=fmt, sparsity=0.9)
        layer.cuda()
        x = torch.randn(8, 64, requires_grad=True)
        out = layer(x.cuda())
        out.sum().backward()
        torch.testing.assert_close(out.cpu(), dense(x), rtol=1e-4, atol=1e-4)
        assert layer.values.grad.is_cuda and layer.values.grad.shape == (layer.nnz,)


PEAK_SCRIPT = textwrap.dedent("""
    import resource, torch
    from actuallysparse.layers import SparseLayer
    torch.set_num_threads(1)
    n, per_row = 4096, 41                       # 99 % sparse
    rows = torch.arange(n).repeat_interleave(per_row)
    cols = ((torch.arange(n).unsqueeze(1) * 37 + torch.arange(per_row) * 97) % n).sort(dim=1).values.flatten()
    layer = SparseLayer.from_entries(n, n, rows, cols, torch.randn(n * per_row) * 0.01,
                                     bias=torch.zeros(n), csr_mode={csr})
    x = torch.randn(64, n, requires_grad=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    layer(x).sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert layer.values.grad.shape == (n * per_row,)
    print((after - before) * 1024)
""")


@pytest.mark.parametrize("fmt", FORMATS)
def test_training_step_peak_memory_far_below_one_dense_weight(fmt):
    script = PEAK_SCRIPT.format(csr=(fmt == "csr"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    peak_increase = int(result.stdout.strip().splitlines()[-1])
    dense_weight = 4096 * 4096 * 4
    assert peak_increase < dense_weight / 4, f"step raised peak RSS by {peak_increase / 2**20:.1f} MiB"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batch_shape", [(5,), (2, 3)])
def test_in_place_activation_after_the_layer_trains(sparse_pair, fmt, batch_shape):
    dense, sparse = sparse_pair(6, 4, fmt=fmt)
    x = torch.randn(*batch_shape, 6, requires_grad=True)
    out = nn.ReLU(inplace=True)(sparse(x))
    out.sum().backward()
    torch.testing.assert_close(out, torch.relu(dense(x)))
    assert sparse.values.grad is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packing_copies_every_row_and_feature(backend, dtype):
    # 21 rows of 29 features: whole 8x8 (float64: 4x4) transposes of the packing, a 4x4 one for
    # float32's last four features, and remainders of both, for contiguous rows and for strided
    # ones (the plain loop)
    dense = nn.Linear(29, 6, dtype=dtype)
    with torch.no_grad():
        dense.weight.mul_(torch.rand_like(dense.weight) < 0.5)
    layer = convert(dense, "csr")
    for x in (torch.randn(21, 29, dtype=dtype), torch.randn(29, 21, dtype=dtype).t()):
        x.requires_grad_(True)
        out = layer(x)
        torch.testing.assert_close(out, dense(x))
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, layer.values), grad)
        want = torch.autograd.grad(dense(x), (x, dense.weight), grad)
        rows, cols = layer._rows_cols()
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1][rows, cols])
