"""LASER: per token, top-k when the gate is confident, else least-loaded among good-enough experts.

Semantics (``docs/routers.md``): token ``t`` is *confident* when
``M_k = sum of its top-k scores >= eps_high`` and takes its top-k. Otherwise
its pool is its top-k plus the experts with ``s >= t_fix * max s``, trimmed to
the ``pool`` best by score, and it takes the ``k`` least-loaded experts of the
pool (ties: higher score). Loads are the running global loads of the call:
confident tokens first, then the flexible tokens in (rank, token) order.

The exact rule is sequential (each flexible token sees the loads left by the
ones before it); :func:`megatron_capaware.policies.reference.laser_greedy` is
that loop, the oracle. The fast path places flexible tokens in ``waves``
(consecutive slices of the global flexible-token order) and stops the
herding that simultaneous decisions cause (every token of a wave rushing to
the same least-loaded expert) with a per-wave water level:

1. The wave's ``n*k`` assignments are water-filled onto the current loads,
   each expert capped by its *demand* (how many of the wave's tokens have it
   in their pool): expert ``e`` may take ``quota[e]`` of them.
2. For ``rounds`` rounds, each token proposes its still-missing experts:
   its least-loaded pool members (ties: higher score) with quota left; an
   expert accepts proposals in token order up to its quota.
3. Slots still open take the least-loaded remaining pool members (no quota).

``waves = number of flexible tokens, rounds = 0`` is the exact greedy. With
the defaults the imbalance ``I`` stays within about 2% of the greedy's
(``scripts/laser_closeness.py``; docs/laser.md).

Collectives (with a group): one all-reduce of ``E + 1``, one all-gather of
1 and one all-reduce of ``waves * (E + 1)`` int64 up front; per wave, one
all-gather of ``E`` int64 per round and one all-reduce of ``E`` int64.

On the CPU each wave works on its own tokens only (one host read per call:
the local size of each wave). On the device path (CUDA, or
``CAPAWARE_DEVICE_PATH=1``) the waves are fixed-shape: every wave runs over
all ``T`` rows with the rows of other waves masked out, so nothing is read
on the host; both give identical decisions.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from megatron_capaware.policies import common, compiled
from megatron_capaware.policies.common import topk_mass
from megatron_capaware.policies.collectives import (
    ProcessGroup,
    all_gather_stack,
    all_reduce_sum,
    group_rank,
    group_size,
)
from megatron_capaware.policies.decision import RoutingDecision

LOAD_UNITS = common.LASER_LOADS
DEFAULT_WAVES = 8
DEFAULT_ROUNDS = 1
_BIG = torch.iinfo(torch.int64).max


def check_laser_args(k: int, num_experts: int, eps_high: float, t_fix: float, pool: int) -> int:
    """Validate LASER's knobs; returns the effective pool size ``min(pool, E)``."""
    if (
        isinstance(eps_high, bool)
        or not isinstance(eps_high, (int, float))
        or not math.isfinite(eps_high)
        or eps_high < 0
    ):
        raise common.RoutingInputError(
            f"eps_high={eps_high!r} must be a finite number >= 0 (0 = every token confident = top-k)"
        )
    if isinstance(t_fix, bool) or not isinstance(t_fix, (int, float)) or not 0.0 < t_fix <= 1.0:
        raise common.RoutingInputError(
            f"t_fix={t_fix!r} must be in (0, 1]: the pool keeps experts scoring at least "
            "t_fix times the token's best score"
        )
    if isinstance(pool, bool) or not isinstance(pool, int):
        raise common.RoutingInputError(f"pool must be an integer, got {pool!r}")
    if pool < k:
        raise common.RoutingInputError(
            f"pool={pool} is smaller than k={k}: a token's pool always holds its top-k; "
            f"use pool >= {k} (pool == k reproduces top-k)"
        )
    return min(pool, num_experts)


