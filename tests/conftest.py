"""Shared fixtures: every test starts from the same random state."""
import pytest
import torch


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
