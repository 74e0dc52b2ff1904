from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, settings

import megatron_capaware
from megatron_capaware._compat.launcher import run_distributed

# The tests' explicit switch: CPU stand-ins for Megatron-Core (no-op with CUDA). The library
# changes nothing global on import (tests/test_structure.py).
megatron_capaware.enable_cpu_support()

# Property tests (tests/test_properties.py): CAPAWARE_HYPOTHESIS_PROFILE picks
# how many cases. "ci" (default): a few thousand in all, derandomized so CI is
# reproducible. "nightly": >= 10^5 in all, fresh random cases each run.
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=300, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_SLOW_OK, print_blob=True)
settings.register_profile("nightly", max_examples=15000, deadline=None, suppress_health_check=_SLOW_OK,
                          print_blob=True)
settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=_SLOW_OK)
# Re-run only the failures a nightly run saved in .hypothesis/ (triage).
settings.register_profile("replay", deadline=None, suppress_health_check=_SLOW_OK, print_blob=True,
                          phases=(Phase.explicit, Phase.reuse, Phase.shrink))
settings.load_profile(os.environ.get("CAPAWARE_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Paths of a tiny MoE checkpoint (with tokenizer) and its texts, made once per session."""
    from tests.helpers.tiny_model import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-moe")
    return run_distributed(make_tiny_checkpoint, 1, str(root), timeout_s=300)[0]


@pytest.fixture(autouse=True)
def _device_path_setting_does_not_leak():
    """CAPAWARE_DEVICE_PATH is process-wide and spawned ranks inherit it: no test may leave it changed."""
    before = os.environ.get("CAPAWARE_DEVICE_PATH")
    yield
    assert os.environ.get("CAPAWARE_DEVICE_PATH") == before, "a test left CAPAWARE_DEVICE_PATH changed"


_SLOW_TIERS = ("multirank", "slow", "slurm", "megatron_training", "dynamic_engine")


def pytest_collection_modifyitems(config, items):
    """The fast tier (``python -m pytest -m fast``): every test that spawns no process group and is not slow."""
    for item in items:
        if not any(item.get_closest_marker(name) for name in _SLOW_TIERS):
            item.add_marker(pytest.mark.fast)
