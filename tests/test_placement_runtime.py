"""The placement runtime in Megatron-Core: experts moved into a plan's layout give top-k's logits."""

from __future__ import annotations

from typing import Dict

import pytest
import torch

from megatron_capaware._compat.launcher import run_distributed
from tests.helpers.placement_workers import placed_gpt_worker

pytestmark = pytest.mark.multirank

LAYOUTS = [
    # (tp, ep, dispatcher, redundant slots of the replicated plan)
    (1, 1, "alltoall", None),
    (1, 2, "alltoall", 2),
    (1, 2, "allgather", 2),
    (1, 4, "alltoall", 4),
    (2, 2, "alltoall", 2),
]


def runs_for(ep: int, redundant, tp: int = 1) -> Dict[str, dict]:
    runs = {
        "contiguous": {"redundant": None},
        "placed": {"redundant": 0, "seed": 11},
        "placed-drop-rank": {"redundant": 0, "seed": 11,
                             "router": {"router_type": "capacity-drop", "gamma": 1.0, "capacity_unit": "rank"}},
        "placed-reroute-rank": {"redundant": 0, "seed": 11, "router": {
            "router_type": "capacity-reroute", "gamma": 1.0, "capacity_unit": "rank", "drop_policy": "weight"}},
        "contiguous-drop-rank": {"redundant": None,
                                 "router": {"router_type": "capacity-drop", "gamma": 1.0, "capacity_unit": "rank"}},
        "placed-drop": {"redundant": 0, "seed": 12, "router": {"router_type": "capacity-drop", "gamma": 1.0}},
        "contiguous-drop": {"redundant": None, "router": {"router_type": "capacity-drop", "gamma": 1.0}},
    }
    if redundant:
        runs["replicated"] = {"redundant": redundant, "seed": 13}
        runs["replicated-rr"] = {"redundant": redundant, "seed": 13, "policy": "round-robin"}
        runs["replicated-drop"] = {"redundant": redundant, "seed": 13,
                                   "router": {"router_type": "capacity-drop", "gamma": 1.0}}
        runs["replicated-drop-rank"] = {"redundant": redundant, "seed": 13, "router": {
            "router_type": "capacity-drop", "gamma": 1.0, "capacity_unit": "rank", "drop_policy": "weight"}}
        runs["replicated-reroute"] = {"redundant": redundant, "seed": 13,
                                      "router": {"router_type": "capacity-reroute", "gamma": 1.0}}
        if tp == 1:  # expanded-drop with TP needs sequence parallelism
            runs["replicated-expanded"] = {"redundant": redundant, "seed": 13,
                                           "router": {"router_type": "expanded-drop", "gamma": 1.0}}
    return runs


@pytest.mark.parametrize("tp,ep,dispatcher,redundant", LAYOUTS,
                         ids=[f"tp{t}-ep{e}-{d}-r{r}" for t, e, d, r in LAYOUTS])
