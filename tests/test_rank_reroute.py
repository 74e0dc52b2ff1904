"""capacity-reroute with unit=rank: drop per EP rank, then offer the dropped assignments to ranks with room.

The fast path (both code paths: ``CAPAWARE_DEVICE_PATH=0`` compacts rows and
stops early, ``=1`` is the sync-free device path) against the loop reference
``policies.reference.capacity_reroute(unit="rank")``, on fixed cases and on
hypothesis-generated ones (padding, group masks, the rho guard, ties,
arbitrary expert -> rank maps, simulated EP groups), plus the invariants of
docs/routers.md: every rank's load <= C_rank, at most k experts per token,
kept assignments keep vanilla's weights, reroute keeps what the drop kept.
"""

from __future__ import annotations

import math
from typing import Any, Dict

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from megatron_capaware import policies as P
from megatron_capaware.policies import collectives, common
from megatron_capaware.policies import reference as R
from megatron_capaware.tools.bench.common import synthetic_scores
from megatron_capaware.tools.bench.sim_dist import run_ranks
from tests.test_properties import SYNC_MODES, assert_same, grouped_case, split_of, sync_free, topk_case


def _fast(scores, k, p, expert_ranks, num_ranks, group=None, **masks):
    return P.capacity_reroute(
        scores, k, p["gamma"], rounds=p["rounds"], policy=p["policy"], min_ratio=p["min_ratio"],
        drop_policy=p["drop_policy"], seed=p["seed"], normalize=p["normalize"], renormalize=p["renormalize"],
        unit="rank", expert_ranks=expert_ranks, num_ranks=num_ranks, group=group, return_decision=True, **masks)


def _ref(scores, k, p, expert_ranks, num_ranks, **masks):
    return R.capacity_reroute(
        scores, k, p["gamma"], rounds=p["rounds"], policy=p["policy"], min_ratio=p["min_ratio"],
        drop_policy=p["drop_policy"], seed=p["seed"], normalize=p["normalize"], renormalize=p["renormalize"],
        unit="rank", expert_ranks=expert_ranks.tolist(), num_ranks=num_ranks, **masks)


def _rank_loads(routing_map: torch.Tensor, expert_ranks: torch.Tensor, num_ranks: int) -> torch.Tensor:
    return torch.zeros(num_ranks, dtype=torch.int64).index_add_(0, expert_ranks, routing_map.sum(0).to(torch.int64))


def check_rank_invariants(scores, k, p, decision, expert_ranks, num_ranks, global_tokens, full_map=None,
                          topk_indices=None, allowed=None) -> None:
    """One rank's decision; ``full_map``: the whole group's map (default: this one's)."""
    routing_map, probs = decision.routing_map, decision.probs
    full_map = routing_map if full_map is None else full_map
    c_rank = common.capacity_from_total(p["gamma"], global_tokens * k, num_ranks)
    assert int(decision.capacity) == c_rank
    assert int(_rank_loads(full_map, expert_ranks, num_ranks).max()) <= c_rank, "a rank's load exceeds C_rank"
    assert torch.equal(decision.global_loads, full_map.sum(0)), "global loads are per expert, over the group"
    assert torch.all(routing_map.sum(1) <= k), "a token has more than k experts"
    assert torch.all(probs[~routing_map] == 0)
    if topk_indices is None:
        top_map, _ = common.topk_map(scores, k)
    else:
        top_map = torch.zeros_like(routing_map).scatter_(1, topk_indices, True)
    if allowed is not None:
        assert not torch.any(routing_map & ~top_map & ~allowed), "rerouted outside the token's groups"
    if not p["renormalize"]:
        vanilla = P.topk(scores, k, normalize=p["normalize"], topk_indices=topk_indices)[0]
        kept = routing_map & top_map
        assert torch.equal(probs[kept], vanilla[kept]), "kept assignments must keep vanilla's weights"


