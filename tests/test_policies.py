"""Routing policies: docs/routers.md invariants, and fast == reference on many cases."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_capaware import policies as P
from megatron_capaware.policies import common
from megatron_capaware.policies import reference as R
from tests.helpers.policy_cases import Case, make_scores, random_cases

CASES = list(random_cases(240, seed=11))


def assert_same(fast, ref, case: Case, what: str) -> None:
    probs, routing_map = fast
    ref_probs, ref_map = ref
    assert torch.equal(routing_map, ref_map), f"{what}: routing maps differ for {case.shape}"
    assert torch.allclose(probs, ref_probs, rtol=1e-6, atol=1e-7), f"{what}: weights differ for {case.shape}"


def assert_well_formed(probs: torch.Tensor, routing_map: torch.Tensor, scores: torch.Tensor) -> None:
    assert probs.shape == scores.shape and routing_map.shape == scores.shape
    assert routing_map.dtype == torch.bool
    assert torch.all(probs[~routing_map] == 0), "weights must be zero off the routing map"
    assert torch.all(probs >= 0)


def max_load(routing_map: torch.Tensor, dim: int = 0) -> int:
    sums = routing_map.sum(dim)
    return int(sums.max()) if sums.numel() else 0


def capacity_of(case: Case) -> int:
    T, E = case.scores.shape
    return common.capacity_from_total(case.gamma, T * case.k, E)


@pytest.mark.parametrize("policy", ["score", "weight", "position", "random"])
def test_drop_matches_reference_and_respects_capacity(policy: str) -> None:
    for case in CASES:
        fast = P.capacity_drop(case.scores, case.k, case.gamma, policy=policy, normalize=case.normalize, seed=7)
        ref = R.capacity_drop(case.scores, case.k, case.gamma, policy=policy, normalize=case.normalize, seed=7)
        assert_same(fast, ref, case, f"capacity_drop[{policy}]")
        probs, routing_map = fast
        assert_well_formed(probs, routing_map, case.scores)
        assert max_load(routing_map) <= capacity_of(case), case.shape
        assert max_load(routing_map, 1) <= case.k
        # Drops are a subset of the top-k, with the top-k's own weights.
        top_probs, top_map = P.topk(case.scores, case.k, normalize=case.normalize)
        assert not torch.any(routing_map & ~top_map)
        assert torch.equal(probs[routing_map], top_probs[routing_map])


def test_drop_by_score_keeps_the_highest_scores() -> None:
    for case in CASES:
        _, routing_map = P.capacity_drop(case.scores, case.k, case.gamma)
        _, top_map = P.topk(case.scores, case.k)
        dropped = top_map & ~routing_map
        for e in range(case.scores.shape[1]):
            kept_scores = case.scores[routing_map[:, e], e]
            dropped_scores = case.scores[dropped[:, e], e]
            if kept_scores.numel() and dropped_scores.numel():
                assert float(kept_scores.min()) >= float(dropped_scores.max()), case.shape


def test_weight_drop_keeps_first_choices_before_any_second_choice() -> None:
    """k = 2, policy weight: an expert drops a token's first choice only once it has
    dropped every second choice offered to it (first choices carry >= half the mass)."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(400, 8, generator=gen) * 2 + torch.linspace(2, 0, 8)  # skewed to low ids
    scores = logits.softmax(-1)
    top = scores.topk(2, dim=1).indices
    _, kept = P.capacity_drop(scores, 2, 1.0, policy="weight")
    _, kept_by_score = P.capacity_drop(scores, 2, 1.0, policy="score")
    first_kept, second_kept = kept.gather(1, top).unbind(1)
    crossings = 0
    for e in range(8):
        first_lost = ((top[:, 0] == e) & ~first_kept).any()
        second_won = ((top[:, 1] == e) & second_kept).any()
        assert not (first_lost and second_won), f"expert {e} kept a second choice over a first choice"
        crossings += int(((top[:, 0] == e) & ~kept_by_score.gather(1, top)[:, 0]).any()
                         and ((top[:, 1] == e) & kept_by_score.gather(1, top)[:, 1]).any())
    assert crossings > 0, "the case should make score-priority keep a second choice over a first one"


