"""Multi-token-prediction (MTP) layers keep Megatron's ``topk`` routing (issue 22, item 2).

DeepSeek-V3-style MTP layers (``--mtp-num-layers``) are MoE layers too, but:
their ``layer_number`` restarts at 1 inside the MTP block at core_v0.19.0
(it would collide with decoder layer 1 in stats, layouts and plans), no plan
or calibration covers them, and their forwards run outside the dynamic
engine's step context (its padding rows would be routed as real tokens).
So the capaware routers leave them alone: :func:`moe_layers` (the list every
installer, stats reader and placement walks) does not include them, and a
``CapawareRouter`` built inside one (``capaware_spec``) routes with
Megatron's own ``TopKRouter.routing`` (:func:`is_mtp_router`). MTP layers
only draft tokens for speculative decoding; their load is a small share.
"""

from __future__ import annotations

from typing import Any, List

import torch
from megatron.core.transformer.moe.moe_layer import BaseMoELayer

#: Module classes (by name, every megatron-core release) that hold the MTP layers.
MTP_CONTAINERS = ("MultiTokenPredictionBlock", "MultiTokenPredictionLayer")


def mtp_moe_layers(model: torch.nn.Module) -> List[Any]:
    """The MoE layers inside ``model``'s MTP block(s), or whose router says it is an MTP layer (0.19+)."""
    found: List[Any] = []
    seen = set()
    for module in model.modules():
        if type(module).__name__ in MTP_CONTAINERS:
            for sub in module.modules():
                if isinstance(sub, BaseMoELayer) and id(sub) not in seen:
                    seen.add(id(sub))
                    found.append(sub)
        elif isinstance(module, BaseMoELayer) and is_mtp_router(getattr(module, "router", None)) \
                and id(module) not in seen:
            seen.add(id(module))
            found.append(module)
    return found


def is_mtp_router(router: Any) -> bool:
    """Whether a router belongs to an MTP layer (megatron-core >= 0.19 flags it ``is_mtp_layer``)."""
    return bool(getattr(router, "is_mtp_layer", False))
