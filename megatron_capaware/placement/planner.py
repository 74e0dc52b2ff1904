"""Expert placement and replication: which experts share an EP rank (pure, torch only).

A MoE layer under expert parallelism waits for its busiest rank, and a rank's
load is the sum of its experts' loads. Which experts share a rank changes
nothing in the model's function, so a placement that evens the rank loads is
a speedup at zero quality cost; replicas of hot experts (``R`` redundant
slots) split an expert's load over ranks. The ideas are those of DeepSeek's
EPLB (replicate the hottest expert per replica, then balanced packing);
this is an independent implementation.

Shapes: ``L`` layers, ``E`` logical experts, ``R`` redundant slots,
``S = E + R`` physical slots, ``W`` EP ranks, ``S / W`` slots per rank.
A placement of one layer is ``slots [S]`` (the logical expert each physical
slot holds; rank ``r`` owns slots ``r*S/W .. (r+1)*S/W - 1``) with every
expert on at least one slot and no rank holding two replicas of one expert.
Each replica is assumed to take an equal share of its expert's load
(round-robin or least-loaded replica choice).
"""

from __future__ import annotations

from megatron_capaware.errors import PlacementError  # noqa: F401 (defined there; re-exported)

import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch



@dataclass(frozen=True)
class LayerPlacement:
    """One layer's placement: ``slots [S]`` logical expert per physical slot, and its figures."""

    slots: List[int]
    num_ranks: int
    predicted_rank_peak: float  # max rank load / mean rank load under this placement
    contiguous_rank_peak: float  # the same for Megatron's contiguous placement, no replicas
    # Per-call busiest-rank figures on the fit and validation calls (placement/validate.py); None in older plans.
    figures: Optional[Dict[str, object]] = None

    @property
    def replicas(self) -> List[int]:
        """Replica count of each logical expert ``[E]``."""
        counts = [0] * (max(self.slots) + 1)
        for e in self.slots:
            counts[e] += 1
        return counts

    def rank_slots(self, rank: int) -> List[int]:
        per = len(self.slots) // self.num_ranks
        return self.slots[rank * per:(rank + 1) * per]


def check_loads(loads: torch.Tensor) -> torch.Tensor:
    """``[L, E]`` (or ``[E]``) finite, non-negative expert loads as float64 ``[L, E]``.

    Raises:
        PlacementError: wrong shape, NaN / Inf or negative values.
    """
    loads = torch.as_tensor(loads, dtype=torch.float64)
    if loads.dim() == 1:
        loads = loads.unsqueeze(0)
    if loads.dim() != 2 or loads.shape[1] < 1:
        raise PlacementError(f"loads must be [layers, experts], got shape {tuple(loads.shape)}")
    if not bool(torch.isfinite(loads).all()):
        raise PlacementError("loads contain NaN or Inf: record them again (capaware-plan) from a clean run")
    if bool((loads < 0).any()):
        raise PlacementError("loads must be >= 0 (token counts per expert); got negative values")
    return loads


def check_layout(num_experts: int, num_ranks: int, redundant: int) -> int:
    """Slots per rank ``(E + R) / W``; raises when the sizes cannot make a placement."""
    if num_ranks < 1 or redundant < 0:
        raise PlacementError(f"EP size {num_ranks} must be >= 1 and redundant slots {redundant} >= 0")
    slots = num_experts + redundant
    if slots % num_ranks:
        raise PlacementError(
            f"{num_experts} experts + {redundant} redundant slots = {slots} slots do not split evenly over "
            f"EP {num_ranks}: choose --redundant-experts so that E + R is a multiple of EP"
        )
    if redundant > num_experts * (num_ranks - 1):
        raise PlacementError(
            f"{redundant} redundant slots would put two replicas of an expert on one rank (at most "
            f"E * (EP - 1) = {num_experts * (num_ranks - 1)})"
        )
    return slots // num_ranks


def rank_loads(loads: torch.Tensor, slots: Sequence[int], num_ranks: int) -> torch.Tensor:
    """``[W]`` rank loads of one layer's ``loads [E]`` under ``slots`` (replicas share equally)."""
    slots_t = torch.as_tensor(list(slots), dtype=torch.int64)
    counts = torch.bincount(slots_t, minlength=loads.shape[0]).to(torch.float64)
    per_slot = loads.to(torch.float64)[slots_t] / counts[slots_t]
    return per_slot.view(num_ranks, -1).sum(dim=1)


def rank_peak(loads: torch.Tensor, slots: Sequence[int], num_ranks: int) -> float:
    """Busiest rank's load over the mean rank load (1.0 = perfectly balanced)."""
    per_rank = rank_loads(loads, slots, num_ranks)
    mean = float(per_rank.mean())
    return float(per_rank.max()) / mean if mean > 0 else 1.0


def contiguous_slots(num_experts: int) -> List[int]:
    """Megatron's placement: expert ``e`` on rank ``e // (E / W)`` (no replicas)."""
    return list(range(num_experts))


def replicate(loads: torch.Tensor, redundant: int, num_ranks: int) -> List[int]:
    """Replica counts ``[E]``: each redundant slot goes to the expert with the largest load per replica.

    An expert has at most ``num_ranks`` replicas (one per rank). Deterministic:
    ties go to the lower expert id.
    """
    counts = [1] * loads.shape[0]
    values = loads.tolist()
    for _ in range(redundant):
        open_experts = [e for e in range(len(values)) if counts[e] < num_ranks]
        best = max(open_experts, key=lambda e: (values[e] / counts[e], -e))
        counts[best] += 1
    return counts


