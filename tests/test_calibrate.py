"""LASER calibration: the rule, the file round trip, and refusal on another model."""

from __future__ import annotations

import pytest
import torch

from megatron_capaware.tools.calibrate import _calibrate_worker, build_calibration, calibrate_layer
from megatron_capaware.config import CapawareConfig, CapawareConfigError, load_calibration
from megatron_capaware._compat.launcher import run_distributed
from tests.helpers.eval_workers import evaluate_worker
from tests.helpers.policy_cases import make_scores


def test_balanced_layer_gets_no_flexibility_and_skewed_layer_meets_its_target() -> None:
    g = torch.Generator().manual_seed(0)
    balanced = [make_scores(512, 8, "random", g) for _ in range(3)]
    result = calibrate_layer(balanced, 2, t_fix=0.3, pool=4, target_reduction=1.0)
    assert result["q"] == 0.0 and result["eps_high"] == 0.0  # already at target: pure top-k
    skewed = [make_scores(512, 8, "skewed", g) for _ in range(3)]
    result = calibrate_layer(skewed, 2, t_fix=0.1, pool=6, target_reduction=1.3)
    assert result["q"] > 0
    assert result["i_laser"] <= result["target_i"] or result["i_laser"] == min(x["i"] for x in result["grid"])
    smaller = [x for x in result["grid"] if x["q"] < result["q"]]
    assert all(x["i"] > result["target_i"] for x in smaller), "the smallest q meeting the target is chosen"


def test_quantile_rule_sets_the_flexible_fraction() -> None:
    calls = [make_scores(1000, 8, "skewed", torch.Generator().manual_seed(1))]
    result = calibrate_layer(calls, 2, t_fix=0.3, pool=4, target_reduction=1.5, flexible_fraction=0.4)
    mass = calls[0].topk(2, dim=1).values.sum(1)
    assert abs(float((mass < result["eps_high"]).double().mean()) - 0.4) < 0.01


@pytest.mark.multirank
def test_calibration_file_round_trip_and_model_check(tiny_checkpoint, tmp_path) -> None:
    options = dict(checkpoint=tiny_checkpoint["checkpoint"], text=tiny_checkpoint["calibration"],
                   seq_len=32, sequences_per_rank=8, max_tokens=None, ep=1)
    recorded = run_distributed(_calibrate_worker, 1, options, timeout_s=300)[0]
    assert sorted(recorded["layers"]) == [1, 2]
    calibration = build_calibration(recorded, t_fix=0.3, target_reduction=1.3, source="calibration.txt")
    path = tmp_path / "cal.json"
    calibration.save(path)
    loaded = load_calibration(path)
    assert loaded.layer_params == calibration.layer_params
    assert loaded.model["moe_layer_numbers"] == [1, 2] and loaded.model["num_moe_experts"] == 8
    cfg = CapawareConfig("laser", laser_calibration=str(path))
    assert set(cfg.layer_params) == {1, 2}
    # The router loads it on the model it was made for...
    records = run_distributed(evaluate_worker, 1, tiny_checkpoint, 1, ["topk", f"laser:calibration={path}"],
                              2048, timeout_s=300)[0]
    assert records[1]["label"] == "laser(calibrated)" and records[1]["dropped_frac"] == 0
    # ... and a file made for another model is refused, naming the mismatch.
    loaded.model["moe_layer_numbers"] = [1, 2, 3, 4]
    loaded.save(tmp_path / "other.json")
    with pytest.raises(Exception, match="different model"):
        run_distributed(evaluate_worker, 1, tiny_checkpoint, 1, [f"laser:calibration={tmp_path / 'other.json'}"],
                        2048, timeout_s=300)
    loaded.model["moe_layer_numbers"] = [1, 2]
    loaded.model["num_moe_experts"] = 16
    loaded.save(tmp_path / "experts.json")
    with pytest.raises(Exception, match="num_moe_experts=16"):
        run_distributed(evaluate_worker, 1, tiny_checkpoint, 1, [f"laser:calibration={tmp_path / 'experts.json'}"],
                        2048, timeout_s=300)


def test_bad_calibration_files_get_clear_errors(tmp_path) -> None:
    with pytest.raises(CapawareConfigError, match="does not exist"):
        load_calibration(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CapawareConfigError, match="not valid JSON"):
        load_calibration(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(CapawareConfigError, match="not a LASER calibration file"):
        load_calibration(tmp_path / "other.json")