@st.composite
def rank_params(draw) -> Dict[str, Any]:
    return dict(
        gamma=draw(st.one_of(st.sampled_from((0.25, 0.5, 0.8, 1.0, 1.05, 1.25, 2.0, math.inf)),
                             st.floats(0.05, 3.0))),
        rounds=draw(st.integers(0, 3)),
        policy=draw(st.sampled_from(common.REROUTE_POLICIES)),
        drop_policy=draw(st.sampled_from(common.DROP_POLICIES)),
        min_ratio=draw(st.sampled_from((0.0, 0.0, 0.2, 0.5, 1.0, 2.0))),
        seed=draw(st.integers(0, 2**31 - 1)),
        normalize=draw(st.booleans()),
        renormalize=draw(st.booleans()),
    )


@st.composite
def rank_map(draw, num_experts: int):
    """``(expert_ranks [E], W)``: Megatron's contiguous layout, or any map (a placement; empty ranks too)."""
    if draw(st.booleans()):
        divisors = [w for w in range(1, num_experts + 1) if num_experts % w == 0]
        world = draw(st.sampled_from(divisors))
        return P.expert_rank_map(num_experts, world), world
    world = draw(st.integers(1, 4))
    ranks = draw(st.lists(st.integers(0, world - 1), min_size=num_experts, max_size=num_experts))
    return torch.tensor(ranks, dtype=torch.int64), world


# ----------------------------------------------------------------------------- fixed cases

CASES = [(T, E, W, k, gamma, policy, rho, mode)
         for T, E, W, k in [(40, 8, 2, 2), (33, 8, 4, 2), (50, 16, 4, 4), (17, 6, 3, 3), (1, 8, 2, 2), (0, 8, 2, 2)]
         for gamma in (0.5, 1.0, 1.1)
         for policy, rho in (("score", 0.0), ("load", 0.0), ("score", 0.5), ("load", 0.3))
         for mode in ("skewed", "ties")]


@pytest.mark.parametrize("device_path", ["0", "1"])
@pytest.mark.parametrize("T, E, W, k, gamma, policy, rho, mode", CASES)
def test_rank_reroute_equals_reference_and_caps_every_rank(monkeypatch, device_path, T, E, W, k, gamma, policy,
                                                           rho, mode) -> None:
    monkeypatch.setenv("CAPAWARE_DEVICE_PATH", device_path)
    scores = synthetic_scores(T, E, mode, torch.Generator().manual_seed(T + E + k))
    ranks = P.expert_rank_map(E, W)
    p = dict(gamma=gamma, rounds=2, policy=policy, min_ratio=rho, drop_policy="weight", seed=3, normalize=True,
             renormalize=False)
    decision = _fast(scores, k, p, ranks, W)
    assert_same(decision.as_tuple(), _ref(scores, k, p, ranks, W), f"rank reroute {p}")
    check_rank_invariants(scores, k, p, decision, ranks, W, T)
    top_map, _ = common.topk_map(scores, k)
    assert int(decision.rerouted) + int(decision.dropped) == T * k - int((decision.routing_map & top_map).sum())
    _, drop_map = P.capacity_drop(scores, k, gamma, policy="weight", seed=3, unit="rank", expert_ranks=ranks,
                                  num_ranks=W)
    assert not torch.any(drop_map & ~decision.routing_map), "reroute must keep everything the drop kept"


def test_the_cases_reroute_across_ranks() -> None:
    """Not vacuous: a skewed batch at gamma 1 drops on the busy rank and reroutes onto the other."""
    scores = synthetic_scores(256, 8, "skewed", torch.Generator().manual_seed(2))
    ranks = P.expert_rank_map(8, 2)
    drop = P.capacity_drop(scores, 2, 1.0, unit="rank", expert_ranks=ranks, num_ranks=2, return_decision=True)
    rr = P.capacity_reroute(scores, 2, 1.0, unit="rank", expert_ranks=ranks, num_ranks=2, return_decision=True)
    assert int(drop.dropped) > 0 and int(rr.rerouted) > 0 and int(rr.dropped) < int(drop.dropped)
    before, after = _rank_loads(drop.routing_map, ranks, 2), _rank_loads(rr.routing_map, ranks, 2)
    assert int(after.max()) <= int(rr.capacity) and int(after.min()) > int(before.min())