def pack(loads: torch.Tensor, counts: Sequence[int], num_ranks: int) -> List[int]:
    """Balanced packing of the replicas into ``W`` ranks of equal slot count: ``slots [S]``.

    Replicas (replicated experts first, then by load, largest first; ties:
    lower expert id) go to the least-loaded rank that has a free slot and no
    replica of the same expert; then pairwise swaps between the busiest rank
    and any other lower the maximum while they can.
    """
    per_rank = sum(counts) // num_ranks
    # Replicated experts first (each needs that many distinct ranks, so placing
    # them early keeps every later choice feasible), then by load.
    items = sorted(((float(loads[e]) / c, e, c) for e, c in enumerate(counts) for _ in range(c)),
                   key=lambda item: (-item[2], -item[0], item[1]))
    bins: List[List[int]] = [[] for _ in range(num_ranks)]
    totals = [0.0] * num_ranks
    for weight, expert, _ in items:
        open_bins = [r for r in range(num_ranks) if len(bins[r]) < per_rank and expert not in bins[r]]
        if not open_bins:  # cannot happen when check_layout passed; kept as a clear error
            raise PlacementError(f"no rank can take another replica of expert {expert}")
        target = min(open_bins, key=lambda r: (totals[r], r))
        bins[target].append(expert)
        totals[target] += weight
    share = {e: float(loads[e]) / c for e, c in enumerate(counts)}
    improved = True
    while improved:
        improved = False
        hot = max(range(num_ranks), key=lambda r: (totals[r], -r))
        best = None
        for other in range(num_ranks):
            if other == hot:
                continue
            for i, a in enumerate(bins[hot]):
                for j, b in enumerate(bins[other]):
                    if a == b or b in bins[hot] or a in bins[other]:
                        continue
                    delta = share[a] - share[b]
                    if delta <= 0:
                        continue
                    new_max = max(totals[hot] - delta, totals[other] + delta)
                    if new_max < totals[hot] - 1e-12 and (best is None or new_max < best[0]):
                        best = (new_max, other, i, j, delta)
        if best is not None:
            _, other, i, j, delta = best
            bins[hot][i], bins[other][j] = bins[other][j], bins[hot][i]
            totals[hot] -= delta
            totals[other] += delta
            improved = True
    return [e for b in bins for e in sorted(b)]


def plan_layer(loads: torch.Tensor, num_ranks: int, redundant: int = 0, nodes: Optional[int] = None) -> LayerPlacement:
    """Placement of one layer from its expert loads ``[E]``.

    ``nodes``: hierarchical planning (node first, then GPU): experts are packed
    into ``nodes`` groups of equal size, then each node's experts and its share
    of the redundant slots are replicated and packed onto its GPUs, so a token
    crosses nodes no more than with contiguous placement's node split.
    """
    loads = check_loads(loads)[0]
    num_experts = loads.shape[0]
    check_layout(num_experts, num_ranks, redundant)
    if nodes and nodes > 1:
        if num_ranks % nodes or num_experts % nodes or redundant % nodes:
            raise PlacementError(
                f"--nodes {nodes} must divide the EP size {num_ranks}, the {num_experts} experts and the "
                f"{redundant} redundant slots"
            )
        groups = pack(loads, [1] * num_experts, nodes)
        per_node = num_experts // nodes
        slots: List[int] = []
        for n in range(nodes):
            experts = groups[n * per_node:(n + 1) * per_node]
            sub = loads[experts]
            local = plan_layer(sub, num_ranks // nodes, redundant // nodes)
            slots += [experts[e] for e in local.slots]
    else:
        slots = pack(loads, replicate(loads, redundant, num_ranks), num_ranks)
    return LayerPlacement(
        slots=slots, num_ranks=num_ranks,
        predicted_rank_peak=rank_peak(loads, slots, num_ranks),
        contiguous_rank_peak=rank_peak(loads, contiguous_slots(num_experts), num_ranks)
        if num_experts % num_ranks == 0 else float("nan"),
    )


def plan(loads: torch.Tensor, num_ranks: int, redundant: int = 0, nodes: Optional[int] = None) -> List[LayerPlacement]:
    """:func:`plan_layer` for every row of ``loads [L, E]``."""
    loads = check_loads(loads)
    return [plan_layer(row, num_ranks, redundant, nodes) for row in loads]


def best_placement_exhaustive(loads: torch.Tensor, num_ranks: int) -> float:
    """The lowest rank peak any placement without replicas reaches (exhaustive; small ``E`` only).

    The reference the fast planner is measured against (``E <= 12``).
    """
    loads = check_loads(loads)[0]
    num_experts = loads.shape[0]
    per = check_layout(num_experts, num_ranks, 0)
    if num_experts > 12:
        raise PlacementError(f"the exhaustive reference is for E <= 12, got {num_experts}")
    values = loads.tolist()
    mean = sum(values) / num_ranks
    best = float("inf")

    def search(remaining: List[int], current_max: float) -> None:
        nonlocal best
        if current_max >= best:
            return
        if not remaining:
            best = current_max
            return
        first, rest = remaining[0], remaining[1:]
        for combo in itertools.combinations(rest, per - 1):  # the group holding the first expert
            group = (first, *combo)
            left = [e for e in rest if e not in combo]
            search(left, max(current_max, sum(values[e] for e in group)))

    search(list(range(num_experts)), 0.0)
    return best / mean if mean > 0 else 1.0
