"""Slow, obviously-right reference implementations of every policy (the test oracles).

Plain Python loops over the GLOBAL batch: the ranks' tokens concatenated in
rank order, which is also the tie-break order of the fast implementations.
Nothing here is vectorised or clever; a reader should be able to check each
function against ``docs/routers.md`` line by line. Scores are read once into
Python floats (float32 values, compared exactly).

Each function returns ``(probs [T, E], routing_map [T, E] bool)`` for the
whole global batch; a rank's fast result must equal its slice.

Optional inputs, as the fast policies take them: ``topk_indices [T, k]`` (the
baseline choice, e.g. group-limited), ``allowed [T, E]`` bool (the experts a
token may be moved to or given), ``valid_tokens [T]`` bool (False: a padding
token). Padding is handled in the most literal way: the policy runs on the
real tokens alone and the padding rows come back empty.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, TypeVar

import torch

from megatron_capaware.policies import common
from megatron_capaware.policies.capacity import hash_uniform

# An item of _keep_top: (priority, global order, payload...).
_Item = TypeVar("_Item", bound=Tuple[Any, ...])


def _rows(scores: torch.Tensor) -> List[List[float]]:
    return scores.to(torch.float32).tolist()


def _topk_lists(scores: torch.Tensor, k: int, topk_indices: Optional[torch.Tensor] = None) -> List[List[int]]:
    # torch.topk is the definition of vanilla routing (Megatron uses it too).
    if topk_indices is not None:
        return topk_indices.to(torch.int64).tolist()
    return torch.topk(scores, k, dim=1).indices.tolist()


def _allowed_lists(allowed: Optional[torch.Tensor], num_tokens: int, num_experts: int) -> List[List[bool]]:
    if allowed is None:
        return [[True] * num_experts for _ in range(num_tokens)]
    return allowed.tolist()


def _on_real_tokens(scores: torch.Tensor, valid_tokens: Optional[torch.Tensor], run, *rows):
    """``run(scores, *rows)`` on the real tokens only; padding rows of the result are empty."""
    if valid_tokens is None:
        return run(scores, *rows)
    real = valid_tokens.nonzero().squeeze(1)
    probs_r, map_r = run(scores[real], *[None if x is None else x[real] for x in rows])
    probs = torch.zeros(scores.shape, dtype=probs_r.dtype, device=scores.device)
    routing_map = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    probs[real], routing_map[real] = probs_r, map_r
    return probs, routing_map


def _output(
    scores: torch.Tensor,
    chosen: List[Set[int]],
    topk_sums: List[float],
    normalize: bool,
    renormalize: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    routing_map = torch.zeros_like(scores, dtype=torch.bool)
    for t, experts in enumerate(chosen):
        for e in experts:
            routing_map[t, e] = True
    topk_sum = torch.tensor(topk_sums, dtype=scores.dtype, device=scores.device)
    probs = common.weights_for(scores, routing_map, topk_sum, normalize=normalize, renormalize=renormalize)
    return probs, routing_map


def topk(scores: torch.Tensor, k: int, *, normalize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    rows = _rows(scores)
    tops = _topk_lists(scores, k)
    return _output(scores, [set(t) for t in tops], [sum(r[e] for e in t) for r, t in zip(rows, tops)], normalize)


def _priority(policy: str, rows: List[List[float]], tops: List[List[int]], t: int, e: int,
              num_experts: int, seed: int) -> float:
    if policy == "score":
        return rows[t][e]
    if policy == "weight":  # share of the token's top-k mass, rounded to float32 as the fast path
        mass = 0.0
        for x in tops[t]:
            mass += rows[t][x]
        return float(torch.tensor(rows[t][e] / mass, dtype=torch.float64).float()) if mass > 0 else 0.0
    if policy == "position":
        return 0.0
    return float(hash_uniform(torch.tensor([t * num_experts + e]), seed)[0])


def _keep_top(items: List[_Item], capacity: int) -> List[_Item]:
    """items: (priority, global order, payload); keep ``capacity`` by (-priority, order)."""
    return sorted(items, key=lambda it: (-it[0], it[1]))[: max(capacity, 0)]


def capacity_drop(
    scores: torch.Tensor,
    k: int,
    gamma: float,
    *,
    policy: str = "score",
    normalize: bool = False,
    renormalize: bool = False,
    seed: int = 0,
    topk_indices: Optional[torch.Tensor] = None,
    valid_tokens: Optional[torch.Tensor] = None,
    unit: str = "expert",
    expert_ranks: Optional[Sequence[int]] = None,
    num_ranks: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``unit="rank"``: each rank (``expert_ranks[e]`` = the rank of expert ``e``)
    keeps its ``ceil(gamma * T * k / W)`` highest-priority assignments, ties in
    (token, top-k position) order."""
    def run(scores, topk_indices):
        if unit == "rank":
            chosen, sums = _rank_drop_state(scores, k, gamma, policy, seed, topk_indices, _ints(expert_ranks),
                                            num_ranks)
        else:
            chosen, tops, sums, _ = _drop_state(scores, k, gamma, policy, seed, topk_indices)
        return _output(scores, chosen, sums, normalize, renormalize)

    return _on_real_tokens(scores, valid_tokens, run, topk_indices)