def test_a_full_rank_gets_no_offer() -> None:
    """An expert of a full rank is never a target, even where it is the token's best candidate."""
    # 4 experts on 2 ranks; every token's top-1 is expert 0 (rank 0), its best other expert is 1 (rank 0 too).
    scores = torch.tensor([[0.6, 0.3, 0.06, 0.04]] * 6)
    ranks = P.expert_rank_map(4, 2)
    for dp in ("0", "1"):
        with sync_free(dp == "1"):
            rr = P.capacity_reroute(scores, 1, 1.0, unit="rank", expert_ranks=ranks, num_ranks=2,
                                    return_decision=True)
        # C_rank = 3: rank 0 keeps 3 tokens on expert 0; the other 3 go to expert 2 (rank 1), not expert 1.
        assert rr.routing_map[:, 1].sum() == 0 and rr.routing_map[:, 0].sum() == 3 and rr.routing_map[:, 2].sum() == 3
        # The expert unit (C = 2) would reroute onto expert 1 of the same rank.
        assert P.capacity_reroute(scores, 1, 1.0)[1][:, 1].sum() == 2


@pytest.mark.parametrize("device_path", ["0", "1"])
def test_a_rank_accepts_at_most_its_room_over_all_its_experts(monkeypatch, device_path) -> None:
    """Offers to different experts of one rank compete for the rank's one room, highest dropped score first."""
    monkeypatch.setenv("CAPAWARE_DEVICE_PATH", device_path)
    # E=4 on 2 ranks, k=1, T=4 -> C_rank = 2. Rank 0 (experts 0, 1) gets all four top-1s; two are dropped
    # (the lowest scores: tokens 2, 3). Rank 1 has room 2: both reroute, token 2 to expert 2, token 3 to 3.
    scores = torch.tensor([[0.9, 0.0, 0.1, 0.0], [0.0, 0.8, 0.0, 0.2], [0.5, 0.0, 0.3, 0.2],
                           [0.0, 0.4, 0.25, 0.35]])
    ranks = P.expert_rank_map(4, 2)
    rr = P.capacity_reroute(scores, 1, 1.0, unit="rank", expert_ranks=ranks, num_ranks=2, return_decision=True)
    assert rr.routing_map.nonzero().tolist() == [[0, 0], [1, 1], [2, 2], [3, 3]]
    assert int(rr.rerouted) == 2 and int(rr.dropped) == 0
    # gamma 1.5: C_rank = 3, rank 0 drops only its lowest (token 3), which goes to rank 1's expert 3.
    rr = P.capacity_reroute(scores, 1, 1.5, unit="rank", expert_ranks=ranks, num_ranks=2, return_decision=True)
    assert rr.routing_map.nonzero().tolist() == [[0, 0], [1, 1], [2, 0], [3, 3]]


@pytest.mark.parametrize("device_path", ["0", "1"])
def test_rank_room_is_shared_by_the_rank_experts_offers(monkeypatch, device_path) -> None:
    """Two offers to two different experts of one rank with room 1: only the higher-scoring one is accepted."""
    monkeypatch.setenv("CAPAWARE_DEVICE_PATH", device_path)
    # E=4 on 2 ranks, k=1, T=5, gamma 0.8: C_rank = 2. Rank 0 gets tokens 0-3 and drops tokens 2 (0.45) and
    # 3 (0.4); rank 1 holds token 4, room 1. Token 2 offers to expert 2, token 3 to expert 3: rank 1
    # takes token 2 only (the unit=expert reroute would place both: different experts).
    scores = torch.tensor([[0.9, 0.0, 0.05, 0.05], [0.0, 0.8, 0.1, 0.1], [0.45, 0.0, 0.3, 0.25],
                           [0.0, 0.4, 0.25, 0.35], [0.0, 0.0, 0.6, 0.4]])
    ranks = P.expert_rank_map(4, 2)
    rr = P.capacity_reroute(scores, 1, 0.8, rounds=2, unit="rank", expert_ranks=ranks, num_ranks=2,
                            return_decision=True)
    assert rr.routing_map.nonzero().tolist() == [[0, 0], [1, 1], [2, 2], [4, 2]]
    assert int(rr.rerouted) == 1 and int(rr.dropped) == 1
    assert _rank_loads(rr.routing_map, ranks, 2).tolist() == [2, 2]
    ref = R.capacity_reroute(scores, 1, 0.8, rounds=2, unit="rank", expert_ranks=ranks.tolist(), num_ranks=2)
    assert torch.equal(ref[1], rr.routing_map)