@pytest.mark.parametrize("policy", ["score", "load"])
@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_reroute_matches_reference_and_respects_capacity(policy: str, rounds: int) -> None:
    for i, case in enumerate(CASES):
        min_ratio = (0.0, 0.2, 0.6)[i % 3]
        kwargs = dict(rounds=rounds, policy=policy, normalize=case.normalize, min_ratio=min_ratio)
        fast = P.capacity_reroute(case.scores, case.k, case.gamma, **kwargs)
        ref = R.capacity_reroute(case.scores, case.k, case.gamma, **kwargs)
        assert_same(fast, ref, case, f"capacity_reroute[{policy}, rounds={rounds}]")
        probs, routing_map = fast
        assert_well_formed(probs, routing_map, case.scores)
        assert max_load(routing_map) <= capacity_of(case), case.shape
        assert max_load(routing_map, 1) <= case.k
        # Rerouting only adds assignments to what the plain drop kept.
        _, drop_map = P.capacity_drop(case.scores, case.k, case.gamma)
        assert not torch.any(drop_map & ~routing_map)


def test_reroute_serves_no_fewer_assignments_than_drop() -> None:
    for case in CASES:
        _, drop_map = P.capacity_drop(case.scores, case.k, case.gamma)
        _, rr_map = P.capacity_reroute(case.scores, case.k, case.gamma, rounds=2)
        assert int(rr_map.sum()) >= int(drop_map.sum())


def test_reroute_guard_refuses_irrelevant_experts() -> None:
    # Two experts hold all the mass; the others are near zero: with a guard,
    # dropped assignments are not moved onto near-irrelevant experts.
    scores = torch.softmax(torch.tensor([[8.0, 7.9, 0.0, 0.0, 0.0, 0.0]] * 12), dim=-1)
    _, unguarded = P.capacity_reroute(scores, 2, 1.0, rounds=2)
    _, guarded = P.capacity_reroute(scores, 2, 1.0, rounds=2, min_ratio=0.5)
    assert int(unguarded[:, 2:].sum()) > 0
    assert int(guarded[:, 2:].sum()) == 0


def test_expanded_drop_matches_reference() -> None:
    for case in CASES:
        E = case.scores.shape[1]
        local = list(range(0, E, 2))
        fast = P.expanded_drop(case.scores, case.k, case.gamma, local, normalize=case.normalize)
        ref = R.expanded_drop(case.scores, case.k, case.gamma, [local], [case.scores.shape[0]], normalize=case.normalize)
        assert_same(fast, ref, case, "expanded_drop")
        probs, routing_map = fast
        assert_well_formed(probs, routing_map, case.scores)
        assert max_load(routing_map) <= capacity_of(case)
        # Only the top-k or this rank's local experts are ever used.
        _, top_map = P.topk(case.scores, case.k)
        allowed = top_map.clone()
        allowed[:, local] = True
        assert not torch.any(routing_map & ~allowed)


@pytest.mark.parametrize("waves,rounds", [(1, 0), (1, 2), (3, 1), (8, 1), (5, 3)])
def test_laser_fast_matches_its_loop_reference(waves: int, rounds: int) -> None:
    for i, case in enumerate(CASES):
        E = case.scores.shape[1]
        pool = case.k + (i % (E - case.k + 2))
        eps_high = (0.0, 0.5, 0.8, 1.01)[i % 4]
        kwargs = dict(normalize=case.normalize)
        fast = P.laser(case.scores, case.k, eps_high, 0.3, pool, waves=waves, rounds=rounds, **kwargs)
        ref = R.laser_waves(case.scores, case.k, eps_high, 0.3, pool, waves=waves, rounds=rounds, **kwargs)
        assert_same(fast, ref, case, f"laser[waves={waves}, rounds={rounds}]")
        probs, routing_map = fast
        assert_well_formed(probs, routing_map, case.scores)
        assert torch.all(routing_map.sum(1) == case.k), "LASER gives every token exactly k experts"


