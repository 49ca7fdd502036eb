"""Importing the packages changes no global state: no optimizer hooks, no warning filters."""
import json
import subprocess
import sys

import pytest

_PROBE = """
import json, sys, warnings
import torch
from torch.optim import optimizer as opt
before = (len(opt._global_optimizer_pre_hooks), len(opt._global_optimizer_post_hooks), list(warnings.filters))
import {module}
after = (len(opt._global_optimizer_pre_hooks), len(opt._global_optimizer_post_hooks), list(warnings.filters))
print(json.dumps({{"hooks": [before[:2], after[:2]], "filters_same": before[2] == after[2],
                   "new_filters": [repr(f) for f in after[2] if f not in before[2]]}}))
"""


@pytest.mark.parametrize("module", ["actuallysparse", "actuallysparse.bench", "comparison.runner"])
def test_import_changes_no_global_state(module):
    result = subprocess.run([sys.executable, "-c", _PROBE.format(module=module)],
                            capture_output=True, text=True, check=True)
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state["hooks"][0] == state["hooks"][1], f"importing {module} registered optimizer hooks"
    assert state["filters_same"], f"importing {module} added warning filters: {state['new_filters']}"


def test_the_orphan_remap_arrives_with_the_first_sparse_layer():
    probe = """
import torch
from torch.optim import optimizer as opt
import actuallysparse
n = len(opt._global_optimizer_pre_hooks)
layer = actuallysparse.SparseLayer(4, 4)
optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
layer(torch.ones(2, 4)).sum().backward()
optimizer.step()
layer.prune_smallest_values(k=0.5)          # optimizer not told
layer(torch.ones(2, 4)).sum().backward()
optimizer.step()
print(n, len(opt._global_optimizer_pre_hooks), optimizer.param_groups[0]["params"][0] is layer.values)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["0", "1", "True"]