def _ints(values) -> List[int]:
    return [int(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]


def _rank_drop_state(scores, k, gamma, policy, seed, topk_indices, expert_ranks, num_ranks=None):
    num_tokens, num_experts = scores.shape
    rows = _rows(scores)
    tops = _topk_lists(scores, k, topk_indices)
    if num_ranks is None:
        num_ranks = max(expert_ranks, default=0) + 1
    capacity = common.capacity_from_total(gamma, num_tokens * k, num_ranks)
    per_rank: Dict[int, List[Tuple[float, int, Tuple[int, int]]]] = {r: [] for r in range(num_ranks)}
    for t in range(num_tokens):
        for j, e in enumerate(tops[t]):
            per_rank[expert_ranks[e]].append((_priority(policy, rows, tops, t, e, num_experts, seed), t * k + j, (t, e)))
    chosen: List[Set[int]] = [set() for _ in range(num_tokens)]
    for items in per_rank.values():
        for _, _, (t, e) in _keep_top(items, capacity):
            chosen[t].add(e)
    sums = [sum(rows[t][e] for e in tops[t]) for t in range(num_tokens)]
    return chosen, sums


def _drop_state(scores, k, gamma, policy, seed, topk_indices=None):
    num_tokens, num_experts = scores.shape
    rows = _rows(scores)
    tops = _topk_lists(scores, k, topk_indices)
    capacity = common.capacity_from_total(gamma, num_tokens * k, num_experts)
    per_expert: Dict[int, List[Tuple[float, int, int]]] = {e: [] for e in range(num_experts)}
    for t in range(num_tokens):
        for e in tops[t]:
            per_expert[e].append((_priority(policy, rows, tops, t, e, num_experts, seed), t, t))
    chosen: List[Set[int]] = [set() for _ in range(num_tokens)]
    for e, items in per_expert.items():
        for _, _, t in _keep_top(items, capacity):
            chosen[t].add(e)
    sums = [sum(rows[t][e] for e in tops[t]) for t in range(num_tokens)]
    return chosen, tops, sums, capacity


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
    seed: int = 0,
    topk_indices: Optional[torch.Tensor] = None,
    valid_tokens: Optional[torch.Tensor] = None,
    allowed: Optional[torch.Tensor] = None,
    unit: str = "expert",
    expert_ranks: Optional[Sequence[int]] = None,
    num_ranks: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token Reroute as docs/routers.md states it, one token and one offer at a time.

    The capacity is per *bucket*: each expert (``unit="expert"``) or each EP
    rank (``unit="rank"``, ``expert_ranks[e]`` = the rank of ``e``): a
    candidate needs spare room in its bucket, ``policy="load"`` ranks
    candidates by that room, and a bucket accepts the best of all offers made
    to it (any of its experts), by (-dropped score, token, the token's slot
    order), up to its room."""
    def run(scores, topk_indices, allowed):
        num_tokens, num_experts = scores.shape
        rows = _rows(scores)
        may_use = _allowed_lists(allowed, num_tokens, num_experts)
        if unit == "rank":
            bucket = _ints(expert_ranks)
            num_buckets = num_ranks if num_ranks is not None else max(bucket, default=0) + 1
            chosen, sums = _rank_drop_state(scores, k, gamma, drop_policy, seed, topk_indices, bucket, num_buckets)
            tops = _topk_lists(scores, k, topk_indices)
            capacity = common.capacity_from_total(gamma, num_tokens * k, num_buckets)
        else:
            chosen, tops, sums, capacity = _drop_state(scores, k, gamma, drop_policy, seed, topk_indices)
            bucket, num_buckets = list(range(num_experts)), num_experts
        load = [0] * num_buckets
        for experts in chosen:
            for e in experts:
                load[bucket[e]] += 1
        # The dropped assignments (token, original expert) still to place.
        unplaced = [[e for e in tops[t] if e not in chosen[t]] for t in range(num_tokens)]
        taken: List[Set[int]] = [set(tops[t]) for t in range(num_tokens)]
        for _ in range(rounds):
            spare = [capacity - load[b] for b in range(num_buckets)]
            offers: Dict[int, List[Tuple[float, Tuple[int, int], Tuple[int, int, int]]]] = {
                b: [] for b in range(num_buckets)}
            for t in range(num_tokens):
                # This token's dropped assignments, highest score first (ties: top-k order).
                slots = sorted(unplaced[t], key=lambda e: (-rows[t][e], tops[t].index(e)))
                candidates = [e for e in range(num_experts)
                              if e not in taken[t] and spare[bucket[e]] > 0 and may_use[t][e]]
                if policy == "score":
                    candidates.sort(key=lambda e: (-rows[t][e], e))
                else:
                    candidates.sort(key=lambda e: (-spare[bucket[e]], -rows[t][e], e))
                offered_to: Set[int] = set()
                for j, dropped_expert in enumerate(slots):
                    # The best candidate no earlier slot took that passes this slot's guard.
                    dropped_score = rows[t][dropped_expert]
                    for target in candidates:
                        if target not in offered_to and rows[t][target] >= min_ratio * dropped_score:
                            offered_to.add(target)
                            offers[bucket[target]].append((dropped_score, (t, j), (t, dropped_expert, target)))
                            break
            for b, items in offers.items():
                for _, _, (t, dropped_expert, target) in _keep_top(items, spare[b]):
                    chosen[t].add(target)
                    taken[t].add(target)
                    unplaced[t].remove(dropped_expert)
                    load[b] += 1
        return _output(scores, chosen, sums, normalize, renormalize)

    return _on_real_tokens(scores, valid_tokens, run, topk_indices, allowed)


def expanded_drop(
    scores: torch.Tensor,
    k: int,
    gamma: float,
    local_experts_per_rank: Sequence[Sequence[int]],
    tokens_per_rank: Sequence[int],
    *,
    normalize: bool = False,
    renormalize: bool = False,
    topk_indices: Optional[torch.Tensor] = None,
    valid_tokens: Optional[torch.Tensor] = None,
    allowed: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    if sum(tokens_per_rank) != scores.shape[0]:
        raise ValueError("tokens_per_rank must sum to the number of tokens")
    rank_of: List[int] = []
    for r, n in enumerate(tokens_per_rank):
        rank_of += [r] * n
    ranks = torch.tensor(rank_of, dtype=torch.int64)

    def run(scores, topk_indices, allowed, ranks):
        num_tokens, num_experts = scores.shape
        rows = _rows(scores)
        tops = _topk_lists(scores, k, topk_indices)
        may_use = _allowed_lists(allowed, num_tokens, num_experts)
        capacity = common.capacity_from_total(gamma, num_tokens * k, num_experts)
        per_expert: Dict[int, List[Tuple[float, int, int]]] = {e: [] for e in range(num_experts)}
        for t in range(num_tokens):
            local = local_experts_per_rank[int(ranks[t])]
            candidates = list(tops[t]) + [e for e in local if e not in tops[t] and may_use[t][e]]
            for e in candidates:
                per_expert[e].append((rows[t][e], t, t))
        chosen: List[Set[int]] = [set() for _ in range(num_tokens)]
        for e, items in per_expert.items():
            for _, _, t in _keep_top(items, capacity):
                chosen[t].add(e)
        sums = [sum(rows[t][e] for e in tops[t]) for t in range(num_tokens)]
        return _output(scores, chosen, sums, normalize, renormalize)

    return _on_real_tokens(scores, valid_tokens, run, topk_indices, allowed, ranks)


def _laser_pool(row: List[float], top: List[int], t_fix: float, pool: int) -> List[int]:
    """The token's candidates in score order (top-k first, as torch.topk gives them)."""
    best = row[top[0]]
    others = sorted((e for e in range(len(row)) if e not in top), key=lambda e: (-row[e], e))
    extra = [e for e in others[: max(pool - len(top), 0)] if row[e] >= t_fix * best]
    return list(top) + extra


def _least_loaded(pool: List[int], load: List[int], k: int) -> List[int]:
    ranked = sorted(range(len(pool)), key=lambda i: (load[pool[i]], i))  # ties: higher score
    return [pool[i] for i in ranked[:k]]


def _ranked_load(load: List[int], expert_ranks: Optional[Sequence[int]]) -> List[int]:
    """What "least loaded" compares, per expert: its own load, or (``load=rank``) its EP rank's total."""
    if expert_ranks is None:
        return load
    per_rank: Dict[int, int] = {}
    for e, r in enumerate(expert_ranks):
        per_rank[r] = per_rank.get(r, 0) + load[e]
    return [per_rank[r] for r in expert_ranks]


def laser_greedy(
    scores: torch.Tensor,
    k: int,
    eps_high: float,
    t_fix: float,
    pool: int,
    *,
    normalize: bool = False,
    renormalize: bool = False,
    valid_tokens: Optional[torch.Tensor] = None,
    expert_ranks: Optional[Sequence[int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """LASER exactly as docs/routers.md states it: flexible tokens one at a time.

    ``expert_ranks`` (``[E]``, each expert's EP rank): ``load=rank``, a
    candidate is ranked by its rank's load instead of its own.
    """
    if valid_tokens is not None:
        return _on_real_tokens(scores, valid_tokens, lambda s: laser_greedy(
            s, k, eps_high, t_fix, pool, normalize=normalize, renormalize=renormalize, expert_ranks=expert_ranks))
    num_tokens, num_experts = scores.shape
    rows = _rows(scores)
    tops = _topk_lists(scores, k)
    sums = [sum(rows[t][e] for e in tops[t]) for t in range(num_tokens)]
    flexible = [sums[t] < eps_high for t in range(num_tokens)]
    load = [0] * num_experts
    chosen: List[Set[int]] = [set() for _ in range(num_tokens)]
    for t in range(num_tokens):
        if not flexible[t]:
            chosen[t] = set(tops[t])
            for e in tops[t]:
                load[e] += 1
    for t in range(num_tokens):
        if flexible[t]:
            picks = _least_loaded(_laser_pool(rows[t], tops[t], t_fix, min(pool, num_experts)),
                                  _ranked_load(load, expert_ranks), k)
            chosen[t] = set(picks)
            for e in picks:
                load[e] += 1
    return _output(scores, chosen, sums, normalize, renormalize)


def water_fill(load: List[int], demand: List[int], units: int) -> List[int]:
    """Place units one at a time on the lowest ``load + quota`` with demand left (ties: lower id)."""
    quota = [0] * len(load)
    for _ in range(min(units, sum(demand))):
        e = min((e for e in range(len(load)) if quota[e] < demand[e]), key=lambda e: (load[e] + quota[e], e))
        quota[e] += 1
    return quota


def laser_waves(
    scores: torch.Tensor,
    k: int,
    eps_high: float,
    t_fix: float,
    pool: int,
    *,
    waves: int,
    rounds: int,
    normalize: bool = False,
    renormalize: bool = False,
    valid_tokens: Optional[torch.Tensor] = None,
    expert_ranks: Optional[Sequence[int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fast path's wave-and-quota scheme (see policies/laser.py), as loops: its oracle.

    ``expert_ranks``: ``load=rank`` (candidates ranked by their EP rank's
    load; the water fill and the quotas stay per expert).
    """
    if valid_tokens is not None:
        return _on_real_tokens(scores, valid_tokens, lambda s: laser_waves(
            s, k, eps_high, t_fix, pool, waves=waves, rounds=rounds, normalize=normalize,
            renormalize=renormalize, expert_ranks=expert_ranks))
    num_tokens, num_experts = scores.shape
    rows = _rows(scores)
    tops = _topk_lists(scores, k)
    sums = [sum(rows[t][e] for e in tops[t]) for t in range(num_tokens)]
    flexible = [t for t in range(num_tokens) if sums[t] < eps_high]
    load = [0] * num_experts
    chosen: List[Set[int]] = [set() for _ in range(num_tokens)]
    for t in range(num_tokens):
        if sums[t] >= eps_high:
            chosen[t] = set(tops[t])
            for e in tops[t]:
                load[e] += 1
    total = len(flexible)
    for wave in range(waves):
        members = [t for i, t in enumerate(flexible) if (i * waves) // max(total, 1) == wave]
        pools = {t: _laser_pool(rows[t], tops[t], t_fix, min(pool, num_experts)) for t in members}
        demand = [sum(e in pools[t] for t in members) for e in range(num_experts)]
        quota = water_fill(load, demand, len(members) * k)
        picked: Dict[int, List[int]] = {t: [] for t in members}
        for _ in range(rounds):
            offers: Dict[int, List[int]] = {e: [] for e in range(num_experts)}
            for t in members:
                allowed = [e for e in pools[t] if e not in picked[t] and quota[e] > 0]
                for e in _least_loaded(allowed, _ranked_load(load, expert_ranks), k - len(picked[t])):
                    offers[e].append(t)  # members are visited in token order
            for e, tokens in offers.items():
                accepted = tokens[: quota[e]]
                for t in accepted:
                    picked[t].append(e)
                load[e] += len(accepted)
                quota[e] -= len(accepted)
        extra: Dict[int, List[int]] = {}
        for t in members:  # every open slot sees the same loads
            allowed = [e for e in pools[t] if e not in picked[t]]
            extra[t] = _least_loaded(allowed, _ranked_load(load, expert_ranks), k - len(picked[t]))
        for t in members:
            for e in extra[t]:
                load[e] += 1
            chosen[t] = set(picked[t]) | set(extra[t])
    return _output(scores, chosen, sums, normalize, renormalize)


def decode_pack(
    scores: torch.Tensor,
    k: int,
    floor: int,
    *,
    t_fix: float = 1.0,
    pool: Optional[int] = None,
    slack: int = 0,
    rank_aware: bool = True,
    expert_ranks: Optional[Sequence[int]] = None,
    normalize: bool = False,
    renormalize: bool = False,
    topk_indices: Optional[torch.Tensor] = None,
    valid_tokens: Optional[torch.Tensor] = None,
    allowed: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """decode-pack (and, ``rank_aware=False``, OEA's rule) as docs/routers.md states it, with loops.

    ``expert_ranks`` (``[E]``, each expert's EP rank; None: one rank).
    """
    def run(s, tk, al):
        num_tokens, num_experts = s.shape
        ranks = [0] * num_experts if expert_ranks is None else [int(r) for r in expert_ranks]
        rows = _rows(s)
        tops = _topk_lists(s, k, tk)
        ok = _allowed_lists(al, num_tokens, num_experts)
        width = min(k if pool is None else pool, num_experts)
        pools = []
        for t in range(num_tokens):
            members = _laser_pool(rows[t], tops[t], t_fix, width)
            pools.append(members[:k] + [e for e in members[k:] if ok[t][e]])
        # Step 1: the floor and its activated set A0; top-k's activated set.
        active = {e for t in range(num_tokens) for e in tops[t][:floor]}
        top_active = {e for t in range(num_tokens) for e in tops[t]}
        if rank_aware:
            def per_rank(experts: Set[int]) -> Dict[int, int]:
                out = {r: 0 for r in ranks}
                for e in experts:
                    out[ranks[e]] += 1
                return out

            a0, atop = per_rank(active), per_rank(top_active)
            target = min(max(a0.values()) + slack, max(atop.values()))
            demand = [sum(1 for t in range(num_tokens) if e in tops[t][floor:]) for e in range(num_experts)]
            holders = [sum(1 for t in range(num_tokens) if e in pools[t][floor:]) for e in range(num_experts)]
            new: Set[int] = set()
            for r in a0:
                wanted = [e for e in range(num_experts) if ranks[e] == r and e not in active and holders[e] > 0]
                wanted.sort(key=lambda e: (-demand[e], -holders[e], e))
                new.update(wanted[: max(target - a0[r], 0)])
            active = active | new
        chosen: List[Set[int]] = []
        for t in range(num_tokens):
            picks = list(tops[t][:floor])
            for e in pools[t][floor:]:
                if len(picks) < k and e in active:
                    picks.append(e)
            chosen.append(set(picks))
        return _output(s, chosen, [sum(rows[t][e] for e in tops[t]) for t in range(num_tokens)], normalize,
                       renormalize)

    return _on_real_tokens(scores, valid_tokens, run, topk_indices, allowed)
