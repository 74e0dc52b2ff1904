"""capaware-tune: spec / flag writing, the budget choice, the refinement, bad input, a search on the tiny model."""

from __future__ import annotations

import argparse
import math
import sys

import pytest

from megatron_capaware.config import CapawareConfig, load_calibration
from megatron_capaware.megatron_lm.arguments import add_capaware_args, config_from_args
from megatron_capaware.tools import tune
from megatron_capaware.tools.router_specs import format_router_spec, megatron_flags, parse_router_spec
from tests.test_cli_errors import assert_one_line, run

CONFIGS = [
    CapawareConfig("topk"),
    CapawareConfig("capacity-drop", gamma=0.9, capacity_unit="rank", drop_policy="weight"),
    CapawareConfig("capacity-drop", gamma=1.25),
    CapawareConfig("capacity-reroute", gamma=1.1, drop_policy="weight", reroute_rounds=2, reroute_min_ratio=0.5),
    CapawareConfig("capacity-reroute", gamma=1.5, reroute_policy="load", scope="local"),
    CapawareConfig("capacity-reroute", gamma=1.05, capacity_unit="rank", drop_policy="weight", reroute_min_ratio=0.3),
    CapawareConfig("expanded-drop", gamma=1.0, renormalize=True),
    CapawareConfig("laser", laser_eps_high=0.7, laser_t_fix=0.4, laser_pool=3),
    CapawareConfig("decode-pack", decode_floor=2, decode_pool=16, decode_t_fix=0.1, decode_slack=1),
    CapawareConfig("decode-pack", decode_rank_aware=False, renormalize=True),
]
FIELDS = ("router_type", "gamma", "drop_policy", "capacity_unit", "reroute_rounds", "reroute_min_ratio",
          "reroute_policy", "scope", "renormalize", "laser_eps_high", "laser_t_fix", "laser_pool")


def same(a: CapawareConfig, b: CapawareConfig) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in FIELDS if a.router_type != "topk" or f == "router_type")


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_spec_and_megatron_flags_describe_the_same_setting(cfg) -> None:
    assert same(parse_router_spec(format_router_spec(cfg))[0], cfg), format_router_spec(cfg)
    parser = add_capaware_args(argparse.ArgumentParser())
    assert same(config_from_args(parser.parse_args(megatron_flags(cfg))), cfg), megatron_flags(cfg)


def rec(label, dppl, speed, ppl=None):
    return {"label": label, "router": label.split("(")[0], "delta_ppl_pct": dppl, "predicted_speedup": speed,
            "ppl": 10 * (1 + dppl / 100) if ppl is None else ppl}


def test_choose_takes_the_fastest_within_the_budget() -> None:
    records = [rec("topk", 0.0, 1.0), rec("a", 0.2, 1.05), rec("b", 0.4, 1.2), rec("c", 0.45, 1.2),
               rec("d", 3.0, 1.5), rec("e", -0.1, 0.9)]
    assert tune.choose(records, 0.1)["label"] == "topk"
    assert tune.choose(records, 0.25)["label"] == "a"
    assert tune.choose(records, 0.5)["label"] == "b"  # tie on speed: the lower perplexity
    assert tune.choose(records, 5)["label"] == "d"


def test_refinement_bisects_between_the_best_within_and_the_next_faster_over() -> None:
    cfgs = {c.describe(): c for c in (
        CapawareConfig("topk"),
        *(CapawareConfig("capacity-drop", gamma=g, capacity_unit="rank") for g in (0.8, 1.0, 1.2)),
        *(CapawareConfig("capacity-drop", gamma=g) for g in (1.0, 1.5)),
    )}
    records = [rec("topk", 0, 1.0), rec("capacity-drop(gamma=0.8,unit=rank)", 2.0, 1.4),
               rec("capacity-drop(gamma=1,unit=rank)", 0.4, 1.13), rec("capacity-drop(gamma=1.2,unit=rank)", 0.1, 1.0),
               rec("capacity-drop(gamma=1)", 6.0, 1.3), rec("capacity-drop(gamma=1.5)", 0.5, 1.09)]
    new = {c.describe() for c in tune.refinements(records, cfgs, 1.0)}
    # rank family: 1.0 within, 0.8 faster and over -> 0.9; expert family: 1.5 within, 1.0 over -> 1.25
    assert new == {"capacity-drop(gamma=0.9,unit=rank)", "capacity-drop(gamma=1.25)"}
    # everything within budget: step gamma down
    assert {c.describe() for c in tune.refinements(records, cfgs, 10.0, families=1)} == {
        "capacity-drop(gamma=0.7,unit=rank)"}


PY = [sys.executable, "-m", "megatron_capaware.tools.tune"]


@pytest.mark.parametrize("argv, fragment", [
    (["--budget", "0"], "--budget 0 is invalid: it is the allowed perplexity change"),
    (["--budget", "nan"], "--budget nan is invalid"),
    (["--budget", "0.5", "-1"], "--budget -1 is invalid"),
    (["--budget", "1", "--model", "bogus"], "no bundled reference model 'bogus'"),
    (["--budget", "1", "--ep", "3"], "--ep 3 does not divide the model's 8 experts"),
])
def test_tune_input_errors_are_one_line(argv, fragment) -> None:
    assert_one_line(run([*PY, *argv]), "capaware-tune", fragment)