def laser_candidates(
    scores: torch.Tensor, k: int, t_fix: float, pool: int, topk_indices: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token's candidate list, best score first.

    Returns:
        ``cand [T, c]`` expert ids: the top-k (as ``torch.topk`` orders them),
        then the other experts by score descending (ties: lower id);
        ``in_pool [T, c]`` bool; ``topk_idx [T, k]``; ``topk_sum [T]``.
    """
    if topk_indices is None:
        values, topk_idx = common.topk_indices(scores, k)
    else:
        topk_idx = topk_indices.to(torch.int64)
        values = scores.gather(1, topk_idx)
    extra = pool - k
    if extra > 0:
        others = torch.ones_like(scores, dtype=torch.bool).scatter_(1, topk_idx, False)
        rest_idx, _ = common.ranked_experts(scores, others, extra)
        # float64, as docs/routers.md and the reference state it: in float32, t_fix * max rounds
        # and can admit or refuse an expert sitting exactly on the threshold.
        best = values.max(dim=1, keepdim=True).values.double()
        good = scores.gather(1, rest_idx).double() >= t_fix * best
        cand = torch.cat([topk_idx, rest_idx], dim=1)
        in_pool = torch.cat([torch.ones_like(topk_idx, dtype=torch.bool), good], dim=1)
    else:
        cand, in_pool = topk_idx, torch.ones_like(topk_idx, dtype=torch.bool)
    return cand, in_pool, topk_idx, values.sum(dim=1)


def capped_water_fill(loads: torch.Tensor, demand: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Integer quotas that raise the lowest loads first, each capped by its demand.

    Finds the largest integer level ``lam`` with
    ``f(lam) = sum_e min(demand_e, max(0, lam - loads_e)) <= U`` where
    ``U = min(units, sum demand)``, sets ``q_e = min(demand_e, max(0, lam -
    loads_e))`` and gives the remaining ``U - sum q`` units, one each, to the
    experts at level ``lam`` that still have demand, lowest id first.
    Closed form over the ``2E`` breakpoints of the piecewise-linear ``f``
    (no iteration, no host sync).

    Args:
        loads: ``[E]`` int64 current loads.
        demand: ``[E]`` int64 how many units each expert could take.
        units: 0-d int64 units to place.

    Returns:
        ``[E]`` int64 quotas summing to ``min(units, sum demand)``.
    """
    # min(d_e, max(0, x - l_e)) = clamp(x, l_e, l_e + d_e) - l_e: one clamp per breakpoint row.
    high = loads + demand
    total = torch.minimum(units, demand.sum())
    points = torch.cat([loads, high])  # [2E]
    f_at = points.unsqueeze(1).clamp(min=loads, max=high).sum(1) - loads.sum()  # [2E]
    base, at = points.masked_fill(f_at > total, -_BIG).max(0)
    slope = ((loads <= base) & (base < high)).sum()
    # slope == 0 only where f is flat from base on, i.e. f(base) == total: the step is 0 either way.
    level = base + (total - f_at.gather(0, at.reshape(1)).squeeze(0)) // slope.clamp(min=1)  # f_at[at] reads at
    filled = level.clamp(min=loads, max=high)  # loads + quota
    quota = filled - loads
    # The units left over go one each to the experts at the level with demand left, lowest id first.
    room = (filled < high) & (filled == level)
    return quota + (room & (torch.cumsum(room, 0) <= total - quota.sum()))


def _least_loaded_positions(
    load_of_cand: torch.Tensor, closed: torch.Tensor, chosen: Optional[torch.Tensor], count: int,
    position: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fill each row up to ``count`` experts: what it has chosen, then the least-loaded open candidates.

    Open: neither ``closed`` nor ``chosen``; least loaded first, ties the
    earlier position (= higher score). One ``topk`` of the ``count`` smallest
    keys, where the chosen positions sort first: a row that has ``m``
    experts takes its ``count - m`` least-loaded open candidates, which is
    "the ``count`` least-loaded open ones, the first ``count - m`` of them".

    Returns:
        ``(positions [T, count], fresh [T, count])``: ``fresh`` marks the open
        candidates taken now (not the chosen ones, not closed padding).
    """
    key = torch.add(position, load_of_cand, alpha=closed.shape[1]).masked_fill(closed, _BIG)
    if chosen is None:
        values, positions = torch.topk(key, count, dim=1, largest=False)
        return positions, values < _BIG
    values, positions = torch.topk(key.masked_fill(chosen, -1), count, dim=1, largest=False)
    return positions, (values >= 0) & (values < _BIG)


def _scatter_counts(experts: torch.Tensor, mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    counts = torch.zeros(num_experts, dtype=torch.int64, device=experts.device)
    return counts.scatter_add_(0, experts.reshape(-1), mask.reshape(-1).to(torch.int64))


# ----------------------------------------------------------------------------- one wave, in pieces
# A wave: the quota (water fill), ``rounds`` of propose -> [all-gather] -> accept, then the final
# pick -> [all-reduce of its counts]. The pieces are pure (no collective, no host read); the CPU
# path calls them on a wave's own rows, the device path on all rows (other waves closed), through
# the segments below, which torch.compile may run as one graph each (policies/compiled.py).


def _load_of(loads, cand, expert_ranks, cand_ranks, num_ranks: int):
    """``[n, c]``: the load each candidate is ranked by: its expert's, or (``load=rank``) its EP rank's.

    ``expert_ranks [E]`` maps experts to EP ranks, ``cand_ranks [n, c]`` is it
    taken at ``cand``; a rank's load is the sum of its experts' loads (global
    when the expert loads are).
    """
    if expert_ranks is None:
        return loads[cand]
    rank_loads = torch.zeros(num_ranks, dtype=loads.dtype, device=loads.device).index_add_(0, expert_ranks, loads)
    return rank_loads[cand_ranks]


def _propose(loads, quota, cand, closed, w_chosen, k: int, position, num_experts: int, ranks=(None, None, 0)):
    """Each row proposes its least-loaded open candidates with quota left.

    Returns ``(positions, fresh, experts, running, last)``: ``running [n, E]``
    the proposals per expert up to each row (row order), ``last [E]`` this
    rank's total (what the all-gather sends).
    """
    positions, fresh = _least_loaded_positions(_load_of(loads, cand, *ranks), closed | (quota[cand] <= 0), w_chosen,
                                               k, position)
    experts = cand.gather(1, positions)
    proposed = torch.zeros(cand.shape[0], num_experts, dtype=torch.bool, device=cand.device)
    # Proposals up to this token: int32 (at most T; half the bytes of the default int64 [n, E]).
    running = torch.cumsum(proposed.scatter_(1, experts, fresh), 0, dtype=torch.int32)
    return positions, fresh, experts, running, _last_row(running)


def _last_row(running):
    """``[E]``: the last row of ``running [n, E]`` (zeros when ``n = 0``), in ``running``'s dtype."""
    return running[-1] if running.shape[0] else running.sum(0, dtype=running.dtype)


def _accept(loads, quota, closed, w_chosen, positions, fresh, experts, running, per_rank, rank: int, single: bool):
    """An expert accepts proposals in (rank, token) order up to its quota.

    ``per_rank [ranks, E]``: the gathered proposal totals; or None for a rank
    alone (``single``, ``rank`` 0), whose total is ``running``'s last row. The
    device path passes None there: the gather of one rank is a view of
    ``running``, and a compiled segment given two inputs where one is a view of
    the other (both outputs of an earlier compiled segment) fails dynamo's
    guard creation under ``dynamic=True`` on torch 2.13 (policies/compiled.py).
    """
    limit = quota - per_rank[:rank].sum(0) if rank else quota  # what earlier ranks left
    accepted = fresh & (running <= limit).gather(1, experts)
    newly = torch.zeros_like(closed).scatter_(1, positions, accepted)
    w_chosen = newly if w_chosen is None else w_chosen | newly
    if per_rank is None:
        total = _last_row(running)
    else:
        total = per_rank[0] if single else per_rank.sum(0)
    taken = torch.minimum(total, quota)
    return loads + taken, quota - taken, closed | newly, w_chosen


def _finish(loads, cand, closed, w_chosen, k: int, position, num_experts: int, ranks=(None, None, 0)):
    """Slots still open take the least-loaded remaining pool members (no quota).

    Returns ``(w_chosen, counts [E])``: the wave's choices and the local
    counts of the new ones (what the all-reduce sums).
    """
    positions, fresh = _least_loaded_positions(_load_of(loads, cand, *ranks), closed, w_chosen, k, position)
    newly = torch.zeros_like(closed).scatter_(1, positions, fresh)
    w_chosen = newly if w_chosen is None else w_chosen | newly
    return w_chosen, _scatter_counts(cand, newly, num_experts)


def _merge(chosen, w_chosen):
    return w_chosen if chosen is None else chosen | w_chosen


def _segment_open(loads, added, chosen, w_done, demand, units, not_in_pool, other_row, cand, position,
                  expert_ranks, cand_ranks, k: int, num_experts: int, num_ranks: int, propose: bool):
    """Device path, from the previous wave's all-reduce to this wave's first collective.

    Closes the previous wave (``added``: its all-reduced counts, ``w_done``:
    its choices; None in the first wave), then opens this one: its rows
    (``other_row`` closes the other waves' rows), its quota and its first
    proposals (``propose``), or with no quota round its final pick.
    """
    if added is not None:
        loads = loads + added
        chosen = _merge(chosen, w_done)
    closed = not_in_pool | other_row.unsqueeze(1)
    ranks = (expert_ranks, cand_ranks, num_ranks)
    if not propose:
        return (loads, chosen) + _finish(loads, cand, closed, None, k, position, num_experts, ranks)
    quota = capped_water_fill(loads, demand, units)
    return (loads, chosen, quota, closed) + _propose(loads, quota, cand, closed, None, k, position, num_experts,
                                                     ranks)


def _segment_round(loads, quota, closed, w_chosen, positions, fresh, experts, running, per_rank, cand, position,
                   expert_ranks, cand_ranks, rank: int, single: bool, k: int, num_experts: int, num_ranks: int,
                   propose: bool):
    """Device path, between a round's all-gather and the next collective: accept, then propose or finish."""
    loads, quota, closed, w_chosen = _accept(loads, quota, closed, w_chosen, positions, fresh, experts, running,
                                             per_rank, rank, single)
    ranks = (expert_ranks, cand_ranks, num_ranks)
    if propose:
        return (loads, quota, closed, w_chosen) + _propose(loads, quota, cand, closed, w_chosen, k, position,
                                                           num_experts, ranks)
    return (loads,) + _finish(loads, cand, closed, w_chosen, k, position, num_experts, ranks)


def _segment_close(loads, added, chosen, w_done):
    """Device path, after the last wave's all-reduce."""
    return loads + added, _merge(chosen, w_done)


_OPEN = compiled.Region(_segment_open)
_ROUND = compiled.Region(_segment_round)
_CLOSE = compiled.Region(_segment_close)


def _device_waves(backend, loads, chosen, cand, in_pool, wave_of, wave_stats, wave_units, position, expert_ranks,
                  cand_ranks, *, waves: int, rounds: int, k: int, num_experts: int, num_ranks: int, rank: int,
                  single: bool, group):
    """The waves on the device path: fixed shapes, every wave over all rows (other waves' rows closed).

    Per wave ``rounds + 1`` segments, each ending at a collective (run eagerly, or compiled with
    ``backend``), and one closing segment: ``waves * (rounds + 1) + 1`` compiled calls in all.
    """
    not_in_pool = ~in_pool
    other_wave = wave_of.unsqueeze(0) != torch.arange(waves, device=cand.device).unsqueeze(1)  # [waves, T]
    added = w_done = None
    for wave in range(waves):
        out = _OPEN(backend, loads, added, chosen, w_done, wave_stats[wave, :-1], wave_units[wave], not_in_pool,
                    other_wave[wave], cand, position, expert_ranks, cand_ranks, k, num_experts, num_ranks, rounds > 0)
        if rounds:
            loads, chosen, quota, closed, positions, fresh, experts, running, last = out
            w_chosen = None
            for r in range(rounds):
                per_rank = None if single else all_gather_stack(last, group)  # [ranks, E]; alone: `running`'s
                out = _ROUND(backend, loads, quota, closed, w_chosen, positions, fresh, experts, running, per_rank,
                             cand, position, expert_ranks, cand_ranks, rank, single, k, num_experts, num_ranks,
                             r + 1 < rounds)
                if r + 1 < rounds:
                    loads, quota, closed, w_chosen, positions, fresh, experts, running, last = out
            loads, w_done, counts = out
        else:
            loads, chosen, w_done, counts = out
        added = all_reduce_sum(counts, group)
    return _CLOSE(backend, loads, added, chosen, w_done)


def laser(
    scores: torch.Tensor,
    k: int,
    eps_high: float,
    t_fix: float,
    pool: int,
    *,
    normalize: bool = False,
    renormalize: bool = False,
    group: Optional[ProcessGroup] = None,
    waves: int = DEFAULT_WAVES,
    rounds: int = DEFAULT_ROUNDS,
    check_values: bool = True,
    topk_indices: Optional[torch.Tensor] = None,
    weights: bool = True,
    return_decision: bool = False,
    valid_tokens: Optional[torch.Tensor] = None,
    load: str = "expert",
    expert_ranks: Optional[torch.Tensor] = None,
    num_ranks: Optional[int] = None,
) -> Union[Tuple[torch.Tensor, torch.Tensor], RoutingDecision]:
    """LASER routing.

    Args:
        scores: ``[T, E]`` router probabilities.
        k: experts per token.
        eps_high: confidence threshold on the top-k mass ``M_k`` (0: every
            token confident, i.e. top-k).
        t_fix: pool threshold in (0, 1], relative to the token's best score.
        pool: the pool's maximum size ``c >= k`` (``c == k``: top-k).
        normalize: the model's top-k normalisation; weights are the chosen
            experts' ``s``, divided by the original top-k sum.
        group: process group over which loads are global.
        waves, rounds: fast-path granularity (module docstring); ``waves`` =
            number of flexible tokens with ``rounds=0`` is the exact greedy.
        topk_indices: optional ``[T, k]`` top-k already computed by the caller.
        valid_tokens: optional ``[T]`` bool, False for padding tokens: they
            take no expert, add no load and do not count in ``T_glob``.
        load: what "least loaded" compares: ``expert`` (each candidate's
            own global load) or ``rank`` (the global load of the candidate's
            EP rank, the sum over its experts), so the choice moves work
            between ranks. Ties as with ``expert`` (higher score first). The
            quotas of the quota rounds stay per expert (they stop a wave from
            herding onto one expert); only the order of preference changes.
        expert_ranks: ``[E]`` int64, each expert's EP rank in ``[0,
            num_ranks)`` (``load="rank"`` only; see :func:`expert_rank_map`).
        num_ranks: the EP size (``load="rank"``).

    Returns:
        ``(probs [T, E], routing_map [T, E] bool)``, exactly ``k`` experts per
        (real) token.

    ``return_decision`` and ``weights``: see :mod:`megatron_capaware.policies`.
    """
    common.check_scores(scores, k, check_values=check_values)
    num_tokens, num_experts = scores.shape
    width = check_laser_args(k, num_experts, eps_high, t_fix, pool)
    if isinstance(waves, bool) or not isinstance(waves, int) or waves < 1:
        raise common.RoutingInputError(f"waves must be an integer >= 1, got {waves!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise common.RoutingInputError(f"rounds must be an integer >= 0, got {rounds!r}")
    valid_tokens = common.check_valid_tokens(valid_tokens, scores)
    device = scores.device
    common.check_choice("load", load, LOAD_UNITS)
    if load == "rank":
        expert_ranks = common.check_expert_ranks(expert_ranks, num_ranks, num_experts, device)
        assert num_ranks is not None  # check_expert_ranks raised otherwise
    else:
        expert_ranks, num_ranks = None, 0
    rank = group_rank(group)
    cand, in_pool, topk_idx, topk_sum = laser_candidates(scores, k, t_fix, width, topk_indices)
    flexible = topk_mass(scores.gather(1, topk_idx)) < eps_high  # [T]
    top_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, topk_idx, True)
    if valid_tokens is None:
        confident = ~flexible
    else:  # padding: neither confident nor flexible, no expert
        flexible &= valid_tokens
        confident = valid_tokens & ~flexible
    confident_map = top_map & confident.unsqueeze(1)

    counts = torch.cat([
        confident_map.sum(dim=0).to(torch.int64), common.token_count(num_tokens, device, valid_tokens).reshape(1)])
    counts = all_reduce_sum(counts, group)
    loads, global_tokens = counts[:-1].clone(), counts[-1]

    # Waves: consecutive slices of the global flexible-token order (rank, token).
    local_flex = flexible.to(torch.int64)
    flex_counts = all_gather_stack(local_flex.sum().reshape(1), group).view(-1)
    flex_index = torch.cumsum(local_flex, 0) - 1 + flex_counts[:rank].sum()
    wave_of = torch.div(flex_index * waves, flex_counts.sum().clamp(min=1), rounding_mode="floor")
    wave_of = torch.where(flexible, wave_of, torch.full_like(wave_of, waves))  # row W: not flexible
    # Per wave: each expert's demand (tokens having it in their pool) and the token count.
    # [T, E + 1] int32, not int64 (at most T per entry; the [T, E] temporaries were 10x the scores).
    in_pool_onehot = torch.zeros(num_tokens, num_experts + 1, dtype=torch.int32, device=device)
    in_pool_onehot.scatter_(1, cand, in_pool.to(torch.int32))
    in_pool_onehot[:, -1] = 1
    wave_stats = torch.zeros(waves + 1, num_experts + 1, dtype=torch.int32, device=device)
    wave_stats = all_reduce_sum(wave_stats.index_add_(0, wave_of, in_pool_onehot)[:waves].to(torch.int64), group)

    wave_units = wave_stats[:, -1] * k
    position = torch.arange(cand.shape[1], device=device)
    single = group_size(group) == 1
    cand_ranks = None if expert_ranks is None else expert_ranks[cand]  # [T, c]
    if common.use_device_path(scores):
        with compiled.agreement_group(group):  # a region's first compiled call: all ranks or none
            loads, chosen = _device_waves(
                compiled.backend_for(scores), loads, None, cand, in_pool, wave_of, wave_stats, wave_units, position,
                expert_ranks, cand_ranks, waves=waves, rounds=rounds, k=k, num_experts=num_experts, num_ranks=num_ranks,
                rank=rank, single=single, group=group)
    else:
        # This rank's tokens grouped by wave, token order kept inside a wave (one host read).
        order = torch.argsort(wave_of, stable=True)
        sizes = torch.bincount(wave_of, minlength=waves + 1).tolist()
        chosen = torch.zeros_like(in_pool)  # [T, c] positions taken by flexible tokens
        start = 0
        for wave in range(waves):
            rows = order[start:start + sizes[wave]]
            start += sizes[wave]
            w_cand, closed = cand[rows], ~in_pool[rows]  # [n, c]; closed: not in the pool or taken
            w_ranks = (expert_ranks, None if cand_ranks is None else cand_ranks[rows], num_ranks)
            w_chosen = None  # taken in this wave
            if rounds:
                quota = capped_water_fill(loads, wave_stats[wave, :-1], wave_units[wave])
            for _ in range(rounds):
                positions, fresh, experts, running, last = _propose(loads, quota, w_cand, closed, w_chosen, k,
                                                                    position, num_experts, w_ranks)
                per_rank = all_gather_stack(last, group)  # [ranks, E]
                loads, quota, closed, w_chosen = _accept(loads, quota, closed, w_chosen, positions, fresh, experts,
                                                         running, per_rank, rank, single)
            w_chosen, counts = _finish(loads, w_cand, closed, w_chosen, k, position, num_experts, w_ranks)
            loads = loads + all_reduce_sum(counts, group)
            chosen[rows] = w_chosen

    target = torch.where(chosen, cand, torch.full_like(cand, num_experts))
    flexible_map = torch.zeros(
        (num_tokens, num_experts + 1), dtype=torch.bool, device=device
    ).scatter_(1, target, chosen)[:, :num_experts]
    routing_map = confident_map | flexible_map
    probs = None
    if weights:
        probs = common.weights_for(scores, routing_map, topk_sum, normalize=normalize, renormalize=renormalize)
    decision = RoutingDecision(
        probs=probs,
        routing_map=routing_map,
        global_loads=loads,
        requested_assignments=global_tokens * k,
        dropped=torch.zeros((), dtype=torch.int64, device=device),
        rerouted=(flexible_map & ~top_map).sum(),
        global_tokens=global_tokens,
        flexible=flexible.sum(),
    )
    return decision if return_decision else decision.as_tuple()