def test_placement_keeps_topk_logits_and_restores_the_logical_layout(tp, ep, dispatcher, redundant) -> None:
    spec = dict(tp=tp, ep=ep, dispatcher=dispatcher, runs=runs_for(ep, redundant, tp))
    results = run_distributed(placed_gpt_worker, tp * ep, spec, timeout_s=420)
    for res in results:
        runs = res["runs"]
        where = f"rank {res['rank']} (tp{tp} ep{ep} {dispatcher})"
        base = runs["contiguous"]["logits"]
        placed_names = [n for n in runs if n.startswith(("placed", "replicated"))]
        for name in placed_names:
            assert runs[name]["slots"], f"{where}: {name} has no layout"
        for name in ("placed", "replicated", "replicated-rr"):
            if name in runs:
                # Same model function: only the order of floating-point sums may differ.
                assert torch.allclose(runs[name]["logits"], base, rtol=1e-5, atol=1e-5), \
                    f"{where}: {name} logits differ by {float((runs[name]['logits'] - base).abs().max())}"
        # A capacity router decides on logical experts: placed or not, the same decision.
        # (unit=rank is not: the placement changes which experts share a rank.)
        assert torch.allclose(runs["placed-drop"]["logits"], runs["contiguous-drop"]["logits"], rtol=1e-5,
                              atol=1e-5), where
        for name in placed_names:
            run = runs[name]
            for layer, slots in run["slots"].items():
                per = len(slots) // ep
                assert run["num_local_experts"][layer - 1] == per
                received = run["received"][layer] // run["duplication"][layer]
                loads = run["slot_loads"][layer]
                mine = loads[res["ep_rank"] * per:(res["ep_rank"] + 1) * per]
                assert torch.equal(received, mine), \
                    f"{where}: {name} layer {layer}: slots received {received.tolist()}, stats say {mine.tolist()}"
                # Every logical assignment landed on one of its expert's slots.
                by_expert = torch.zeros_like(run["global_loads"][layer]).index_add_(
                    0, torch.tensor(slots), loads)
                assert torch.equal(by_expert, run["global_loads"][layer]), f"{where}: {name} layer {layer}"
        if ep > 1:  # unit=rank caps the busiest rank of the placed layout (C_rank = ceil(T*k/W))
            for name in ("placed-drop-rank", "placed-reroute-rank", "replicated-drop-rank"):
                for layer, summary in runs.get(name, {}).get("summary", {}).items():
                    assert summary["rank_peak_load"] <= 1.0 + ep / 64 + 1e-9, f"{where}: {name} {layer}: {summary}"
        for name, run in runs.items():  # no token ever holds two replicas of one expert
            per_expert = torch.zeros(run["map"].shape[0], max(run["slot_expert"]) + 1, dtype=torch.int64)
            per_expert.index_add_(1, torch.tensor(run["slot_expert"]), run["map"].to(torch.int64))
            assert int(per_expert.max()) <= 1, f"{where}: {name} gave a token one expert twice"
        for name in ("replicated-reroute", "replicated-expanded"):
            if name in runs:
                for layer, loads in runs[name]["slot_loads"].items():
                    assert int(loads.max()) <= runs[name]["capacity"][layer], f"{where}: {name} layer {layer}"
        if "replicated-drop" in runs:  # capacity per physical slot: C = ceil(T*k/S) each
            run = runs["replicated-drop"]
            for layer, loads in run["slot_loads"].items():
                assert int(loads.max()) <= run["capacity"][layer], f"{where}: layer {layer}: {loads.tolist()}"
                assert run["capacity"][layer] < runs["contiguous-drop"]["capacity"][layer]  # S > E slots
        assert res["restored"], f"{where}: expert weights differ after remove_placement"
        assert "EP" in res["wrong_ep"], res["wrong_ep"]
        if ep > 1:
            assert "redundant experts is not supported yet" in res["replicas_with_drop"], res["replicas_with_drop"]
        assert res["still_contiguous"], where


@pytest.mark.parametrize("redundant", [0, 2])
def test_online_replanning_moves_experts_between_forwards_without_changing_logits(redundant, tmp_path) -> None:
    from tests.helpers.placement_workers import replan_worker

    spec = {"ep": 2, "redundant": redundant, "ckpt": str(tmp_path / "ckpt")}
    results = run_distributed(replan_worker, 2, spec, timeout_s=420)
    for res in results:
        assert [e[0] for e in res["events"]] == [2, 4]  # every 2 forwards
        assert all(e[1] > 0 and e[3] <= e[2] + 1e-9 for e in res["events"])  # planned peak never worse
        for logits in res["logits"][1:]:
            assert torch.allclose(logits, res["logits"][0], rtol=1e-5, atol=1e-5)
        assert all(len(slots) == 8 + redundant for slots in res["slots"].values())
        assert all(calls == 5 for calls in res["calls"].values())  # moving experts keeps the records
        # Saved while placed, loaded into a contiguous model: the same function.
        assert res["still_placed"]
        assert torch.allclose(res["reloaded_logits"], res["logits"][0], rtol=1e-5, atol=1e-5)
    assert results[0]["slots"] == results[1]["slots"]  # every rank made the same plan
    # The shift benchmark's offline simulation (placement/shift.py) reaches the runtime's layouts and moves
    # from the recorded per-call loads.
    from megatron_capaware.placement import shift as S

    res = results[0]
    layers = sorted(res["call_loads"])
    loads = torch.tensor([[res["call_loads"][n][c] for n in layers] for c in range(5)], dtype=torch.float64)
    layouts, moves = S.replanner_layouts(loads, 2, every=2, window=2, redundant=redundant)
    assert [m.call for m in moves] == [2, 4] and [m.transfers for m in moves] == [e[4] for e in res["events"]]
    assert {n: s for n, s in zip(layers, layouts[-1])} == {n: list(s) for n, s in res["slots"].items()}
