"""The one installer: capaware routing into the MoE layers of a Megatron model.

Every path goes through :func:`install_layers`: :func:`install_capaware_routers`
(a built model: the tools, a user's script, ``capaware-generate``), a capaware
spec (:func:`~megatron_capaware.adapters.spec.capaware_spec`: each layer as it
is built) and the Megatron-LM launcher (each layer at its first forward). Its
steps, in order:

1. **validate** every layer (refusals, LASER calibration, layout) changing nothing;
2. **agree**: the ranks of each load group compare a digest of the
   configuration and layout (one small all-gather); a rank whose validation
   failed makes every rank raise;
3. **place** the experts into a placement plan's layout, if one is given;
4. **install**: each MoE layer's router and dispatchers are turned into the
   capaware classes in place (parameters, buffers and hooks kept: a loaded
   checkpoint stays loaded) and share one
   :class:`~megatron_capaware.adapters.state.LayerRoutingState`, whose device
   tensors are built now;
5. **score check**: one :class:`~megatron_capaware.adapters.guards.DeferredScoreCheck`
   per load group and install, read once per model forward.

Calling it again reconfigures the routers (the evaluation sweeps router
settings over one loaded model).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_capaware.adapters.dispatcher import adapt_dispatchers, capaware_dispatcher_class
from megatron_capaware.adapters.guards import DeferredScoreCheck, check_rank_agreement
from megatron_capaware.adapters.inference_padding import install_dynamic_padding_hook
from megatron_capaware.adapters.layers import (
    build_load_group,
    dispatchers,
    distinct_load_groups,
    moe_layers,
    named_moe_layers,
)
from megatron_capaware.adapters.placement import check_router_for_slots, place_layers
from megatron_capaware.adapters.router import CapawareRouter, check_supported
from megatron_capaware.adapters.state import LayerRoutingState
from megatron_capaware.adapters.stats import LayerRoutingStats
from megatron_capaware.config import CapawareConfig, CapawareConfigError, load_calibration
from megatron_capaware.placement.plan_file import PlacementPlan, load_plan
from megatron_capaware.registry import LASER, router_type

__all__ = ["collect_stats", "install_capaware_routers", "install_layers", "moe_layers", "preflight_layer",
           "reset_stats"]


def preflight_layer(layer: Any, capaware: CapawareConfig) -> None:
    """Every check the installer makes on one layer, changing nothing (no collective).

    Raises:
        CapawareConfigError / TypeError: naming the conflicting option and the fix.
    """
    router = layer.router
    if type(router) not in (TopKRouter, CapawareRouter):
        raise CapawareConfigError(
            f"MoE layer {layer.layer_number} uses {type(router).__name__}; capaware routing replaces "
            "Megatron's TopKRouter only (inference-optimized routers are not supported)"
        )
    check_supported(layer.config, capaware)
    if not router_type(capaware.router_type).is_vanilla:  # topk (Megatron's routing) runs under any dispatcher
        for dispatcher in dispatchers(layer):
            capaware_dispatcher_class(dispatcher)
    layout = getattr(router, "capaware_layout", None) if isinstance(router, CapawareRouter) else None
    if layout is not None:
        check_router_for_slots(capaware, len(layout.slots), layer.config.num_moe_experts)
    if not router_type(capaware.router_type).token_copies and build_load_group(layer)[1] > 1:
        raise CapawareConfigError(
            f"{capaware.router_type} with tensor parallelism needs --sequence-parallel: without it the TP "
            "ranks hold copies of the same tokens on different EP ranks, whose local experts differ"
        )


def _check_calibration(layers: Sequence[Any], capaware: CapawareConfig, whole_model: bool) -> None:
    """A LASER calibration (file or per-layer parameters) must cover these layers and this model."""
    if not capaware.layer_params and not capaware.laser_calibration:
        return
    config = layers[0].config
    numbers = [int(layer.layer_number) for layer in layers]
    if capaware.laser_calibration:
        load_calibration(capaware.laser_calibration).check_model(
            numbers if whole_model else None, config.num_moe_experts, config.moe_router_topk)
    missing = sorted(set(numbers) - set(capaware.layer_params))
    if missing:
        raise CapawareConfigError(
            f"LASER calibration {capaware.laser_calibration or ''} has no parameters for MoE layer(s) {missing} "
            f"(it holds layers {sorted(capaware.layer_params)}): it was made for another model; run "
            "capaware-calibrate on this checkpoint")


def _attach(layer: Any, name: str, capaware: CapawareConfig, score_check: Optional[DeferredScoreCheck]
            ) -> LayerRoutingState:
    """Step 4 for one validated layer: the capaware classes and one shared, built state."""
    router = layer.router
    previous = router.__dict__.get("capaware_state")
    router.__class__ = CapawareRouter
    router.capaware_setup(capaware)
    state = router.capaware_state
    load_group, copies = build_load_group(layer)
    layout = previous.layout if previous is not None else None
    # Logical experts this rank computes (under a placement: those of its slots).
    local_experts = list(layer.local_expert_indices) if layout is None else \
        [layout.slots[s] for s in layer.local_expert_indices]
    stats = LayerRoutingStats(
        layer_number=int(router.layer_number or layer.layer_number or 0),
        num_experts=layer.config.num_moe_experts,
        ep_size=layer.config.expert_model_parallel_size,
        local_experts=local_experts,
        duplication=copies,
        load_group=load_group,
        # Local scope: each call's figures are this rank's, summed over the group when reported.
        reduce_group=load_group if capaware.scope == "local" else None,
    )
    state.name = name or state.name
    state.load_group = load_group
    state.local_experts = local_experts
    state.stats = stats if capaware.record_stats else None
    state.score_check = score_check
    state.installed = True
    state.build_tensors(router.weight.device)
    if state.score_check_hook is None:  # read the model's deferred score check after this layer's experts
        state.score_check_hook = layer.register_forward_hook(_after_moe_forward)
    adapt_dispatchers(dispatchers(layer), state)
    return state


def _after_moe_forward(layer: Any, *_: Any) -> None:
    """Forward hook of an installed MoE layer: the deferred score check reads once the model's forward is done."""
    check = layer.router.capaware_state.score_check
    if check is not None:
        check.maybe_check()