# ----------------------------------------------------------------------------- one expert per rank


@given(data=st.data(), case=topk_case(), params=rank_params(), padded=st.booleans(), masked=st.booleans())
def test_one_expert_per_rank_equals_the_expert_unit(data, case, params, padded: bool, masked: bool) -> None:
    """E == EP: unit=rank is unit=expert bit for bit (map, weights, every figure), under any rank order."""
    scores, k = case
    num_tokens, num_experts = scores.shape
    order = data.draw(st.permutations(list(range(num_experts))))  # a placement's order, or the identity
    ranks = torch.tensor(order, dtype=torch.int64)
    masks: Dict[str, Any] = {}
    if padded:
        masks["valid_tokens"] = torch.tensor(data.draw(st.lists(st.booleans(), min_size=num_tokens,
                                                                max_size=num_tokens)), dtype=torch.bool)
    if masked:
        masks["allowed"] = torch.tensor(data.draw(st.lists(st.booleans(), min_size=num_tokens * num_experts,
                                                           max_size=num_tokens * num_experts)),
                                        dtype=torch.bool).view(num_tokens, num_experts)
    for mode in SYNC_MODES:
        with sync_free(mode):
            by_rank = _fast(scores, k, params, ranks, num_experts, **masks)
            by_expert = P.capacity_reroute(
                scores, k, params["gamma"], rounds=params["rounds"], policy=params["policy"],
                min_ratio=params["min_ratio"], drop_policy=params["drop_policy"], seed=params["seed"],
                normalize=params["normalize"], renormalize=params["renormalize"], return_decision=True, **masks)
        for field in ("routing_map", "probs", "global_loads", "requested_assignments", "dropped", "rerouted",
                      "global_tokens", "capacity"):
            a, b = getattr(by_rank, field), getattr(by_expert, field)
            assert a.dtype == b.dtype and torch.equal(a, b), (field, mode, params)


# ----------------------------------------------------------------------------- properties


@given(data=st.data(), case=topk_case(), params=rank_params(), padded=st.booleans(), masked=st.booleans())
def test_rank_reroute_properties(data, case, params, padded: bool, masked: bool) -> None:
    scores, k = case
    num_tokens, num_experts = scores.shape
    ranks, world = data.draw(rank_map(num_experts))
    masks: Dict[str, Any] = {}
    valid = None
    if padded:
        valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=num_tokens, max_size=num_tokens)),
                             dtype=torch.bool).reshape(num_tokens)
        masks["valid_tokens"] = valid
    if masked:
        masks["allowed"] = torch.tensor(data.draw(st.lists(st.booleans(), min_size=num_tokens * num_experts,
                                                           max_size=num_tokens * num_experts)),
                                        dtype=torch.bool).view(num_tokens, num_experts)
    note(f"ranks={ranks.tolist()} W={world} params={params} padded={padded} masked={masked}")
    ref = _ref(scores, k, params, ranks, world, **masks)
    real = slice(None) if valid is None else valid
    for mode in SYNC_MODES:
        with sync_free(mode):
            decision = _fast(scores, k, params, ranks, world, **masks)
        assert_same(decision.as_tuple(), ref, f"rank reroute sync_free={mode}")
        if valid is not None:
            assert not torch.any(decision.routing_map[~valid]), "a padding token was routed"
        import dataclasses

        mine = dataclasses.replace(decision, routing_map=decision.routing_map[real], probs=decision.probs[real])
        check_rank_invariants(scores[real], k, params, mine, ranks, world, int(scores[real].shape[0]),
                              allowed=None if not masked else masks["allowed"][real])
        top_map, _ = common.topk_map(scores[real], k)
        kept_top = int((mine.routing_map & top_map).sum())
        assert int(decision.rerouted) + int(decision.dropped) == mine.routing_map.shape[0] * k - kept_top
    # The reroute keeps everything the rank-unit drop kept.
    _, drop_map = P.capacity_drop(scores, k, params["gamma"], policy=params["drop_policy"], seed=params["seed"],
                                  unit="rank", expert_ranks=ranks, num_ranks=world,
                                  valid_tokens=masks.get("valid_tokens"))
    assert not torch.any(drop_map & ~decision.routing_map)


