"""SparseConv2d: products against a masked dense Conv2d on every backend, its API, and mixed models."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actuallysparse import SparseConv2d, SparseLayer, convert, convert_model, functional, kernels, stored_bytes
from actuallysparse.layers import prune_sparse_model, set_global_k
from actuallysparse.pruning import achieved_sparsity, prune_to_sparsity

# (in, out, kernel, stride, padding, dilation, bias, height, width)
GEOMETRIES = [
    pytest.param(3, 5, 3, 1, 1, 1, True, 7, 9, id="3x3-pad1-odd"),
    pytest.param(4, 6, 1, 1, 0, 1, True, 5, 5, id="1x1"),
    pytest.param(4, 5, 3, 2, 1, 1, False, 9, 8, id="3x3-stride2-nobias"),
    pytest.param(3, 4, 3, 1, 2, 2, True, 8, 7, id="3x3-dilation2"),
    pytest.param(5, 4, 3, 1, "same", 1, True, 6, 5, id="3x3-same"),
    pytest.param(3, 4, (2, 3), 1, "same", (2, 1), True, 6, 7, id="2x3-same-dilated"),
    pytest.param(2, 3, 3, (2, 1), 0, 1, True, 7, 6, id="3x3-valid-stride21"),
    # padding beyond the kernel's reach: the input gradient is scattered, not a flipped forward
    pytest.param(3, 4, 3, 1, (3, 1), 1, True, 5, 6, id="3x3-pad31"),
]


def _masked_pair(in_ch, out_ch, kernel, stride, padding, dilation, bias, *, density=0.4, dtype=torch.float64,
                 fmt="csr"):
    """A dense Conv2d with a random pattern (one output channel empty) and its SparseConv2d."""
    dense = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias,
                      dtype=dtype)
    with torch.no_grad():
        dense.weight.mul_(torch.rand_like(dense.weight) < density)
        dense.weight[out_ch // 2] = 0
    return dense, convert(dense, fmt)


def _tolerance(dtype):
    return {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, 3, 37])
@pytest.mark.parametrize("in_ch, out_ch, kernel, stride, padding, dilation, bias, height, width", GEOMETRIES)
def test_products_match_masked_dense(backend, dtype, batch, in_ch, out_ch, kernel, stride, padding, dilation, bias,
                                     height, width):
    dense, sparse = _masked_pair(in_ch, out_ch, kernel, stride, padding, dilation, bias, dtype=dtype)
    x = torch.randn(batch, in_ch, height, width, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, expected = sparse(x), dense(x_ref)
    torch.testing.assert_close(out, expected, **_tolerance(dtype))
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, **_tolerance(dtype))
    rows, cols = sparse._rows_cols()
    assert sparse.values.grad.shape == (sparse.nnz,)
    torch.testing.assert_close(sparse.values.grad, dense.weight.grad.reshape(out_ch, -1)[rows, cols],
                               **_tolerance(dtype))
    if bias:
        torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, **_tolerance(dtype))


@pytest.mark.parametrize("transposed", [False, True], ids=["scattered", "transposed"])
@pytest.mark.parametrize("in_ch, out_ch, kernel, stride, padding, dilation, bias, height, width",
                         GEOMETRIES[:5] + GEOMETRIES[-1:])
def test_gradcheck(backend, in_ch, out_ch, kernel, stride, padding, dilation, bias, height, width, transposed):
    _, sparse = _masked_pair(in_ch, out_ch, kernel, stride, padding, dilation, bias, density=0.5)
    crow, col = sparse._pattern()
    pattern = sparse._transposed_pattern() if transposed else None
    x = torch.randn(2, in_ch, height, width, dtype=torch.float64, requires_grad=True)
    values = sparse.values.detach().clone().requires_grad_()
    b = sparse.bias.detach().clone().requires_grad_() if bias else None
    inputs = (x, values) + ((b,) if bias else ())

    def apply(x, values, b=None):
        return functional.sparse_conv2d(x, values, b, crow, col, out_ch, sparse.geometry(), pattern)

    assert torch.autograd.gradcheck(apply, inputs)
    assert torch.autograd.gradgradcheck(apply, inputs)


def test_transposed_pattern_flips_the_taps_and_is_cached_with_the_pattern():
    dense, sparse = _masked_pair(3, 4, (2, 3), 1, 0, 1, False)
    pattern = sparse._transposed_pattern()
    assert sparse._transposed_pattern() is pattern
    weight = dense.weight.detach()  # (out, in, kh, kw)
    flipped = weight.flip(2, 3).transpose(0, 1).reshape(3, -1)  # (in, out * kh * kw)
    rows = functional.rows_from_crow(pattern.crow)
    expected = flipped.nonzero()
    torch.testing.assert_close(torch.stack([rows, pattern.col.long()], 1), expected)
    torch.testing.assert_close(sparse.values.detach()[pattern.perm.long()], flipped[rows, pattern.col.long()])
    prune_to_sparsity(sparse, 0.8)
    assert sparse._transposed is None
    sparse._transposed_pattern()
    sparse.eval()
    assert sparse._transposed is None


def test_evaluation_keeps_the_input_offsets_per_input_size_until_pattern_or_mode_changes(backend):
    native = backend is functional.NATIVE_BACKEND
    _, sparse = _masked_pair(3, 5, 3, 1, 1, 1, True)
    sparse.eval()

    def check(height, width):
        x = torch.randn(2, 3, height, width, dtype=torch.float64)
        with torch.no_grad():
            out = sparse(x)
        expected = F.conv2d(x, sparse.dense_weight(), sparse.bias.detach(), padding=1)
        torch.testing.assert_close(out, expected, **_tolerance(torch.float64))

    check(7, 9)
    if not native:  # the torch backend reads no offsets
        assert sparse._offsets is None
        return
    cached = sparse._offsets
    assert (cached.height, cached.width, cached.offsets.shape) == (7, 9, (sparse.nnz,))
    # 3 channels x 9 x 11 padded rows fit 16 bits
    assert cached.offsets.dtype == torch.int16
    assert stored_bytes(sparse).by_category["caches"] == 2 * sparse.nnz
    check(7, 9)
    assert sparse._offsets is cached
    check(5, 6)   # another size replaces the entry
    assert (sparse._offsets.height, sparse._offsets.width) == (5, 6)
    prune_to_sparsity(sparse, 0.8)   # a new pattern drops it
    assert sparse._offsets is None
    check(5, 6)
    sparse.train()
    assert sparse._offsets is None
    check(5, 6)   # training mode builds none
    assert sparse._offsets is None


@pytest.mark.parametrize("setting, value, expected", [("padding", (2, 0), dict(padding=(2, 0))),
                                                      ("padding", "valid", dict(padding=0)),
                                                      ("dilation", (2, 1), dict(padding=1, dilation=(2, 1))),
                                                      ("stride", (2, 2), dict(padding=1, stride=2))])
def test_a_changed_setting_changes_the_geometry_and_what_evaluation_kept(backend, setting, value, expected):
    _, sparse = _masked_pair(3, 5, 3, 1, 1, 1, True)
    sparse.eval()
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        sparse(x)                        # keeps the geometry, and on the native kernels the offsets
        setattr(sparse, setting, value)
        out = sparse(x)
    assert sparse.geometry()[:6] == tuple(sparse.kernel_size) + tuple(sparse.stride) + tuple(sparse.dilation)
    torch.testing.assert_close(out, F.conv2d(x, sparse.dense_weight(), sparse.bias.detach(), **expected),
                               **_tolerance(torch.float64))


def test_a_transposed_pattern_pointing_outside_the_values_is_refused(backend):
    from actuallysparse import kernels

    if backend is not functional.NATIVE_BACKEND:
        pytest.skip("the native backward gathers the values through the permutation itself")
    _, sparse = _masked_pair(3, 4, 3, 1, 1, 1, False, dtype=torch.float32)
    crow, col = sparse._pattern()
    pattern = sparse._transposed_pattern()
    x, grad = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6)
    values = sparse.values.detach()
    expected = kernels.conv_backward(grad, x, values, crow, col, sparse.geometry(), True, False)[0]
    torch.testing.assert_close(kernels.conv_backward(grad, x, values, crow, col, sparse.geometry(), True, False,
                                                     pattern)[0], expected, **_tolerance(torch.float32))
    bad = pattern.perm.clone()
    bad[-1] = sparse.nnz
    with pytest.raises(RuntimeError, match=f"perm must hold positions of the {sparse.nnz} non-zeros"):
        kernels.conv_backward(grad, x, values, crow, col, sparse.geometry(), True, False,
                              functional.TransposedPattern(pattern.crow, pattern.col, bad))


def test_given_offsets_compute_what_the_call_would_and_bad_ones_are_named(backend):
    from actuallysparse import kernels

    if backend is not functional.NATIVE_BACKEND:
        pytest.skip("offsets are the native kernels' own")
    dense, sparse = _masked_pair(4, 6, 3, 1, 1, 1, True, dtype=torch.float32)
    crow, col = sparse._pattern()
    geometry = sparse.geometry()
    values, bias = sparse.values.detach(), sparse.bias.detach()
    # 4 x 130 x 130 padded rows need 32 bits, the smaller inputs 16; batches of one and of tiles
    for batch, height, width, dtype in ((1, 4, 4, torch.int16), (3, 7, 5, torch.int16), (1, 128, 128, torch.int32),
                                        (3, 128, 128, torch.int32)):
        x = torch.randn(batch, 4, height, width)
        offsets = kernels.conv_offsets(col, 4, height, width, geometry)
        assert offsets.dtype == dtype
        expected = F.conv2d(x, sparse.dense_weight(), bias, padding=1)
        torch.testing.assert_close(kernels.conv_forward(x, values, bias, crow, col, 6, geometry, offsets), expected,
                                   **_tolerance(torch.float32))
        torch.testing.assert_close(kernels.conv_forward(x, values, bias, crow, col, 6, geometry), expected,
                                   **_tolerance(torch.float32))
    with pytest.raises(RuntimeError, match=f"offsets must be the {sparse.nnz} contiguous offsets"):
        kernels.conv_forward(x, values, bias, crow, col, 6, geometry, offsets[1:])
    with pytest.raises(RuntimeError, match=r"\(int16 only where they fit\), got \[\d+\] Short"):
        kernels.conv_forward(x, values, bias, crow, col, 6, geometry, offsets.to(torch.int16))


@pytest.mark.parametrize("batch", [1, 3])
def test_a_fused_relu_is_written_with_the_output_and_follows_the_product_under_a_graph(backend, batch):
    dense, sparse = _masked_pair(4, 6, 3, 1, 1, 1, True)
    sparse.fused_relu = True
    assert repr(sparse).endswith("k=0.05, fused_relu=True)")
    x = torch.randn(batch, 4, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        for bias in (sparse.bias, dense.bias):   # relu keeps a NaN, as torch's does
            bias[1] = float("nan")
        torch.testing.assert_close(sparse.eval()(x), F.relu(dense(x)), equal_nan=True, **_tolerance(torch.float64))
        for bias in (sparse.bias, dense.bias):
            bias[1] = 0.5
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = sparse.train()(x_ours), F.relu(dense(x_ref))
    torch.testing.assert_close(out, expected, **_tolerance(torch.float64))
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **_tolerance(torch.float64))
    # other sparse formats keep it; an nn.Conv2d cannot hold it
    assert convert(sparse, "coo").fused_relu
    with pytest.raises(ValueError, match="computes the ReLU after it"):
        convert(sparse, "dense")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch, height, width", [
    (3, 8, 8),      # one item holds whole pairs of rows: 16 pixels
    (37, 16, 16),   # 32 pixels an item, half the channels; a second batch tile
    (5, 9, 7),      # odd sizes: the last row and column are in no window
    (1, 6, 8),      # one image: pooled after the single-image forward
    (2, 4, 140),    # rows too wide for the buffer: pooled after the forward
])
def test_a_fused_pool_writes_the_pooled_output_and_follows_the_product_under_a_graph(backend, dtype, batch, height,
                                                                                     width):
    dense, sparse = _masked_pair(4, 19, 3, 1, 1, 1, True, dtype=dtype)
    sparse.fused_relu = sparse.fused_pool = True
    assert repr(sparse).endswith("k=0.05, fused_relu=True, fused_pool=True)")
    x = torch.randn(batch, 4, height, width, dtype=dtype)
    with torch.no_grad():
        expected = F.max_pool2d(F.relu(dense(x)), 2)
        torch.testing.assert_close(sparse.eval()(x), expected, **_tolerance(dtype))
        # a NaN wins its window, as in max_pool2d (the reference: this layer unfused; a dense
        # convolution would spread an input NaN through its zero weights too)
        sparse.bias[2] = float("nan")
        x[0, :, 1, 2] = float("nan")
        sparse.fused_relu = sparse.fused_pool = False
        expected = F.max_pool2d(F.relu(sparse(x)), 2)
        sparse.fused_relu = sparse.fused_pool = True
        assert expected.isnan().any() and not expected.isnan().all()
        torch.testing.assert_close(sparse(x), expected, equal_nan=True, **_tolerance(dtype))
    x = torch.randn(batch, 4, height, width, dtype=dtype)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    sparse.bias.data.fill_(0.25)
    dense.bias.data.fill_(0.25)
    out, expected = sparse.train()(x_ours), F.max_pool2d(F.relu(dense(x_ref)), 2)
    torch.testing.assert_close(out, expected, **_tolerance(dtype))
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **_tolerance(dtype))
    assert convert(sparse, "coo").fused_pool
    sparse.fused_relu = False
    with pytest.raises(ValueError, match="pools its output"):
        convert(sparse, "dense")


def test_a_fused_pool_needs_an_output_of_two_by_two(backend):
    _, sparse = _masked_pair(2, 3, 3, 1, 0, 1, True)
    sparse.fused_pool = True
    with torch.no_grad(), pytest.raises(ValueError, match=r"fused_pool\), which is 1x2 for input shape \(2, 2, 3, 4\); it needs at least 2x2"):
        sparse.eval()(torch.randn(2, 2, 3, 4, dtype=torch.float64))


def test_no_non_zeros_leaves_the_bias(backend):
    conv = convert(nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64), "coo")
    conv.keep_entries(torch.zeros(conv.nnz, dtype=torch.bool))
    assert conv.nnz == 0
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    torch.testing.assert_close(out, conv.bias.detach().view(1, -1, 1, 1).expand(2, 4, 5, 5))
    out.sum().backward()
    assert conv.values.grad.shape == (0,)
    torch.testing.assert_close(x.grad, torch.zeros_like(x))


def test_non_contiguous_and_three_dimensional_input(backend):
    dense, sparse = _masked_pair(4, 3, 3, 1, 1, 1, True)
    x = torch.randn(2, 9, 6, 4, dtype=torch.float64).permute(0, 3, 2, 1)[:, :, :, ::2]   # (2, 4, 6, 5), strided
    assert not x.is_contiguous()
    torch.testing.assert_close(sparse(x), dense(x), **_tolerance(torch.float64))
    channels_last = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(sparse(channels_last), dense(x), **_tolerance(torch.float64))
    torch.testing.assert_close(sparse(x[0]), dense(x[0]), **_tolerance(torch.float64))
    assert sparse(x[0]).shape == (3, 6, 5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packing_copies_every_image_and_pixel(backend, dtype):
    # 21 images and rows of 13 pixels: whole 8x8 (float64: 4x4) transposes of the packing, a 4x4
    # one for float32's last four pixels, and remainders of both, on rows that are contiguous and
    # on strided ones (the plain loop)
    dense, sparse = _masked_pair(3, 4, 3, 1, 1, 1, True, dtype=dtype)
    for x in (torch.randn(21, 3, 5, 13, dtype=dtype), torch.randn(21, 3, 5, 26, dtype=dtype)[..., ::2]):
        x.requires_grad_(True)
        out = sparse(x)
        torch.testing.assert_close(out, dense(x), **_tolerance(dtype))
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, sparse.values), grad)
        want = torch.autograd.grad(dense(x), (x, dense.weight), grad)
        torch.testing.assert_close(got[0], want[0], **_tolerance(dtype))
        rows, cols = sparse._rows_cols()
        torch.testing.assert_close(got[1], want[1].reshape(4, -1)[rows, cols], **_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tile_vectors", [1, 2, 3, 4])
@pytest.mark.parametrize("height, width", [(2, 2), (3, 5), (5, 5)])
def test_every_tile_width_and_what_whole_pixel_groups_leave(backend, dtype, tile_vectors, height, width):
    # the native kernels take batch tiles of one to four vectors (a cache line a row by default,
    # the others for measuring), and outputs of 4, 15 and 25 pixels leave parts of the groups of
    # 2 to 16 pixels the kernels hold in registers: the forward, the scattered input gradient and
    # the one computed as a forward, and the value gradient, against the dense convolution
    if backend is functional.TORCH_BACKEND:
        pytest.skip("tile widths are the native kernels' own")
    dense, sparse = _masked_pair(5, 6, 3, 1, 1, 1, True, dtype=dtype)
    crow, col = sparse._pattern()
    values, geometry = sparse.values.detach(), list(sparse.geometry())
    x = torch.randn(37, 5, height, width, dtype=dtype, requires_grad=True)
    ops = kernels._ops()
    out = ops.conv2d(x.detach(), values, sparse.bias.detach(), crow, col, 6, geometry, "", tile_vectors)
    expected = dense(x)
    torch.testing.assert_close(out, expected, **_tolerance(dtype))
    grad = torch.randn_like(out)
    want_x, want_w = torch.autograd.grad(expected, (x, dense.weight), grad)
    rows, cols = sparse._rows_cols()
    transposed = sparse._transposed_pattern()
    for parts in ((None, None, None), (transposed.crow, transposed.col, transposed.perm)):
        grad_x, grad_values = ops.conv2d_backward(grad, x.detach(), values, crow, col, geometry, True, True, "",
                                                  tile_vectors, *parts)
        torch.testing.assert_close(grad_x, want_x, **_tolerance(dtype))
        torch.testing.assert_close(grad_values, want_w.reshape(6, -1)[rows, cols], **_tolerance(dtype))


def test_coo_and_csr_compute_alike(backend):
    dense, coo = _masked_pair(3, 4, 3, 1, 1, 1, True, fmt="coo")
    csr = convert(coo, "csr")
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(coo(x), csr(x))
    assert coo.indices.dtype == torch.int16 and csr.col_indices.dtype == torch.int16   # compact where they fit


def test_repr_in_the_conv2d_manner():
    assert repr(SparseConv2d(3, 8, 3, padding=1)) == (
        "SparseConv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), csr_mode=False, k=0.05)")
    assert repr(SparseConv2d(2, 4, (1, 3), stride=2, padding=0, dilation=2, bias=False,
                             csr_mode=True)) == (
        "SparseConv2d(2, 4, kernel_size=(1, 3), stride=(2, 2), dilation=(2, 2), bias=False, csr_mode=True, k=0.05)")
    assert "padding='same'" in repr(SparseConv2d(2, 4, 3, padding="same"))


@pytest.mark.parametrize("kwargs, message", [
    ({"groups": 2}, "groups=2"),
    ({"padding_mode": "reflect"}, "padding_mode='reflect'"),
    ({"padding": "full"}, "'full'"),
    ({"padding": -1}, "padding must be a non-negative integer"),
    ({"kernel_size": 0}, "kernel_size must be a positive integer"),
    ({"stride": (1, 2, 3)}, "stride must be"),
    ({"padding": "same", "stride": 2}, "needs stride 1"),
    ({"k": 0}, "k must be"),
])
def test_unsupported_arguments_are_named(kwargs, message):
    arguments = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        SparseConv2d(**arguments)


def test_bad_inputs_are_named():
    conv = SparseConv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*got shape \(2, 5, 6, 6\)"):
        conv(torch.randn(2, 5, 6, 6))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        conv(torch.randn(1, 3, 2, 6))
    with pytest.raises(TypeError, match="float64"):
        conv(torch.randn(1, 3, 6, 6, dtype=torch.float64))


@pytest.mark.parametrize("column", [27, -1, 40000])
def test_the_native_kernel_names_a_column_outside_the_weight(column):
    from actuallysparse import kernels

    if not kernels.is_available():
        pytest.skip("the native kernels could not be built")
    # 3 input channels x 3x3 taps: columns 0..26; the bad one sits among many good ones
    col = torch.randint(0, 27, (70000,), dtype=torch.int32)
    col[50000] = column
    crow = torch.tensor([0, 70000], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=f"column {column} lies outside the 27 columns of 3 input channels x 3x3"):
        kernels.conv_forward(torch.randn(2, 3, 5, 5), torch.randn(70000), None, crow, col, 1,
                             (3, 3, 1, 1, 1, 1, 1, 1, 1, 1))


def test_converter_round_trip_is_exact():
    dense = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)
    with torch.no_grad():
        dense.weight.mul_(torch.rand_like(dense.weight) < 0.3)
    for target in ("coo", "csr"):
        sparse = convert(dense, target)
        assert isinstance(sparse, SparseConv2d) and sparse.csr_mode == (target == "csr")
        assert sparse.nnz == int((dense.weight != 0).sum())
        back = convert(sparse, "dense")
        assert type(back) is nn.Conv2d
        assert (back.stride, back.padding, back.dilation) == (dense.stride, dense.padding, dense.dilation)
        assert torch.equal(back.weight, dense.weight) and torch.equal(back.bias, dense.bias)
    mask = torch.zeros_like(dense.weight)
    mask[0] = 1
    assert convert(dense, "coo", mask=mask).nnz == int((dense.weight[0] != 0).sum())


def _mixed_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2)),
        nn.Flatten(), nn.Linear(32, 10))


def test_convert_model_reaches_every_depth_and_mixes_with_linear():
    model = convert_model(convert_model(_mixed_model(), nn.Conv2d, "csr"), nn.Linear, "coo")
    assert isinstance(model[0], SparseConv2d) and isinstance(model[2][0], SparseConv2d)
    assert isinstance(model[4], SparseLayer)
    back = convert_model(model, SparseConv2d, "dense")
    assert type(back[2][0]) is nn.Conv2d


def test_global_pruning_spans_convolutions_and_linears_and_the_optimizer_keeps_training():
    model = convert_model(convert_model(_mixed_model(), nn.Conv2d, "csr"), nn.Linear, "csr")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(4, 3, 6, 6)
    model(x).pow(2).mean().backward()
    optimizer.step()
    achieved = prune_to_sparsity(model, 0.8, scope="global", optimizer=optimizer)
    assert achieved == pytest.approx(0.8, abs=1e-3)
    assert {type(m) for m in model.modules() if hasattr(m, "nnz") and m.nnz < m.n_weights} >= {SparseConv2d}
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    optimizer.step()
    for parameter, old in zip(model.parameters(), before):
        assert not torch.equal(parameter, old), "a layer stopped training after pruning"
    report = stored_bytes(model, optimizer)
    sparse = [m for m in model.modules() if isinstance(m, (SparseConv2d, SparseLayer))]
    assert report.by_category["values"] == sum(m.nnz for m in sparse) * 4
    assert report.by_category["parameters"] == 0      # no dense weight left anywhere
    assert report.optimizer_state_bytes == sum(m.nnz + m.bias.numel() for m in sparse) * 4   # momentum


def test_original_helpers_reach_convolutions():
    model = convert_model(_mixed_model(), nn.Conv2d, "coo")
    set_global_k(model, 0.25)
    assert model[0].k == 0.25 and model[2][0].k == 0.25
    prune_sparse_model(model, torch.randn(1, 3, 6, 6))
    assert model[2][0].nnz == model[2][0].n_weights - int(0.25 * model[2][0].n_weights)
    assert achieved_sparsity(model) == pytest.approx(0.25, abs=0.01)


def test_state_dict_loads_into_other_nnz_and_save_round_trips():
    source = convert(nn.Conv2d(3, 4, 3, padding=1), "csr")
    prune_to_sparsity(source, 0.7)
    target = SparseConv2d(3, 4, 3, padding=1)
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 3, 5, 5)
    assert target.nnz == source.nnz
    torch.testing.assert_close(target(x), source(x))
    model = convert_model(_mixed_model(), nn.Conv2d, "coo")
    prune_to_sparsity(model, 0.5)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(loaded(x), model(x))


def _pruned_conv_model():
    model = convert_model(convert_model(_mixed_model(), nn.Conv2d, "csr"), nn.Linear, "coo")
    prune_to_sparsity(model, 0.6)
    return model


def test_exported_model_with_sparse_convolutions_matches_eager():
    model = _pruned_conv_model().eval()
    program = torch.export.export(model, (torch.randn(2, 3, 6, 6),))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert sum("actuallysparse.conv2d" in target for target in targets) == 2
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(program.module()(x), model(x))


def test_dense_weight_matches_the_converted_conv():
    dense, sparse = _masked_pair(3, 4, 3, 1, 1, 1, True)
    assert torch.equal(sparse.dense_weight(), dense.weight.detach())
    assert sparse.weight.shape == (4, 27)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(F.conv2d(x, sparse.dense_weight(), sparse.bias, padding=1), sparse(x))


def test_assign_new_weight_and_format_switches_keep_the_products():
    conv = SparseConv2d(3, 4, 3, padding=1).double()
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64) * (torch.rand(4, 3, 3, 3) < 0.3)
    conv.assign_new_weight(weight)
    assert conv.nnz == int((weight != 0).sum())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    expected = F.conv2d(x, weight, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected)
    values = conv.values
    conv.switch_to_CSR()
    assert conv.is_CSR() and conv.values is values
    torch.testing.assert_close(conv(x), expected)
    conv.switch_to_COO()
    torch.testing.assert_close(conv(x), expected)
    with pytest.raises(ValueError, match=r"weight has shape \(4, 27\), layer expects \(4, 3, 3, 3\)"):
        conv.assign_new_weight(weight.reshape(4, 27))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_single_image_with_rows_wider_than_the_vectors(backend, dtype):
    # One image takes its own path (vectors over a row's pixels); rows of 37 and 40 pixels cover
    # whole vectors and a partial one on every instruction set.
    for width, stride in ((37, 1), (40, (2, 1))):
        dense, sparse = _masked_pair(3, 4, 3, stride, 1, 1, True, dtype=dtype)
        x = torch.randn(1, 3, 9, width, dtype=dtype)
        torch.testing.assert_close(sparse(x), dense(x), **_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_image_whose_pixels_fit_one_vector(backend, dtype):
    # A 2x2 output spans 6 lanes at its padded width, a 3x3 one 13, a 1x5 one 5: runs of one
    # vector where they fit it (8 or 16 lanes), of two otherwise.
    for height, width in ((2, 2), (3, 3), (1, 5)):
        dense, sparse = _masked_pair(5, 7, 3, 1, 1, 1, True, dtype=dtype)
        x = torch.randn(1, 5, height, width, dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), dense(x), **_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_image_runs_of_every_length(backend, dtype):
    # One output row of w pixels spans ceil(w / lanes) vectors (lanes 2 to 16): runs of one to
    # six of them, and more split into several runs; a 3-row output at the padded width too.
    dense, sparse = _masked_pair(3, 4, 3, 1, 1, 1, True, dtype=dtype)
    for height, width in [(1, w) for w in range(1, 100, 3)] + [(3, 30), (4, 17)]:
        x = torch.randn(1, 3, height, width, dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), dense(x), **_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_image_whose_planes_outgrow_l1(backend, dtype):
    # 1024 channels of 6x6 padded planes (144-288 KiB): the single-image forward walks them in
    # blocks that fit L1 (partial sums kept between blocks), plain, dilated and row-strided; 37
    # output channels fill two chunks and part of a third; with the bias and a fused ReLU.
    for stride, dilation, pad in ((1, 1, 1), (1, 2, 2), ((2, 1), 1, 1)):
        dense, sparse = _masked_pair(1024, 37, 3, stride, pad, dilation, True, dtype=dtype, density=0.05)
        sparse.fused_relu = True
        x = torch.randn(1, 1024, 4, 4, dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), F.relu(dense(x)), **_tolerance(dtype))


def test_a_row_too_wide_for_16_bit_columns_keeps_int32_and_computes_alike(backend):
    # 3641 channels x 3 x 3 = 32769 columns: the last does not fit int16
    dense, sparse = _masked_pair(3641, 2, 3, 1, 1, 1, True, density=0.01)
    assert sparse.col_indices.dtype == torch.int32
    x = torch.randn(2, 3641, 3, 3, dtype=torch.float64, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_()
    torch.testing.assert_close(sparse(x), dense(x_dense), **_tolerance(torch.float64))
    sparse(x).sum().backward()
    dense(x_dense).sum().backward()
    torch.testing.assert_close(x.grad, x_dense.grad, **_tolerance(torch.float64))
