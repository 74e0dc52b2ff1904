"""Routing policies: pure torch functions that know nothing of Megatron.

Each takes the router's probabilities ``scores [T, E]`` and returns Megatron's
routing format ``(probs [T, E] float, routing_map [T, E] bool)``, ``probs``
zero wherever ``routing_map`` is False (see ``shared/SPEC.md``). ``group`` is
an optional ``torch.distributed`` process group over which loads are global.

The ``*_decision`` variants return a :class:`RoutingDecision` that also
carries the global loads, drops and reroutes the policy already computed.
:mod:`megatron_capaware.policies.reference` holds loop implementations used
as test oracles.
"""

from megatron_capaware.policies._common import RoutingInputError
from megatron_capaware.policies.capacity import (
    capacity_drop,
    capacity_drop_decision,
    capacity_reroute,
    capacity_reroute_decision,
    expanded_drop,
    expanded_drop_decision,
    map_decision,
    topk,
    topk_decision,
)
from megatron_capaware.policies.decision import RoutingDecision
from megatron_capaware.policies.laser import laser, laser_decision
from megatron_capaware.policies.selection import select_top_per_expert

__all__ = [
    "RoutingDecision",
    "RoutingInputError",
    "capacity_drop",
    "capacity_drop_decision",
    "capacity_reroute",
    "capacity_reroute_decision",
    "expanded_drop",
    "expanded_drop_decision",
    "laser",
    "laser_decision",
    "map_decision",
    "select_top_per_expert",
    "topk",
    "topk_decision",
]
