"""Smoke tests: each benchmark runs end to end on tiny shapes (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from megatron_capaware.tools.bench import overhead, straggler

pytestmark = pytest.mark.multirank


def test_straggler_benchmark_runs_on_tiny_shapes(tmp_path) -> None:
    out = tmp_path / "straggler.json"
    assert straggler.main(["--ep", "2", "--tokens-per-rank", "128", "--hidden", "32", "--ffn", "64",
                           "--trace", "none", "--skews", "0", "1.5", "--repeats", "1", "--warmup", "0",
                           "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert {r["case"] for r in records} == {"synthetic-skew0", "synthetic-skew1.5"}
    for r in records:
        for key in ("router", "ep", "speedup", "ideal_speedup", "efficiency", "dropped_frac"):
            assert key in r
        assert r["layer_ms"] > 0 and r["ep"] == 2
    skewed = {r["router"]: r for r in records if r["case"] == "synthetic-skew1.5"}
    assert skewed["topk"]["i_rank_topk"] > 1.05, "the synthetic skew must imbalance the EP ranks"
    assert skewed["capacity-drop"]["i_rank"] < skewed["topk"]["i_rank"]


def test_overhead_benchmark_runs_on_tiny_shapes(tmp_path) -> None:
    out = tmp_path / "overhead.json"
    assert overhead.main(["--tokens", "256", "--experts", "8", "--topk", "2", "--hidden", "32",
                          "--active-ffn", "64", "--repeats", "1", "--warmup", "0", "--layer-tokens", "256",
                          "--layer-repeats", "1", "--layer-warmup", "0", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["router"] for r in records] == ["megatron-topk", "capacity-drop", "capacity-reroute",
                                              "expanded-drop", "laser"]
    for r in records:
        for key in ("router", "tokens", "experts", "topk", "ratio_vs_topk_router", "share_of_layer"):
            assert key in r
        assert r["router_ms"] > 0 and 0 < r["share_of_layer"] < 1