def test_laser_with_one_token_per_wave_is_the_exact_greedy() -> None:
    for i, case in enumerate(CASES):
        E = case.scores.shape[1]
        pool = case.k + (i % (E - case.k + 2))
        fast = P.laser(case.scores, case.k, 0.9, 0.2, pool, waves=max(case.scores.shape[0], 1), rounds=0)
        ref = R.laser_greedy(case.scores, case.k, 0.9, 0.2, pool)
        assert_same(fast, ref, case, "laser exact")


def _rank_maps(E: int, i: int):
    """Expert -> EP rank maps for load=rank: Megatron's contiguous layout, and a shuffled (placed) one."""
    ranks = next(r for r in (2, 3, 1) if E % r == 0)
    contiguous = P.expert_rank_map(E, ranks)
    placed = contiguous[torch.randperm(E, generator=torch.Generator().manual_seed(i))]
    return ranks, (contiguous, placed)


@pytest.mark.parametrize("waves,rounds", [(1, 0), (3, 1), (8, 1), (5, 3)])
def test_laser_load_rank_matches_its_loop_reference(waves: int, rounds: int) -> None:
    for i, case in enumerate(CASES[::2]):
        E = case.scores.shape[1]
        pool = case.k + (i % (E - case.k + 2))
        eps_high = (0.5, 0.8, 1.01)[i % 3]
        num_ranks, maps = _rank_maps(E, i)
        for expert_ranks in maps:
            fast = P.laser(case.scores, case.k, eps_high, 0.3, pool, waves=waves, rounds=rounds,
                           normalize=case.normalize, load="rank", expert_ranks=expert_ranks, num_ranks=num_ranks)
            ref = R.laser_waves(case.scores, case.k, eps_high, 0.3, pool, waves=waves, rounds=rounds,
                                normalize=case.normalize, expert_ranks=expert_ranks.tolist())
            assert_same(fast, ref, case, f"laser load=rank [waves={waves}, rounds={rounds}]")
            assert torch.all(fast[1].sum(1) == case.k)


def test_laser_load_rank_with_one_token_per_wave_is_the_exact_rank_greedy() -> None:
    for i, case in enumerate(CASES[::2]):
        E = case.scores.shape[1]
        pool = case.k + (i % (E - case.k + 2))
        num_ranks, maps = _rank_maps(E, i)
        for expert_ranks in maps:
            fast = P.laser(case.scores, case.k, 0.9, 0.2, pool, waves=max(case.scores.shape[0], 1), rounds=0,
                           load="rank", expert_ranks=expert_ranks, num_ranks=num_ranks)
            ref = R.laser_greedy(case.scores, case.k, 0.9, 0.2, pool, expert_ranks=expert_ranks.tolist())
            assert_same(fast, ref, case, "laser load=rank exact")


def test_laser_load_rank_with_one_expert_per_rank_is_load_expert() -> None:
    for i, case in enumerate(CASES[::3]):
        E = case.scores.shape[1]
        pool = case.k + (i % (E - case.k + 2))
        shuffled = torch.randperm(E, generator=torch.Generator().manual_seed(i))  # E == EP, any placement
        for rounds in (0, 1, 2):
            base = P.laser(case.scores, case.k, 0.8, 0.3, pool, waves=4, rounds=rounds)
            by_rank = P.laser(case.scores, case.k, 0.8, 0.3, pool, waves=4, rounds=rounds, load="rank",
                              expert_ranks=shuffled, num_ranks=E)
            assert_same(by_rank, base, case, "E == EP")


