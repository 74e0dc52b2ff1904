"""Decode packing: fewer activated experts on the busiest EP rank (issue 24).

At a decode step an expert's GEMM reads its weights whatever its token count,
so an EP rank's expert time follows how many of its experts are *activated*
(receive >= 1 token), and the step waits for the busiest rank. This router
concentrates a step's assignments on experts already activated, and spends
the room left on the other ranks, so the busiest rank activates as few
experts as the per-token quality floor allows.

Semantics (``docs/routers.md``, "decode-pack"), per MoE layer and call, over
the whole EP group (the group's tokens concatenated in rank order):

1. **Floor.** Every token keeps its ``floor`` best experts (the first
   ``floor`` of its top-k, best first). ``A0`` = the experts some token's
   floor uses; ``a0[r]`` = how many of rank ``r``'s experts are in ``A0``.
   No router that keeps the floor can activate fewer than ``max_r a0[r]`` on
   the busiest rank.
2. **Pool.** A token's pool is LASER's: its top-k, then the other experts
   scoring ``>= t_fix x`` its best score, trimmed to the ``pool`` best by
   score (``allowed``, group-limited routing, restricts the experts beyond
   the top-k).
3. **Activation** (``rank_aware=True``). The target is
   ``M = min(max_r a0[r] + slack, max_r a_topk[r])`` (``a_topk``: the
   per-rank activated count under top-k, so the busiest rank never activates
   more experts than under top-k). Rank ``r`` may activate ``M - a0[r]``
   further experts (none on the busiest rank with ``slack=0``): those of its
   experts outside ``A0`` that most tokens would take under top-k (beyond
   their floor), then that most pools hold, then the lower id; an expert in
   nobody's pool is never activated. ``A = A0 + the activated experts``.
   ``rank_aware=False`` is **OEA's rule** (Opportunistic Expert Activation,
   arXiv 2511.02237: top-k0 plus piggybacking on the experts the batch
   already activates, no rank awareness): ``A = A0``.
4. **Fill.** Each token fills its other ``k - floor`` slots with its pool's
   members in ``A`` (outside its floor), best score first; fewer if its pool
   holds fewer. A token never has more than ``k`` experts, and never an
   expert outside ``A``.

So the busiest rank activates at most ``M`` experts (``max_r a0[r]`` with
``slack=0``), never more than under top-k, and OEA's rule at the same floor
activates exactly as many on the busiest rank but fewer on the others: the
rank-aware rule gives the tokens more of their own experts at the same
busiest-rank count. ``floor == k`` is top-k exactly.

Exact and global: one all-reduce of ``3E + 1`` int64 (floor, top-k and pool
counts per expert, tokens), from which every rank derives the same ``A``;
one all-reduce of ``E`` int64 for the global loads the statistics report.
Shapes depend on ``E`` only (never on the data), the same code runs on CPU
and device (no host read), and every step is a fixed-shape tensor op (no
per-token loop). Integer counts make the decision
independent of how the tokens are split over ranks.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from megatron_capaware.policies import common
from megatron_capaware.policies.collectives import ProcessGroup, all_reduce_sum
from megatron_capaware.policies.decision import RoutingDecision
from megatron_capaware.policies.laser import laser_candidates

_COUNT_BITS = 21  # per-expert counts in the activation key saturate at 2**21 - 1 tokens
_COUNT_MAX = (1 << _COUNT_BITS) - 1


def check_decode_args(k: int, num_experts: int, floor: int, t_fix: float, pool: int, slack: int) -> int:
    """Validate the knobs; returns the effective pool size ``min(pool, E)``."""
    if isinstance(floor, bool) or not isinstance(floor, int) or not 1 <= floor <= k:
        raise common.RoutingInputError(
            f"floor={floor!r} must be an integer in [1, k={k}]: each token keeps its `floor` best experts "
            f"(floor == k is top-k)"
        )
    if isinstance(t_fix, bool) or not isinstance(t_fix, (int, float)) or not 0.0 < t_fix <= 1.0:
        raise common.RoutingInputError(
            f"t_fix={t_fix!r} must be in (0, 1]: the pool holds the top-k and the experts scoring at least "
            "t_fix times the token's best score"
        )
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < k:
        raise common.RoutingInputError(
            f"pool={pool!r} must be an integer >= k={k} (the pool always holds the top-k; pool == k: a token "
            "fills its slots only from its own top-k)"
        )
    if isinstance(slack, bool) or not isinstance(slack, int) or slack < 0:
        raise common.RoutingInputError(
            f"slack={slack!r} must be an integer >= 0: how many experts beyond the floor's busiest rank a rank "
            "may activate (0: the floor's busiest-rank count, the fewest the floor allows)"
        )
    return min(pool, num_experts)


def activation_order(key: torch.Tensor, expert_ranks: torch.Tensor) -> torch.Tensor:
    """``[E]`` int64: each expert's place among its own rank's experts, by ``key`` descending (0 = first).

    ``key [E]`` int64, unique; ``expert_ranks [E]``. One ``[E, E]`` comparison
    (E <= 1024): no sort, no host read.
    """
    same = expert_ranks.unsqueeze(0) == expert_ranks.unsqueeze(1)  # [E, E]
    return (same & (key.unsqueeze(0) > key.unsqueeze(1))).sum(dim=1)


def decode_pack(
    scores: torch.Tensor,
    k: int,
    floor: int,
    *,
    t_fix: float = 1.0,
    pool: Optional[int] = None,
    slack: int = 0,
    rank_aware: bool = True,
    expert_ranks: Optional[torch.Tensor] = None,
    num_ranks: Optional[int] = None,
    normalize: bool = False,
    renormalize: bool = False,
    group: Optional[ProcessGroup] = None,
    check_values: bool = True,
    topk_indices: Optional[torch.Tensor] = None,
    weights: bool = True,
    return_decision: bool = False,
    valid_tokens: Optional[torch.Tensor] = None,
    allowed: Optional[torch.Tensor] = None,
) -> Union[Tuple[torch.Tensor, torch.Tensor], RoutingDecision]:
    """The decode-pack router (module docstring; ``rank_aware=False``: OEA's rule).

    Args:
        scores: ``[T, E]`` router probabilities.
        k: the model's top-k; each token takes at most ``k`` experts.
        floor: ``k0`` in ``[1, k]``, the best experts every token keeps.
        t_fix, pool: the pool (LASER's): top-k plus experts scoring
            ``>= t_fix x`` the best, at most ``pool`` (default ``k``) in all.
        slack: rank-aware only: experts a rank may activate beyond the
            floor's busiest-rank count (capped at top-k's busiest rank).
        rank_aware: spend the other ranks' room (True) or OEA's rule (False).
        expert_ranks: ``[E]`` int64, each expert's EP rank (Megatron's
            contiguous layout: :func:`~megatron_capaware.policies.expert_rank_map`;
            a placement's without replicas). None: one rank holds every
            expert (then both rules coincide).
        num_ranks: the EP size (with ``expert_ranks``).
        normalize, renormalize: the model's top-k normalisation (weights
            divided by the original top-k sum), or each token's kept weights
            rescaled to sum to 1.
        group: process group over which the activated set is global.
        topk_indices: optional ``[T, k]`` top-k, best first (the floor is its
            first ``floor`` columns).
        valid_tokens: optional ``[T]`` bool, False = padding (no expert, no count).
        allowed: optional ``[T, E]`` bool: the experts beyond its top-k a
            token may take (group-limited routing).

    Returns:
        ``(probs [T, E], routing_map [T, E] bool)``; ``return_decision``: a
        :class:`RoutingDecision` (``dropped``: top-k assignments not taken,
        ``rerouted``: experts taken outside the top-k, both this rank's).
    """
    common.check_scores(scores, k, check_values=check_values)
    num_tokens, num_experts = scores.shape
    width = check_decode_args(k, num_experts, floor, t_fix, k if pool is None else pool, slack)
    valid_tokens = common.check_valid_tokens(valid_tokens, scores)
    allowed = common.check_allowed(allowed, scores)
    device = scores.device
    if expert_ranks is None:
        expert_ranks = torch.zeros(num_experts, dtype=torch.int64, device=device)
        num_ranks = 1
    else:
        expert_ranks = common.check_expert_ranks(expert_ranks, num_ranks, num_experts, device)

    cand, in_pool, topk_idx, topk_sum = laser_candidates(scores, k, t_fix, width, topk_indices)  # [T, c]
    position = torch.arange(cand.shape[1], device=device)
    if allowed is not None:  # beyond its top-k a token only takes allowed experts
        in_pool = in_pool & ((position < k) | allowed.gather(1, cand))
    if valid_tokens is not None:
        in_pool = in_pool & valid_tokens.unsqueeze(1)
    is_floor = in_pool & (position < floor)  # [T, c]
    is_top = in_pool & (position < k)
    # Per expert: floor users, top-k users, pool holders (outside the floor); then the token count.
    kinds = torch.stack([is_floor, is_top, in_pool & ~is_floor]).to(torch.int64)  # [3, T, c]
    flat = cand.reshape(-1)
    counts = torch.zeros(3 * num_experts, dtype=torch.int64, device=device).index_add_(
        0, (flat.unsqueeze(0) + torch.arange(3, device=device).unsqueeze(1) * num_experts).reshape(-1),
        kinds.reshape(-1))
    counts = all_reduce_sum(torch.cat([counts, common.token_count(num_tokens, device, valid_tokens).reshape(1)]),
                            group)
    floor_count, top_count, pool_count = counts[:-1].view(3, num_experts)
    global_tokens = counts[-1]

    active = floor_count > 0  # A0 [E]
    if rank_aware:
        assert num_ranks is not None  # set with expert_ranks, checked above
        per_rank = torch.zeros(2, num_ranks, dtype=torch.int64, device=device).index_add_(
            1, expert_ranks, torch.stack([active, top_count > 0]).to(torch.int64))
        target = torch.minimum(per_rank[0].max() + slack, per_rank[1].max())
        room = (target - per_rank[0]).clamp_min(0)  # [W]
        demand = (top_count - floor_count).clamp(0, _COUNT_MAX)
        key = (demand << 31) | (pool_count.clamp(0, _COUNT_MAX) << 10) | (
            1023 - torch.arange(num_experts, device=device))
        candidate = ~active & (pool_count > 0)
        key = torch.where(candidate, key, torch.full_like(key, -1))
        active = active | (candidate & (activation_order(key, expert_ranks) < room[expert_ranks]))

    # Fill: the first k - floor pool members in A beyond the floor, by position (= score order).
    open_slot = in_pool & (position >= floor) & active[cand]
    take = open_slot & (torch.cumsum(open_slot.to(torch.int32), dim=1) <= k - floor)
    chosen = is_floor | take  # [T, c]
    target_ids = torch.where(chosen, cand, torch.full_like(cand, num_experts))
    routing_map = torch.zeros((num_tokens, num_experts + 1), dtype=torch.bool, device=device).scatter_(
        1, target_ids, True)[:, :num_experts]

    dropped = (is_top & ~chosen).sum()
    added = (chosen & (position >= k)).sum()
    loads = all_reduce_sum(routing_map.sum(dim=0).to(torch.int64), group)
    probs = None
    if weights:
        probs = common.weights_for(scores, routing_map, topk_sum, normalize=normalize, renormalize=renormalize)
    decision = RoutingDecision(
        probs=probs,
        routing_map=routing_map,
        global_loads=loads,
        requested_assignments=global_tokens * k,
        dropped=dropped,
        rerouted=added,
        global_tokens=global_tokens,
    )
    return decision if return_decision else decision.as_tuple()
