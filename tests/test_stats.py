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


def test_calls_without_requested_assignments_leave_the_peak_figures_to_the_others():
    # An idle EP rank's dummy forward (dynamic engine, EP 2) sees the global loads but requests
    # nothing itself: it has no peak figures, which must not break (or dilute) the per-call mean.
    from megatron_capaware import metrics

    busy = torch.tensor([6.0, 2.0, 0.0, 0.0])
    out = metrics.summarize_calls([torch.zeros(4), busy, busy], [0, 8, 8], [0, 1, 1], [0, 0, 0], ep_size=2)
    assert out["peak_load"] == metrics.load_metrics(busy, 2, 8)["peak_load"] == 3.0
    assert out["calls"] == 3.0 and out["dropped_frac"] == 2 / 16
