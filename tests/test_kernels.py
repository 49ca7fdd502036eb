"""The three products of a sparse linear layer, on every backend and instruction set this CPU has.

Each backend is checked against a masked dense reference in float64 (and float32 with a
looser tolerance) and with gradcheck; an instruction set the CPU lacks is skipped with the
reason, so a machine with AVX-512 runs those cases and one without says so.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from actuallysparse import functional, kernels
from actuallysparse.converter import convert
from actuallysparse.functional import sparse_linear, transpose_pattern
from actuallysparse.pruning import prune_to_sparsity

def _pattern(out_features, in_features, density, dtype, empty_row=True, empty_col=True, column_dtype=torch.int32):
    """A random CSR weight (int32 row pointers) with an empty row and column, and its dense copy."""
    dense = torch.randn(out_features, in_features, dtype=torch.float64)
    dense *= torch.rand(out_features, in_features) < density
    if empty_row:
        dense[out_features // 2] = 0
    if empty_col:
        dense[:, in_features // 3] = 0
    dense = dense.to(dtype)
    csr = dense.to_sparse_csr()
    crow = csr.crow_indices().to(torch.int32)
    col = csr.col_indices().to(column_dtype)
    return dense, crow, col, csr.values().clone()


def _tolerance(dtype):
    return {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-4}


SHAPES = [(37, 29), (5, 70), (64, 16)]
BATCHES = [1, 3, 17, 70]


@pytest.mark.parametrize("column_dtype", [torch.int32, torch.int16])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("out_features, in_features", SHAPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_products_match_masked_dense(backend, dtype, out_features, in_features, batch, column_dtype):
    dense, crow, col, values = _pattern(out_features, in_features, 0.3, dtype, column_dtype=column_dtype)
    x = torch.randn(batch, in_features, dtype=dtype)
    bias = torch.randn(out_features, dtype=dtype)
    grad_out = torch.randn(batch, out_features, dtype=dtype)
    tol = _tolerance(dtype)

    y = backend.forward(x, values, bias, crow, col, out_features)
    torch.testing.assert_close(y, x @ dense.T + bias, **tol)
    assert backend.forward(x, values, None, crow, col, out_features).shape == (batch, out_features)

    transposed = transpose_pattern(crow, col, in_features)
    grad_x = backend.grad_input(grad_out, values, crow, col, transposed.crow, transposed.col, transposed.perm,
                                in_features)
    torch.testing.assert_close(grad_x, grad_out @ dense, **tol)
    grad_x = backend.grad_input(grad_out, values, crow, col, None, None, None, in_features)
    torch.testing.assert_close(grad_x, grad_out @ dense, **tol)

    grad_values = backend.grad_values(grad_out, x, crow, col)
    torch.testing.assert_close(grad_values, (grad_out.T @ x)[dense != 0], **tol)


def test_non_contiguous_operands(backend):
    dense, crow, col, values = _pattern(23, 41, 0.4, torch.float64)
    x = torch.randn(41, 19, dtype=torch.float64).T              # transposed view
    grad_out = torch.randn(19, 46, dtype=torch.float64)[:, ::2]  # strided columns
    torch.testing.assert_close(backend.forward(x, values, None, crow, col, 23), x @ dense.T)
    transposed = transpose_pattern(crow, col, 41)
    torch.testing.assert_close(backend.grad_input(grad_out, values, crow, col, transposed.crow, transposed.col,
                                                  transposed.perm, 41), grad_out @ dense)
    torch.testing.assert_close(backend.grad_values(grad_out, x, crow, col), (grad_out.T @ x)[dense != 0])
    # the gradient of out.sum() arrives as an expanded (stride 0) tensor
    ones = torch.ones(1, 1, dtype=torch.float64).expand(19, 23)
    torch.testing.assert_close(backend.grad_values(ones, x, crow, col), (ones.T @ x)[dense != 0])


def test_no_non_zeros(backend):
    _, crow, col, values = _pattern(6, 9, 0.0, torch.float64)
    assert values.numel() == 0
    x = torch.randn(4, 9, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(backend.forward(x, values, bias, crow, col, 6), bias.expand(4, 6))
    transposed = transpose_pattern(crow, col, 9)
    grad_x = backend.grad_input(torch.ones(4, 6, dtype=torch.float64), values, crow, col, transposed.crow,
                                transposed.col, transposed.perm, 9)
    torch.testing.assert_close(grad_x, torch.zeros(4, 9, dtype=torch.float64))
    assert backend.grad_values(torch.ones(4, 6, dtype=torch.float64), x, crow, col).shape == (0,)


@pytest.mark.parametrize("column_dtype", [torch.int32, torch.int16])
@pytest.mark.parametrize("batch", [1, 5])
def test_gradcheck(backend, batch, column_dtype):
    dense, crow, col, values = _pattern(9, 13, 0.4, torch.float64, column_dtype=column_dtype)
    transposed = transpose_pattern(crow, col, 13)
    x = torch.randn(batch, 13, dtype=torch.float64, requires_grad=True)
    values = values.requires_grad_()
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)

    def fn(x, values, bias):
        return sparse_linear(x, values, bias, crow, col, (9, 13), transposed)

    assert torch.autograd.gradcheck(fn, (x, values, bias))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [2, 70])
def test_input_gradient_by_row_slices_and_by_tiles(backend, threads, batch):
    # the native backward takes the input gradient by batch tiles where they share out evenly
    # over the threads, else by slices of W's rows: both partitions, whatever the machine's
    # thread count (one thread always takes tiles, two threads with one tile take row slices)
    dense, crow, col, values = _pattern(40, 300, 0.3, torch.float64)
    grad_out = torch.randn(batch, 40, dtype=torch.float64)
    x = torch.randn(batch, 300, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grad_x, grad_values = backend.backward(grad_out, x, values, crow, col, None, None, None, True, True)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(grad_x, grad_out @ dense, **_tolerance(torch.float64))
    torch.testing.assert_close(grad_values, (grad_out.T @ x)[dense != 0], **_tolerance(torch.float64))


@pytest.mark.parametrize("fmt", ["coo", "csr"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_matches_masked_dense(backend, fmt, dtype, sparse_pair):
    dense, sparse = sparse_pair(in_features=45, out_features=21, fmt=fmt, sparsity=0.8, dtype=dtype)
    assert sparse._pattern()[0].dtype == torch.int32
    tol = _tolerance(dtype)
    for shape in [(45,), (3, 45), (2, 5, 45)]:
        x = torch.randn(*shape, dtype=dtype)
        x_sparse = x.clone().requires_grad_()
        x_dense = x.clone().requires_grad_()
        out = sparse(x_sparse)
        expected = dense(x_dense)
        torch.testing.assert_close(out, expected.reshape(out.shape), **tol)
        grad = torch.randn_like(out)
        out.backward(grad)
        expected.backward(grad.reshape(expected.shape))
        torch.testing.assert_close(x_sparse.grad, x_dense.grad, **tol)
        mask = dense.weight.detach() != 0
        torch.testing.assert_close(sparse.values.grad, dense.weight.grad[mask], **tol)
        torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, **tol)
        sparse.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
    with torch.no_grad():
        x = torch.randn(7, 45, dtype=dtype)
        torch.testing.assert_close(sparse.eval()(x), dense(x), **tol)


def test_native_is_the_default_on_the_cpu(monkeypatch):
    monkeypatch.delenv(functional.BACKEND_VARIABLE, raising=False)
    x = torch.zeros(2, 3)
    crow = torch.zeros(4, dtype=torch.int32)
    expected = functional.NATIVE_BACKEND if kernels.is_available() else functional.TORCH_BACKEND
    assert functional.backend_for(x, crow) is expected
    assert functional.backend_for(x, crow.long()) is functional.TORCH_BACKEND     # int64 indices
    assert functional.backend_for(x.half(), crow) is functional.TORCH_BACKEND     # other dtypes


def test_backend_name_says_where_a_layer_computes(monkeypatch):
    monkeypatch.delenv(functional.BACKEND_VARIABLE, raising=False)
    expected = f"native-{kernels.isa()}" if kernels.is_available() else "torch"
    assert functional.backend_name() == expected
    assert functional.backend_name("cpu", torch.float64) == expected
    assert functional.backend_name("cpu", torch.float16) == "torch"
    assert functional.backend_name("cuda") == "torch"
    with functional.use_backend("torch"):
        assert functional.backend_name() == "torch"


def test_fallback_warns_once(monkeypatch):
    monkeypatch.delenv(functional.BACKEND_VARIABLE, raising=False)
    monkeypatch.setattr(kernels, "is_available", lambda: False)
    monkeypatch.setattr(kernels, "load_error_summary", lambda: "no compiler found")
    monkeypatch.setattr(functional, "_fallback_warned", False)
    x = torch.zeros(2, 3)
    crow = torch.zeros(4, dtype=torch.int32)
    with pytest.warns(RuntimeWarning, match="no compiler found"):
        assert functional.backend_for(x, crow) is functional.TORCH_BACKEND
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no second warning
        assert functional.backend_for(x, crow) is functional.TORCH_BACKEND


def test_bad_environment_values(monkeypatch):
    x = torch.zeros(2, 3)
    crow = torch.zeros(4, dtype=torch.int32)
    monkeypatch.setenv(functional.BACKEND_VARIABLE, "fast")
    with pytest.raises(ValueError, match="ACTUALLYSPARSE_BACKEND"):
        functional.backend_for(x, crow)
    monkeypatch.setenv(functional.BACKEND_VARIABLE, "native")
    with pytest.raises(RuntimeError, match="int32"):
        functional.backend_for(x, crow.long())
    if kernels.is_available():
        with pytest.raises(RuntimeError, match="int32 row pointers and int32 or int16 column indices, got Int and Long"):
            kernels.forward(x, torch.zeros(0), None, crow, torch.zeros(0, dtype=torch.int64), 3)
    if kernels.is_available():
        monkeypatch.setenv(kernels.ISA_VARIABLE, "sse9")
        with pytest.raises(ValueError, match="ACTUALLYSPARSE_ISA"):
            kernels.isa()
        # every product reads the variable at its call
        with pytest.raises(ValueError, match="ACTUALLYSPARSE_ISA='sse9' is not an instruction set"):
            kernels.forward(x, torch.zeros(0), None, crow, torch.zeros(0, dtype=torch.int32), 3)
        if "avx2" in kernels.supported_isas():
            monkeypatch.setenv(kernels.ISA_VARIABLE, " AVX2 ")
            assert kernels.isa() == "avx2"
        missing = [isa for isa in kernels.ISAS if isa not in kernels.supported_isas()]
        if missing:
            monkeypatch.setenv(kernels.ISA_VARIABLE, missing[0])
            with pytest.raises(RuntimeError, match="supports only"):
                kernels.isa()


def test_importing_compiles_nothing(tmp_path):
    probe = ("import os, actuallysparse, actuallysparse.bench, actuallysparse.kernels as k; "
             "print(k._loaded, os.listdir(os.environ['TORCH_EXTENSIONS_DIR']))")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.split("\n")[0] == "False []"


def test_pruned_layer_trains_on_native_kernels(backend):
    layer = convert(torch.nn.Linear(40, 30), "coo")
    prune_to_sparsity(layer, 0.9)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(8, 40)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = layer(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert layer.values.grad.shape == layer.values.shape


def _pruned_model():
    first = convert(torch.nn.Linear(30, 20), "csr")
    prune_to_sparsity(first, 0.8)
    second = convert(torch.nn.Linear(20, 10), "coo")
    prune_to_sparsity(second, 0.7)
    return torch.nn.Sequential(first, torch.nn.ReLU(), second)


@pytest.mark.parametrize("family", ["linear", "conv"])
@pytest.mark.parametrize("name", ["native", "torch"])
def test_compiled_fullgraph_matches_eager(name, family, monkeypatch):
    from test_conv import _pruned_conv_model

    if name == "native" and not kernels.is_available():
        pytest.skip(f"the native kernels could not be built: {kernels.load_error_summary()}")
    monkeypatch.setenv(functional.BACKEND_VARIABLE, name)
    torch._dynamo.reset()
    model, shape = (_pruned_model(), (5, 30)) if family == "linear" else (_pruned_conv_model(), (3, 3, 6, 6))
    x = torch.randn(*shape, requires_grad=True)
    expected = model(x)
    expected.sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    x.grad = None

    compiled = torch.compile(model, fullgraph=True)   # a graph break would raise
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    for got, want in zip([x.grad] + [p.grad for p in model.parameters()], grads):
        torch.testing.assert_close(got, want)


def test_exported_pruned_model_matches_eager():
    model = _pruned_model().eval()
    program = torch.export.export(model, (torch.randn(4, 30),))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert sum("actuallysparse.linear" in target for target in targets) == 2
    assert not any("argsort" in target for target in targets)   # no pattern work in the graph
    x = torch.randn(4, 30)
    torch.testing.assert_close(program.module()(x), model(x))
