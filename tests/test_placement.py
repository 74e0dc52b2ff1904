"""Expert placement: the planner's invariants, its gap to the exhaustive optimum, the plan file."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megatron_capaware import placement as P
from megatron_capaware.placement.plan_file import PlacementPlan, plan_from_placements


@st.composite
def layouts(draw):
    experts = draw(st.sampled_from([2, 4, 6, 8, 12, 16]))
    ranks = draw(st.sampled_from([w for w in (1, 2, 3, 4, 8) if experts % w == 0]))
    redundant = draw(st.sampled_from([r for r in range(0, experts * (ranks - 1) + 1) if (experts + r) % ranks == 0]))
    loads = draw(st.lists(st.floats(0, 1e4, allow_nan=False), min_size=experts, max_size=experts))
    return torch.tensor(loads, dtype=torch.float64), ranks, redundant


@given(layouts())
def test_every_rank_gets_its_slots_and_no_expert_twice(case) -> None:
    loads, ranks, redundant = case
    layer = P.plan_layer(loads, ranks, redundant)
    per = (loads.numel() + redundant) // ranks
    assert len(layer.slots) == loads.numel() + redundant
    assert sorted(set(layer.slots)) == list(range(loads.numel()))  # every expert has a slot
    for r in range(ranks):
        mine = layer.rank_slots(r)
        assert len(mine) == per and len(set(mine)) == per  # no rank holds an expert twice
    assert sum(layer.replicas) == loads.numel() + redundant
    assert P.plan_layer(loads, ranks, redundant).slots == layer.slots  # deterministic
    total = float(P.rank_loads(loads, layer.slots, ranks).sum())
    assert abs(total - float(loads.sum())) <= 1e-6 * max(1.0, float(loads.sum()))  # replicas share, nothing lost


def test_gap_to_the_exhaustive_optimum_is_small() -> None:
    g = torch.Generator().manual_seed(0)
    gaps = []
    for case in range(120):
        experts, ranks = [(8, 2), (8, 4), (6, 3), (12, 4), (12, 3)][case % 5]
        loads = torch.rand(experts, generator=g, dtype=torch.float64) ** 3 * 100
        best = P.best_placement_exhaustive(loads, ranks)
        gaps.append(P.plan_layer(loads, ranks).predicted_rank_peak / best - 1)
    assert min(gaps) >= -1e-12  # nothing beats the optimum
    assert max(gaps) < 0.06 and sum(gaps) / len(gaps) < 0.005, (max(gaps), sum(gaps) / len(gaps))


def test_a_replica_of_every_expert_on_every_rank_balances_perfectly() -> None:
    loads = torch.tensor([50.0, 10, 5, 1, 1, 1, 1, 1])
    layer = P.plan_layer(loads, 4, redundant=8 * 3)
    assert layer.replicas == [4] * 8 and abs(layer.predicted_rank_peak - 1.0) < 1e-12
    # The hottest expert gets the first replicas.
    assert P.replicate(loads, 3, num_ranks=4) == [4, 1, 1, 1, 1, 1, 1, 1]


def test_the_bundled_models_loads_at_ep2_reach_the_known_optimum() -> None:
    # Top-k loads of the bundled model's layer 4 (held-out text, committed figures).
    records = json.loads(open("docs/results/reference_eval.json").read())
    loads = torch.tensor(next(r for r in records if r["router"] == "topk")["expert_loads"]["4"])
    layer = P.plan_layer(loads, 2)
    assert layer.predicted_rank_peak <= layer.contiguous_rank_peak
    assert abs(layer.predicted_rank_peak - P.best_placement_exhaustive(loads, 2)) < 0.01


@pytest.mark.parametrize("loads, ranks, redundant, message", [
    ([1.0, float("nan")], 2, 0, "NaN or Inf"),
    ([1.0, -2.0], 2, 0, "must be >= 0"),
    ([1.0, 2.0, 3.0, 4.0], 2, 1, "do not split evenly over EP 2"),
    ([1.0, 2.0], 2, 4, "two replicas of an expert on one rank"),
])
def test_bad_inputs_are_refused(loads, ranks, redundant, message) -> None:
    with pytest.raises(P.PlacementError, match=message):
        P.plan_layer(torch.tensor(loads), ranks, redundant)


def _plan(tmp_path, **changes):
    placements = P.plan(torch.tensor([[4.0, 3, 2, 1], [1.0, 1, 1, 5]]), 2, 2)
    plan = plan_from_placements(placements, [1, 2], {"num_moe_experts": 4, "moe_router_topk": 2}, 2, 2, None, {})
    data = plan.to_dict()
    data.update(changes)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path, plan


def test_plan_file_round_trip_and_model_checks(tmp_path) -> None:
    path, plan = _plan(tmp_path)
    loaded = P.load_plan(path)
    assert {n: p.slots for n, p in loaded.layers.items()} == {n: p.slots for n, p in plan.layers.items()}
    loaded.check_model([1, 2], 4, 2)
    with pytest.raises(P.PlacementError, match="made for another model"):
        loaded.check_model([1, 2, 3], 4, 2)
    with pytest.raises(P.PlacementError, match="run capaware-plan --ep 4"):
        loaded.check_model([1, 2], 4, 4)
    assert isinstance(loaded, PlacementPlan) and loaded.replica_bytes(1000) == 2 * 2 * 1000


@pytest.mark.parametrize("slots, message", [
    ([0, 0, 1, 2, 3, 3], "rank 0 holds two replicas of expert(s) [0]"),
    ([0, 1, 2, 3, 0], "5 slots, expected E + R = 6"),
    ([0, 1, 2, 0, 1, 2], "every expert needs a slot (missing [3])"),
])
def test_bad_plan_files_are_refused(tmp_path, slots, message) -> None:
    path, plan = _plan(tmp_path)
    data = json.loads(path.read_text())
    data["layers"]["1"]["slots"] = slots
    path.write_text(json.dumps(data))
    with pytest.raises(P.PlacementError) as err:
        P.load_plan(path)
    assert message in str(err.value)
