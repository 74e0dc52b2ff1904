"""capaware-plan on a tiny checkpoint, and capaware-eval --placement with it (real commands)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from megatron_capaware import placement as P
from tests.helpers.megatron_training_support import subprocess_env
from tests.test_cli_errors import assert_one_line, script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multirank


def run(args, timeout=600):
    return subprocess.run(args, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def test_plan_then_evaluate_with_it(tiny_checkpoint, tmp_path) -> None:
    ckpt, text = tiny_checkpoint["checkpoint"], tiny_checkpoint["heldout"]
    small = ["--seq-len", "32", "--sequences-per-rank", "2"]
    plan_path = tmp_path / "plan.json"
    made = run([script("capaware-plan"), "--checkpoint", ckpt, "--text", tiny_checkpoint["calibration"], "--ep", "2",
                "--redundant-experts", "2", "--keep-replicas", "--out", str(plan_path), *small])
    assert made.returncode == 0, made.stdout + made.stderr
    plan = P.load_plan(plan_path)
    assert sorted(plan.layers) == [1, 2] and plan.ep == 2 and plan.redundant == 2
    assert all(len(p.slots) == 10 for p in plan.layers.values())
    assert plan.provenance["tokens"] > 0 and not plan.provenance["in_sample"]
    assert "predicted speedup" in made.stdout
    # Fitted on the first calls, checked on the last: the file and the output say so.
    validation = plan.provenance["validation"]
    assert validation["fit_calls"] >= 1 and validation["validation_calls"] >= 1
    assert all(set(p.figures) >= {"contiguous_validation", "written_validation"} for p in plan.layers.values())
    assert "per-call busiest rank, fit" in made.stdout
    evaluated = run([script("capaware-eval"), "--checkpoint", ckpt, "--text", text, "--ep", "2", "--routers", "topk",
                     "--placement", str(plan_path), "--no-plots", "--no-progress", "--out", str(tmp_path / "eval"),
                     "--json", str(tmp_path / "eval.json"), *small])
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert "topk@plan: EP 2, R=2 (least-loaded)" in evaluated.stdout
    records = {r["label"]: r for r in json.loads((tmp_path / "eval.json").read_text())}
    placed = records["topk @placed:plan.json"]
    # The experts really moved (measured on the physical slots), and the model's function did not change.
    assert placed["placement"]["redundant"] == 2
    assert abs(placed["ppl"] / records["topk"]["ppl"] - 1) <= 1e-5
    assert placed["rank_peak_load"] != records["topk"]["rank_peak_load"]


def test_a_plan_for_another_model_is_one_line(tiny_checkpoint) -> None:
    bundled_plan = ROOT / "megatron_capaware/models/reference_models/shakespeare-moe-8x2/placement-ep2-r0.json"  # the bundled model has 4 MoE layers
    result = run([script("capaware-eval"), "--checkpoint", tiny_checkpoint["checkpoint"], "--text",
                  tiny_checkpoint["heldout"], "--ep", "2", "--placement", str(bundled_plan), "--seq-len", "32",
                  "--sequences-per-rank", "2"])
    assert_one_line(result, "capaware-eval", "made for another model; run capaware-plan on this checkpoint")


def test_plan_refuses_a_layout_before_recording() -> None:
    result = run([script("capaware-plan"), "--ep", "2", "--redundant-experts", "1", "--out", "/tmp/never.json"])
    assert_one_line(result, "capaware-plan", "do not split evenly over EP 2")
    assert not Path("/tmp/never.json").exists()
