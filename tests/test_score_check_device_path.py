"""On the device path the score check reads once per model forward, not once per layer.

Run at EP = 2 with ``CAPAWARE_DEVICE_PATH=1`` (the CUDA code path on CPU
tensors): a NaN gate on rank 1 still raises the same clear error on every
rank, and the router's forward issues no host sync for the check.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

from megatron_capaware._compat.launcher import run_distributed

pytestmark = pytest.mark.multirank


def deferred_check_worker() -> Dict[str, Any]:
    from megatron_capaware import parallel
    from megatron_capaware.adapters import install_capaware_routers
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.tools.bench.launch_count import count_call
    from tests.helpers.mp_workers import build_moe_layer, deterministic_tokens

    parallel.init_model_parallel(parallel.ParallelSizes(expert_parallel=2), timeout_s=60)
    rank = torch.distributed.get_rank()
    spec = dict(experts=8, hidden=16, ffn=8, k=2, tp=1, ep=2, etp=1, dispatcher="alltoall", seed=0)
    layer = build_moe_layer(spec).eval()
    install_capaware_routers(layer, CapawareConfig("capacity-drop", gamma=1.0))
    hidden = deterministic_tokens(24, 16, 1 + rank).unsqueeze(1)
    out: Dict[str, Any] = {"rank": rank}
    with torch.no_grad():
        work = count_call(lambda: layer.router(hidden))
        layer.router.capaware_score_check.clear()
        out["check_sync_sites"] = [s for s in work.sync_sites if "guards.py" in s or "common.py" in s]
        out["clean_forward_finite"] = bool(torch.isfinite(layer(hidden)[0]).all())
        if rank == 1:
            layer.router.weight[0, 0] = float("nan")
        try:
            layer(hidden)
            out["error"] = None
        except Exception as err:  # noqa: BLE001
            out["error"] = f"{type(err).__name__}: {err}"
    parallel.destroy()
    return out


def test_nan_on_one_rank_raises_on_every_rank_once_per_forward() -> None:
    results = run_distributed(deferred_check_worker, 2, timeout_s=300, collective_timeout_s=60,
                              extra_env={"CAPAWARE_DEVICE_PATH": "1"})
    for res in results:
        assert res["clean_forward_finite"], res
        assert res["check_sync_sites"] == [], res  # the check waits for the end of the forward
        assert res["error"] is not None, f"rank {res['rank']}: NaN scores were routed silently"
        assert res["error"].startswith("RoutingInputError: router scores contain NaN or Inf"), res
        assert "on rank(s) [1] of the load group" in res["error"], res
