"""Predicted speedup, balancedness and the Pareto frontier of the evaluation records."""

from __future__ import annotations

from megatron_capaware.tools import report


def record(label, ppl, peak_rank, rank_imbalance=1.1, router="capacity-drop"):
    return {"label": label, "router": router, "ppl": ppl, "rank_peak_load": peak_rank,
            "per_layer": {"1": {"rank_imbalance": rank_imbalance}, "2": {"rank_imbalance": 2 * rank_imbalance}}}


def test_speedup_is_topk_peak_over_setting_peak_and_dominated_settings_are_marked(tmp_path) -> None:
    recs = [record("topk", 10.0, 1.2, router="topk"), record("a", 10.5, 1.0), record("b", 10.4, 0.96),
            record("c", 11.0, 1.1), record("d", 12.0, 0.8)]
    base = recs[0]
    for r in recs:
        r["predicted_speedup"] = report.predicted_speedup(base, r)
    report.mark_frontier(recs)
    assert recs[1]["predicted_speedup"] == 1.2 / 1.0
    frontier = {r["label"]: r["frontier"] for r in recs}
    # a is slower and worse than b; c is slower than b and worse; d is the fastest.
    assert frontier == {"topk": "yes", "a": "dominated", "b": "yes", "c": "dominated", "d": "yes"}
    assert report.plot_frontier([dict(r, delta_ppl_pct=100 * (r["ppl"] / 10 - 1)) for r in recs],
                                tmp_path / "f.png") == [tmp_path / "f.png"]


def test_make_records_adds_balancedness_and_frontier() -> None:
    from types import SimpleNamespace

    def result(router, ppl, peak):
        cfg = SimpleNamespace(describe=lambda: router, router_type=router, uses_capacity=router != "topk",
                              gamma=1.25, to_dict=lambda: {})
        layer = {"imbalance": 1.5, "rank_imbalance": 1.25, "rank_peak_load": peak, "peak_load": peak,
                 "max_vio": 0.5, "cv": 0.1, "zero_load_frac": 0.0, "dropped_frac": 0.0, "rerouted_frac": 0.0}
        return SimpleNamespace(config=cfg, per_layer={1: layer}, expert_loads={}, ppl=ppl, accuracy=0.3,
                               tokens=100, seconds=1.0)

    options = SimpleNamespace(expert_parallel=2, tensor_parallel=1)
    recs = report.make_records([result("topk", 10.0, 1.2), result("capacity-drop", 10.1, 1.0)], options)
    assert abs(recs[1]["predicted_speedup"] - 1.2) < 1e-9 and recs[1]["balancedness"] == 0.8
    assert [r["frontier"] for r in recs] == ["yes", "yes"]
    assert "speedup" in report.format_table(recs) and "frontier" in report.markdown_table(recs)