def install_layers(layers: Sequence[Any], capaware: CapawareConfig, *, placement: Any = None,
                   replica_policy: str = "least-loaded", names: Optional[Sequence[str]] = None,
                   whole_model: bool = True, score_check: Optional[DeferredScoreCheck] = None,
                   ) -> List[LayerRoutingState]:
    """Install ``capaware`` in these MoE layers: validate, agree, place, install, score check.

    Every rank of the layers' load groups must call this with its own copies
    of the same layers (it issues collectives).

    Args:
        layers: MoE layers (``BaseMoELayer``), in module order.
        capaware: the router configuration.
        placement: a :class:`~megatron_capaware.placement.PlacementPlan` or a plan file: the experts
            move into its layout after the checks (None: a placed layer stays placed).
        replica_policy: which replica computes a chosen expert under a plan with replicas.
        names: the layers' qualified module names (their identity); default: empty.
        whole_model: ``layers`` are all the model's MoE layers (a plan or calibration must cover
            exactly them); False for per-layer installation (the launcher).
        score_check: the deferred score check these layers share with the model's other layers
            (per-layer installation: the spec, the launcher; its ``expected`` is the caller's);
            default: one per load group, expecting these layers.

    Returns:
        The layers' states, in order.

    Raises:
        CapawareConfigError / PlacementError: unsupported options, a calibration or plan made for
            another model, or ranks that disagree (raised on every rank of the group, nothing changed).
    """
    if not layers:
        raise CapawareConfigError("the model has no MoE layer (num_moe_experts unset?)")
    error: Optional[BaseException] = None
    plan: Optional[PlacementPlan] = None
    try:  # 1. validate, changing nothing
        if capaware.router_type == LASER:
            _check_calibration(layers, capaware, whole_model)
        for layer in layers:
            preflight_layer(layer, capaware)
        if placement is not None:
            plan = placement if isinstance(placement, PlacementPlan) else load_plan(placement)
            config = layers[0].config
            if whole_model:
                plan.check_model([int(l.layer_number) for l in layers], config.num_moe_experts,
                                 config.expert_model_parallel_size)
            for layer in layers:
                layer_plan = plan.layers.get(int(layer.layer_number))
                if layer_plan is not None:
                    check_router_for_slots(capaware, len(layer_plan.slots), config.num_moe_experts)
    except (CapawareConfigError, TypeError, ValueError) as err:
        error = err
    groups = distinct_load_groups(layers)
    for load_group, group_layers in groups.values():  # 2. agree (raises everywhere on any failure)
        check_rank_agreement(group_layers, capaware, load_group, error)
    if error is not None:
        raise error
    install_dynamic_padding_hook()  # padding rows of the dynamic engine take no capacity
    names = list(names) if names is not None else [""] * len(layers)
    checks = {key: DeferredScoreCheck(group, len(group_layers)) for key, (group, group_layers) in groups.items()}
    states = []
    for layer, name in zip(layers, names):  # 4. install (before placing: placement updates the state)
        group, _ = build_load_group(layer)
        check = score_check if score_check is not None else checks[id(getattr(group, "group", group))]
        if check.group is None:
            check.group = group
        states.append(_attach(layer, name, capaware, check if capaware.check_scores else None))
    if plan is not None:  # 3. place: every rank of the EP group moves the same experts
        place_layers(list(layers), plan, replica_policy, whole_model=whole_model)
    return states


