"""A real Megatron MoE layer at EP=2 (gloo): decode-sized batches, ranks that disagree,
a NaN on one rank, and the pure policies on a real group. One spawn for all of it.

Decode: one new token per sequence, so a rank may route T=1 token or none
(T=0) while the other routes a few; every router must still decide exactly as
its policy does on the two ranks' tokens concatenated, send the experts
exactly what it decided (``received``), keep loads <= C with
``C = ceil(gamma*T*k/E) >= 1``, and never drop every expert of every token.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import pytest
import torch

from megatron_capaware import policies as P
from megatron_capaware.policies import reference as R
from megatron_capaware._compat.launcher import run_distributed
from tests.helpers.reliability_workers import E, K, ROUTERS, ep2_worker
from megatron_capaware.tools.bench.sim_dist import run_ranks

pytestmark = pytest.mark.multirank

DECODE = {
    "alltoall": [[1, 1], [1, 0], [0, 1], [0, 0], [3, 1], [2, 5]],
    "allgather": [[1, 1], [0, 0]],  # Megatron's allgather dispatcher needs equal counts per rank
}
POLICY_CASES = [
    dict(seed=1, sizes=[3, 5], E=8, k=2, gamma=1.0),
    dict(seed=2, sizes=[0, 6], E=6, k=3, gamma=0.5),
    dict(seed=3, sizes=[1, 1], E=8, k=2, gamma=1.0),
    dict(seed=4, sizes=[7, 2], E=4, k=1, gamma=0.75),
]


@pytest.fixture(scope="module")
def ep2() -> List[Dict[str, Any]]:
    spec = dict(collective_timeout_s=60, decode=DECODE, policy_cases=POLICY_CASES)
    return run_distributed(ep2_worker, 2, spec, timeout_s=420, collective_timeout_s=60)


def expected(name: str, scores: torch.Tensor, rank_scores: List[torch.Tensor], local: List[List[int]],
             sizes: List[int]):
    kw = ROUTERS[name]
    if name == "topk":
        return P.topk(scores, K, normalize=True)
    if name == "drop_local":  # each rank on its own tokens
        parts = [P.capacity_drop(s, K, kw["gamma"], normalize=True) for s in rank_scores]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if kw["router_type"] == "capacity-drop":
        return P.capacity_drop(scores, K, kw["gamma"], policy=kw.get("drop_policy", "score"),
                               seed=kw.get("seed", 0), normalize=True)
    if kw["router_type"] == "capacity-reroute":
        return P.capacity_reroute(scores, K, kw["gamma"], rounds=kw.get("reroute_rounds", 1),
                                  policy=kw.get("reroute_policy", "score"), normalize=True)
    if name == "expanded":
        return R.expanded_drop(scores, K, kw["gamma"], local, sizes, normalize=True)
    if name == "laser":
        return P.laser(scores, K, kw["laser_eps_high"], kw["laser_t_fix"], kw["laser_pool"], normalize=True)
    raise KeyError(name)


def test_decode_sized_batches_through_megatron_every_router(ep2) -> None:
    local = [r["local_experts"] for r in ep2]
    for key in ep2[0]["decode"]:
        per_rank = [r["decode"][key] for r in ep2]
        sizes = per_rank[0]["sizes"]
        rank_scores = [d["scores"] for d in per_rank]
        scores = torch.cat(rank_scores)
        total = sum(sizes)
        for name in ROUTERS:
            exp_probs, exp_map = expected(name, scores, rank_scores, local, sizes)
            maps = []
            for rank, d in enumerate(per_rank):
                got = d["routers"][name]
                rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
                where = f"{name} at {key} on rank {rank}"
                assert got["out"].shape == (sizes[rank], 1, 32) and torch.isfinite(got["out"]).all(), where
                assert torch.equal(got["map"], exp_map[rows]), f"{where}: routing map differs from the policy"
                assert torch.allclose(got["probs"].float(), exp_probs[rows], rtol=1e-5, atol=1e-6), where
                # The experts received exactly what the router decided.
                assert torch.equal(got["received"], got["global_loads"][local[rank]]), where
                kw = ROUTERS[name]
                if kw["router_type"] in ("capacity-drop", "capacity-reroute", "expanded-drop") and name != "drop_local":
                    cap = got["capacity"]
                    assert cap == max(1, math.ceil(kw["gamma"] * total * K / E)), where
                    assert cap >= 1, f"{where}: C must be >= 1"
                    assert int(got["received"].max()) <= cap, f"{where}: load above C"
                maps.append(got["map"])
            full = torch.cat(maps)
            if total:
                assert int(full.sum()) >= 1, f"{name} at {key}: every expert of every token was dropped"
            if total == 1 and name != "expanded":
                # A lone decode token keeps all its k experts (C >= 1, its experts are distinct).
                assert int(full.sum()) == K, f"{name} at {key}: a lone token lost an expert"


def test_ranks_that_disagree_are_refused_at_install_on_every_rank(ep2) -> None:
    for res in ep2:
        err = res["errors"]["gamma_differs"]
        assert err["type"] == "CapawareConfigError"
        assert "disagree" in err["message"] and "gamma (rank 0: 1.0, rank 1: 2.0)" in err["message"]
        assert err["seconds"] < 5, "the check is one small all-gather, not a timeout"
        assert res["gamma_after_refusal"] == 1.5, "a refused install must leave the previous routers"
        typ = res["errors"]["router_type_differs"]
        assert typ["type"] == "CapawareConfigError" and 'router_type (rank 0: "laser", rank 1: "capacity-reroute")' \
            in typ["message"]
        assert torch.isfinite(res["forward_after_refusals"]).all()
    # Rank 1 alone fails its own validation: it raises its error, rank 0 names it.
    assert "pool=1 is smaller than top-k=2" in ep2[1]["errors"]["validation_on_one_rank"]["message"]
    other = ep2[0]["errors"]["validation_on_one_rank"]["message"]
    assert "failed on rank(s) [1]" in other and "pool=1 is smaller than top-k=2" in other


def test_nan_scores_on_one_rank_raise_on_every_rank_and_leave_the_group_usable(ep2) -> None:
    for res in ep2:
        err = res["errors"]["nan_on_rank_1"]
        assert err is not None, f"rank {res['rank']}: NaN router scores were routed silently"
        assert err["type"] == "RoutingInputError"
        assert "NaN or Inf on rank(s) [1]" in err["message"] and "gate produced non-finite logits" in err["message"]
        assert err["seconds"] < 5, "both ranks must fail at once, not after the collective timeout"
        assert torch.isfinite(res["forward_after_nan"]).all()
    assert "non-finite values on this rank, the first at token 0, expert 0" in ep2[1]["errors"]["nan_on_rank_1"]["message"]
    assert torch.equal(ep2[0]["forward_after_nan"], ep2[0]["forward_after_refusals"])


def test_policies_on_a_real_group_equal_the_reference_and_the_thread_simulation(ep2) -> None:
    for i, case in enumerate(POLICY_CASES):
        sizes, k, gamma = case["sizes"], case["k"], case["gamma"]
        scores = ep2[0]["policy_cases"][i]["scores"]
        locals_ = [list(range(case["E"]))[r::2] for r in range(2)]
        refs = {
            "drop": R.capacity_drop(scores, k, gamma, policy="random", seed=5)[1],
            "reroute": R.capacity_reroute(scores, k, gamma, rounds=2, policy="load")[1],
            "expanded": R.expanded_drop(scores, k, gamma, locals_, sizes)[1],
            "laser": R.laser_waves(scores, k, 0.9, 0.2, k + 2, waves=8, rounds=1)[1],
        }

        def simulated(rank: int, group):
            part = scores[sum(sizes[:rank]):sum(sizes[:rank + 1])]
            return {
                "drop": P.capacity_drop(part, k, gamma, policy="random", seed=5, group=group)[1],
                "reroute": P.capacity_reroute(part, k, gamma, rounds=2, policy="load", group=group)[1],
                "expanded": P.expanded_drop(part, k, gamma, locals_[rank], group=group)[1],
                "laser": P.laser(part, k, 0.9, 0.2, k + 2, group=group)[1],
            }

        sim = run_ranks(simulated, 2)
        for name, ref in refs.items():
            real = torch.cat([ep2[r]["policy_cases"][i][name] for r in range(2)])
            assert torch.equal(real, ref), f"case {i} {name}: real gloo ranks differ from the reference"
            assert torch.equal(torch.cat([s[name] for s in sim]), real), f"case {i} {name}: simulation != gloo"
