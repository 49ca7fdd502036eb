"""Shared fixtures: every test starts from the same random state."""
import pytest
import torch

from actuallysparse import functional, kernels

# Every backend and instruction set; a kernel test takes the `backend` fixture and runs on each.
CONFIGS = [("torch", None)] + [("native", isa) for isa in kernels.ISAS]


def _config_id(config):
    backend, isa = config
    return backend if isa is None else f"{backend}-{isa}"


@pytest.fixture(params=CONFIGS, ids=_config_id)
def backend(request, monkeypatch):
    """Force one backend (and instruction set) through the environment; yield the Backend."""
    name, isa = request.param
    monkeypatch.setenv(functional.BACKEND_VARIABLE, name)
    if isa is None:
        monkeypatch.delenv(kernels.ISA_VARIABLE, raising=False)
        return functional.TORCH_BACKEND
    if not kernels.is_available():
        pytest.skip(f"the native kernels could not be built: {kernels.load_error_summary()}")
    if isa not in kernels.supported_isas():
        pytest.skip(f"this CPU lacks {isa} (it supports {', '.join(kernels.supported_isas())})")
    monkeypatch.setenv(kernels.ISA_VARIABLE, isa)
    return functional.NATIVE_BACKEND




@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def sparse_pair():
    """A factory: (dense nn.Linear, SparseLayer of the same weight pruned to ``sparsity``)."""
    from actuallysparse.converter import convert
    from actuallysparse.pruning import prune_to_sparsity

    def make(in_features=12, out_features=7, fmt="csr", sparsity=0.5, dtype=torch.float32, bias=True):
        dense = torch.nn.Linear(in_features, out_features, bias=bias).to(dtype)
        sparse = convert(dense, fmt)
        if sparsity:
            prune_to_sparsity(sparse, sparsity)
        # the dense reference restricted to the kept pattern
        with torch.no_grad():
            dense.weight.copy_(sparse.weight.to_dense())
        return dense, sparse

    return make


@pytest.fixture(scope="session")
def quick_reproduction(tmp_path_factory):
    """One quick ``reproduce`` run, shared by the tests that read it (it takes minutes)."""
    from comparison.reproduce import ReproduceSettings, reproduce

    out = tmp_path_factory.mktemp("reproduce")
    reproduce(ReproduceSettings(out=str(out), quick=True, progress=False), echo=lambda text: None)
    return out