@given(data=st.data(), case=grouped_case(), params=rank_params())
def test_rank_reroute_stays_in_the_selected_groups(data, case, params) -> None:
    """Group-limited routing: Megatron's group-limited top-k as the baseline, its groups as ``allowed``."""
    scores, k, groups, group_topk = case
    num_tokens, num_experts = scores.shape
    ranks, world = data.draw(rank_map(num_experts))
    allowed = P.group_limited_mask(scores, k, groups, group_topk)
    indices = torch.topk(scores.masked_fill(~allowed, float("-inf")), k, dim=1).indices
    masks = dict(topk_indices=indices, allowed=allowed)
    ref = _ref(scores, k, params, ranks, world, **masks)
    for mode in SYNC_MODES:
        with sync_free(mode):
            decision = _fast(scores, k, params, ranks, world, **masks)
        assert_same(decision.as_tuple(), ref, f"grouped rank reroute sync_free={mode}")
        assert not torch.any(decision.routing_map & ~allowed), "a token left its selected groups"
        check_rank_invariants(scores, k, params, decision, ranks, world, num_tokens, topk_indices=indices,
                              allowed=allowed)


@given(data=st.data(), case=topk_case(max_tokens=20), params=rank_params(), mode=st.sampled_from(SYNC_MODES),
       with_copies=st.booleans(), padded=st.booleans())