def test_laser_load_rank_prefers_the_lighter_rank() -> None:
    """Expert 1 is the least loaded expert but sits on the busy rank 0 (experts 0, 1); rank 1
    (experts 2, 3) is lighter: load=expert picks expert 1, load=rank picks expert 2."""
    confident = torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 6)  # 6 tokens on expert 0 (rank 0)
    busy_rank1 = torch.tensor([[0.01, 0.01, 0.01, 0.97]] * 4)  # 4 on expert 3 (rank 1)
    flexible = torch.tensor([[0.30, 0.26, 0.24, 0.20]])  # top-1 expert 0; pool {0, 1, 2}
    scores = torch.cat([confident, busy_rank1, flexible])
    kwargs = dict(waves=1, rounds=0)
    by_expert = P.laser(scores, 1, 0.9, 0.7, 3, **kwargs)[1]
    by_rank = P.laser(scores, 1, 0.9, 0.7, 3, load="rank", expert_ranks=P.expert_rank_map(4, 2), num_ranks=2,
                      **kwargs)[1]
    assert by_expert[-1].nonzero().flatten().tolist() == [1]
    assert by_rank[-1].nonzero().flatten().tolist() == [2]


def test_laser_load_rank_needs_the_rank_map() -> None:
    scores = torch.softmax(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), -1)
    with pytest.raises(common.RoutingInputError, match="expert_ranks"):
        P.laser(scores, 1, 0.9, 0.5, 2, load="rank")
    with pytest.raises(common.RoutingInputError, match="expert_ranks must be an integer tensor"):
        P.laser(scores, 1, 0.9, 0.5, 2, load="rank", expert_ranks=torch.zeros(3, dtype=torch.int64), num_ranks=2)
    with pytest.raises(common.RoutingInputError, match="load="):
        P.laser(scores, 1, 0.9, 0.5, 2, load="token")


def test_capped_water_fill_matches_unit_by_unit_filling() -> None:
    from megatron_capaware.policies.laser import capped_water_fill

    g = torch.Generator().manual_seed(4)
    for _ in range(400):
        E = int(torch.randint(1, 10, (1,), generator=g))
        loads = torch.randint(0, 12, (E,), generator=g)
        demand = torch.randint(0, 6, (E,), generator=g)
        units = int(torch.randint(0, 40, (1,), generator=g))
        fast = capped_water_fill(loads, demand, torch.tensor(units))
        assert fast.tolist() == R.water_fill(loads.tolist(), demand.tolist(), units)


def test_gamma_infinity_and_huge_equal_topk() -> None:
    for case in CASES:
        expected = P.topk(case.scores, case.k, normalize=case.normalize)
        for gamma in (math.inf, 1e9):
            for result in (
                P.capacity_drop(case.scores, case.k, gamma, normalize=case.normalize),
                P.capacity_reroute(case.scores, case.k, gamma, normalize=case.normalize, rounds=2),
            ):
                assert torch.equal(result[1], expected[1]) and torch.equal(result[0], expected[0])


def test_laser_pool_k_or_eps_zero_equals_topk() -> None:
    for case in CASES:
        expected = P.topk(case.scores, case.k, normalize=case.normalize)
        E = case.scores.shape[1]
        for eps, pool in ((0.9, case.k), (0.0, E)):
            got = P.laser(case.scores, case.k, eps, 0.1, pool, normalize=case.normalize)
            assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])


def test_normalize_keeps_vanilla_weights_and_never_inflates() -> None:
    scores = make_scores(64, 8, "skewed", torch.Generator().manual_seed(3))
    top_probs, _ = P.topk(scores, 2, normalize=True)
    probs, routing_map = P.capacity_drop(scores, 2, 0.5, normalize=True)
    assert torch.equal(probs[routing_map], top_probs[routing_map])
    assert torch.all(probs.sum(1) <= 1 + 1e-6)
    renorm, renorm_map = P.capacity_drop(scores, 2, 0.5, normalize=True, renormalize=True)
    survivors = renorm_map.any(1)
    assert torch.allclose(renorm.sum(1)[survivors], torch.ones(int(survivors.sum())))


