"""A real Megatron MoELayer on several gloo ranks decides exactly as the pure policies.

For every topology (EP=2, EP=4, TP=2 x EP=2 with expert-TP 1 and 2) and
dispatcher, each rank routes its slice of a fixed token set; the expected
decision is the pure policy applied to the concatenated tokens of the rank's
dispatch domain (the ranks whose tokens reach the same experts). Checks:
routing maps and weights, the layer output against a dense recomputation,
the per-expert loads the experts actually received (<= C), and that TP ranks
holding copies of the same tokens decide bit-identically. Different token
splits of the same global order give the same decisions.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import pytest
import torch

from megatron_capaware import policies as P
from megatron_capaware.policies import reference as R
from megatron_capaware._compat.launcher import run_distributed
from tests.helpers.mp_workers import deterministic_tokens, deterministic_weights, moe_layer_worker

pytestmark = pytest.mark.multirank

E, K, H, F, SEED = 8, 2, 32, 16, 1234
GAMMA = 1.0
ROUTERS: Dict[str, Dict[str, Any]] = {
    "topk": dict(router_type="topk"),
    "drop": dict(router_type="capacity-drop", gamma=GAMMA),
    "drop_position": dict(router_type="capacity-drop", gamma=GAMMA, drop_policy="position"),
    "drop_random": dict(router_type="capacity-drop", gamma=GAMMA, drop_policy="random", seed=5),
    "drop_local": dict(router_type="capacity-drop", gamma=GAMMA, scope="local"),
    "drop_rank": dict(router_type="capacity-drop", gamma=GAMMA, capacity_unit="rank"),
    "reroute": dict(router_type="capacity-reroute", gamma=GAMMA, reroute_rounds=2),
    "reroute_load": dict(router_type="capacity-reroute", gamma=GAMMA, reroute_policy="load", reroute_min_ratio=0.3),
    "reroute_rank": dict(router_type="capacity-reroute", gamma=GAMMA, capacity_unit="rank", reroute_rounds=2,
                         reroute_policy="load", drop_policy="weight"),
    "expanded": dict(router_type="expanded-drop", gamma=1.25),
    "laser": dict(router_type="laser", laser_eps_high=0.6, laser_t_fix=0.3, laser_pool=4),
    "laser_rank": dict(router_type="laser", laser_eps_high=0.6, laser_t_fix=0.3, laser_pool=4, laser_load="rank"),
    "decode": dict(router_type="decode-pack", decode_floor=1, decode_pool=4, decode_t_fix=0.3),
    "decode_oea": dict(router_type="decode-pack", decode_floor=1, decode_rank_aware=False),
}
CAPACITY_ROUTERS = {"drop", "drop_position", "drop_random", "drop_local", "reroute", "reroute_load", "expanded"}


def expected_decision(name: str, scores: torch.Tensor, local_experts: List[List[int]], sizes: List[int],
                      ep: int = 1):
    kw = ROUTERS[name]
    if name == "drop_rank":
        return P.capacity_drop(scores, K, kw["gamma"], unit="rank", expert_ranks=P.expert_rank_map(E, ep),
                               num_ranks=ep, normalize=True)
    if name == "reroute_rank":
        return P.capacity_reroute(scores, K, kw["gamma"], rounds=kw["reroute_rounds"], policy=kw["reroute_policy"],
                                  drop_policy=kw["drop_policy"], unit="rank", expert_ranks=P.expert_rank_map(E, ep),
                                  num_ranks=ep, normalize=True)
    if name == "topk":
        return P.topk(scores, K, normalize=True)
    if name in ("drop", "drop_position", "drop_random", "drop_local"):
        return P.capacity_drop(scores, K, kw["gamma"], policy=kw.get("drop_policy", "score"),
                               normalize=True, seed=kw.get("seed", 0))
    if name in ("reroute", "reroute_load"):
        return P.capacity_reroute(scores, K, kw["gamma"], rounds=kw["reroute_rounds"] if "reroute_rounds" in kw else 1,
                                  policy=kw.get("reroute_policy", "score"),
                                  min_ratio=kw.get("reroute_min_ratio", 0.0), normalize=True)
    if name == "expanded":
        return R.expanded_drop(scores, K, kw["gamma"], local_experts, sizes, normalize=True)
    if name == "laser":
        return P.laser(scores, K, kw["laser_eps_high"], kw["laser_t_fix"], kw["laser_pool"], normalize=True)
    if name == "laser_rank":
        return P.laser(scores, K, kw["laser_eps_high"], kw["laser_t_fix"], kw["laser_pool"], normalize=True,
                       load="rank", expert_ranks=P.expert_rank_map(E, ep), num_ranks=ep)
    if name in ("decode", "decode_oea"):
        return P.decode_pack(scores, K, kw["decode_floor"], t_fix=kw.get("decode_t_fix", 1.0),
                             pool=kw.get("decode_pool"), rank_aware=kw.get("decode_rank_aware", True),
                             expert_ranks=P.expert_rank_map(E, ep), num_ranks=ep, normalize=True)
    raise KeyError(name)


def dense_moe(tokens: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """sum_e probs[t, e] * expert_e(x_t), computed densely from the same weights."""
    weights = deterministic_weights(E, H, F, SEED)
    out = torch.zeros_like(tokens)
    for e in range(E):
        y = torch.nn.functional.gelu(tokens @ weights[f"fc1.{e}"].T) @ weights[f"fc2.{e}"].T
        out += probs[:, e:e + 1] * y
    return out


TOPOLOGIES = [
    # (tp, ep, etp, dispatcher, tokens per attention-DP slice)
    (1, 2, 1, "alltoall", [48, 48]),
    (1, 2, 1, "allgather", [48, 48]),
    (1, 2, 1, "alltoall", [13, 83]),
    (1, 2, 1, "alltoall", [0, 96]),
    (1, 4, 1, "alltoall", [24, 30, 18, 24]),
    (1, 4, 1, "allgather", [24, 24, 24, 24]),  # allgather needs equal counts per rank
    (2, 2, 1, "alltoall", [40, 56]),
    (2, 2, 1, "allgather", [48, 48]),
    (2, 2, 2, "alltoall", [40, 56]),
]


@pytest.mark.parametrize("tp,ep,etp,dispatcher,sizes", TOPOLOGIES,
                         ids=[f"tp{t}-ep{e}-etp{x}-{d}-{'_'.join(map(str, s))}" for t, e, x, d, s in TOPOLOGIES])
def test_megatron_layer_matches_policies(tp: int, ep: int, etp: int, dispatcher: str, sizes: List[int]) -> None:
    world = tp * ep if etp == 1 else max(tp, etp) * ep
    routers = dict(ROUTERS)
    if tp > 1:
        routers.pop("expanded")  # needs sequence parallelism with TP (checked below)
    spec = dict(experts=E, k=K, hidden=H, ffn=F, seed=SEED, tp=tp, ep=ep, etp=etp,
                dispatcher=dispatcher, tokens_per_slice=sizes, routers=routers)
    results = run_distributed(moe_layer_worker, world, spec, timeout_s=420)
    all_tokens = deterministic_tokens(sum(sizes), H, SEED + 1)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    by_slice = {r["dp_rank"]: r for r in results}
    for res in results:
        slices = res["domain_slices"]
        scores = torch.cat([by_slice[d]["scores"] for d in slices])
        dom_sizes = [sizes[d] for d in slices]
        # The slice's experts for Expanded Drop: those of the rank holding it.
        local = [by_slice[d]["local_experts"] for d in slices]
        start = sum(dom_sizes[: slices.index(res["dp_rank"])])
        rows = slice(start, start + sizes[res["dp_rank"]])
        tokens = all_tokens[offsets[res["dp_rank"]]: offsets[res["dp_rank"]] + sizes[res["dp_rank"]]]
        assert torch.equal(res["scores"], scores[rows])
        for name, got in res["routers"].items():
            if name == "drop_local":
                exp_probs, exp_map = P.capacity_drop(res["scores"], K, GAMMA, normalize=True)
            else:
                exp_probs, exp_map = expected_decision(name, scores, local, dom_sizes, ep)
                exp_probs, exp_map = exp_probs[rows], exp_map[rows]
            where = f"{name} on rank {res['rank']}"
            assert torch.equal(got["map"], exp_map), f"{where}: routing map differs from the policy"
            assert torch.allclose(got["probs"].float(), exp_probs, rtol=1e-5, atol=1e-6), f"{where}: weights"
            kept = got["map"] & res["vanilla_map"]
            assert torch.equal(got["probs"][kept], res["vanilla_probs"][kept]), f"{where}: kept weights != vanilla"
            assert torch.allclose(got["out"].view(-1, H), dense_moe(tokens, got["probs"].float()), atol=2e-5), \
                f"{where}: layer output differs from the dense recomputation"
            received = got["received"] // got["duplication"]
            assert torch.equal(received, got["global_loads"][res["local_experts"]]), \
                f"{where}: experts received {received.tolist()} but the policy decided " \
                f"{got['global_loads'][res['local_experts']].tolist()}"
            if name in ("drop_rank", "reroute_rank"):  # the rank's experts together stay within C_rank
                assert got["capacity"] == math.ceil(GAMMA * sum(dom_sizes) * K / ep)
                assert int(received.sum()) <= got["capacity"], f"{where}: rank load above C_rank"
            if name in CAPACITY_ROUTERS and name != "drop_local":
                cap = got["capacity"]
                assert cap == math.ceil(GAMMA * sum(dom_sizes) * K / E) or name == "expanded"
                assert (int(received.max()) if received.numel() else 0) <= cap, f"{where}: load above C"
        # The rank-unit reroute keeps what the rank-unit drop kept (on these tokens it also reroutes:
        # 1 assignment at EP 2, 4 at EP 4, onto the other ranks).
        drop_rank, reroute_rank = res["routers"]["drop_rank"]["map"], res["routers"]["reroute_rank"]["map"]
        assert not torch.any(drop_rank & ~reroute_rank), f"reroute_rank on rank {res['rank']} lost a kept assignment"
        topk = res["routers"]["topk"]
        assert torch.equal(topk["out"], res["vanilla_out"]), "topk adapter must equal vanilla Megatron"
        assert torch.equal(topk["map"], res["vanilla_map"]) and torch.equal(topk["probs"], res["vanilla_probs"])
    # TP ranks holding copies of the same tokens decide bit-identically.
    for a in results:
        for b in results:
            if a["rank"] < b["rank"] and a["dp_rank"] == b["dp_rank"]:
                for name in a["routers"]:
                    assert torch.equal(a["routers"][name]["map"], b["routers"][name]["map"]), name
                    assert torch.equal(a["routers"][name]["probs"], b["routers"][name]["probs"]), name


def test_expanded_drop_with_tp_copies_is_refused() -> None:
    spec = dict(experts=E, k=K, hidden=H, ffn=F, seed=SEED, tp=2, ep=2, etp=1, dispatcher="alltoall",
                tokens_per_slice=[8, 8], routers={"expanded": ROUTERS["expanded"]})
    with pytest.raises(Exception, match="sequence-parallel"):
        run_distributed(moe_layer_worker, 4, spec, timeout_s=300)
