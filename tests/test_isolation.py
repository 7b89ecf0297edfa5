"""No test leaks global state into the next: torch's thread count and Hydra's ConfigStore are restored after each.

Both cases of the one test below first check they see the session's state, then change it as a
test may (``run.train`` sets the run's thread count; tests/test_new_pruner.py registers a pruner
schema, which would then be listed among the ``pruner`` options in every later "unknown pruner"
message). Whichever runs second, in any order, fails when ``conftest._isolate_global_state``
does not restore the state: checked by removing each half of its restoration (after its ``yield``):
``test_global_state_is_restored_after_each_test[second]`` failed on the thread count, then on the
ConfigStore entry.
"""

from __future__ import annotations

import pytest
import torch
from hydra.core.config_store import ConfigStore

#: torch's thread count when this module is imported (collection: before any test ran)
SESSION_THREADS = torch.get_num_threads()


@pytest.mark.parametrize("case", ["first", "second"])
def test_global_state_is_restored_after_each_test(case):
    repo = ConfigStore.instance().repo
    assert torch.get_num_threads() == SESSION_THREADS
    assert "isolation_probe.yaml" not in repo.get("pruner", {})
    torch.set_num_threads(max(1, SESSION_THREADS - 1) if SESSION_THREADS > 1 else 2)
    ConfigStore.instance().store(group="pruner", name="isolation_probe", node={"x": 1})
    assert torch.get_num_threads() != SESSION_THREADS and "isolation_probe.yaml" in repo["pruner"]
