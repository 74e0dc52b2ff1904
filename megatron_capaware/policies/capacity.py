"""Capacity-Aware Token Drop, Token Reroute and Expanded Drop (vectorised).

Pure torch: no Megatron import, CPU and GPU alike, no per-token Python loop
and, on the device path, no host synchronisation (every shape is fixed by
``T``, ``k``, ``E``; masks replace data-dependent indexing; the optional
score check, ``check_values=True``, reads one flag pair per call). Semantics are
those of ``docs/routers.md``; :mod:`megatron_capaware.policies.reference`
holds the loop implementations they are tested against.

Tensor shapes: ``T`` local tokens, ``E`` experts, ``k`` top-k.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from megatron_capaware.policies import common
from megatron_capaware.policies.collectives import ProcessGroup, all_reduce_sum
from megatron_capaware.policies.decision import RoutingDecision
from megatron_capaware.policies.selection import select_top_per_expert



_M32 = 0xFFFFFFFF


def hash_uniform(index: torch.Tensor, seed: int) -> torch.Tensor:
    """Deterministic uniform floats in ``[0, 1)`` from int64 indices (no RNG state).

    A 32-bit integer hash (multiply / xor-shift; every product < 2^63 so int64
    arithmetic never overflows; the index's high 32 bits are folded in), so
    the "random" drop policy gives every (global token, expert) pair the same
    key whatever the EP split, on CPU and GPU alike.
    """
    low, high = index & _M32, (index >> 32) & _M32
    x = ((low * 0x27D4EB2F) & _M32) + ((high * 0x165667B1) & _M32)
    x = (x + ((int(seed) & _M32) * 0x3C6EF372 & _M32)) & _M32
    x = ((x ^ (x >> 16)) * 0x045D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x045D9F3B) & _M32
    x = x ^ (x >> 16)
    return (x >> 8).to(torch.float32) / float(1 << 24)


def _selected(
    scores: torch.Tensor, k: int, topk_indices: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The baseline choice ``(indices [T, k], their scores [T, k])``."""
    if topk_indices is None:
        values, indices = common.topk_indices(scores, k)
        return indices, values
    if topk_indices.shape != (scores.shape[0], k):
        raise common.RoutingInputError(
            f"topk_indices must be [T={scores.shape[0]}, k={k}], got {tuple(topk_indices.shape)}"
        )
    indices = topk_indices.to(torch.int64)
    return indices, scores.gather(1, indices)


def _drop_priority(
    policy: str,
    values: torch.Tensor,
    indices: torch.Tensor,
    num_experts: int,
    seed: int,
    group: Optional[ProcessGroup],
    valid_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Priority of each top-k assignment ``[T*k]`` under a drop policy.

    ``random`` hashes the global index of the token among the real tokens
    (padding tokens have none), so padding changes no real token's key.
    """
    if policy == "score":
        return values.reshape(-1)
    if policy == "weight":
        return normalized_weights(values).reshape(-1)
    if policy == "position":
        # Equal priorities: ties break by (rank, token order) = earliest tokens first.
        return torch.zeros(values.numel(), dtype=torch.float32, device=values.device)
    num_tokens, k = indices.shape
    offset, _ = common.local_token_offset(num_tokens, values.device, group, valid_tokens)
    if valid_tokens is None:
        local_index = torch.arange(num_tokens, device=values.device)
    else:
        local_index = torch.cumsum(valid_tokens.to(torch.int64), 0) - 1
    token = local_index.unsqueeze(1) + offset
    return hash_uniform((token * num_experts + indices).reshape(-1), seed)


def normalized_weights(values: torch.Tensor) -> torch.Tensor:
    """``[T, k]`` float32: each top-k score over its row's top-k sum (0 where that sum is 0).

    The share of the token's MoE output the assignment carries under top-k
    normalisation (Mixtral, OLMoE, Qwen with ``norm_topk_prob``): for ``k = 2``
    a token's first choice always outranks any second choice, and a flat
    token's first choice outranks a confident token's second. Divided in
    float64 over a left-to-right sum (as the reference) so rounding cannot
    depend on the batch.
    """
    mass = common.topk_mass(values).unsqueeze(1)
    share = torch.where(mass > 0, values.double() / mass.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    return share.to(torch.float32)


def expert_rank_map(num_experts: int, num_ranks: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """``[E]`` int64: Megatron's contiguous layout, expert ``e`` on rank ``e // (E / W)``."""
    if num_ranks < 1 or num_experts % num_ranks:
        raise common.RoutingInputError(f"{num_ranks} EP ranks do not divide {num_experts} experts")
    return torch.arange(num_experts, device=device) // (num_experts // num_ranks)


def _token_capacity(gamma: float, k: int, num_experts: int):
    """The selection's capacity rule: ``C = ceil(gamma * T_glob * k / E)`` from the global token count."""

    def capacity(offered: torch.Tensor, global_tokens: torch.Tensor) -> torch.Tensor:
        return common.capacity_tensor(gamma, global_tokens * k, num_experts)

    # Where the token count is a host int (one process, no padding) the same float64 rule on the host.
    capacity.from_count = lambda tokens: common.capacity_from_total(  # type: ignore[attr-defined]
        gamma, tokens * k, num_experts)
    return capacity


def capacity_drop(
    scores: torch.Tensor,
    k: int,
    gamma: float,
    *,
    policy: str = "score",
    normalize: bool = False,
    renormalize: bool = False,
    group: Optional[ProcessGroup] = None,
    seed: int = 0,
    topk_indices: Optional[torch.Tensor] = None,
    check_values: bool = True,
    weights: bool = True,
    return_decision: bool = False,
    valid_tokens: Optional[torch.Tensor] = None,
    unit: str = "expert",
    expert_ranks: Optional[torch.Tensor] = None,
    num_ranks: Optional[int] = None,
) -> Union[Tuple[torch.Tensor, torch.Tensor], RoutingDecision]:
    """Capacity-Aware Token Drop.

    Route top-k; every expert keeps at most ``C = ceil(gamma * T_glob * k / E)``
    assignments, those of highest priority; the rest are dropped. With
    ``unit="rank"`` the cap is on what sets the layer's latency, each EP rank:
    a rank keeps at most ``C_rank = ceil(gamma * T_glob * k / W)`` assignments
    over all of its experts, its highest-priority ones.

    Args:
        scores: ``[T, E]`` router probabilities (>= 0, finite).
        k: experts per token.
        gamma: capacity factor > 0 (``math.inf``: no limit, equals ``topk``).
        policy: which assignments an overloaded expert keeps: ``score``
            (highest ``s[t, e]``), ``position`` (earliest tokens), ``random``
            (a seeded hash of the global token index and expert).
        normalize: the model's top-k normalisation (see docs/routers.md).
        group: process group over which loads and ``T_glob`` are global;
            ``None``: this process's tokens are the whole batch.
        seed: seed of the ``random`` policy.
        renormalize: make each token's surviving weights sum to 1.
        topk_indices: optional ``[T, k]`` baseline choice (e.g. Megatron's own,
            group-limited or bias-adjusted); default ``torch.topk(scores, k)``.
        check_values: reject NaN / Inf / negative scores (one host read per
            call; the only one: with ``check_values=False`` the device path
            has no host sync).
        valid_tokens: optional ``[T]`` bool, False for padding tokens: they
            take no expert and no capacity and do not count in ``T_glob``.
        unit: ``expert`` (the papers') or ``rank``.
        expert_ranks: with ``unit="rank"``: ``[E]`` int64, the EP rank of each
            expert (:func:`expert_rank_map` builds Megatron's contiguous one).
        num_ranks: with ``unit="rank"``: ``W``.

    Returns:
        ``(probs [T, E] float, routing_map [T, E] bool)``; ``probs`` is zero
        off the map. After this, every expert's load over the group is <= C
        (``unit="rank"``: every rank's load is <= C_rank).

    Collectives (with a group): those of
    :func:`~megatron_capaware.policies.selection.select_top_per_expert`, plus
    one all-gather of one int64 for ``policy="random"``.

    ``return_decision`` and ``weights``: see :mod:`megatron_capaware.policies`.
    """
    common.check_scores(scores, k, check_values=check_values)
    gamma = common.check_gamma(gamma)
    common.check_choice("policy", policy, common.DROP_POLICIES)
    valid_tokens = common.check_valid_tokens(valid_tokens, scores)
    common.check_choice("unit", unit, common.CAPACITY_UNITS)
    indices, values, selection, keep, routing_map = _drop_assignments(
        scores, k, gamma, policy, group, seed, topk_indices, valid_tokens, unit, expert_ranks, num_ranks)
    probs = None
    if weights:
        probs = common.weights_for(scores, routing_map, values.sum(dim=1), normalize=normalize, renormalize=renormalize)
    # unit=rank: the selection counted ranks; the per-expert loads take one all-reduce of E.
    global_loads = selection.global_kept if unit == "expert" else all_reduce_sum(
        routing_map.sum(dim=0).to(torch.int64), group)
    decision = RoutingDecision(
        probs=probs,
        routing_map=routing_map,
        global_loads=global_loads,
        requested_assignments=selection.global_offered.sum(),
        dropped=_dropped(keep, valid_tokens),
        rerouted=torch.zeros((), dtype=torch.int64, device=scores.device),
        global_tokens=selection.global_items,
        capacity=selection.capacity[0] if scores.shape[1] else None,
    )
    return decision if return_decision else decision.as_tuple()



def _drop_assignments(scores, k, gamma, policy, group, seed, topk_indices, valid_tokens, unit="expert",
                      expert_ranks=None, num_ranks=None):
    """The drop step on checked inputs: ``(indices [T, k], values [T, k], selection, keep [T, k], routing_map)``.

    Shared by :func:`capacity_drop` and :func:`capacity_reroute` (which needs
    the pieces, not the decision).
    """
    num_tokens, num_experts = scores.shape
    indices, values = _selected(scores, k, topk_indices)  # [T, k]
    priority = _drop_priority(policy, values, indices, num_experts, seed, group, valid_tokens)
    buckets, num_buckets = indices.reshape(-1), num_experts  # unit=expert: one bucket per expert
    if unit == "rank":
        if expert_ranks is None or not num_ranks:
            raise common.RoutingInputError(
                "unit='rank' needs expert_ranks [E] and num_ranks (expert_rank_map builds Megatron's layout)"
            )
        expert_ranks = _check_expert_ranks(expert_ranks, num_experts, num_ranks, indices.device)
        buckets, num_buckets = expert_ranks[indices].reshape(-1), int(num_ranks)
    selection = select_top_per_expert(
        priority,
        buckets,
        num_buckets,
        _token_capacity(gamma, k, num_buckets),
        group,
        valid=_token_items(valid_tokens, k),
        extra_count=num_tokens if valid_tokens is None else valid_tokens.sum(),
    )
    keep = selection.keep.view(num_tokens, k)
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, indices, keep)
    return indices, values, selection, keep, routing_map


def _check_expert_ranks(expert_ranks, num_experts: int, num_ranks, device) -> torch.Tensor:
    """``expert_ranks`` as ``[E]`` int64 on ``device``; its shape and ``num_ranks`` checked (no host read)."""
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise common.RoutingInputError(f"unit='rank' needs num_ranks an integer >= 1, got {num_ranks!r}")
    ranks = torch.as_tensor(expert_ranks, device=device)
    if ranks.shape != (num_experts,) or ranks.dtype.is_floating_point or ranks.dtype == torch.bool:
        raise common.RoutingInputError(
            f"expert_ranks must be an integer tensor [E={num_experts}] (the EP rank of each expert), "
            f"got {ranks.dtype} {tuple(ranks.shape)}"
        )
    return ranks.to(torch.int64)


def _token_items(valid_tokens: Optional[torch.Tensor], width: int) -> Optional[torch.Tensor]:
    """``[T * width]`` item mask of a token-major ``[T, width]`` item array (None: all items)."""
    if valid_tokens is None:
        return None
    return valid_tokens.unsqueeze(1).expand(-1, width).reshape(-1)


def _dropped(keep: torch.Tensor, valid_tokens: Optional[torch.Tensor]) -> torch.Tensor:
    """Dropped assignments of ``keep [T, k]``, padding tokens' slots not counted."""
    lost = ~keep
    if valid_tokens is not None:
        lost &= valid_tokens.unsqueeze(1)
    return lost.sum()


def candidate_order(
    scores: torch.Tensor, spare: torch.Tensor, available: torch.Tensor, policy: str, count: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``count`` best reroute candidates, best first.

    Args:
        scores: ``[T, E]``.
        spare: ``[E]`` int64 spare capacity of each expert (global).
        available: ``[T, E]`` bool, experts the token may be moved to.
        policy: ``score`` (highest ``s[t, e]`` first, ties lower expert id) or
            ``load`` (largest spare capacity = least loaded first, ties higher
            score, then lower expert id).

    Returns:
        ``(experts [T, count], ok [T, count] bool)``: ``ok`` marks real candidates.
    """
    return common.ranked_experts(scores, available, count, spare if policy == "load" else None)


def capacity_reroute(
    scores: torch.Tensor,
    k: int,
    gamma: float,
    *,
    rounds: int = 1,
    policy: str = "score",
    min_ratio: float = 0.0,
    drop_policy: str = "score",
    normalize: bool = False,
    renormalize: bool = False,
    group: Optional[ProcessGroup] = None,
    seed: int = 0,
    topk_indices: Optional[torch.Tensor] = None,
    check_values: bool = True,
    weights: bool = True,
    return_decision: bool = False,
    valid_tokens: Optional[torch.Tensor] = None,
    allowed: Optional[torch.Tensor] = None,
    unit: str = "expert",
    expert_ranks: Optional[torch.Tensor] = None,
    num_ranks: Optional[int] = None,
) -> Union[Tuple[torch.Tensor, torch.Tensor], RoutingDecision]:
    """Capacity-Aware Token Reroute.

    As :func:`capacity_drop`; then, for ``rounds`` rounds, every dropped
    assignment of token ``t`` that is still unplaced is offered to one expert
    ``e'`` not already among ``t``'s experts with spare capacity
    ``R = C - L > 0``: a token's dropped assignments, highest ``s`` first,
    each take the best candidate not taken by an earlier one (by ``s[t, e']``
    for ``policy="score"``, least loaded first for ``"load"``) among those
    passing the guard ``s[t, e'] >= min_ratio * s[t, e_dropped]``. An expert
    accepts offers in order of the dropped assignment's score (higher-scoring
    overflow first; ties by rank then token order) up to its spare capacity;
    the rest try again next round. Whatever is unplaced after the last round
    is dropped.

    With ``unit="rank"`` the drop is :func:`capacity_drop`'s rank unit (each
    EP rank keeps at most ``C_rank = ceil(gamma * T_glob * k / W)``
    assignments over its experts) and the spare room is per rank,
    ``R_r = C_rank - L_r``: a candidate must lie on a rank with ``R_r > 0``
    (``policy="load"``: the least-loaded *rank* first, then score), and a
    rank accepts at most ``R_r`` of the offers made to any of its experts,
    in the same order (dropped score, then rank, token and the token's slot
    order). With one expert per rank it equals ``unit="expert"``.

    Args:
        rounds: offer rounds (0: plain drop).
        policy: ``score`` or ``load`` (candidate order).
        min_ratio: quality guard: offer only to an expert whose score is at
            least ``min_ratio`` times the dropped assignment's score.
        drop_policy: the drop step's policy (default ``score``).
        allowed: optional ``[T, E]`` bool, the experts each token may be
            rerouted to (group-limited routing: the experts of its selected
            groups); None: every expert.
        unit, expert_ranks, num_ranks: as :func:`capacity_drop`.
        Other arguments as :func:`capacity_drop`.

    Returns:
        ``(probs [T, E], routing_map [T, E] bool)``; a rerouted assignment's
        weight is ``s[t, e']`` (divided by the original top-k sum when
        ``normalize``). Every expert's global load stays <= C
        (``unit="rank"``: every rank's load <= C_rank).

    Collectives (with a group): the drop's, plus one selection (4 all-reduces
    of ``E*256+1`` int32 and one all-gather of ``E`` int32) per round;
    ``unit="rank"``: every selection's buckets are the ``W`` ranks (``W*256+1``
    and ``W``), plus one all-reduce of ``E`` int64 at the end for the
    per-expert loads.

    ``return_decision`` and ``weights``: see :mod:`megatron_capaware.policies`.
    """
    common.check_choice("policy", policy, common.REROUTE_POLICIES)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise common.RoutingInputError(f"rounds must be an integer >= 0, got {rounds!r}")
    if not (isinstance(min_ratio, (int, float)) and 0.0 <= float(min_ratio) and math.isfinite(min_ratio)):
        raise common.RoutingInputError(
            f"min_ratio={min_ratio!r} must be a finite number >= 0 (0 = always reroute)"
        )
    allowed = common.check_allowed(allowed, scores)
    # The checks of the drop step, in capacity_drop's order.
    common.check_scores(scores, k, check_values=check_values)
    gamma = common.check_gamma(gamma)
    common.check_choice("policy", drop_policy, common.DROP_POLICIES)
    valid_tokens = common.check_valid_tokens(valid_tokens, scores)
    common.check_choice("unit", unit, common.CAPACITY_UNITS)
    num_tokens, num_experts = scores.shape
    indices, values, drop, kept, drop_map = _drop_assignments(
        scores, k, gamma, drop_policy, group, seed, topk_indices, valid_tokens, unit, expert_ranks, num_ranks)
    # The capacity buckets: the experts, or (unit=rank) the ranks, bucket_of[e] = the rank of e.
    bucket_of, num_buckets = None, num_experts
    if unit == "rank":
        bucket_of = _check_expert_ranks(expert_ranks, num_experts, num_ranks, scores.device)
        assert num_ranks is not None  # _check_expert_ranks raised otherwise
        num_buckets = num_ranks
    settled = kept if valid_tokens is None else kept | ~valid_tokens.unsqueeze(1)  # padding loses nothing
    # Only tokens with a dropped slot take part; on the CPU work on those rows
    # alone (on the device all rows, masked: no host sync). Row order = token order.
    rows = None if common.use_device_path(scores) else (~settled).any(dim=1).nonzero().squeeze(1)
    if rows is None:
        r_scores, r_idx, r_values, r_settled, r_allowed = scores, indices, values, settled, allowed
    else:
        r_scores, r_idx, r_values, r_settled = scores[rows], indices[rows], values[rows], settled[rows]
        r_allowed = None if allowed is None else allowed[rows]
    # taken: the experts a slot may not move to (the token's own top-k, the experts it has
    # been given, and with group-limited routing those outside its groups).
    taken = torch.zeros_like(r_scores, dtype=torch.bool) if r_allowed is None else ~r_allowed
    taken = taken.scatter_(1, r_idx, True)  # [n, E]
    placed = None
    loads = drop.global_kept  # [buckets]
    capacity = drop.capacity[0]
    spare = (capacity - loads).clamp(min=0)  # [buckets]
    rerouted = None
    # The dropped slots' scores, -1 where a slot has nothing to place. Kept sorted (highest
    # first, ties in slot order: a stable sort of a stably sorted row keeps that order).
    slot_score = r_values.masked_fill(r_settled, -1.0)
    score_keys = common.expert_keys(r_scores) if policy == "score" and min_ratio <= 0 and rounds else None
    for round_index in range(rounds):
        # Dropped slots, highest dropped score first: each takes the best candidate left.
        slot_score = torch.sort(slot_score, dim=1, descending=True, stable=True).values
        spare_e = spare if bucket_of is None else spare[bucket_of]  # [E]: the spare room of e's bucket
        unavailable = taken | (spare_e <= 0).unsqueeze(0)
        if min_ratio > 0:
            cand, propose = _guarded_candidates(r_scores, spare_e, ~unavailable, policy, slot_score, min_ratio,
                                                r_idx)
        else:
            # No guard (every score passes s >= 0): slot j takes candidate j.
            keys = score_keys if score_keys is not None else common.expert_keys(r_scores, spare_e)
            best, cand = torch.topk(keys.masked_fill(unavailable, -1), k, dim=1)
            propose = (slot_score >= 0) & (best >= 0)
        # Slots that propose nothing (score -1) are not items, so their priority is never read.
        # Offers compete per bucket (unit=rank: all offers to a rank's experts), in item order
        # on ties: rank, token, then the token's slot order.
        selection = select_top_per_expert(
            slot_score.reshape(-1),
            (cand if bucket_of is None else bucket_of[cand]).reshape(-1),
            num_buckets,
            spare,
            group,
            valid=propose.reshape(-1),
        )
        accepted = selection.keep.view(-1, k)
        newly = torch.zeros_like(taken).scatter_(1, cand, accepted)
        placed = newly if placed is None else placed | newly
        taken = taken | newly
        slot_score = slot_score.masked_fill(accepted, -1.0)
        count = accepted.sum()
        rerouted = count if rerouted is None else rerouted + count
        if bucket_of is None:  # unit=rank: the per-expert loads are counted once, after the last round
            loads = loads + selection.global_kept
        if round_index + 1 < rounds:
            spare = spare - selection.global_kept
    if placed is None:
        routing_map = drop_map
    elif rows is None:
        routing_map = drop_map | placed
    else:
        routing_map = drop_map.clone()
        routing_map[rows] |= placed
    probs = None
    if weights:
        probs = common.weights_for(scores, routing_map, values.sum(dim=1), normalize=normalize, renormalize=renormalize)
    if bucket_of is not None:  # unit=rank: the loads above are per rank; the per-expert ones take one all-reduce
        loads = all_reduce_sum(routing_map.sum(dim=0).to(torch.int64), group)
    decision = RoutingDecision(
        probs=probs,
        routing_map=routing_map,
        global_loads=loads,
        requested_assignments=drop.global_offered.sum(),
        dropped=(slot_score >= 0).sum(),
        rerouted=torch.zeros((), dtype=torch.int64, device=scores.device) if rerouted is None else rerouted,
        global_tokens=drop.global_items,
        capacity=capacity,
    )
    return decision if return_decision else decision.as_tuple()


def _guarded_candidates(
    scores: torch.Tensor,
    spare: torch.Tensor,
    available: torch.Tensor,
    policy: str,
    slot_score: torch.Tensor,
    min_ratio: float,
    topk_idx: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reroute candidates under the guard: ``(experts [n, k], propose [n, k] bool)``.

    Slot ``j`` (the token's ``j``-th highest still-unplaced dropped score;
    ``slot_score`` is -1 where there is none) takes the best available
    expert, in the policy's order, that no earlier slot took and that passes
    ``s[t, e'] >= min_ratio * slot_score[t, j]`` (float64, as the reference).
    Thresholds fall with ``j``, so an expert too weak for one slot stays
    open to the next. One masked ``max`` per slot, no host sync.

    A slot that proposes nothing names one of the token's own top-k experts
    (``topk_idx``: never a candidate), so a row never names an expert twice
    and the caller's scatters stay deterministic.
    """
    # Keys >= 1 of the available experts (finite scores: +1 cannot overflow), 0 elsewhere.
    key = (common.expert_keys(scores, spare if policy == "load" else None) + 1) * available
    threshold = torch.where(slot_score >= 0, min_ratio * slot_score.double(), math.inf)  # [n, k]
    passes = scores.double().unsqueeze(1) >= threshold.unsqueeze(2)  # [n, k, E]
    experts, proposes = [], []
    for j in range(slot_score.shape[1]):
        best_key, best = (key * passes[:, j]).max(dim=1, keepdim=True)  # [n, 1]
        ok = best_key > 0
        key = torch.where(ok, key.scatter(1, best, 0), key)  # a taken expert leaves the list
        experts.append(best)
        proposes.append(ok)
    propose = torch.cat(proposes, dim=1)
    return torch.where(propose, torch.cat(experts, dim=1), topk_idx), propose


_VALIDATED_ATTR = "_capaware_local_experts_checked"


def _check_local_experts(local_experts: Union[Sequence[int], torch.Tensor], num_experts: int) -> torch.Tensor:
    if local_experts is None:
        raise common.RoutingInputError(
            "expanded_drop needs local_experts (the experts on this token's EP rank); "
            "pass them, or use capacity-drop when no expert-parallel layout is known"
        )
    ids = torch.as_tensor(local_experts, dtype=torch.int64).reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise common.RoutingInputError(
            f"local_experts {ids.tolist()} must lie in [0, E={num_experts})"
        )
    if torch.unique(ids).numel() != ids.numel():
        raise common.RoutingInputError(f"local_experts {ids.tolist()} has duplicates")
    return ids


def local_experts_tensor(
    local_experts: Union[Sequence[int], torch.Tensor], num_experts: int, device: torch.device
) -> torch.Tensor:
    """Expanded Drop's local expert ids as a checked int64 tensor on ``device``.

    Checking the ids reads them on the host (range, duplicates). A tensor this
    function returned is recognised when it comes back (same ``E``, same
    device, not modified in place since) and returned as it is: callers that
    route every forward (the Megatron router) build it once and pass it, so
    the device path makes no host sync for it. Anything else is checked.
    """
    if isinstance(local_experts, torch.Tensor):
        mark = getattr(local_experts, _VALIDATED_ATTR, None)
        if mark == (num_experts, local_experts._version) and local_experts.device == torch.device(device):
            return local_experts
    # A normal tensor even under torch.inference_mode() (Megatron's dynamic engine runs in it):
    # inference tensors have no version counter to recognise the tensor by.
    with torch.inference_mode(False):
        ids = _check_local_experts(local_experts, num_experts).to(device)
        if ids is local_experts:  # never mark the caller's own tensor as a side effect
            ids = ids.clone()
    setattr(ids, _VALIDATED_ATTR, (num_experts, ids._version))
    return ids


def expanded_drop(
    scores: torch.Tensor,
    k: int,
    gamma: float,
    local_experts: Union[Sequence[int], torch.Tensor],
    *,
    normalize: bool = False,
    renormalize: bool = False,
    group: Optional[ProcessGroup] = None,
    topk_indices: Optional[torch.Tensor] = None,
    check_values: bool = True,
    weights: bool = True,
    return_decision: bool = False,
    valid_tokens: Optional[torch.Tensor] = None,
    allowed: Optional[torch.Tensor] = None,
) -> Union[Tuple[torch.Tensor, torch.Tensor], RoutingDecision]:
    """Expanded Drop: a token's candidates are its top-k plus its rank's local experts.

    Every expert then keeps at most ``C = ceil(gamma * T_glob * k / E)``
    candidates, those of highest ``s[t, e]``. Local experts cost no
    communication, so idle local capacity absorbs tokens that would otherwise
    only lose experts. A token can end with more than ``k`` experts.

    Args:
        local_experts: expert ids on this process's EP rank (``m`` of them);
            a tensor from :func:`local_experts_tensor` is not checked again.
        allowed: optional ``[T, E]`` bool: a local expert is a candidate of a
            token only where allowed (group-limited routing: the experts of
            its selected groups); None: every local expert.
        Other arguments as :func:`capacity_drop`.

    Returns:
        ``(probs [T, E], routing_map [T, E] bool)``; weights are the raw
        ``s[t, e]`` (divided by the original top-k sum when ``normalize``).
        The decision's ``rerouted`` counts the local experts added.

    ``return_decision`` and ``weights``: see :mod:`megatron_capaware.policies`.
    """
    common.check_scores(scores, k, check_values=check_values)
    gamma = common.check_gamma(gamma)
    valid_tokens = common.check_valid_tokens(valid_tokens, scores)
    allowed = common.check_allowed(allowed, scores)
    num_tokens, num_experts = scores.shape
    local = local_experts_tensor(local_experts, num_experts, scores.device)
    indices, values = _selected(scores, k, topk_indices)  # [T, k]
    taken = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, indices, True)
    local_idx = local.unsqueeze(0).expand(num_tokens, -1)  # [T, m]
    cand = torch.cat([indices, local_idx], dim=1)  # [T, k+m], token-major item order
    extra_ok = ~taken.gather(1, local_idx)
    if allowed is not None:
        extra_ok &= allowed.gather(1, local_idx)
    valid = torch.cat([torch.ones_like(indices, dtype=torch.bool), extra_ok], dim=1)
    if valid_tokens is not None:
        valid &= valid_tokens.unsqueeze(1)
    priority = scores.gather(1, cand)
    selection = select_top_per_expert(
        priority.reshape(-1),
        cand.reshape(-1),
        num_experts,
        _token_capacity(gamma, k, num_experts),
        group,
        valid=valid.reshape(-1),
        extra_count=num_tokens if valid_tokens is None else valid_tokens.sum(),
    )
    keep = selection.keep.view(num_tokens, cand.shape[1])
    # Invalid items (a local expert already in the top-k) repeat a column: send
    # them to a spare column so they cannot overwrite the real item's decision.
    target = torch.where(valid, cand, torch.full_like(cand, num_experts))
    routing_map = torch.zeros(
        (num_tokens, num_experts + 1), dtype=torch.bool, device=scores.device
    ).scatter_(1, target, keep & valid)[:, :num_experts]
    probs = None
    if weights:
        probs = common.weights_for(scores, routing_map, values.sum(dim=1), normalize=normalize, renormalize=renormalize)
    kept_topk = keep[:, :k]
    decision = RoutingDecision(
        probs=probs,
        routing_map=routing_map,
        global_loads=selection.global_kept,
        requested_assignments=selection.global_items * k,
        dropped=_dropped(kept_topk, valid_tokens),
        rerouted=(keep[:, k:] & valid[:, k:]).sum(),
        global_tokens=selection.global_items,
        capacity=selection.capacity[0] if num_experts else None,
    )
    return decision if return_decision else decision.as_tuple()


