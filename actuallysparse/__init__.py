"""actuallysparse: PyTorch linear and convolution layers whose pruned weights are really gone.

Modules:
    storage     ``SparseModule``: the non-zeros, pattern, pruning and state every sparse layer shares
    layers      ``SparseLayer`` and the original package's helpers
    conv        ``SparseConv2d``
    converter   dense <-> COO <-> CSR conversion of layers and models
    pruning     magnitude pruning to a target sparsity (per layer or global)
    memory      bytes a module and its optimizer state really hold
    fusion      fuse_batchnorm (eval-mode BatchNorm folded into the layer before it), fuse_pooling
                (max-pooling handed to the sparse convolution before it), use_native_layers (the
                library's pooling, batch norm and dropout in place of torch's) and drop_identities
                (the places the fusions leave, taken out)
    pooling     MaxPool2x2: nn.MaxPool2d(2, 2) on the products' backends (a native kernel on the CPU);
                AdaptiveAvgPool2d: torch's, with no work where the input has the output's size
    normalization  BatchNorm2d: nn.BatchNorm2d with its training mode on a native kernel
    dropout     Dropout: nn.Dropout with its mask drawn on every thread by the native kernel
    dynamic     sparse from the first step: make_sparse, SET and RigL
    optim       keeping optimizers in step with pruned parameters
    functional  the sparse products and the one place that picks their backend
    kernels     the compiled CPU kernels, built on first use
    bench       ``python -m actuallysparse.bench [--conv]``: dense vs masked vs sparse, side by side
                (``bench_conv`` holds the convolution tables, ``timing`` what both time with)
"""
from actuallysparse.conv import SparseConv2d
from actuallysparse.converter import convert, convert_model
from actuallysparse.fusion import drop_identities, fuse_batchnorm, fuse_pooling, use_native_layers
from actuallysparse.layers import SparseLayer, prune_sparse_model, set_global_k
from actuallysparse.memory import MemoryReport, stored_bytes
from actuallysparse.pruning import achieved_sparsity, prune_to_sparsity

__version__ = "0.2.0"

__all__ = [
    "SparseLayer",
    "SparseConv2d",
    "convert",
    "convert_model",
    "fuse_batchnorm",
    "fuse_pooling",
    "drop_identities",
    "use_native_layers",
    "prune_sparse_model",
    "set_global_k",
    "prune_to_sparsity",
    "achieved_sparsity",
    "stored_bytes",
    "MemoryReport",
]
