"""Megatron's ``--moe-pad-experts-for-cuda-graph-inference`` with every router (issue 23, item 4).

megatron-core 0.19 asserts the flag when the dynamic engine uses CUDA graphs at EP > 1
(``TextGenerationController.__init__``), and with it switches each CUDA-graph step to
drop-and-pad at capacity factor E / k (nothing dropped, static shapes) and each eager step
back (``set_decode_expert_padding``). Checked here on a tiny GPT, at EP 1 and EP 2 (gloo,
alltoall; allgather at EP 2), with no plan, a permutation plan, and (EP 2) a plan with replicas:

- a step with padding on, marked captured: every router's logits equal Megatron's own router
  under the same padding (bit for bit without a plan; to float tolerance with one, the
  experts' contributions summed in another order), and nothing is recorded as dropped;
- padding off, an eager step: the policy runs as without the flag (capacity-drop drops; the
  logits equal those of the eager step before any padding, bit for bit);
- a router installed while Megatron's toggle has padding on is accepted, and the same capacity
  fields set without the flag (a user's static setting) are still refused.

The padding is Megatron's own ``set_decode_expert_padding`` (in megatron-core 0.16.1 and 0.19.2).
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

pytestmark = pytest.mark.multirank

ROUTERS: Dict[str, Dict[str, Any]] = {
    "topk": {"router_type": "topk"},
    "capacity-drop": {"router_type": "capacity-drop", "gamma": 0.5},
    "capacity-reroute": {"router_type": "capacity-reroute", "gamma": 0.5},
    "expanded-drop": {"router_type": "expanded-drop", "gamma": 0.5},
    "laser": {"router_type": "laser"},
    "decode-pack": {"router_type": "decode-pack"},
}


def _runs(ep: int) -> Dict[str, Dict[str, Any]]:
    runs: Dict[str, Dict[str, Any]] = {}
    for name, router in ROUTERS.items():
        runs[name] = {"router": router, "redundant": None}
        if name == "decode-pack":  # a decode router: without a plan only
            continue
        runs[f"{name}+permutation"] = {"router": router, "redundant": 0, "seed": 3}
        if ep > 1 and name in ("topk", "capacity-drop", "capacity-reroute"):
            runs[f"{name}+replicas"] = {"router": router, "redundant": ep, "seed": 5}
    return runs


@pytest.mark.parametrize("ep,dispatcher", [(1, "alltoall"), (2, "alltoall"), (2, "allgather")])
def test_padded_captured_steps_equal_megatron_and_eager_steps_run_the_policy(ep: int, dispatcher: str) -> None:
    utils = pytest.importorskip("megatron.core.inference.utils")
    if not hasattr(utils, "set_decode_expert_padding"):
        pytest.skip("this megatron-core has no set_decode_expert_padding (Megatron's CUDA-graph padding)")
    from megatron_capaware._compat.launcher import run_distributed
    from tests.helpers.cuda_graph_padding_workers import padding_worker

    spec = {"ep": ep, "dispatcher": dispatcher, "runs": _runs(ep)}
    alltoall = dispatcher == "alltoall"  # allgather has no capacity: it sends what the map holds
    results = run_distributed(padding_worker, ep, spec, timeout_s=540)
    for res in results:
        megatron = res["megatron_captured"]
        # Megatron's padding ran (every expert's input padded to capacity T, the rank's rows) and
        # changes no logit beyond float order.
        assert res["megatron_capacity"] == ([res["rows"]] * 2 if alltoall else [None] * 2)
        assert torch.allclose(megatron, res["megatron_eager"], rtol=1e-5, atol=1e-5)
        for name, rec in res["runs"].items():
            where = f"{name} at EP {ep}, {dispatcher}"
            if "+" in name:
                assert torch.allclose(rec["captured"], megatron, rtol=1e-5, atol=1e-5), where
            else:
                assert torch.equal(rec["captured"], megatron), where
            assert rec["dropped_captured"] == 0, where
            # Every slot, a replica included, padded to its expert's capacity T.
            assert rec["capacity"] == ([res["rows"]] * 2 if alltoall else [None] * 2), where
            # Eager steps: the policy as without the flag, unchanged by the padded step between.
            assert torch.equal(rec["eager_after"], rec["eager_before"]), where
            if name.split("+")[0] in ("capacity-drop", "expanded-drop"):
                assert rec["dropped_before"] > 0 and rec["dropped_after"] == rec["dropped_before"], where
                assert not torch.allclose(rec["eager_before"], megatron, rtol=1e-5, atol=1e-5), where
        assert res["install_while_padded"] == "accepted", res["install_while_padded"]
        assert "--moe-expert-capacity-factor" in res["static_padding"], res["static_padding"]