def test_tune_refuses_short_and_held_out_texts(tmp_path) -> None:
    from megatron_capaware.models import reference_models

    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.\n")
    assert_one_line(run([*PY, "--budget", "1", "--text", str(short)]), "capaware-tune",
                    "give a longer --text")
    assert_one_line(run([*PY, "--budget", "1", "--text", str(reference_models.HELDOUT_TEXT)]), "capaware-tune",
                    "is the bundled held-out text")


@pytest.mark.multirank
def test_tune_search_on_the_tiny_model_writes_usable_choices(tiny_checkpoint, tmp_path) -> None:
    from megatron_capaware._compat.launcher import run_distributed
    from tests.helpers.eval_workers import tune_worker

    out = run_distributed(tune_worker, 2, tiny_checkpoint, 2, [0.01, 1.0], str(tmp_path), timeout_s=600)
    records, summary = out[0]["records"], out[0]["summary"]
    labels = [r["label"] for r in records]
    assert labels[0] == "topk" and len(labels) == len(set(labels)) > len(tune.COARSE_SPECS)
    assert [r["label"] for r in out[1]["records"]] == labels, "every rank must sweep the same settings"
    assert any(r["router"] == "laser" for r in records)
    placed = [r for r in records if r.get("placement")]
    assert {r["label"] for r in placed} >= {"topk @placed:plan.json"}  # searched on the plan too
    assert abs(records[labels.index("topk @placed:plan.json")]["ppl"] / records[0]["ppl"] - 1) <= 1e-5
    split, validation = out[0]["split"], out[0]["validation"]
    assert split["search_batches"] >= 1 and split["validation_batches"] >= 1
    for choice in summary["choices"]:
        assert choice["calib_delta_ppl_pct"] <= choice["budget_pct"]
        # Checked on the validation split: within budget * (1 - margin) there (top-k: 0 by definition).
        assert choice["validation_delta_ppl_pct"] <= choice["budget_pct"] * 0.8 or choice["label"] == "topk"
        faster = [r for r in records if r["delta_ppl_pct"] <= choice["budget_pct"]
                  and r["predicted_speedup"] > choice["predicted_speedup"] + 1e-12]
        # A faster setting within the budget on the search split was rejected on validation, or never tried.
        assert all(r["label"] in choice["rejected_on_validation"] or r["label"] not in validation for r in faster)
        assert set(choice["rejected_on_validation"]) <= set(validation)
        cfg = parse_router_spec(choice["spec"])[0]
        if cfg.router_type == "laser":
            load_calibration(choice["calibration_file"]).check_model([1, 2], 8, 2)
        elif choice["placement"]:
            assert choice["label"] == cfg.describe() + " @placed:plan.json"
            assert "--capaware-placement " in choice["megatron_flags"]
        else:
            assert cfg.describe() == choice["label"]
        assert choice["megatron_flags"].startswith("--moe-router-type ")
    assert summary["frontier"] and all(math.isfinite(r["ppl"]) for r in summary["records"])
    assert "LASER" in summary["laser_note"]


def test_laser_hull_keeps_the_rungs_worth_their_cost() -> None:
    points = [(0.0, 0.0, -1), (0.01, 0.05, 0), (0.02, 0.06, 1), (0.03, 0.15, 2), (0.04, 0.14, 3), (0.1, 0.2, 4)]
    # rung 0 lies below the chord to rung 2; rung 1 too; rung 3 gains less than rung 2 for more cost
    assert [r for _, _, r in tune._upper_hull(points)] == [-1, 2, 4]


def test_the_choice_is_checked_on_a_split_the_search_did_not_see() -> None:
    search = [rec("topk", 0.0, 1.0), rec("a", 0.2, 1.05), rec("b", 0.45, 1.2), rec("c", 0.3, 1.1), rec("d", 3.0, 1.5)]
    # b looked within 0.5% on the search split but costs 0.9% on validation: c is the fastest that holds.
    validation = {"topk": rec("topk", 0.0, 1.0), "b": rec("b", 0.9, 1.2), "c": rec("c", 0.35, 1.1),
                  "a": rec("a", 0.1, 1.05)}
    record, check, rejected = tune.choose_validated(search, validation, 0.5, margin=0.2)
    assert record["label"] == "c" and check["delta_ppl_pct"] == 0.35 and rejected == ["b"]
    # The margin: c's 0.35% is not within 0.5 * (1 - 0.4) = 0.3%, a's 0.1% is.
    assert tune.choose_validated(search, validation, 0.5, margin=0.4)[0]["label"] == "a"
    # Nothing holds: top-k.
    assert tune.choose_validated(search, {"topk": validation["topk"]}, 0.5, 0.2)[0]["label"] == "topk"
    assert tune.validation_candidates(search, 0.5, 2) == ["b", "c"]


def test_split_batches_keeps_one_batch_on_each_side() -> None:
    assert tune.split_batches(4, 0.25) == 3 and tune.split_batches(9, 0.25) == 6
    assert tune.split_batches(2, 0.9) == 1 and tune.split_batches(5, 0.0) == 5
    with pytest.raises(Exception, match="at least 2"):
        tune.split_batches(1, 0.25)


@pytest.mark.parametrize("argv, fragment", [
    (["--budget", "1", "--margin", "1"], "--margin 1 is invalid"),
    (["--budget", "1", "--validation-fraction", "-0.1"], "--validation-fraction -0.1 is invalid"),
])
def test_tune_validation_flags_are_checked(argv, fragment) -> None:
    assert_one_line(run([*PY, *argv]), "capaware-tune", fragment)
