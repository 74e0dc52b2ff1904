"""The whole router's op budget and local-scope statistics (issue 22, items 12 and 10).

One spawned gloo rank (Megatron's MoE layer needs its parallel state) runs
``scripts/count_router_ops.py``'s counting (the whole ``router(hidden)`` call
plus the layer's deferred score check, T = 2,048, E = 64, k = 8, on CPU with
``CAPAWARE_DEVICE_PATH=1``) at EP 1 and 2 (simulated ranks,
``tools/bench/sim_dist.py``, a collective counted as one op) and checks:

- each router's count is within its budget (docs/benchmarks.md: the measured
  count after issue 22 plus a small margin);
- ``--capaware-scope local`` with stats on and the score check off issues no
  collective per call; with the score check on, one (the deferred check's
  all-gather, once per model forward);
- the local-scope stats summed at report time (``collect_stats`` ->
  ``LayerRoutingStats.reduce_pending``) equal the group's figures computed
  from the routers' outputs.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any, Dict

import pytest
import torch

from megatron_capaware._compat.launcher import run_distributed

pytestmark = pytest.mark.multirank

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "count_router_ops.py"

#: ATen ops of the whole router per MoE layer (global scope, stats and score check on, eager),
#: the figures measured after issue 22 (docs/benchmarks.md) plus a small margin.
BUDGET = {
    "EP=1": {"TopKRouter (Megatron)": 9, "topk": 17, "capacity-drop": 57, "capacity-reroute": 98,
             "expanded-drop": 71, "laser": 658, "decode-pack": 107},
    "EP=2": {"TopKRouter (Megatron)": 9, "topk": 19, "capacity-drop": 107, "capacity-reroute": 188,
             "expanded-drop": 121, "laser": 732, "decode-pack": 113},
}


def _script():
    spec = importlib.util.spec_from_file_location("count_router_ops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def router_ops_worker() -> Dict[str, Any]:
    import os

    os.environ["CAPAWARE_DEVICE_PATH"] = "1"
    from megatron_capaware import parallel
    from megatron_capaware.adapters import install_capaware_routers
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.tools.bench.sim_dist import run_ranks

    script = _script()
    parallel.init_model_parallel(parallel.ParallelSizes(), timeout_s=120)
    out: Dict[str, Any] = {}
    parser = script.build_parser()
    out["global"] = script.count(parser.parse_args(["--ep", "1", "2"]))
    local_calls: Dict[str, Dict[str, int]] = {}
    script.count(parser.parse_args(["--ep", "2", "--scope", "local", "--no-score-check"]), local_calls)
    out["local_no_check_collectives"] = local_calls
    checked: Dict[str, Dict[str, int]] = {}
    script.count(parser.parse_args(["--ep", "2", "--scope", "local", "--routers", "capacity-drop"]), checked)
    out["local_checked_collectives"] = checked

    # Local-scope stats: 3 calls per rank at EP 2, summed at report time, against the outputs.
    layer = script._layer()
    install_capaware_routers(layer, CapawareConfig("capacity-drop", gamma=1.0, scope="local"))
    router = layer.router

    def rank_fn(rank: int, group: Any):
        mine = script._rank_router(router, rank, 2, group)
        maps = []
        with torch.no_grad():
            for call in range(3):
                hidden = script._hidden(10 * call + rank)[: 1024 + 512 * call]  # a different T per call
                maps.append(mine(hidden)[1])
        stats = mine.capaware_state.stats
        try:
            stats.global_loads  # noqa: B018 - unreduced local records must not be read as the group's
            unread = None
        except RuntimeError as err:
            unread = str(err)
        stats.reduce_pending()  # what collect_stats does on every rank
        return dict(loads=[l.clone() for l in stats.global_loads], requested=list(stats.requested),
                    tokens=list(stats.tokens), dropped=list(stats.dropped), capacity=list(stats.capacity),
                    map_loads=[m.sum(dim=0).to(torch.int64) for m in maps], tokens_in=[m.shape[0] for m in maps],
                    unread=unread)

    out["local_stats"] = run_ranks(rank_fn, 2, timeout_s=120)
    parallel.destroy()
    return out


@pytest.fixture(scope="module")
def counted() -> Dict[str, Any]:
    return run_distributed(router_ops_worker, 1, timeout_s=600, collective_timeout_s=120)[0]


def test_the_whole_router_meets_its_ops_budget_at_ep_1_and_2(counted) -> None:
    table = counted["global"]
    print("\nATen ops per MoE layer, whole router (global scope, stats and score check on):")
    for name, row in table.items():
        print(f"  {name:24s} EP=1 {row['EP=1']:4d}  EP=2 {row['EP=2']:4d}")
    over = {(name, ep): (row[ep], BUDGET[ep][name]) for name, row in table.items() for ep in ("EP=1", "EP=2")
            if row[ep] > BUDGET[ep][name]}
    assert not over, f"over budget (measured, budget): {over}"


def test_local_scope_issues_no_collective_per_call(counted) -> None:
    """Item 10: at --capaware-scope local the stats stay on the device (0 collectives per call); the score
    check's one all-gather per model forward is what is left (--capaware-no-score-check removes it)."""
    for name, row in counted["local_no_check_collectives"].items():
        assert row["EP=2"] == 0, (name, row)
    assert counted["local_checked_collectives"]["capacity-drop"]["EP=2"] == 1, counted["local_checked_collectives"]


def test_local_scope_stats_summed_at_report_time_equal_the_group_figures(counted) -> None:
    ranks = counted["local_stats"]
    for rank in ranks:
        assert rank["unread"] is not None and "collect_stats" in rank["unread"], rank["unread"]
    for call in range(3):
        expected = ranks[0]["map_loads"][call] + ranks[1]["map_loads"][call]  # what the experts receive
        tokens = ranks[0]["tokens_in"][call] + ranks[1]["tokens_in"][call]
        for rank in ranks:
            assert torch.equal(rank["loads"][call], expected), (call, rank["loads"][call], expected)
            assert rank["tokens"][call] == tokens and rank["requested"][call] == tokens * 8
            assert rank["capacity"][call] is None  # per rank at local scope
        # dropped: each rank's own (reduce_summaries sums them), and they add up to the group's drops.
        assert ranks[0]["dropped"][call] + ranks[1]["dropped"][call] == tokens * 8 - int(expected.sum())
