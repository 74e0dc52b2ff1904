"""A placement's logical-to-physical slot mapping, on the routing side of the dispatcher.

Under a placement (:mod:`megatron_capaware.adapters.placement`) the token
dispatcher addresses ``S = E + R`` physical slots. These functions turn a
router's logical ``[T, E]`` decision into slots ``[T, S]`` (each chosen expert
to one of its replicas), give the capacity routers the slot view they decide
on under replicas, and count per-slot loads for the stats. Each reads the
layer's :class:`~megatron_capaware.adapters.state.LayerRoutingState` (its
layout and slot table, built on the router's device at install). The
dispatcher itself is pointed at the slots by
:func:`~megatron_capaware.adapters.dispatcher.retarget_dispatcher`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import torch

from megatron_capaware.adapters.state import LayerRoutingState
from megatron_capaware.placement.replicas import even_slot_loads, replica_choice, to_physical
from megatron_capaware.policies.collectives import all_reduce_sum, group_rank
from megatron_capaware.registry import EXPANDED_DROP


def slot_loads(state: LayerRoutingState, decision: Any, physical_map: torch.Tensor) -> torch.Tensor:
    """This call's global per-slot loads ``[S]`` (device-side; for the stats).

    ``--capaware-scope local``: this rank's slot loads, counted from ``physical_map`` with no
    collective (the stats sum them over the group when reported: ``LayerRoutingStats.reduce_pending``).
    """
    layout = state.layout
    if state.config.scope == "local":
        return physical_map.sum(dim=0).to(torch.int64)
    if layout.replica_policy == "least-loaded":  # exact from the expert loads, no collective
        return even_slot_loads(decision.global_loads, layout.table)
    # round-robin splits are data-dependent: count them (one all-reduce of [S], with stats on only).
    return all_reduce_sum(physical_map.sum(dim=0).to(torch.int64), state.load_group)


def logical_decision(state: LayerRoutingState, decision: Any) -> Tuple[Any, Any]:
    """A slot-space decision -> ``(slot loads [S], the decision with logical loads [E])``."""
    if decision is None:
        return None, None
    table = state.layout.table
    slot_loads = decision.global_loads.to(torch.int64)
    logical = torch.zeros(table.num_experts, dtype=torch.int64, device=slot_loads.device).index_add_(
        0, table.slot_expert, slot_loads)
    return slot_loads, dataclasses.replace(decision, global_loads=logical)


def slot_allowed(state: LayerRoutingState, allowed: Optional[torch.Tensor], logical: torch.Tensor,
                 slots: torch.Tensor) -> torch.Tensor:
    """``[T, S]`` bool: the slots a reroute or an expansion may give each token.

    A held expert (in the token's top-k): only the replica already chosen.
    Any other expert: one designated replica, round-robin by token index
    (expanded-drop: this rank's own where it has one, as it adds local slots).
    Under group-limited routing, only the experts of the token's groups.
    """
    table = state.layout.table
    num_tokens = slots.shape[0]
    device = slots.device
    count = table.replica_count  # [E]
    index = group_rank(state.load_group) * num_tokens + torch.arange(num_tokens, device=device)
    replica = index.unsqueeze(1) % count  # [T, E] round-robin
    if state.config.router_type == EXPANDED_DROP:  # it adds this rank's slots (refused with TP copies,
        # whose ranks differ: reroute must not depend on the rank, so TP copies decide alike)
        local = state.local_replica  # [E]: this rank's replica index of each expert, -1: none
        replica = torch.where(local >= 0, local, replica)
    width = table.replica_slots.shape[1]
    designated = table.replica_slots.reshape(-1)[torch.arange(table.num_experts, device=device) * width + replica]
    mask = torch.zeros((num_tokens, table.num_slots), dtype=torch.bool, device=device).scatter_(1, designated, True)
    held = torch.zeros((num_tokens, table.num_experts), dtype=torch.bool, device=device).scatter_(1, logical, True)
    chosen = torch.zeros_like(mask).scatter_(1, slots, True)
    mask = (mask & ~held[:, table.slot_expert]) | chosen
    if allowed is not None:
        mask = mask & allowed[:, table.slot_expert]
    return mask


def slot_choice(state: LayerRoutingState, scores: torch.Tensor, indices: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logical top-k ``indices [T, k]`` -> their replicas' slots ``[T, k]``, and scores per slot ``[T, S]``."""
    layout = state.layout
    table = layout.table
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, indices, True)  # [T, E]
    replica = replica_choice(chosen, table, layout.replica_policy, state.load_group)  # [T, E]
    width = table.replica_slots.shape[1]
    slots = table.replica_slots.reshape(-1)[indices * width + replica.gather(1, indices)]  # [T, k]
    return slots, scores[:, table.slot_expert]


def to_slots(state: LayerRoutingState, probs: torch.Tensor, routing_map: torch.Tensor
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logical ``[T, E]`` decision -> the placement's physical slots ``[T, S]`` (adapters/placement.py).

    Replica choice over the load group whatever the scope (a placement
    changes where experts run, not the routing semantics).
    """
    layout = state.layout
    table = layout.table
    replica = replica_choice(routing_map, table, layout.replica_policy, state.load_group)
    return to_physical(probs, routing_map, table, replica)