def test_rank_reroute_split_over_ranks_equals_reference_on_concatenation(data, case, params, mode: bool,
                                                                         with_copies: bool, padded: bool) -> None:
    """Simulated EP groups: every rank's slice of the reference on the concatenated tokens, loads global."""
    scores, k = case
    num_tokens, num_experts = scores.shape
    ranks, world_ranks = data.draw(rank_map(num_experts))
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=num_tokens, max_size=num_tokens)),
                         dtype=torch.bool).reshape(num_tokens) if padded else None
    masked = data.draw(st.booleans())
    allowed = torch.tensor(data.draw(st.lists(st.booleans(), min_size=num_tokens * num_experts,
                                              max_size=num_tokens * num_experts)),
                           dtype=torch.bool).view(num_tokens, num_experts) if masked else None
    sizes = data.draw(split_of(num_tokens))
    world = len(sizes)
    offsets = [sum(sizes[:i]) for i in range(world)]
    copies_of = [r // 2 * 2 for r in range(2 * world)] if with_copies else None
    slice_of = (lambda r: r // 2) if with_copies else (lambda r: r)
    note(f"sizes={sizes} copies={with_copies} ranks={ranks.tolist()} W={world_ranks} params={params}")

    def rows_of(rank: int) -> slice:
        s = slice_of(rank)
        return slice(offsets[s], offsets[s] + sizes[s])

    def rank_fn(rank: int, group) -> Any:
        rows = rows_of(rank)
        masks = {}
        if valid is not None:
            masks["valid_tokens"] = valid[rows]
        if allowed is not None:
            masks["allowed"] = allowed[rows]
        return _fast(scores[rows], k, params, ranks, world_ranks, group=group, **masks)

    with sync_free(mode):
        results = run_ranks(rank_fn, 2 * world if with_copies else world, copies_of=copies_of)
    masks = {}
    if valid is not None:
        masks["valid_tokens"] = valid
    if allowed is not None:
        masks["allowed"] = allowed
    ref_probs, ref_map = _ref(scores, k, params, ranks, world_ranks, **masks)
    real_tokens = num_tokens if valid is None else int(valid.sum())
    for rank, decision in enumerate(results):
        rows = rows_of(rank)
        assert_same(decision.as_tuple(), (ref_probs[rows], ref_map[rows]), f"rank {rank} of {sizes}")
        assert torch.equal(decision.global_loads, ref_map.sum(0)), f"rank {rank}: global loads"
        c_rank = common.capacity_from_total(params["gamma"], real_tokens * k, world_ranks)
        assert int(decision.capacity) == c_rank and int(decision.global_tokens) == real_tokens
    assert int(_rank_loads(ref_map, ranks, world_ranks).max()) <= \
        common.capacity_from_total(params["gamma"], real_tokens * k, world_ranks)
    if with_copies:
        for rank in range(1, len(results), 2):
            assert torch.equal(results[rank].routing_map, results[rank - 1].routing_map)
            assert torch.equal(results[rank].probs, results[rank - 1].probs)


# ----------------------------------------------------------------------------- collectives


def test_the_collectives_depend_only_on_experts_ranks_and_rounds(monkeypatch) -> None:
    """Device path: the same collectives, in the same order, whatever the tokens (T, skew, padding); per
    selection 4 all-reduces of W*256+1 int32 (the last three one slot less) and one all-gather of W int32,
    then one all-reduce of E int64 for the per-expert loads."""
    monkeypatch.setenv("CAPAWARE_DEVICE_PATH", "1")
    E, W, k, rounds = 8, 2, 2, 2
    ranks = P.expert_rank_map(E, W)
    logs = []
    for sizes, mode in (([40, 24], "skewed"), ([3, 0], "ties"), ([17, 50], "random")):
        scores = synthetic_scores(sum(sizes), E, mode, torch.Generator().manual_seed(sum(sizes)))

        def rank_fn(rank, group):
            part = scores[sum(sizes[:rank]):sum(sizes[:rank + 1])]
            return P.capacity_reroute(part, k, 1.0, rounds=rounds, unit="rank", expert_ranks=ranks, num_ranks=W,
                                      group=group, return_decision=True, check_values=False)

        with collectives.record_collectives() as log:
            run_ranks(rank_fn, W)
        logs.append(list(log.calls))
    assert logs[0] == logs[1] == logs[2]
    selection = [("all_reduce", 4 * (W * 256 + 1), W)] + [("all_reduce", 4 * W * 256, W)] * 3 + \
        [("all_gather", 4 * W, W)]
    expected = [c for c in selection for _ in range(W)] * (1 + rounds) + [("all_reduce", 8 * E, W)] * W
    assert sorted(logs[0]) == sorted(expected)


# ----------------------------------------------------------------------------- bad input


def test_bad_rank_unit_input_is_refused_with_one_line() -> None:
    scores = synthetic_scores(8, 4, "random", torch.Generator().manual_seed(0))
    with pytest.raises(P.RoutingInputError, match="needs expert_ranks"):
        P.capacity_reroute(scores, 2, 1.0, unit="rank")
    with pytest.raises(P.RoutingInputError, match="needs expert_ranks"):
        P.capacity_reroute(scores, 2, 1.0, unit="rank", expert_ranks=P.expert_rank_map(4, 2))
    with pytest.raises(P.RoutingInputError, match=r"expert_ranks must be an integer tensor \[E=4\]"):
        P.capacity_reroute(scores, 2, 1.0, unit="rank", expert_ranks=torch.tensor([0, 1]), num_ranks=2)
    with pytest.raises(P.RoutingInputError, match="expert_ranks must be an integer tensor"):
        P.capacity_reroute(scores, 2, 1.0, unit="rank", expert_ranks=torch.zeros(4), num_ranks=2)
    with pytest.raises(P.RoutingInputError, match="num_ranks an integer >= 1"):
        P.capacity_reroute(scores, 2, 1.0, unit="rank", expert_ranks=P.expert_rank_map(4, 2), num_ranks=2.0)
    with pytest.raises(P.RoutingInputError, match="unit"):
        P.capacity_reroute(scores, 2, 1.0, unit="node")
