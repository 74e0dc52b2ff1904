"""The shift benchmark's layout simulation: per-call figures, re-planner schedule, move counts, recovery."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_capaware import placement as P
from megatron_capaware.placement import shift as S
from megatron_capaware.placement.validate import per_call_peak


def _stream(seed: int, calls: int = 12, layers: int = 2, experts: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(layers, experts, generator=g, dtype=torch.float64) ** 3 * 80 + 1
    b = a.flip(-1)  # the hot experts change half-way
    rates = torch.stack([a] * (calls // 2) + [b] * (calls - calls // 2))
    return torch.poisson(rates, generator=g)


def test_call_figures_match_per_call_peak_layer_by_layer() -> None:
    loads = _stream(0)
    layout = [P.plan_layer(loads[:, i].sum(0), 4, 4).slots for i in range(2)]
    busiest, mean = S.call_rank_figures(loads, S.static_layouts(layout, loads.shape[0]), 4)
    for i in range(2):
        assert abs(float(busiest[:, i].sum() / mean[:, i].sum()) - per_call_peak(loads[:, i], layout[i], 4)) < 1e-12


def test_replanner_schedule_mirrors_online_replanner() -> None:
    loads = _stream(1)
    layouts, moves = S.replanner_layouts(loads, 2, every=3, window=2)
    assert [m.call for m in moves] == [3, 6, 9]  # after calls 3, 6, 9 (not after the last, 12)
    contiguous = [list(range(8))] * 2
    assert layouts[0] == layouts[2] == contiguous  # calls 1-3 on the initial layout
    planned = [P.plan_layer(loads[1:3, i].mean(0), 2).slots for i in range(2)]  # calls 2 and 3
    expected = [S.align_ranks(list(range(8)), p, 2) for p in planned]  # ranks relabelled: fewest moves
    assert layouts[3] == layouts[5] == expected
    assert moves[0].transfers == sum(S.transfers(a, b, 2) for a, b in zip(contiguous, expected))
    unaligned, _ = S.replanner_layouts(loads, 2, every=3, window=2, align=False)
    assert unaligned[3] == planned


def test_transfers_count_what_crosses_ranks() -> None:
    assert S.transfers([0, 1, 2, 3], [0, 1, 2, 3], 2) == 0
    assert S.transfers([0, 1, 2, 3], [1, 0, 3, 2], 2) == 0  # reordered within ranks
    assert S.transfers([0, 1, 2, 3], [0, 2, 1, 3], 2) == 2  # one swap: two experts cross
    # Replicas: rank 0 wants 0 2 1 (2 comes from rank 1), rank 1 wants 3 0 2 (0 comes from rank 0).
    assert S.transfers([0, 1, 2, 3], [0, 2, 1, 3, 0, 2], 2) == 2


@given(st.integers(0, 1000), st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 5)]))
@settings(max_examples=20, deadline=None)
def test_the_oracle_window_plan_is_what_planning_on_that_window_gives(seed, setting) -> None:
    loads = _stream(seed)
    windows = S.report_windows([("a", 6), ("b", 6)], 2)
    oracle = S.oracle_layouts(loads, 2, [(a, b) for a, b, _ in windows])
    for a, b, _ in windows:
        assert oracle[a] == [P.plan_layer(loads[a:b, i].sum(0), 2).slots for i in range(2)]
    window, every = setting
    layouts, _ = S.replanner_layouts(loads, 2, every, window)
    assert len(layouts) == loads.shape[0]


def test_report_windows_restart_at_each_segment_and_recovery_counts_from_the_switch() -> None:
    windows = S.report_windows([("a", 5), ("b", 4), ("a", 2)], 2)
    assert windows == [(0, 2, "a"), (2, 4, "a"), (4, 5, "a"), (5, 7, "b"), (7, 9, "b"), (9, 11, "a")]
    regret = [1.0, 1.0, 1.0, 1.3, 1.02, 1.2]
    out = S.recovery_calls(regret, windows, 1.05)
    assert out[0] == {"switch_call": 5, "to": "b", "calls_to_within": 4, "first_window_regret": 1.3}
    assert out[1]["calls_to_within"] is None  # never within 5% before the segment ended


@given(st.integers(0, 10_000), st.sampled_from([(8, 2, 0), (8, 4, 4), (12, 3, 3), (16, 8, 0), (16, 8, 8)]))
@settings(max_examples=40, deadline=None)
def test_aligning_ranks_moves_fewer_experts_and_keeps_the_balance(seed, case) -> None:
    experts, ranks, redundant = case
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(experts, generator=g, dtype=torch.float64) ** 2 * 100
    b = torch.rand(experts, generator=g, dtype=torch.float64) ** 2 * 100
    old = P.plan_layer(a, ranks, redundant).slots
    new = P.plan_layer(b, ranks, redundant).slots
    aligned = S.align_ranks(old, new, ranks)
    from megatron_capaware.adapters.placement import slot_table
    slot_table(aligned, ranks)  # still a valid layout
    assert sorted(P.rank_loads(b, aligned, ranks).tolist()) == sorted(P.rank_loads(b, new, ranks).tolist())
    assert S.transfers(old, aligned, ranks) <= S.transfers(old, new, ranks)
    if not redundant:  # re-planning to the same groups: no move
        assert S.transfers(old, S.align_ranks(old, old, ranks), ranks) == 0


def test_bench_shift_help_and_bad_input_are_one_line(tmp_path) -> None:
    import sys

    from tests.test_cli_errors import assert_one_line, run

    py = [sys.executable, "-m", "megatron_capaware.tools.bench.shift"]
    helped = run([*py, "--help"], timeout=120)
    assert helped.returncode == 0 and "--replan" in helped.stdout and "--debug" in helped.stdout
    assert_one_line(run([*py, "--other", f"verse={tmp_path / 'none.txt'}"]), "capaware-bench-shift",
                    "python scripts/shift_texts.py")
    text = tmp_path / "t.txt"
    text.write_text("x")
    assert_one_line(run([*py, "--other", f"verse={text}", "--replan", "4"]), "capaware-bench-shift",
                    "give WINDOW:EVERY")
    assert_one_line(run([*py, "--other", f"verse={text}", "--ep", "3"]), "capaware-bench-shift",
                    "--ep 3: use EP sizes >= 2 that divide the 8 experts")


def test_the_per_call_replanner_fits_each_window_on_its_calls() -> None:
    from megatron_capaware.placement.validate import fit_layer

    loads = _stream(3)
    layouts, moves = S.replanner_layouts(loads, 2, every=4, window=4, objective="per-call", align=False)
    assert [m.call for m in moves] == [4, 8]
    assert layouts[4] == [fit_layer(loads[0:4, i], 2, 0, None, "per-call").slots for i in range(2)]


def test_online_replanner_refuses_an_unknown_objective() -> None:
    import pytest

    from megatron_capaware.adapters.replan import OnlineReplanner

    with pytest.raises(P.PlacementError, match="objective='median'"):
        OnlineReplanner(every=2, objective="median")
