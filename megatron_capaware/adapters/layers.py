"""Finding a Megatron model's MoE layers, their token dispatchers and their load groups.

Pure look-ups on built Megatron modules: nothing here changes a module or
issues a collective.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_layer import BaseMoELayer

from megatron_capaware.adapters.mtp import mtp_moe_layers
from megatron_capaware.policies.collectives import LoadGroup


def moe_layers(model: torch.nn.Module) -> List[Any]:
    """The model's decoder MoE layers, in module order; MTP layers left out (issue 22, item 2).

    Multi-token-prediction layers (``--mtp-num-layers``) keep Megatron's own
    ``topk`` routing: no capaware router, no stats, no placement
    (:func:`megatron_capaware.adapters.mtp.mtp_moe_layers`).
    """
    return [layer for _, layer in named_moe_layers(model)]


def named_moe_layers(model: torch.nn.Module) -> List[Tuple[str, Any]]:
    """``(qualified module name, layer)`` of the model's decoder MoE layers (MTP left out), in module order.

    The name identifies a layer: Megatron's ``layer_number`` restarts inside
    the Multi-Token-Prediction block, so two MoE layers can share it.
    """
    mtp = {id(m) for m in mtp_moe_layers(model)}
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseMoELayer) and id(m) not in mtp]


def dispatchers(layer: Any) -> List[Any]:
    """The layer's token dispatchers (the inference one, and a separate training one if any)."""
    out = [layer.token_dispatcher]
    training = getattr(layer, "_training_token_dispatcher", None)
    if training is not None and training is not layer.token_dispatcher:
        out.append(training)
    return out


def build_load_group(layer: Any) -> Tuple[Optional[LoadGroup], int]:
    """The group over which a layer's expert loads are global, and token duplication.

    Tokens reach the layer's experts from every rank of the dispatcher's
    expert-TP x EP group. Without sequence parallelism, the attention-TP
    ranks inside that group hold the same tokens; they are counted once.

    Returns:
        ``(load group or None for a single rank, copies of each token)``.
    """
    dispatcher = layer.token_dispatcher
    group = getattr(dispatcher, "tp_ep_group", None)
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None, 1
    me = dist.get_rank()
    members = dist.get_process_group_ranks(group)
    config = layer.config
    tp_group = layer.router.tp_group
    copies = [me]
    if not config.sequence_parallel and tp_group is not None and dist.get_world_size(tp_group) > 1:
        copies = sorted(set(dist.get_process_group_ranks(tp_group)) & set(members))
    primary = min(copies)
    load_group = LoadGroup(group=group, counts_weight=1 if me == primary else 0,
                           primary_rank=members.index(primary))
    return load_group, len(copies)


def distinct_load_groups(layers: Sequence[Any]) -> Dict[int, Tuple[Any, List[Any]]]:
    """``{id(process group): (load group, its layers)}`` in layer order."""
    out: Dict[int, Tuple[Any, List[Any]]] = {}
    for layer in layers:
        group, _ = build_load_group(layer)
        pg = group.group if isinstance(group, LoadGroup) else group
        key = id(pg)
        if key not in out:
            out[key] = (group, [])
        out[key][1].append(layer)
    return out
