"""Token-dispatcher behaviour for routing maps with any number of experts per token.

Megatron's ``alltoall`` dispatcher, when no capacity factor is set, sizes its
permutation buffer as ``tokens * k``: a router that drops assignments (fewer
than ``k``) or adds them (Expanded Drop) makes it fail with "Split sizes
doesn't match". The subclass here sizes it from the routing map instead (as
Megatron itself does in its capacity-factor mode), so dropped assignments
are never sent nor computed. Both dispatchers also record how many tokens
each local expert actually received.

Installed by changing the class of the dispatcher instance the layer built
(no state is rebuilt), for Megatron-Core 0.16 to 0.19.
"""

from __future__ import annotations

from typing import Any, Dict, List, Type

import torch
from megatron.core.transformer.moe.moe_utils import get_capacity
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)

from megatron_capaware.registry import router_type


class CapawareDispatcherMixin:
    """Records received tokens per local expert into the layer's stats.

    Reads the layer's :class:`~megatron_capaware.adapters.state.LayerRoutingState`
    (``capaware_state``, shared with the router; set by the installer).
    """

    capaware_state: Any = None

    @property
    def capaware_stats(self) -> Any:
        """The layer's ``LayerRoutingStats``, or None."""
        return self.capaware_state.stats if self.capaware_state is not None else None

    @property
    def capaware_variable_counts(self) -> bool:
        """True when this call may give a token other than ``k`` experts.

        Every router but those that keep exactly k per token (vanilla top-k, LASER: it moves
        assignments between a token's pool experts); LASER's count changes only on a call
        with padding tokens (no expert), which its router notes in the state; with a decode
        router that may keep fewer (``--capaware-decode-router decode-pack``) every call
        counts as variable. Otherwise Megatron's own sync point stays.
        """
        state = self.capaware_state
        if state is None:
            return False
        decode = getattr(state.config, "decode_router", None)  # a decode router may keep fewer than k
        return not router_type(state.config.router_type).keeps_k or (
            not router_type(state.config.router_type).is_vanilla and state.padded) or (
            decode is not None and not router_type(decode).keeps_k)

    def dispatch_postprocess(self, hidden_states, probs):  # type: ignore[override]
        result = super().dispatch_postprocess(hidden_states, probs)  # type: ignore[misc]
        # Under Megatron's drop-and-pad (its CUDA-graph steps) every expert receives its capacity,
        # padding included: not a count of tokens, and a captured step records nothing.
        if self.capaware_stats is not None and not getattr(self, "drop_and_pad", False):
            self.capaware_stats.record_received(result[1])
        return result


class CapawareAlltoAllTokenDispatcher(CapawareDispatcherMixin, MoEAlltoAllTokenDispatcher):
    """``alltoall`` dispatcher that sends exactly the assignments in the routing map."""

    def preprocess(self, routing_map):  # type: ignore[override]
        tokens_per_local_expert = super().preprocess(routing_map)
        if self.drop_and_pad:
            return self._pad_slots_to_expert_capacity(routing_map, tokens_per_local_expert)
        if self.capaware_variable_counts and not self.drop_and_pad:
            # Buffer size from the map, not tokens * k (as Megatron's capacity mode does).
            self.num_out_tokens = routing_map.sum()
            self._maybe_update_cuda_sync_point("before_permutation_1")
            # Megatron checked "sync point not before the device-to-host copy point"
            # inside preprocess, before this earlier sync point existed. Where the
            # copies come later (its CUDA-graph setting: before_ep_alltoall) the
            # sync would wait on an event not yet recorded: copy at the sync point
            # instead (every count is computed by now).
            priority = getattr(self, "cuda_sync_point_priority", None)
            dtoh = getattr(self, "cuda_dtoh_point", None)
            if priority and dtoh is not None and priority[dtoh] > priority[self.cuda_sync_point]:
                self.cuda_dtoh_point = self.cuda_sync_point
        return tokens_per_local_expert


    def _pad_slots_to_expert_capacity(self, routing_map, tokens_per_local_expert):
        """Megatron's drop-and-pad sizes, with each physical slot padded to its *expert's* capacity.

        Megatron sets drop-and-pad on its CUDA-graph steps (``set_decode_expert_padding``, factor
        ``f = E / k``) and sizes each expert's input as ``C = ceil(T * k / num_experts * f)``. Under
        a placement with replicas this dispatcher addresses ``S = E + R`` slots, so Megatron's
        formula would give ``ceil(T * E / S) < T`` per slot and cut assignments the router kept
        (its padded top-k gives every *logical* expert ``C = ceil(T * k / E * f)`` rows, and one
        replica may receive all of them). Here every slot gets ``C`` computed over the ``E``
        logical experts: a replica can never receive more, so nothing the router kept is cut,
        and the shapes stay static (``C * S`` rows sent). Without replicas (``S = E``) these are
        Megatron's own sizes, unchanged.
        """
        logical = int(self.config.num_moe_experts)
        if self.num_experts == logical:
            return tokens_per_local_expert
        capacity = get_capacity(num_tokens=routing_map.size(0) * self.config.moe_router_topk,
                                num_experts=logical, capacity_factor=self.moe_expert_capacity_factor)
        self.capacity = capacity
        self.num_out_tokens = capacity * self.num_experts
        self.num_global_tokens_per_local_expert = torch.full_like(self.num_global_tokens_per_local_expert, capacity)
        return torch.full_like(tokens_per_local_expert, capacity * self.tp_size * self.ep_size)


