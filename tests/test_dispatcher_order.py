"""The alltoall dispatcher's device-to-host copy point never comes after its sync point.

Megatron checks the order inside ``preprocess``; the capaware subclass moves
the sync point earlier afterwards (variable token counts), so it must move
the copy point with it. Megatron's CUDA-graph setting puts the copies at
``before_ep_alltoall``: without the fix the sync at ``before_permutation_1``
would wait on an event not yet recorded.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

from megatron_capaware._compat.launcher import run_distributed

pytestmark = pytest.mark.multirank


def dispatcher_order_worker(dtoh_point: str) -> Dict[str, Any]:
    from megatron_capaware import parallel
    from megatron_capaware.adapters import install_capaware_routers
    from megatron_capaware.config import CapawareConfig
    from tests.helpers.mp_workers import build_moe_layer, deterministic_tokens

    parallel.init_model_parallel(parallel.ParallelSizes())
    spec = dict(experts=4, hidden=16, ffn=8, k=2, tp=1, ep=1, etp=1, dispatcher="alltoall", seed=0)
    layer = build_moe_layer(spec).eval()
    install_capaware_routers(layer, CapawareConfig("capacity-drop", gamma=1.0))
    dispatcher = layer.token_dispatcher
    dispatcher.cuda_dtoh_point = dtoh_point
    hidden = deterministic_tokens(32, 16, 1).unsqueeze(1)
    with torch.no_grad():
        out = layer(hidden)[0]
    priority = dispatcher.cuda_sync_point_priority
    result = dict(dtoh=dispatcher.cuda_dtoh_point, sync=dispatcher.cuda_sync_point,
                  ordered=priority[dispatcher.cuda_dtoh_point] <= priority[dispatcher.cuda_sync_point],
                  finite=bool(torch.isfinite(out).all()))
    parallel.destroy()
    return result


@pytest.mark.parametrize("dtoh_point", ["before_permutation_1", "before_ep_alltoall"])
def test_copy_point_is_not_after_sync_point(dtoh_point) -> None:
    result = run_distributed(dispatcher_order_worker, 1, dtoh_point, timeout_s=240)[0]
    assert result["ordered"] and result["finite"], result
    assert result["sync"] == "before_permutation_1" and result["dtoh"] == "before_permutation_1", result
