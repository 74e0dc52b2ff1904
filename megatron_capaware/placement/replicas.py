"""Logical experts -> physical slots at routing time (pure torch, Megatron-free).

The gate keeps its ``E`` outputs; a placement puts ``S = E + R`` physical
slots on ``W`` ranks (``S / W`` each, rank ``r`` owning slots
``r*S/W .. (r+1)*S/W - 1``). After the router has decided which logical
experts each token uses (``routing_map [T, E]``), every chosen expert is
computed by exactly one of its replicas:

- ``least-loaded``: expert ``e``'s assignments, numbered in global order
  (EP rank, then token), go to replica ``p mod m_e``. That is the replica with
  the fewest assignments so far, ties to the lowest replica index, so every
  replica gets ``floor`` or ``ceil`` of ``L_e / m_e``: the equal share the
  planner assumes. Exact over the group: one all-gather of ``[E]`` counts.
- ``round-robin``: token ``t`` of group rank ``g`` (global index
  ``g * T + t``; exact when every rank holds ``T`` tokens) uses replica
  ``(g * T + t) mod m_e``. No collective.

With ``R = 0`` every expert has one slot and both policies are the column
permutation ``map[:, slot] = logical[:, slots[slot]]``. Shapes in comments:
``T`` tokens, ``E`` logical experts, ``S`` slots, ``M`` most replicas of one
expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from megatron_capaware.placement.planner import PlacementError
from megatron_capaware.policies.collectives import ProcessGroup, exclusive_rank_prefix, group_rank

REPLICA_POLICIES = ("least-loaded", "round-robin")


@dataclass(frozen=True)
class SlotTable:
    """One layer's placement as index tensors (all int64, on one device).

    Attributes:
        slot_expert: ``[S]`` logical expert of each physical slot.
        slot_replica: ``[S]`` which replica of its expert each slot is (0-based, slot order).
        replica_slots: ``[E, M]`` the slots of each expert's replicas in slot
            order, padded with the expert's first slot.
        replica_count: ``[E]`` replicas of each expert (>= 1).
        num_ranks: ``W``.
    """

    slot_expert: torch.Tensor
    slot_replica: torch.Tensor
    replica_slots: torch.Tensor
    replica_count: torch.Tensor
    num_ranks: int

    @property
    def num_slots(self) -> int:
        return int(self.slot_expert.numel())

    @property
    def num_experts(self) -> int:
        return int(self.replica_count.numel())

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.num_ranks

    def to(self, device: torch.device) -> "SlotTable":
        return SlotTable(self.slot_expert.to(device), self.slot_replica.to(device), self.replica_slots.to(device),
                         self.replica_count.to(device), self.num_ranks)


def slot_table(slots: Sequence[int], num_ranks: int, device: Optional[torch.device] = None) -> SlotTable:
    """Index tensors of a placement ``slots [S]`` (the logical expert of each slot) over ``num_ranks``.

    Raises:
        PlacementError: slots that do not split over the ranks, an expert
            without a slot, or two replicas of an expert on one rank.
    """
    slots = [int(e) for e in slots]
    num_slots = len(slots)
    if num_ranks < 1 or num_slots % num_ranks:
        raise PlacementError(f"{num_slots} slots do not split evenly over {num_ranks} EP ranks")
    num_experts = max(slots) + 1 if slots else 0
    if min(slots, default=0) < 0 or sorted(set(slots)) != list(range(num_experts)):
        raise PlacementError(f"slots {slots} must hold every expert 0..E-1 at least once")
    per = num_slots // num_ranks
    for rank in range(num_ranks):
        held = slots[rank * per:(rank + 1) * per]
        if len(set(held)) != len(held):
            raise PlacementError(f"rank {rank} holds two replicas of one expert ({held}): replicas must be on "
                                 "different ranks")
    by_expert = [[s for s, e in enumerate(slots) if e == x] for x in range(num_experts)]
    width = max(len(r) for r in by_expert)
    replica_slots = [r + [r[0]] * (width - len(r)) for r in by_expert]
    slot_replica = [by_expert[e].index(s) for s, e in enumerate(slots)]
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    return SlotTable(as_tensor(slots), as_tensor(slot_replica), as_tensor(replica_slots),
                     as_tensor([len(r) for r in by_expert]), num_ranks)


def replica_choice(routing_map: torch.Tensor, table: SlotTable, policy: str = "least-loaded",
                   group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """The replica each assignment uses: ``[T, E]`` int64 in ``[0, m_e)`` (any value off the map).

    Args:
        routing_map: ``[T, E]`` bool, the logical decision of this rank's tokens.
        table: the layer's :class:`SlotTable` (on the map's device).
        policy: ``least-loaded`` (exact over ``group``) or ``round-robin``.
        group: the group the layer's loads are global over (None: this rank only).

    Collectives: ``least-loaded`` with a group and ``R > 0``: one all-gather
    of ``[E]`` int64. None otherwise.
    """
    if policy not in REPLICA_POLICIES:
        raise PlacementError(f"replica policy {policy!r}: use one of {', '.join(REPLICA_POLICIES)}")
    num_tokens = routing_map.shape[0]
    count = table.replica_count  # [E]
    if table.num_slots == table.num_experts:  # no replicas: nothing to choose, no collective
        return torch.zeros(routing_map.shape, dtype=torch.int64, device=routing_map.device)
    if policy == "round-robin":
        index = group_rank(group) * num_tokens + torch.arange(num_tokens, device=routing_map.device)
        return index.unsqueeze(1) % count  # [T, E]
    taken = routing_map.to(torch.int64)
    before = exclusive_rank_prefix(taken.sum(dim=0), group)  # [E] assignments of earlier ranks
    position = before + taken.cumsum(dim=0) - taken  # [T, E] global number of each assignment
    return position % count


def to_physical(probs: torch.Tensor, routing_map: torch.Tensor, table: SlotTable,
                replica: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logical decision ``[T, E]`` -> physical ``(probs [T, S], routing_map [T, S])``.

    Each row's ``E`` experts land on ``E`` distinct slots (each slot belongs to
    one expert), so the scatter writes every slot at most once per row.
    """
    width = table.replica_slots.shape[1]
    flat = torch.arange(table.num_experts, device=routing_map.device) * width + replica  # [T, E]
    slot = table.replica_slots.reshape(-1)[flat]  # [T, E]
    shape = (routing_map.shape[0], table.num_slots)
    physical_map = torch.zeros(shape, dtype=torch.bool, device=routing_map.device).scatter_(1, slot, routing_map)
    physical_probs = torch.zeros(shape, dtype=probs.dtype, device=probs.device).scatter_(
        1, slot, torch.where(routing_map, probs, torch.zeros_like(probs)))
    return physical_probs, physical_map