class CapawareAllGatherTokenDispatcher(CapawareDispatcherMixin, MoEAllGatherTokenDispatcher):
    """``allgather`` dispatcher (already map-driven) that records received tokens."""


CAPAWARE_DISPATCHERS: Dict[Type[Any], Type[Any]] = {
    MoEAlltoAllTokenDispatcher: CapawareAlltoAllTokenDispatcher,
    MoEAllGatherTokenDispatcher: CapawareAllGatherTokenDispatcher,
    CapawareAlltoAllTokenDispatcher: CapawareAlltoAllTokenDispatcher,
    CapawareAllGatherTokenDispatcher: CapawareAllGatherTokenDispatcher,
}


def capaware_dispatcher_class(dispatcher: Any) -> Type[Any]:
    """The capaware class for a dispatcher instance.

    Raises:
        TypeError: for a dispatcher this package does not adapt (flex/DeepEP,
            inference-only dispatchers).
    """
    cls = CAPAWARE_DISPATCHERS.get(type(dispatcher))
    if cls is None:
        raise TypeError(
            f"capaware routers support Megatron's alltoall and allgather token dispatchers, not "
            f"{type(dispatcher).__name__}; use --moe-token-dispatcher-type alltoall or allgather"
        )
    return cls


def retarget_dispatcher(dispatcher: Any, num_slots: int, local_slots: List[int]) -> None:
    """Point a token dispatcher at ``num_slots`` experts, ``local_slots`` of them here (as Megatron's init does).

    A placement (:mod:`megatron_capaware.adapters.placement`) calls this after
    moving the expert weights: the dispatcher then sends each physical slot's
    tokens to the rank that holds it.
    """
    dispatcher.num_local_experts = len(local_slots)
    dispatcher.local_expert_indices = list(local_slots)
    if hasattr(dispatcher, "num_experts"):
        dispatcher.num_experts = num_slots
    if hasattr(dispatcher, "sort_input_by_local_experts"):
        chunks = torch.arange(num_slots * dispatcher.tp_size, device=dispatcher.sort_input_by_local_experts.device)
        dispatcher.sort_input_by_local_experts = chunks.reshape(-1, len(local_slots)).T.ravel()
        dispatcher.restore_output_by_local_experts = chunks.reshape(len(local_slots), -1).T.ravel()


def adapt_dispatchers(dispatchers: List[Any], state: Any) -> List[Any]:
    """Turn a layer's dispatchers into the capaware classes reading ``state``; returns those adapted.

    Vanilla ``topk`` under a dispatcher this package does not adapt (flex / DeepEP) keeps
    Megatron's dispatcher unchanged (only the received-token counts go unrecorded); the
    other routers were refused before (:func:`capaware_dispatcher_class`).
    """
    adapted = []
    for dispatcher in dispatchers:
        if type(dispatcher) not in CAPAWARE_DISPATCHERS and router_type(state.config.router_type).is_vanilla:
            continue
        dispatcher.__class__ = capaware_dispatcher_class(dispatcher)
        dispatcher.capaware_state = state
        adapted.append(dispatcher)
    return adapted