def map_decision(
    probs: torch.Tensor, routing_map: torch.Tensor, group: Optional[ProcessGroup] = None
) -> RoutingDecision:
    """Load figures of a routing that is already decided (e.g. Megatron's own top-k).

    Collectives: one all-reduce of ``E + 1`` int64.
    """
    device = routing_map.device
    counts = torch.cat(
        [routing_map.sum(dim=0).to(torch.int64), common.token_count(routing_map.shape[0], device).reshape(1)]
    )
    all_reduce_sum(counts, group)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    return RoutingDecision(
        probs=probs,
        routing_map=routing_map,
        global_loads=counts[:-1],
        requested_assignments=counts[:-1].sum(),
        dropped=zero,
        rerouted=zero,  # read-only figures: one zero serves both
        global_tokens=counts[-1],
    )


def topk(
    scores: torch.Tensor,
    k: int,
    *,
    normalize: bool = False,
    group: Optional[ProcessGroup] = None,
    check_values: bool = True,
    topk_indices: Optional[torch.Tensor] = None,
    return_decision: bool = False,
) -> Union[Tuple[torch.Tensor, torch.Tensor], RoutingDecision]:
    """Vanilla top-k routing: ``(probs [T, E], routing_map [T, E] bool)``.

    ``normalize=True`` divides each token's weights by the sum of its top-k
    scores (Mixtral-style); otherwise weights are the raw scores.
    ``topk_indices``: optional ``[T, k]`` choice already made by the caller.
    ``return_decision=True`` returns the :class:`RoutingDecision` with the
    global loads (one all-reduce over ``group``, see :func:`map_decision`).
    """
    common.check_scores(scores, k, check_values=check_values)
    indices, values = _selected(scores, k, topk_indices)
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, indices, True)
    probs = common.weights_for(scores, routing_map, values.sum(dim=1), normalize=normalize)
    return map_decision(probs, routing_map, group) if return_decision else (probs, routing_map)