def even_slot_loads(loads: torch.Tensor, table: SlotTable) -> torch.Tensor:
    """Per-slot loads ``[S]`` when every expert's load ``[E]`` is split as ``least-loaded`` splits it.

    Replica ``q`` of expert ``e`` gets ``L_e // m_e + (q < L_e mod m_e)``: the
    exact per-slot load of the ``least-loaded`` policy, from the global
    expert loads alone (no collective).
    """
    loads = loads.to(torch.int64)[table.slot_expert]  # [S]
    count = table.replica_count[table.slot_expert]
    return loads // count + (table.slot_replica < loads % count).to(torch.int64)


def to_physical_reference(probs: torch.Tensor, routing_map: torch.Tensor, slots: Sequence[int], num_ranks: int,
                          policy: str, rank: int = 0, counts_before: Optional[Sequence[int]] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Loop reference of :func:`replica_choice` + :func:`to_physical` (tests only; slow).

    ``counts_before[e]``: assignments of expert ``e`` on the ranks before this
    one (``least-loaded``); ``rank``: this rank's index (``round-robin``).
    """
    slots = list(slots)
    num_tokens, num_experts = routing_map.shape
    replicas = [[s for s, x in enumerate(slots) if x == e] for e in range(num_experts)]
    taken = list(counts_before) if counts_before is not None else [0] * num_experts
    out_probs = torch.zeros(num_tokens, len(slots), dtype=probs.dtype)
    out_map = torch.zeros(num_tokens, len(slots), dtype=torch.bool)
    for t in range(num_tokens):
        for e in range(num_experts):
            if not bool(routing_map[t, e]):
                continue
            if policy == "least-loaded":
                choice = replicas[e][taken[e] % len(replicas[e])]
                taken[e] += 1
            else:
                choice = replicas[e][(rank * num_tokens + t) % len(replicas[e])]
            out_map[t, choice] = True
            out_probs[t, choice] = probs[t, e]
    return out_probs, out_map
