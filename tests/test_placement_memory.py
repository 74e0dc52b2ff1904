"""Placement memory (issue 22, item 6): bounded peak, the agreed memory pre-check, the rollback.

Gloo processes at EP 2. The peak is measured per rank by
``megatron_capaware.tools.bench.placement_memory`` (bytes of the tensors
allocated during the placement, seen by a ``TorchDispatchMode``; docs/placement.md, "Memory").
"""

from __future__ import annotations

import pytest

from megatron_capaware._compat.launcher import run_distributed
from tests.helpers.placement_workers import placement_fault_worker

pytestmark = pytest.mark.multirank


def test_peak_extra_memory_is_about_one_layer_not_the_whole_model() -> None:
    """8 MoE layers of 48 MiB of expert weights (24 MiB per rank), a plan moving every expert: peak <= formula."""
    from megatron_capaware.tools.bench.placement_memory import run

    result = run(["--layers", "8", "--hidden", "512", "--ffn", "1024", "--ep", "2"])
    layer = result["layer_local_expert_mib"]
    assert layer == pytest.approx(24.0)
    for rank in result["ranks"]:
        assert rank["restored_bit_equal"] and rank["restored_bit_equal_after_replicas"]
        for name, step in rank["steps"].items():
            bound = rank["formula_mib"][name]
            # The formula (placement.moves.transient_rows) is what is allocated, plus small index tensors;
            # a plan with replicas also keeps the replicas' weights (kept: the model grows by R / W experts a layer).
            transient = step["tracked_mib"] - step["kept_mib"]
            assert step["tracked_mib"] <= bound + step["kept_mib"] + 1.0, (rank["rank"], name, step, bound)
            assert transient <= 2.5 * layer + 1.0, (rank["rank"], name, step)
            assert transient < 0.5 * 8 * layer  # the old placement held a second copy of all 8 layers
        # A plan without replicas moving every expert: sent + received rows, 2 x the layer.
        assert rank["steps"]["apply"]["tracked_mib"] >= 1.9 * layer  # the measurement sees the buffers


def test_memory_precheck_refuses_on_every_rank_before_anything_moves() -> None:
    faults = [{"kind": "memory", "rank": 1, "redundant": 0}]
    results = run_distributed(placement_fault_worker, 2, {"faults": faults}, timeout_s=300,
                              collective_timeout_s=60)
    errors = [r["scenarios"][0]["error"] for r in results]
    assert errors[0] is not None and errors[0] == errors[1], errors  # the same error on both ranks
    assert errors[0].startswith("PlacementMemoryError") and "rank 1 needs" in errors[0]
    assert "(1024 bytes) free (injected)" in errors[0] and "before any weight moved" in errors[0]
    for r in results:
        scenario = r["scenarios"][0]
        assert scenario["bit_equal"] and not scenario["placed"] and scenario["logits_equal"]
        assert r["placed_after"] == r["plan"] and r["placed_logits_close"] and r["restored"]


def test_a_failure_inside_layer_3_moves_every_layer_back_on_every_rank() -> None:
    faults = [{"kind": "write", "rank": 1, "redundant": 0}, {"kind": "write", "rank": 0, "redundant": 2}]
    results = run_distributed(placement_fault_worker, 2, {"faults": faults}, timeout_s=300,
                              collective_timeout_s=60)
    for index, fault in enumerate(faults):
        errors = [r["scenarios"][index]["error"] for r in results]
        assert errors[0] is not None and errors[0] == errors[1], errors
        assert "moving MoE layer 3 failed on rank " + str(fault["rank"]) in errors[0]
        assert "injected failure" in errors[0] and "2 MoE layer(s) moved before were moved back" in errors[0]
        for r in results:
            scenario = r["scenarios"][index]
            assert scenario["bit_equal"], (r["rank"], fault)  # weights bit-equal to before
            assert not scenario["placed"] and scenario["num_local_experts"] == [4] * 6
            assert scenario["logits_equal"]  # routing and dispatch still the logical layout's
    for r in results:  # the group is still in step: the same plan then applies and is removed
        assert r["placed_after"] == r["plan"] and r["placed_logits_close"] and r["restored"]