def test_k_equals_E_and_single_token() -> None:
    g = torch.Generator().manual_seed(5)
    scores = make_scores(7, 4, "random", g)
    probs, routing_map = P.capacity_drop(scores, 4, 1.0)
    assert max_load(routing_map) <= math.ceil(7 * 4 / 4)
    one = make_scores(1, 8, "random", g)
    for result in (
        P.capacity_drop(one, 2, 1.0),
        P.capacity_reroute(one, 2, 1.0),
        P.laser(one, 2, 0.99, 0.1, 4),
    ):
        # Capacity is at least 1, so a lone token (decode step) keeps its experts.
        assert int(result[1].sum()) == 2


def test_empty_batch_is_valid() -> None:
    scores = torch.empty(0, 8)
    for probs, routing_map in (
        P.topk(scores, 2),
        P.capacity_drop(scores, 2, 1.0),
        P.capacity_reroute(scores, 2, 1.0, rounds=2),
        P.expanded_drop(scores, 2, 1.0, [0, 1]),
        P.laser(scores, 2, 0.5, 0.5, 4),
    ):
        assert probs.shape == (0, 8) and routing_map.shape == (0, 8)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda s: P.capacity_drop(s, 2, 0.0), "gamma"),
        (lambda s: P.capacity_drop(s, 2, -1.0), "gamma"),
        (lambda s: P.capacity_drop(s, 2, float("nan")), "gamma"),
        (lambda s: P.capacity_drop(s, 9, 1.0), "k=9"),
        (lambda s: P.capacity_drop(s, 0, 1.0), "k=0"),
        (lambda s: P.capacity_drop(s, 2, 1.0, policy="lowest"), "policy"),
        (lambda s: P.capacity_reroute(s, 2, 1.0, policy="far"), "policy"),
        (lambda s: P.capacity_reroute(s, 2, 1.0, rounds=-1), "rounds"),
        (lambda s: P.capacity_reroute(s, 2, 1.0, min_ratio=-0.1), "min_ratio"),
        (lambda s: P.laser(s, 2, 0.5, 0.5, 1), "pool=1 is smaller than k=2"),
        (lambda s: P.laser(s, 2, 0.5, 0.0, 4), "t_fix"),
        (lambda s: P.laser(s, 2, 0.5, 1.5, 4), "t_fix"),
        (lambda s: P.laser(s, 2, -0.1, 0.5, 4), "eps_high"),
        (lambda s: P.expanded_drop(s, 2, 1.0, None), "local_experts"),
        (lambda s: P.expanded_drop(s, 2, 1.0, [0, 8]), "local_experts"),
        (lambda s: P.topk(s[0], 2), "2-D"),
        (lambda s: P.topk(s.long(), 2), "floating point"),
    ],
)
def test_bad_input_gets_a_clear_error(call, message: str) -> None:
    scores = make_scores(6, 8, "random", torch.Generator().manual_seed(0))
    with pytest.raises(P.RoutingInputError, match=message):
        call(scores)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_non_finite_or_negative_scores_are_rejected(bad: float) -> None:
    scores = make_scores(6, 8, "random", torch.Generator().manual_seed(0))
    scores[3, 5] = bad
    for call in (
        lambda: P.topk(scores, 2),
        lambda: P.capacity_drop(scores, 2, 1.0),
        lambda: P.capacity_reroute(scores, 2, 1.0),
        lambda: P.expanded_drop(scores, 2, 1.0, [0]),
        lambda: P.laser(scores, 2, 0.5, 0.5, 4),
    ):
        with pytest.raises(P.RoutingInputError, match="NaN or Inf|>= 0"):
            call()