def install_capaware_routers(model: torch.nn.Module, capaware: CapawareConfig, *,
                             placement: Any = None, replica_policy: str = "least-loaded",
                             ) -> Dict[int, LayerRoutingStats]:
    """Make every MoE layer of ``model`` route with ``capaware`` (idempotent): :func:`install_layers`.

    ``placement``: a :class:`~megatron_capaware.placement.PlacementPlan` or
    the path of a plan file: the experts then move into the plan's layout
    (with ``replica_policy``). Without it a placed model stays placed
    (reinstalling routers keeps the layout;
    :func:`~megatron_capaware.adapters.placement.remove_placement` undoes it).

    Returns:
        ``{layer_number: LayerRoutingStats}`` of the model's MoE layers.

    Raises:
        CapawareConfigError: unsupported Megatron options, a LASER
            calibration made for a different model, or ranks that disagree
            (raised on every rank of the group, naming the differing field).
    """
    named = named_moe_layers(model)
    install_layers([layer for _, layer in named], capaware, placement=placement, replica_policy=replica_policy,
                   names=[name for name, _ in named])
    return collect_stats(model)


def layer_states(model: torch.nn.Module) -> List[LayerRoutingState]:
    """The routing states of an installed model's MoE layers, in module order."""
    return [layer.router.capaware_state for layer in moe_layers(model)
            if isinstance(layer.router, CapawareRouter) and layer.router.capaware_state.installed]


def collect_stats(model: torch.nn.Module) -> Dict[int, LayerRoutingStats]:
    """The stats recorders of an installed model, by layer number.

    With ``--capaware-scope local`` the recorded figures are this rank's until reported: this
    function then sums the pending records of every layer over its load group
    (``LayerRoutingStats.reduce_pending``: two all-reduces per layer with pending records), so it
    is COLLECTIVE at local scope: every rank of the group must call it at the same point (as
    :func:`reduce_summaries`). At global scope it issues nothing.
    """
    out: Dict[int, LayerRoutingStats] = {}
    for state in layer_states(model):
        if state.stats is not None:
            state.stats.reduce_pending()
            out[state.stats.layer_number] = state.stats
    return out


def reset_stats(model: torch.nn.Module) -> None:
    """Forget every recorded call (totals and the dynamic engine's per-phase records)."""
    for state in layer_states(model):
        for stats in ([state.stats] if state.stats is not None else []) + list(state.phase_stats.values()):
            stats.reset()
        state.phase_routers.clear()
