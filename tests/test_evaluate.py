"""capaware-eval on a tiny checkpoint made in the test."""

from __future__ import annotations

import json
import math

import pytest

from megatron_capaware.tools import report
from megatron_capaware._compat.launcher import run_distributed
from tests.helpers.eval_workers import evaluate_worker

pytestmark = pytest.mark.multirank

SPECS = ["topk", "capacity-drop:gamma=0.75|1.25", "capacity-reroute:gamma=0.75,rounds=2",
         "expanded-drop:gamma=1.0", "laser:eps_high=0.95,t_fix=0.2,pool=4"]


def test_evaluation_at_ep2_reports_quality_and_balance(tiny_checkpoint, tmp_path) -> None:
    records_by_rank = run_distributed(evaluate_worker, 2, tiny_checkpoint, 2, SPECS, 4096, timeout_s=420)
    records = records_by_rank[0]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(records) == strip(records_by_rank[1]), "every rank must report the same figures"
    labels = [r["label"] for r in records]
    assert labels[0] == "topk" and len(records) == 6
    for r in records:
        for key in ("router", "gamma", "ppl", "accuracy", "i_agg", "rank_imbalance", "dropped_frac", "rerouted_frac"):
            assert key in r, key
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1 and 0 <= r["accuracy"] <= 1
        assert r["tokens"] == records[0]["tokens"] > 0
        assert set(r["per_layer"]) == {"1", "2"}
    topk, drop_low, drop_high, reroute, expanded, laser = records
    assert topk["dropped_frac"] == 0 and topk["delta_ppl_pct"] == 0
    assert drop_low["dropped_frac"] > drop_high["dropped_frac"] > 0 or drop_high["dropped_frac"] == 0
    assert drop_low["dropped_frac"] > 0 and drop_low["i_agg"] < topk["i_agg"]
    assert reroute["dropped_frac"] < drop_low["dropped_frac"] and reroute["rerouted_frac"] > 0
    assert laser["dropped_frac"] == 0 and laser["rerouted_frac"] > 0
    assert drop_low["gamma"] == 0.75 and laser["gamma"] is None
    paths = report.write_outputs(records, tmp_path / "out", json_path=tmp_path / "r.json")
    names = {p.name for p in paths}
    assert {"results.json", "results.csv", "expert_load_heatmaps.png", "quality_vs_balance.png", "r.json"} <= names
    assert json.loads((tmp_path / "r.json").read_text())[1]["router"] == "capacity-drop"
    table = report.format_table(records)
    assert "drop(g0.75)" in table and "I_agg" in table
    assert max(len(line) for line in table.splitlines()) <= report.TERMINAL_WIDTH
    # What each rank computed, for the heatmaps: no placement here, so the slots are the experts.
    assert all(r["slot_loads"] == r["expert_loads"] and r["slot_experts"] is None for r in records)
    assert "capacity-drop(gamma=0.75)" in (tmp_path / "out" / "results.md").read_text()