def test_decisions_report_loads_drops_and_reroutes() -> None:
    scores = make_scores(200, 8, "skewed", torch.Generator().manual_seed(9))
    drop = P.capacity_drop(scores, 2, 1.0, return_decision=True)
    assert torch.equal(drop.global_loads, drop.routing_map.sum(0))
    assert int(drop.dropped) == 400 - int(drop.routing_map.sum())
    assert int(drop.capacity) == 50 and int(drop.global_tokens) == 200
    rr = P.capacity_reroute(scores, 2, 1.0, rounds=2, return_decision=True)
    assert torch.equal(rr.global_loads, rr.routing_map.sum(0))
    assert int(rr.rerouted) + int(rr.dropped) == int(drop.dropped)
    las = P.laser(scores, 2, 0.9, 0.3, 4, return_decision=True)
    assert torch.equal(las.global_loads, las.routing_map.sum(0))


def test_sync_free_path_used_on_cuda_matches_the_reference(monkeypatch) -> None:
    """The CUDA code path (fixed work, no host sync) gives the same decisions."""
    monkeypatch.setenv("CAPAWARE_DEVICE_PATH", "1")
    for case in CASES[::3]:
        E = case.scores.shape[1]
        for fast, ref in (
            (P.capacity_drop(case.scores, case.k, case.gamma, normalize=case.normalize),
             R.capacity_drop(case.scores, case.k, case.gamma, normalize=case.normalize)),
            (P.capacity_reroute(case.scores, case.k, case.gamma, rounds=2, policy="load"),
             R.capacity_reroute(case.scores, case.k, case.gamma, rounds=2, policy="load")),
            (P.expanded_drop(case.scores, case.k, case.gamma, list(range(0, E, 2))),
             R.expanded_drop(case.scores, case.k, case.gamma, [list(range(0, E, 2))], [case.scores.shape[0]])),
        ):
            assert_same(fast, ref, case, "sync-free path")


