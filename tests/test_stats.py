"""Per-layer routing statistics: bounded memory, same summary as keeping every call."""

import torch

from megatron_capaware import policies
from megatron_capaware.adapters.stats import LayerRoutingStats


def _decisions(n: int):
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        scores = torch.rand(40 + i, 8, generator=gen) ** 3
        yield policies.capacity_drop(scores.softmax(-1), 2, 1.0, return_decision=True)


def test_folded_records_give_the_same_summary_and_stay_bounded():
    unbounded = LayerRoutingStats(layer_number=1, num_experts=8, ep_size=2, local_experts=list(range(8)),
                                  max_records=10**9)
    bounded = LayerRoutingStats(layer_number=1, num_experts=8, ep_size=2, local_experts=list(range(8)),
                                max_records=4)
    for decision in _decisions(23):
        unbounded.record_decision(decision)
        bounded.record_decision(decision)
        bounded.record_received(torch.ones(8, dtype=torch.int64))
    assert len(bounded.global_loads) == 4 and len(bounded.received) == 4 and len(bounded.capacity) == 4
    assert bounded.calls == unbounded.calls == 23
    a, b = unbounded.summary(), bounded.summary()
    assert a.keys() == b.keys()
    for key in a:
        assert abs(a[key] - b[key]) < 1e-9, key
    assert a["dropped_frac"] > 0  # the case exercises drops
    torch.testing.assert_close(bounded.mean_loads(), unbounded.mean_loads())
    for name in ("requested", "dropped", "rerouted", "tokens", "flexible"):
        assert bounded.total(name) == unbounded.total(name)
    bounded.reset()
    assert bounded.calls == 0 and bounded.mean_loads() is None and bounded.summary()["calls"] == 0.0


def test_peak_load_is_relative_to_topk_mean_load():
    """Expanded drop fills every expert to C: I is 1 but the busiest rank does gamma x top-k's mean."""
    from megatron_capaware import metrics

    full = metrics.load_metrics(torch.tensor([4, 4, 4, 4]), ep_size=2, requested=8)
    assert full["imbalance"] == 1.0 and full["peak_load"] == 2.0 and full["rank_peak_load"] == 2.0
    skewed = metrics.load_metrics(torch.tensor([5, 1, 1, 1]), ep_size=2, requested=8)
    assert skewed["peak_load"] == skewed["imbalance"] == 2.5  # no drops: same mean
    assert skewed["rank_peak_load"] == skewed["rank_imbalance"] == 1.5
    assert "peak_load" not in metrics.load_metrics(torch.tensor([1, 1]))


def test_the_device_ring_keeps_every_call_and_its_slot_loads():
    """Issue 22, item 12: each call is copied into a preallocated ring (no per-call stack / clone); what is
    read back is every call's figures, with its own slot loads where given (a change of S flushes first)."""
    stats = LayerRoutingStats(layer_number=1, num_experts=8, ep_size=2, local_experts=list(range(4)))
    decisions = list(_decisions(5))
    for i, decision in enumerate(decisions):
        slots = None if i < 2 else torch.arange(8 + (i >= 4) * 2, dtype=torch.int64) * i  # S = 8, then 10
        stats.record_decision(decision, slots)
    assert stats.pending == 1 and stats.calls == 5  # S changed at call 5: the first 4 were copied then
    for i, decision in enumerate(decisions):
        assert torch.equal(stats.global_loads[i], decision.global_loads)
        assert stats.dropped[i] == int(decision.dropped) and stats.capacity[i] == int(decision.capacity)
        assert stats.tokens[i] == int(decision.global_tokens)
        expected = decision.global_loads if i < 2 else torch.arange(8 + (i >= 4) * 2) * i
        assert torch.equal(stats.slot_loads()[i], expected), i
    assert stats.pending == 0


def test_local_scope_records_are_summed_at_report_time_and_never_read_unsummed():
    """Issue 22, item 10: with a reduce group (--capaware-scope local) each rank records its own figures (no
    collective per call); reduce_pending sums them over the group (the loads, requested and tokens; dropped
    stays per rank for reduce_summaries; no capacity); reading before that raises; ranks whose call counts
    differ all raise instead of one waiting (simulated ranks)."""
    import pytest

    from megatron_capaware.tools.bench.sim_dist import run_ranks

    gen = torch.Generator().manual_seed(1)
    scores = [torch.rand(64, 8, generator=gen).softmax(-1) for _ in range(6)]  # [rank * 3 + call]

    def rank_fn(rank: int, group, calls=(3, 3)):
        stats = LayerRoutingStats(layer_number=1, num_experts=8, ep_size=2, local_experts=[], load_group=group,
                                  reduce_group=group)
        local = [policies.capacity_drop(scores[rank * 3 + c], 2, 1.0, return_decision=True)
                 for c in range(calls[rank])]
        for decision in local:
            stats.record_decision(decision)
        with pytest.raises(RuntimeError, match="collect_stats"):
            stats.global_loads  # noqa: B018
        stats.reduce_pending()
        return stats, local

    (a, local_a), (b, local_b) = run_ranks(rank_fn, 2)
    for c in range(3):
        loads = local_a[c].global_loads + local_b[c].global_loads
        for stats in (a, b):
            assert torch.equal(stats.global_loads[c], loads)
            assert stats.requested[c] == 2 * 64 * 2 and stats.tokens[c] == 128 and stats.capacity[c] is None
        assert a.dropped[c] == int(local_a[c].dropped) and b.dropped[c] == int(local_b[c].dropped)

    def mismatched(rank: int, group):
        try:
            rank_fn(rank, group, calls=(3, 2))
        except RuntimeError as err:
            return str(err)
        return None

    errors = run_ranks(mismatched, 2)  # every rank raises (run_ranks fails on a simulated hang)
    assert all(e is not None and "different numbers of routing calls" in e for e in errors), errors


def test_calls_without_requested_assignments_leave_the_peak_figures_to_the_others():
    # An idle EP rank's dummy forward (dynamic engine, EP 2) sees the global loads but requests
    # nothing itself: it has no peak figures, which must not break (or dilute) the per-call mean.
    from megatron_capaware import metrics

    busy = torch.tensor([6.0, 2.0, 0.0, 0.0])
    out = metrics.summarize_calls([torch.zeros(4), busy, busy], [0, 8, 8], [0, 1, 1], [0, 0, 0], ep_size=2)
    assert out["peak_load"] == metrics.load_metrics(busy, 2, 8)["peak_load"] == 3.0
    assert out["calls"] == 3.0 and out["dropped_frac"] == 2 / 16
