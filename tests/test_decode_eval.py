"""capaware-eval --decode on a tiny checkpoint: single-token steps through the KV cache."""

from __future__ import annotations

import math

import pytest

from megatron_capaware.tools import report
from megatron_capaware._compat.launcher import run_distributed
from tests.helpers.eval_workers import decode_worker

pytestmark = pytest.mark.multirank

EP, BATCH = 2, 8
SPECS = ["topk", "capacity-drop:gamma=0.5", "capacity-drop:gamma=0.5,unit=rank", "decode-pack:floor=1"]


def test_decode_reports_active_experts_loads_and_quality(tiny_checkpoint) -> None:
    out = run_distributed(decode_worker, EP, tiny_checkpoint, EP, SPECS, BATCH, timeout_s=420)
    records = out[0]["records"]
    topk, drop, rank, pack = records
    experts_per_rank = 8 // EP
    for r in records:
        assert r["decode_tokens"] == BATCH * 6 * 2 and r["decode_rounds"] == 2
        assert 1 <= r["decode_active_mean"] <= r["decode_active_max"] <= experts_per_rank
        # a step of BATCH tokens asks for at most BATCH * k assignments: no more experts can be active
        assert r["decode_active_total"] <= min(8, BATCH * 2)
        assert math.isfinite(r["decode_ppl"]) and set(r["decode_per_layer"]) == {"1", "2"}
    # the KV-cache steps compute what a full forward computes at those positions
    assert topk["decode_ppl"] == pytest.approx(out[0]["full_forward_ppl"], rel=1e-4)
    assert topk["decode_delta_ppl_pct"] == 0 and topk["decode_dropped_frac"] == 0
    assert topk["decode_active_speedup"] == 1
    # gamma 0.5 at T = 8 tokens: C = ceil(0.5 * 8 * 2 / 8) = 1 per expert; rank unit C = ceil(0.5*16/2) = 4
    assert drop["decode_dropped_frac"] > 0 and drop["decode_rank_peak_load"] < topk["decode_rank_peak_load"]
    assert rank["decode_rank_peak_load"] <= 0.5 + 1e-9
    assert rank["decode_active_max"] <= topk["decode_active_max"]
    # decode-pack keeps each token's best expert and packs the rest: never more active on the busiest rank
    assert pack["decode_active_max"] <= topk["decode_active_max"] and pack["decode_rerouted_frac"] == 0
    assert pack["decode_frontier"] in ("yes", "dominated")
    table = report.format_decode_table(records)
    assert "active_max" in table and "drop(g0.5,rank)" in table


@pytest.mark.parametrize("argv, fragment", [
    (["--ep", "2", "--decode", "3"], "--decode 3 is invalid: the decode batch is split over the 2 data-parallel"),
    (["--decode", "4", "--decode-prompt-len", "5000"], "exceeds the model's"),
    (["--decode", "4", "--decode-steps", "0"], "--decode-steps 0 is invalid"),
])
def test_decode_input_errors_are_one_line(argv, fragment) -> None:
    import sys

    from tests.test_cli_errors import assert_one_line, run

    assert_one_line(run([sys.executable, "-m", "megatron_capaware.tools.evaluate", "--routers", "topk", *argv]),
                    "capaware-eval", fragment)