@pytest.mark.parametrize("fast_or_ref", ["fast", "reference"])
def test_reroute_guard_with_load_policy_tries_the_eligible_experts(fast_or_ref: str) -> None:
    """Issue 12, item 6: with policy=load and min_ratio > 0, token 2's least-loaded
    candidates (experts 2, 3: spare 2, score 0.05) fail the guard (0.05 < 0.5 * 0.5);
    expert 1 (spare 1, score 0.4) passes it. The slot used to try only the least-loaded
    candidate and stay dropped; it must go to the least-loaded candidate that passes."""
    scores = torch.tensor([
        [0.90, 0.05, 0.03, 0.02],
        [0.80, 0.10, 0.05, 0.05],
        [0.50, 0.40, 0.05, 0.05],  # dropped by expert 0 (C = 2)
        [0.10, 0.80, 0.05, 0.05],  # loads expert 1 once
    ])
    fn = P.capacity_reroute if fast_or_ref == "fast" else R.capacity_reroute
    for mode in ("0", "1"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(common.DEVICE_PATH_ENV, mode)
            _, routing_map = fn(scores, 1, 2.0, rounds=1, policy="load", min_ratio=0.5)
        assert routing_map[2].tolist() == [False, True, False, False], (fast_or_ref, mode)
        assert routing_map.sum(0).tolist() == [2, 2, 0, 0]


def test_reroute_guard_leaves_a_weak_expert_to_a_later_slot() -> None:
    """A slot whose guard an expert fails leaves that expert to the token's next
    (lower-scoring, so more lenient) dropped slot instead of wasting it."""
    # Token 0 loses both experts 0 and 1 to tokens 1-4; expert 2 scores 0.2:
    # below 0.5 * 0.45 (slot 1) but above 0.5 * 0.35 (slot 2).
    scores = torch.tensor([[0.45, 0.35, 0.20, 0.0]] + [[0.5, 0.5, 0.0, 0.0]] * 4)
    for fn in (P.capacity_reroute, R.capacity_reroute):
        for policy in ("score", "load"):
            _, routing_map = fn(scores, 2, 1.0, rounds=1, policy=policy, min_ratio=0.5)
            assert routing_map[0].tolist() == [False, False, True, False], (fn, policy)


def _with_padding(scores: torch.Tensor, positions, gen: torch.Generator):
    """Uniform padding rows inserted at ``positions`` (their score 1/E beats a peaked
    real token's second choice); returns (padded scores, valid_tokens)."""
    num_tokens, num_experts = scores.shape
    total = num_tokens + len(positions)
    valid = torch.ones(total, dtype=torch.bool)
    valid[list(positions)] = False
    padded = torch.full((total, num_experts), 1.0 / num_experts)
    padded[valid] = scores
    return padded, valid


@pytest.mark.parametrize("name", ["drop", "drop_random", "reroute", "expanded", "laser"])
def test_padding_tokens_take_no_expert_and_no_capacity(name: str) -> None:
    """Issue 12, item 7: padding tokens route nowhere, take no capacity and are not in
    T_glob: the real tokens are routed exactly as without the padding."""
    gen = torch.Generator().manual_seed(21)
    logits = torch.randn(40, 8, generator=gen) * 3
    real = torch.softmax(logits, -1)
    padded, valid = _with_padding(real, [0, 1, 2, 3, 17, 18, 30, 31, 32, 43], gen)
    k = 2
    local = [0, 1, 2]
    calls = {
        "drop": lambda s, **kw: P.capacity_drop(s, k, 1.0, return_decision=True, **kw),
        "drop_random": lambda s, **kw: P.capacity_drop(s, k, 1.0, policy="random", seed=3, return_decision=True, **kw),
        "reroute": lambda s, **kw: P.capacity_reroute(s, k, 1.0, rounds=2, return_decision=True, **kw),
        "expanded": lambda s, **kw: P.expanded_drop(s, k, 1.0, local, return_decision=True, **kw),
        "laser": lambda s, **kw: P.laser(s, k, 0.9, 0.3, 4, return_decision=True, **kw),
    }
    alone = calls[name](real)
    for mode in ("0", "1"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(common.DEVICE_PATH_ENV, mode)
            got = calls[name](padded, valid_tokens=valid)
            ignored = calls[name](padded)
        assert not torch.any(got.routing_map[~valid]) and torch.all(got.probs[~valid] == 0)
        assert torch.equal(got.routing_map[valid], alone.routing_map), f"{name}: real tokens routed differently"
        assert torch.equal(got.probs[valid], alone.probs)
        assert int(got.global_tokens) == 40 and torch.equal(got.global_loads, alone.global_loads)
        assert int(got.dropped) == int(alone.dropped) and int(got.rerouted) == int(alone.rerouted)
        if got.capacity is not None:
            assert int(got.capacity) == int(alone.capacity) == common.capacity_from_total(1.0, 40 * k, 8)
        if name != "laser":  # the case is one where padding would take capacity from real tokens
            assert not torch.equal(ignored.routing_map[valid], alone.routing_map), f"{name}: the case tests nothing"


def test_group_limited_reroute_and_expanded_stay_in_the_selected_groups() -> None:
    """Issue 12, item 5: 64 tokens, 16 experts in 4 groups, group_topk 1. Top-k spans one
    group per token; capacity-reroute and expanded-drop used to move tokens to other groups."""
    gen = torch.Generator().manual_seed(5)
    scores = torch.softmax(torch.randn(64, 16, generator=gen) * 2 + torch.linspace(2, 0, 16), -1)
    k, groups = 2, 4
    allowed = P.group_limited_mask(scores, k, groups, 1)
    indices = torch.topk(scores.masked_fill(~allowed, float("-inf")), k, dim=1).indices  # Megatron's selection
    local = list(range(0, 16, 3))

    def spans(routing_map: torch.Tensor) -> torch.Tensor:
        return routing_map.view(64, groups, -1).any(2).sum(1)

    _, top_map = P.topk(scores, k, topk_indices=indices)
    assert torch.all(spans(top_map) == 1)
    for mode in ("0", "1"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(common.DEVICE_PATH_ENV, mode)
            for policy in ("score", "load"):
                kw = dict(rounds=2, policy=policy, topk_indices=indices)
                free = P.capacity_reroute(scores, k, 1.0, **kw)[1]
                fast = P.capacity_reroute(scores, k, 1.0, allowed=allowed, **kw)
                ref = R.capacity_reroute(scores, k, 1.0, allowed=allowed, **kw)
                assert int((spans(free) > 1).sum()) > 0, "without the mask reroute leaves the groups"
                assert not torch.any(fast[1] & ~allowed) and torch.equal(fast[1], ref[1])
                assert torch.allclose(fast[0], ref[0])
                assert int(fast[1].sum()) > int(P.capacity_drop(scores, k, 1.0, topk_indices=indices)[1].sum())
            free = P.expanded_drop(scores, k, 1.0, local, topk_indices=indices)[1]
            fast = P.expanded_drop(scores, k, 1.0, local, topk_indices=indices, allowed=allowed)
            ref = R.expanded_drop(scores, k, 1.0, [local], [64], topk_indices=indices, allowed=allowed)
            assert int((spans(free) > 1).sum()) > 0
            assert not torch.any(fast[1] & ~allowed) and torch.equal(fast[1], ref[1])
            assert torch.allclose(fast[0], ref[0])


def test_group_limited_mask_is_megatrons_group_selection() -> None:
    from megatron.core.transformer.moe.moe_utils import group_limited_topk

    gen = torch.Generator().manual_seed(2)
    for num_groups, group_topk, k in ((4, 1, 2), (4, 2, 4), (8, 3, 6), (2, 2, 1)):
        scores = torch.softmax(torch.randn(50, 16, generator=gen), -1)
        _, megatron_idx = group_limited_topk(scores, k, 50, 16, num_groups, group_topk)
        allowed = P.group_limited_mask(scores, k, num_groups, group_topk)
        assert torch.all(allowed.view(50, num_groups, -1).any(2).sum(1) == group_topk)
        assert torch.all(allowed.gather(1, megatron_idx)), "Megatron's top-k lies outside the groups"
        ours = torch.topk(scores.masked_fill(~allowed, float("-inf")), k, dim=1).indices
        assert torch.equal(ours, megatron_idx)


def test_masks_are_checked() -> None:
    scores = make_scores(6, 8, "random", torch.Generator().manual_seed(0))
    with pytest.raises(P.RoutingInputError, match="valid_tokens"):
        P.capacity_drop(scores, 2, 1.0, valid_tokens=torch.ones(5, dtype=torch.bool))
    with pytest.raises(P.RoutingInputError, match="valid_tokens"):
        P.laser(scores, 2, 0.5, 0.5, 4, valid_tokens=torch.ones(6))
    with pytest.raises(P.RoutingInputError, match="allowed"):
        P.capacity_reroute(scores, 2, 1.0, allowed=torch.ones(6, 7, dtype=torch.bool))
    with pytest.raises(P.RoutingInputError, match="num_groups"):
        P.group_limited_mask(scores, 2, 3, 1)


def test_local_experts_tensor_is_checked_once_and_again_after_a_change() -> None:
    scores = make_scores(6, 8, "random", torch.Generator().manual_seed(0))
    ids = P.local_experts_tensor([0, 3], 8, scores.device)
    assert P.local_experts_tensor(ids, 8, scores.device) is ids
    assert P.local_experts_tensor(ids, 9, scores.device) is not ids  # another E: checked again
    assert torch.equal(P.expanded_drop(scores, 2, 1.0, ids)[1], P.expanded_drop(scores, 2, 1.0, [0, 3])[1])
    ids[1] = 8  # changed in place: no longer the checked tensor
    with pytest.raises(P.RoutingInputError, match="local_experts"):
        P.expanded_drop(scores, 2, 1.0, ids)
    plain = torch.tensor([0, 3])
    P.expanded_drop(scores, 2, 1.0, plain)
    assert not hasattr(plain, "_capaware_local_experts_checked"), "the caller's tensor must not be marked"
    with pytest.raises(P.RoutingInputError, match="duplicates"):
        P.expanded_drop(scores, 2, 1.0, torch.tensor([1, 1]))
