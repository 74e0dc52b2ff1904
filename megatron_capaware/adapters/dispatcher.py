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

from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)


class CapawareDispatcherMixin:
    """Records received tokens per local expert into ``capaware_stats``.

    Attributes:
        capaware_stats: a ``LayerRoutingStats`` or None.
        capaware_variable_counts: True when the router may give a token other
            than ``k`` experts (every capaware router but ``topk``).
    """

    capaware_stats: Any = None
    capaware_variable_counts: bool = False
    #: The layer's router; LASER gives every token exactly k experts unless this call had
    #: padding tokens (its ``capaware_padded``), so Megatron's own sync point stays otherwise.
    capaware_router: Any = None

    def _capaware_counts_vary(self) -> bool:
        if self.capaware_variable_counts:
            return True
        return bool(getattr(self.capaware_router, "capaware_padded", False))

    def dispatch_postprocess(self, hidden_states, probs):  # type: ignore[override]
        result = super().dispatch_postprocess(hidden_states, probs)  # type: ignore[misc]
        if self.capaware_stats is not None:
            self.capaware_stats.record_received(result[1])
        return result


class CapawareAlltoAllTokenDispatcher(CapawareDispatcherMixin, MoEAlltoAllTokenDispatcher):
    """``alltoall`` dispatcher that sends exactly the assignments in the routing map."""

    def preprocess(self, routing_map):  # type: ignore[override]
        tokens_per_local_expert = super().preprocess(routing_map)
        if self._capaware_counts_vary() and not self.drop_and_pad:
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


#: Routers that may give a token other than k experts on any call. LASER moves
#: assignments between a token's pool experts and keeps k per token; only padding
#: tokens (no expert) change its count, which the router reports per call.
VARIABLE_COUNT_ROUTERS = ("capacity-drop", "capacity-reroute", "expanded-drop")


def adapt_dispatchers(dispatchers: List[Any], router: Any, router_type: str) -> List[Any]:
    """Turn a layer's dispatchers into the capaware classes; returns those adapted.

    ``topk`` under a dispatcher this package does not adapt (flex / DeepEP) keeps
    Megatron's dispatcher unchanged (only the received-token counts go
    unrecorded); the other routers were refused before (:func:`capaware_dispatcher_class`).
    """
    adapted = []
    for dispatcher in dispatchers:
        if type(dispatcher) not in CAPAWARE_DISPATCHERS and router_type == "topk":
            continue
        dispatcher.__class__ = capaware_dispatcher_class(dispatcher)
        dispatcher.capaware_variable_counts = router_type in VARIABLE_COUNT_ROUTERS
        dispatcher.capaware_router = router if router_type == "laser" else None  # only LASER's count follows padding
        adapted.append(dispatcher)
    return adapted
