"""Plans checked on held-out calls: per-call busiest rank, the split, the per-call refinement, the guards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_capaware import placement as P
from megatron_capaware.placement import validate as V
from megatron_capaware.placement.plan_file import plan_from_placements

ROOT = Path(__file__).resolve().parents[1]


@st.composite
def call_cases(draw, max_redundant: bool = True):
    experts = draw(st.sampled_from([4, 6, 8, 12]))
    ranks = draw(st.sampled_from([w for w in (2, 3, 4) if experts % w == 0]))
    options = [r for r in range(0, experts * (ranks - 1) + 1) if (experts + r) % ranks == 0 and r <= 2 * ranks]
    redundant = draw(st.sampled_from(options)) if max_redundant else 0
    calls = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    skew = torch.rand(experts, generator=g, dtype=torch.float64) ** 3
    loads = torch.poisson((skew * 60 + 1).expand(calls, experts).contiguous(), generator=g)
    return loads, ranks, redundant


@given(call_cases())
@settings(max_examples=60, deadline=None)
def test_per_call_peak_matches_the_loop_reference_and_bounds_the_mean_peak(case) -> None:
    loads, ranks, redundant = case
    slots = P.plan_layer(loads.sum(0), ranks, redundant).slots
    fast = V.per_call_peak(loads, slots, ranks)
    assert abs(fast - V.per_call_peak_reference(loads, slots, ranks)) < 1e-9
    # Every call waits for its own busiest rank: never below the busiest rank of the summed loads.
    assert fast >= P.rank_peak(loads.sum(0), slots, ranks) - 1e-9


@given(call_cases())
@settings(max_examples=40, deadline=None)
def test_per_call_refinement_keeps_a_valid_layout_and_never_raises_the_cost(case) -> None:
    loads, ranks, redundant = case
    start = P.plan_layer(loads.sum(0), ranks, redundant).slots
    refined = V.refine_per_call(loads, start, ranks)
    P.LayerPlacement(refined, ranks, 0.0, 0.0)  # shape only; validity next
    from megatron_capaware.adapters.placement import slot_table  # no Megatron import: pure torch
    slot_table(refined, ranks)  # raises on a missing expert or two replicas on one rank
    assert sorted(refined) == sorted(start)  # the same replicas, moved
    assert V.per_call_peak(loads, refined, ranks) <= V.per_call_peak(loads, start, ranks) + 1e-12


def test_split_calls_holds_out_the_last_calls_and_refuses_what_cannot_split() -> None:
    fit, val = V.split_calls(19, 0.25)
    assert (fit.start, fit.stop, val.start, val.stop) == (0, 14, 14, 19)
    fit, val = V.split_calls(2, 0.9)
    assert (fit.stop, val.start) == (1, 1)  # at least one call on each side
    with pytest.raises(P.PlacementError, match="at least 2"):
        V.split_calls(1, 0.25)
    with pytest.raises(P.PlacementError, match=r"in \(0, 1\)"):
        V.split_calls(10, 1.0)


def _drifting_loads() -> torch.Tensor:
    """[8 calls, 1 layer, 4 experts]: expert 0 hot in the first 6 calls, expert 3 in the last 2."""
    early = torch.tensor([60.0, 20, 10, 10])
    late = torch.tensor([10.0, 20, 10, 60])
    return torch.stack([early] * 6 + [late] * 2).unsqueeze(1)


def test_replicas_fitted_to_a_hot_expert_that_cools_are_not_written() -> None:
    loads = _drifting_loads()
    out = V.plan_validated(loads, num_ranks=2, redundant=2, validation_fraction=0.25)
    fig = out.figures[0]
    assert fig["replicated_validation"] > fig["kept_free_validation"]  # the case is what it claims
    assert out.redundant == 0 and len(out.placements[0].slots) == 4
    assert out.warnings and "replica-free" in out.warnings[0]
    kept = V.plan_validated(loads, num_ranks=2, redundant=2, validation_fraction=0.25, keep_replicas=True)
    assert kept.redundant == 2 and len(kept.placements[0].slots) == 6 and "anyway" in kept.warnings[0]


def test_a_layer_whose_plan_loses_to_contiguous_on_validation_keeps_contiguous() -> None:
    # Fit: experts 0 and 1 hot together (the plan splits them: {0,2} {1,3}); validation: 0 and 2 hot,
    # which that plan puts together while contiguous ({0,1} {2,3}) splits them.
    fit = torch.tensor([50.0, 50, 1, 1])
    val = torch.tensor([50.0, 1, 50, 1])
    loads = torch.stack([fit] * 3 + [val]).unsqueeze(1)
    out = V.plan_validated(loads, num_ranks=2, validation_fraction=0.25)
    fig = out.figures[0]
    assert fig["replica_free_validation"] > fig["contiguous_validation"]
    assert fig["choice"] == "contiguous" and out.placements[0].slots == [0, 1, 2, 3]
    assert fig["written_validation"] == fig["contiguous_validation"]
    assert any("contiguous" in w for w in out.warnings)


@given(call_cases(), st.sampled_from(V.OBJECTIVES))
@settings(max_examples=40, deadline=None)
def test_what_is_written_never_loses_on_validation(case, objective) -> None:
    loads, ranks, redundant = case
    out = V.plan_validated(loads.unsqueeze(1), ranks, redundant, validation_fraction=0.34, objective=objective)
    fig = out.figures[0]
    assert fig["kept_free_validation"] <= fig["contiguous_validation"] + 1e-12
    assert fig["written_validation"] <= fig["kept_free_validation"] + 1e-12
    assert len(out.placements[0].slots) == loads.shape[1] + out.redundant


def test_bad_call_loads_are_refused() -> None:
    with pytest.raises(P.PlacementError, match=r"\[calls, layers, experts\]"):
        V.plan_validated(torch.ones(4, 8), 2)
    with pytest.raises(P.PlacementError, match="finite and >= 0"):
        V.plan_validated(-torch.ones(4, 1, 8), 2)
    with pytest.raises(P.PlacementError, match="objective"):
        V.fit_layer(torch.ones(4, 8), 2, objective="median")


def test_the_plan_file_keeps_the_figures_and_older_plans_still_load(tmp_path) -> None:
    out = V.plan_validated(_drifting_loads(), num_ranks=2, validation_fraction=0.25)
    from dataclasses import replace
    layers = [replace(p, figures=f) for p, f in zip(out.placements, out.figures)]
    plan = plan_from_placements(layers, [3], {"num_moe_experts": 4}, 2, out.redundant, None,
                                {"validation": out.summary})
    plan.save(tmp_path / "p.json")
    back = P.load_plan(tmp_path / "p.json")
    assert back.layers[3].figures["written_validation"] == pytest.approx(out.figures[0]["written_validation"])
    assert back.provenance["validation"]["validation_calls"] == 2
    shipped = sorted((ROOT / "megatron_capaware/models/reference_models").glob("*/placement-*.json"))
    assert shipped
    for path in shipped:  # written before the figures existed
        assert all(p.figures is None for p in P.load_plan(path).layers.values())
