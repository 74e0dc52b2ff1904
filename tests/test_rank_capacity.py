"""capacity-drop with unit=rank: each EP rank keeps at most C_rank assignments over its experts."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_capaware import policies as P
from megatron_capaware.policies import reference as R
from megatron_capaware.tools.bench.common import synthetic_scores

CASES = [(T, E, W, k, gamma, policy, mode)
         for T, E, W, k in [(40, 8, 2, 2), (33, 8, 4, 2), (50, 16, 4, 4), (17, 6, 3, 3), (1, 8, 2, 2), (0, 8, 2, 2)]
         for gamma in (0.5, 1.0, 1.25)
         for policy in ("score", "weight", "position", "random")
         for mode in ("skewed", "ties")]


@pytest.mark.parametrize("device_path", ["0", "1"])
@pytest.mark.parametrize("T, E, W, k, gamma, policy, mode", CASES)
def test_rank_unit_equals_reference_and_caps_every_rank(monkeypatch, device_path, T, E, W, k, gamma, policy, mode):
    monkeypatch.setenv("CAPAWARE_DEVICE_PATH", device_path)
    scores = synthetic_scores(T, E, mode, torch.Generator().manual_seed(T + E + k))
    ranks = P.expert_rank_map(E, W)
    decision = P.capacity_drop(scores, k, gamma, policy=policy, seed=3, unit="rank", expert_ranks=ranks,
                               num_ranks=W, return_decision=True, normalize=True)
    ref_probs, ref_map = R.capacity_drop(scores, k, gamma, policy=policy, seed=3, unit="rank",
                                         expert_ranks=ranks.tolist(), normalize=True)
    assert torch.equal(decision.routing_map, ref_map)
    assert torch.allclose(decision.probs, ref_probs, atol=1e-6)
    c_rank = max(1, math.ceil(gamma * T * k / W)) if T else 1
    per_rank = decision.routing_map.sum(0).view(W, -1).sum(1)
    assert int(per_rank.max()) <= c_rank
    assert torch.equal(decision.global_loads, decision.routing_map.sum(0))
    assert int(decision.capacity) == c_rank or T == 0


def test_one_expert_per_rank_is_the_expert_unit() -> None:
    scores = synthetic_scores(64, 8, "skewed", torch.Generator().manual_seed(1))
    by_rank = P.capacity_drop(scores, 2, 1.0, unit="rank", expert_ranks=P.expert_rank_map(8, 8), num_ranks=8)
    by_expert = P.capacity_drop(scores, 2, 1.0)
    assert torch.equal(by_rank[1], by_expert[1]) and torch.equal(by_rank[0], by_expert[0])


def test_rank_unit_drops_less_than_expert_unit_at_the_same_rank_cap() -> None:
    """At equal gamma C_rank = C * E / W: a rank may fill its budget from any of its experts."""
    scores = synthetic_scores(256, 8, "skewed", torch.Generator().manual_seed(2))
    rank = P.capacity_drop(scores, 2, 1.0, unit="rank", expert_ranks=P.expert_rank_map(8, 2), num_ranks=2,
                           return_decision=True)
    expert = P.capacity_drop(scores, 2, 1.0, return_decision=True)
    assert int(rank.dropped) <= int(expert.dropped)


def test_rank_unit_needs_the_layout() -> None:
    scores = synthetic_scores(8, 4, "random", torch.Generator().manual_seed(0))
    with pytest.raises(P.RoutingInputError, match="needs expert_ranks"):
        P.capacity_drop(scores, 2, 1.0, unit="rank")
    with pytest.raises(P.RoutingInputError, match="unit"):
        P.capacity_drop(scores, 2, 1.0, unit="node")


@pytest.mark.parametrize("sizes", [[20, 20], [0, 33], [7, 1]])
def test_rank_unit_over_simulated_ranks_equals_the_reference_on_the_concatenation(sizes) -> None:
    from megatron_capaware.tools.bench.sim_dist import run_ranks

    E, W, k, gamma = 8, 2, 2, 1.0
    scores = synthetic_scores(sum(sizes), E, "skewed", torch.Generator().manual_seed(sum(sizes)))
    ranks = P.expert_rank_map(E, W)
    offsets = [0, sizes[0]]

    def rank_fn(rank, group):
        part = scores[offsets[rank]:offsets[rank] + sizes[rank]]
        return P.capacity_drop(part, k, gamma, unit="rank", expert_ranks=ranks, num_ranks=W, group=group)

    results = run_ranks(rank_fn, len(sizes))
    _, ref_map = R.capacity_drop(scores, k, gamma, unit="rank", expert_ranks=ranks.tolist())
    assert torch.equal(torch.cat([m for _, m in results]), ref_map)
