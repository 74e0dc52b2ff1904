"""Smoke tests: each benchmark runs end to end on tiny shapes (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch

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


def test_straggler_benchmark_times_placed_layouts_and_the_forced_balance(tmp_path) -> None:
    from megatron_capaware.tools.bench.common import skewed_scores
    from tests.helpers.placement_workers import make_plan

    trace = tmp_path / "trace.pt"
    torch.save({"layers": {3: [skewed_scores(256, 8, 1.5, seed=3)]}, "model": {}, "source": "test"}, trace)
    plans = []
    for redundant in (0, 2):
        plan = make_plan([3], 8, 2, redundant, seed=4)
        plan.save(tmp_path / f"plan-r{redundant}.json")
        plans.append(str(tmp_path / f"plan-r{redundant}.json"))
    out = tmp_path / "straggler.json"
    assert straggler.main(["--ep", "2", "--tokens-per-rank", "128", "--hidden", "32", "--ffn", "64",
                           "--trace", str(trace), "--skews", "--placement", *plans, "--routers", "topk",
                           "--placed-routers", "topk", "capacity-drop:gamma=1.0,unit=rank",
                           "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    rows = {r["label"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"topk", "topk @placed:plan-r0.json", "capacity-drop(gamma=1,unit=rank) @placed:plan-r0.json",
                         "topk @placed:plan-r2.json", "capacity-drop(gamma=1,unit=rank) @placed:plan-r2.json",
                         "topk (force_load_balancing)"}
    assert len(rows["topk @placed:plan-r2.json"]["placement"]) == 10
    forced = rows["topk (force_load_balancing)"]
    assert forced["router"] == "megatron-force-balance" and forced["i_rank"] < rows["topk"]["i_rank"]
    for label, row in rows.items():
        assert row["layer_ms"] > 0
        if label.startswith("topk"):  # placement and forced balance drop nothing
            assert row["dropped_frac"] == 0.0, label


def test_decode_benchmark_runs_on_tiny_shapes(tmp_path) -> None:
    from megatron_capaware.tools.bench import decode

    out = tmp_path / "decode.json"
    assert decode.main(["--ep", "2", "--batches", "2", "8", "--steps", "3", "--hidden", "32", "--ffn", "64",
                        "--experts", "16", "--topk", "4", "--case", "synthetic", "--repeats", "1", "--warmup", "0",
                        "--routers", "topk", "decode-pack:floor=1,rank=0", "decode-pack:floor=1",
                        "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["batch"], r["label"]) for r in records] == [
        (b, label) for b in (2, 8) for label in ("topk", "decode-pack(oea,floor=1)", "decode-pack(floor=1)")]
    for r in records:
        assert r["layer_ms"] > 0 and r["ep"] == 2 and len(r["per_step_ms"]) == 3
        assert 0 < r["active_max"] <= 8 and r["bytes_read_max_mb"] > 0
    at8 = {r["label"]: r for r in records if r["batch"] == 8}
    # The packing rules never activate more experts on the busiest rank than top-k; OEA == pack there.
    assert at8["decode-pack(floor=1)"]["active_max"] <= at8["topk"]["active_max"]
    assert at8["decode-pack(floor=1)"]["active_max"] == at8["decode-pack(oea,floor=1)"]["active_max"]


def test_decode_benchmark_refuses_an_uneven_batch(capsys) -> None:
    from megatron_capaware.tools.bench import decode

    assert decode.main(["--ep", "4", "--batches", "6", "--case", "synthetic"]) != 0
    assert "multiples of 4" in capsys.readouterr().err
