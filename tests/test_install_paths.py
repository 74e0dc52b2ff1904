"""The one installer, reached by every path: a built model, a capaware spec, the Megatron-LM launcher's hook.

At EP 2 on the device path (``CAPAWARE_DEVICE_PATH=1``: the CUDA code path on
CPU tensors), each path must give the same guarantees: the ranks agree before
routing (a differing gamma raises on every rank), the score check is read once
per model forward (not per layer), and the routers make no other host sync,
on the first routing call too.
"""

from __future__ import annotations

import pytest

from megatron_capaware._compat.launcher import run_distributed
from tests.helpers.install_path_workers import PATHS, install_path_worker

pytestmark = pytest.mark.multirank


@pytest.mark.parametrize("path", PATHS)
def test_every_install_path_gives_the_same_guarantees(path: str) -> None:
    results = run_distributed(install_path_worker, 2, path, 2, timeout_s=400, collective_timeout_s=60,
                              extra_env={"CAPAWARE_DEVICE_PATH": "1"})
    for res in results:
        assert res["layers"] == 2, res
        assert res["shared_check"] == 1, res  # one deferred check for the model's layers
        # One host read per forward (the score check), whatever the number of MoE layers.
        assert len(res["first"]) == 1 and "guards.py" in res["first"][0], res
        assert len(res["later"]) == 1 and "guards.py" in res["later"][0], res
        # Every routed call recorded (the launcher's installing forward routes too).
        assert res["stats_calls"] == ([3, 3] if path == "launcher" else [2, 2]), res
        assert res["disagree"] is not None and "disagree" in res["disagree"] and "gamma" in res["disagree"], res
        assert res["nan"] is not None and "router scores contain NaN or Inf" in res["nan"], res
        assert "on rank(s) [1] of the load group" in res["nan"], res
    if path == "installer":
        assert results[0]["names"] == ["decoder.layers.0.mlp", "decoder.layers.1.mlp"]
