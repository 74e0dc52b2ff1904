"""Routing policies: pure torch functions that know nothing of Megatron.

One public function per policy, named as in ``docs/routers.md`` (the
semantics). Each takes the router's probabilities ``scores [T, E]`` and
returns Megatron's routing format ``(probs [T, E] float, routing_map [T, E]
bool)``, ``probs`` zero wherever ``routing_map`` is False. With
``return_decision=True`` they return a :class:`RoutingDecision` instead, which
also carries the global loads, drops and reroutes the policy already
computed; ``weights=False`` then skips the combine weights (``probs`` is
None) for callers that compute them (the Megatron router). ``group`` is an
optional ``torch.distributed`` process group over which loads are global.
``valid_tokens [T]`` bool (False: a padding token, which takes no expert and
no capacity) and, for the routers that add experts, ``allowed [T, E]`` bool
(the experts a token may be given: group-limited routing) are optional.
:mod:`megatron_capaware.policies.reference` holds loop implementations used
as test oracles.
"""

from megatron_capaware.policies.capacity import (
    capacity_drop,
    capacity_reroute,
    expanded_drop,
    expert_rank_map,
    local_experts_tensor,
    map_decision,
    topk,
)
from megatron_capaware.policies.common import RoutingInputError, group_limited_mask
from megatron_capaware.policies.decision import RoutingDecision
from megatron_capaware.policies.decode import decode_pack
from megatron_capaware.policies.laser import laser
from megatron_capaware.policies.selection import select_top_per_expert

__all__ = [
    "RoutingDecision",
    "RoutingInputError",
    "capacity_drop",
    "capacity_reroute",
    "decode_pack",
    "expanded_drop",
    "expert_rank_map",
    "group_limited_mask",
    "laser",
    "local_experts_tensor",
    "map_decision",
    "select_top_per_expert",
    "topk",
]
