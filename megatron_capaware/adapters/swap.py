"""Attach capaware routing to the MoE layers of an already-built Megatron model.

:func:`install_capaware_routers` walks a model, turns every MoE layer's
``TopKRouter`` into a :class:`CapawareRouter` and its dispatcher into the
capaware dispatcher, in place: the objects keep their parameters, buffers,
sharding attributes and hooks (their class changes, nothing is copied), so a
loaded checkpoint stays loaded. Calling it again reconfigures the routers
(e.g. the evaluation sweeps router settings over one loaded model).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_capaware.adapters.dispatcher import capaware_dispatcher_class
from megatron_capaware.adapters.router import CapawareRouter, check_supported
from megatron_capaware.adapters.stats import LayerRoutingStats
from megatron_capaware.config import CapawareConfig, CapawareConfigError, load_calibration
from megatron_capaware.policies.collectives import LoadGroup

from megatron.core.transformer.moe.moe_layer import BaseMoELayer
from megatron.core.transformer.moe.router import TopKRouter


def moe_layers(model: torch.nn.Module) -> List[Any]:
    """The model's decoder MoE layers, in module order; MTP layers left out (issue 22, item 2).

    Multi-token-prediction layers (``--mtp-num-layers``) keep Megatron's own
    ``topk`` routing: no capaware router, no stats, no placement
    (:func:`megatron_capaware.adapters.mtp.mtp_moe_layers`).
    """
    from megatron_capaware.adapters.mtp import mtp_moe_layers

    mtp = {id(m) for m in mtp_moe_layers(model)}
    return [m for m in model.modules() if isinstance(m, BaseMoELayer) and id(m) not in mtp]


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


def _dispatchers(layer: Any) -> List[Any]:
    dispatchers = [layer.token_dispatcher]
    training = getattr(layer, "_training_token_dispatcher", None)
    if training is not None and training is not layer.token_dispatcher:
        dispatchers.append(training)
    return dispatchers


def preflight_layer(layer: Any, capaware: CapawareConfig) -> None:
    """Every check :func:`install_in_layer` makes, changing nothing (no collective).

    Raises:
        CapawareConfigError / TypeError: as :func:`install_in_layer`.
    """
    router = layer.router
    if type(router) not in (TopKRouter, CapawareRouter):
        raise CapawareConfigError(
            f"MoE layer {layer.layer_number} uses {type(router).__name__}; capaware routing replaces "
            "Megatron's TopKRouter only (inference-optimized routers are not supported)"
        )
    check_supported(layer.config, capaware)
    if capaware.router_type != "topk":  # topk (Megatron's routing) runs under any dispatcher
        for dispatcher in _dispatchers(layer):
            capaware_dispatcher_class(dispatcher)
    layout = getattr(router, "capaware_layout", None)
    if layout is not None:
        from megatron_capaware.adapters.placement import check_router_for_slots

        check_router_for_slots(capaware, len(layout.slots), layer.config.num_moe_experts)
    if capaware.router_type == "expanded-drop" and build_load_group(layer)[1] > 1:
        raise CapawareConfigError(
            "expanded-drop with tensor parallelism needs --sequence-parallel: without it the TP "
            "ranks hold copies of the same tokens on different EP ranks, whose local experts differ"
        )


def install_in_layer(layer: Any, capaware: CapawareConfig) -> LayerRoutingStats:
    """Make one MoE layer route with ``capaware``; returns its stats recorder.

    Validates first (:func:`preflight_layer`): a refused configuration leaves
    the layer as it was.
    """
    preflight_layer(layer, capaware)
    from megatron_capaware.adapters.inference_padding import install_dynamic_padding_hook

    install_dynamic_padding_hook()  # padding rows of the dynamic engine take no capacity
    router = layer.router
    router.__class__ = CapawareRouter
    router.capaware_setup(capaware)
    dispatchers = _dispatchers(layer)
    from megatron_capaware.adapters.dispatcher import adapt_dispatchers

    dispatchers = adapt_dispatchers(dispatchers, router, capaware.router_type)
    load_group, copies = build_load_group(layer)
    ep_size = layer.config.expert_model_parallel_size
    # Logical experts this rank computes (under a placement: those of its slots).
    layout = getattr(router, "capaware_layout", None)
    local_experts = list(layer.local_expert_indices) if layout is None else \
        [layout.slots[s] for s in layer.local_expert_indices]
    stats = LayerRoutingStats(
        layer_number=int(router.layer_number or layer.layer_number or 0),
        num_experts=layer.config.num_moe_experts,
        ep_size=ep_size,
        local_experts=local_experts,
        duplication=copies,
        load_group=load_group,
    )
    router.capaware_installed = True
    router.capaware_load_group = load_group
    router.capaware_local_experts = local_experts
    router.capaware_stats = stats if capaware.record_stats else None
    for dispatcher in dispatchers:
        dispatcher.capaware_stats = router.capaware_stats
    return stats


def install_capaware_routers(model: torch.nn.Module, capaware: CapawareConfig, *,
                             placement: Any = None, replica_policy: str = "least-loaded",
                             ) -> Dict[int, LayerRoutingStats]:
    """Make every MoE layer of ``model`` route with ``capaware`` (idempotent).

    ``placement``: a :class:`~megatron_capaware.placement.PlacementPlan` or
    the path of a plan file: the experts then move into the plan's layout
    (:func:`~megatron_capaware.adapters.placement.apply_placement`, with
    ``replica_policy``). Without it a placed model stays placed (reinstalling
    routers keeps the layout; :func:`~megatron_capaware.adapters.placement.remove_placement`
    undoes it).

    Returns:
        ``{layer_number: LayerRoutingStats}`` of the model's MoE layers.

    Every layer is validated before any is changed, then the ranks of each
    load group check that they install the same configuration on the same
    layout (:func:`~megatron_capaware.adapters.guards.check_rank_agreement`:
    one small all-gather; every rank of the group must call this).

    Raises:
        CapawareConfigError: unsupported Megatron options, a LASER
            calibration made for a different model, or ranks that disagree
            (raised on every rank of the group, naming the differing field).
    """
    from megatron_capaware.adapters.guards import (
        check_rank_agreement,
        distinct_load_groups,
        install_deferred_score_check,
    )

    layers = moe_layers(model)
    if not layers:
        raise CapawareConfigError("the model has no MoE layer (num_moe_experts unset?)")
    error: Optional[BaseException] = None
    try:
        if capaware.router_type == "laser" and capaware.laser_calibration:
            config = layers[0].config
            load_calibration(capaware.laser_calibration).check_model(
                [int(l.layer_number) for l in layers], config.num_moe_experts, config.moe_router_topk
            )
        elif capaware.router_type == "laser" and capaware.layer_params:
            missing = sorted({int(l.layer_number) for l in layers} - set(capaware.layer_params))
            if missing:
                raise CapawareConfigError(
                    f"LASER per-layer parameters are missing MoE layers {missing}; calibrate this model"
                )
        for layer in layers:
            preflight_layer(layer, capaware)
    except (CapawareConfigError, TypeError, ValueError) as err:
        error = err
    groups = distinct_load_groups(layers)
    for load_group, _ in groups.values():
        check_rank_agreement(layers, capaware, load_group, error)
    if error is not None:
        raise error
    if placement is not None:
        from megatron_capaware.adapters.placement import check_router_for_slots
        from megatron_capaware.placement.plan_file import PlacementPlan, load_plan

        plan = placement if isinstance(placement, PlacementPlan) else load_plan(placement)
        config = layers[0].config
        plan.check_model([int(l.layer_number) for l in layers], config.num_moe_experts,
                         config.expert_model_parallel_size)
        for layer in layers:
            check_router_for_slots(capaware, len(plan.layers[int(layer.layer_number)].slots), config.num_moe_experts)
    installed = {stats.layer_number: stats for stats in (install_in_layer(l, capaware) for l in layers)}
    if len(groups) == 1:  # one load group (every Megatron model): one score read per forward
        install_deferred_score_check(model, layers, layers[0].router.capaware_load_group)
    if placement is not None:
        from megatron_capaware.adapters.placement import apply_placement

        apply_placement(model, plan, replica_policy)
        installed = collect_stats(model)
    return installed


def collect_stats(model: torch.nn.Module) -> Dict[int, LayerRoutingStats]:
    """The stats recorders of an installed model, by layer number."""
    out: Dict[int, LayerRoutingStats] = {}
    for layer in moe_layers(model):
        stats = getattr(layer.router, "capaware_stats", None)
        if stats is not None:
            out[stats.layer_number] = stats
    return out


def reset_stats(model: torch.nn.Module) -> None:
    for stats in collect_stats(model).values():
        stats.reset()
