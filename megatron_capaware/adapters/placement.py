"""Put a Megatron MoE model's experts into a placement plan's layout, and back.

A model is built and loaded as usual (Megatron's contiguous, *logical*
layout: expert ``e`` on EP rank ``e // (E / W)``). :func:`apply_placement`
then, per MoE layer:

1. moves expert weights over the EP group into the plan's *physical* layout
   (one all-to-all of the experts' rows per dtype; no disk round trip), so
   rank ``r`` holds the ``S / W`` slots ``r*S/W ..`` of the plan (with ``R``
   redundant slots, ``S = E + R``; a replica is a copy of its expert);
2. points the token dispatcher at the ``S`` slots (``S / W`` local ones);
3. gives the router the layer's :class:`~megatron_capaware.placement.replicas.SlotTable`:
   the gate keeps its ``E`` outputs and its state-dict keys, the routing
   decision is made on logical experts as before, then each chosen expert is
   sent to one replica (:mod:`megatron_capaware.placement.replicas`).

:func:`remove_placement` moves the weights back into the logical layout
(the first replica of each expert), e.g. before saving a checkpoint, so a
checkpoint saved from a placed model is an ordinary Megatron checkpoint.

Expert modules: ``SequentialMLP`` (any ``R``), ``GroupedMLP`` (any ``R``),
``TEGroupedMLP`` (``R = 0``: the weights are permuted in place; replicas
would change its GEMM count, refused). Expert tensor parallelism needs
nothing more: each expert-TP rank moves its own shards over its EP group.

Atomic: every check runs before any collective, every layer's new weights
are exchanged before any layer is changed, and the ranks agree on the plan
first (one all-gather): a refused or failed placement leaves the model as it
was on every rank, or raises on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state

from megatron_capaware.adapters.dispatcher import retarget_dispatcher
from megatron_capaware.adapters.layers import dispatchers, moe_layers
from megatron_capaware.adapters.placement_checks import check_layer, invalidate_weight_caches
from megatron_capaware.adapters.state import LayerLayout
from megatron_capaware.placement.plan_file import PlacementPlan
from megatron_capaware.placement.planner import LayerPlacement
from megatron_capaware.placement.planner import PlacementError, contiguous_slots
from megatron_capaware.placement.replicas import REPLICA_POLICIES, slot_table
from megatron_capaware.registry import router_names
from megatron_capaware.policies.collectives import all_gather_objects, all_to_all_rows, group_rank, group_size


#: Router types that run under a plan with replicas.
SLOT_ROUTERS = router_names(replicas=True)


# --- expert modules: per-slot tensors out, per-slot tensors in -------------------------------------------------


def _kind(experts: Any) -> str:
    name = type(experts).__name__
    if name in ("SequentialMLP", "GroupedMLP") or name.endswith("TEGroupedMLP"):
        return "TEGroupedMLP" if name.endswith("TEGroupedMLP") else name
    raise PlacementError(
        f"placement supports SequentialMLP, GroupedMLP and TEGroupedMLP experts, not {name}"
    )


def _te_tensors(linear: Any, index: int) -> List[torch.Tensor]:
    out = [getattr(linear, f"weight{index}")]
    bias = getattr(linear, f"bias{index}", None)
    if isinstance(bias, torch.Tensor) and bias.numel():
        out.append(bias)
    return out


def expert_tensors(experts: Any) -> List[List[torch.Tensor]]:
    """The tensors of each local expert ``[num_local][n]``, views of the module's parameters.

    The same ``n`` tensors in the same order for every expert of a module.
    """
    kind, n = _kind(experts), experts.num_local_experts
    if kind == "SequentialMLP":
        return [[p for _, p in sorted(expert.named_parameters())] for expert in experts.local_experts]
    if kind == "GroupedMLP":
        hidden = experts.config.hidden_size
        w1 = experts.weight1.view(n, hidden, -1)
        w2 = experts.weight2.view(n, -1, hidden)
        return [[w1[i], w2[i]] for i in range(n)]
    return [_te_tensors(experts.linear_fc1, i) + _te_tensors(experts.linear_fc2, i) for i in range(n)]


def _check_resizable(experts: Any, count: int, layer_number: int) -> None:
    if _kind(experts) == "TEGroupedMLP" and count != experts.num_local_experts:
        raise PlacementError(
            f"MoE layer {layer_number}: a plan with redundant experts changes the number of local experts "
            f"({experts.num_local_experts} -> {count}), which Transformer Engine's grouped GEMM fixes at build "
            "time: use a plan with --redundant-experts 0, or SequentialMLP experts (--no-moe-grouped-gemm)"
        )


def _clone_expert(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of one expert module with its own parameters, sharing everything else.

    Process groups, the config and other plain objects are shared (process
    groups cannot be copied); parameters, buffers and submodules are new.
    """
    memo: Dict[int, Any] = {}
    for sub in module.modules():
        for key, value in vars(sub).items():
            if key in ("_parameters", "_buffers", "_modules") or torch.is_tensor(value):
                continue
            if not isinstance(value, (dict, list, tuple, set, torch.nn.Module)):
                memo[id(value)] = value
    return copy.deepcopy(module, memo)


def _set_expert_tensors(experts: Any, new: List[List[torch.Tensor]]) -> None:
    """Make the module hold exactly the experts ``new`` (values copied; count may change)."""
    kind, count = _kind(experts), len(new)
    if count == experts.num_local_experts:
        with torch.no_grad():
            for old, values in zip(expert_tensors(experts), new):
                for dst, src in zip(old, values):
                    dst.copy_(src)
        return
    if kind == "SequentialMLP":
        modules = list(experts.local_experts)
        while len(modules) < count:
            modules.append(_clone_expert(modules[0]))
        experts.local_experts = torch.nn.ModuleList(modules[:count])
        experts.num_local_experts = count
        with torch.no_grad():
            for old, values in zip(expert_tensors(experts), new):
                for dst, src in zip(old, values):
                    dst.copy_(src)
        return
    # GroupedMLP: rebuild the two stacked parameters, keeping their attributes (allreduce, sharding).
    hidden = experts.config.hidden_size
    for name, stacked in (("weight1", torch.stack([v[0] for v in new]).reshape(count * hidden, -1)),
                          ("weight2", torch.stack([v[1] for v in new]).reshape(-1, hidden))):
        old = getattr(experts, name)
        if name == "weight1":  # [n, H, F] viewed as [H, n*F] by Megatron: same memory order as its view
            stacked = stacked.reshape(hidden, -1)
        param = torch.nn.Parameter(stacked.to(old.dtype).contiguous(), requires_grad=old.requires_grad)
        param.__dict__.update({k: v for k, v in old.__dict__.items() if not k.startswith("_")})
        setattr(experts, name, param)
    experts.num_local_experts = count


# --- the exchange ----------------------------------------------------------------------------------------------


def _exchange(tensors: List[List[torch.Tensor]], holders: List[List[int]], wants: List[List[int]],
              group: Any) -> List[List[torch.Tensor]]:
    """Move expert tensors so rank ``r`` ends with the experts ``wants[r]`` (in that order).

    ``holders[r]``: the experts rank ``r`` holds now, in local order (the
    first holder of an expert sends it). ``tensors``: this rank's, ``[len(holders[me])][n]``.
    Returns ``[len(wants[me])][n]`` new tensors. One all-to-all per dtype.
    """
    me, size = group_rank(group), group_size(group)
    source: Dict[int, Tuple[int, int]] = {}
    for rank, held in enumerate(holders):
        for local, expert in enumerate(held):
            source.setdefault(expert, (rank, local))
    send = [[source[e][1] for e in wants[d] if source[e][0] == me] for d in range(size)]
    recv_from = [source[e][0] for e in wants[me]]
    recv_counts = [recv_from.count(s) for s in range(size)]
    # Received rows come grouped by source, each group in this rank's wanted order.
    order = sorted(range(len(wants[me])), key=lambda i: (recv_from[i], i))
    position = {slot: row for row, slot in enumerate(order)}
    num = len(tensors[0]) if tensors else 0
    out: List[List[Optional[torch.Tensor]]] = [[None] * num for _ in wants[me]]
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for j in range(num):
        by_dtype.setdefault(tensors[0][j].dtype, []).append(j)
    for dtype, members in by_dtype.items():
        sizes = [tensors[0][j].numel() for j in members]
        rows = torch.stack([torch.cat([tensors[i][j].reshape(-1) for j in members])
                            for d in range(size) for i in send[d]]) if any(send) else \
            tensors[0][members[0]].new_zeros((0, sum(sizes)))
        got = all_to_all_rows(rows, [len(s) for s in send], recv_counts, group)
        for slot in range(len(wants[me])):
            parts = got[position[slot]].split(sizes)
            for j, part in zip(members, parts):
                out[slot][j] = part.reshape(tensors[0][j].shape).clone()
    return out  # type: ignore[return-value]


def check_router_for_slots(capaware: Any, num_slots: int, num_experts: int) -> None:
    """Refuse router settings that a layout with ``num_slots`` slots for ``num_experts`` experts cannot serve.

    With replicas (``S > E``): ``topk`` and the capacity routers (capacity per
    slot, or per rank); LASER would need replica-aware candidate pools, not
    built yet.
    """
    if num_slots > num_experts and capaware.router_type not in SLOT_ROUTERS:
        raise PlacementError(
            f"--moe-router-type {capaware.router_type} with a placement that has {num_slots - num_experts} "
            "redundant experts is not supported yet (replica-aware candidate pools): use a plan made with "
            f"--redundant-experts 0, or {' / '.join(SLOT_ROUTERS)} with this plan"
        )
    decode = capaware.decode_router
    if num_slots > num_experts and decode is not None and decode not in SLOT_ROUTERS:
        raise PlacementError(
            f"--capaware-decode-router {decode} with a placement that has {num_slots - num_experts} redundant "
            "experts is not supported yet: use a plan made with --redundant-experts 0, or drop the decode router"
        )


def _plan_digest(plan: Optional[PlacementPlan], policy: str) -> str:
    body = json.dumps({"layers": {n: p.slots for n, p in sorted(plan.layers.items())} if plan else None,
                       "policy": policy}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _ep_group(layer: Any) -> Any:
    group = getattr(layer.experts, "ep_group", None)
    if group is None:
        group = parallel_state.get_expert_model_parallel_group() if layer.config.expert_model_parallel_size > 1 \
            else None
    return group if group is not None and group_size(group) > 1 else None


def layer_layouts(model: torch.nn.Module) -> Dict[int, LayerLayout]:
    """The current layout of every installed MoE layer, by layer number."""
    return {int(l.layer_number): l.router.capaware_layout for l in moe_layers(model)
            if getattr(l.router, "capaware_layout", None) is not None}


def _set_layouts(model: torch.nn.Module, plan: Optional[PlacementPlan], policy: str) -> None:
    """Move every MoE layer's experts to ``plan``'s layout (None: the logical one). Collective."""
    layers = moe_layers(model)
    if not layers:
        raise PlacementError("the model has no MoE layer to place")
    place_layers(layers, plan, policy, whole_model=True)


def place_layers(layers: Sequence[Any], plan: Optional[PlacementPlan], policy: str = "least-loaded", *,
                 whole_model: bool = False) -> None:
    """Move these MoE layers' experts to ``plan``'s layout (None: the logical one); every EP rank calls it.

    For callers that place layer by layer (the launcher places each layer at
    its first forward); :func:`apply_placement` places a whole model
    (``whole_model``: the plan must cover exactly these layers).
    """
    # In whatever mode the caller is (the launcher places from a forward pre-hook, possibly under
    # inference_mode, on parameters that may be inference tensors); nothing here needs autograd.
    with torch.no_grad():
        _place_layers(layers, plan, policy, whole_model)


def _place_layers(layers: Sequence[Any], plan: Optional[PlacementPlan], policy: str, whole_model: bool) -> None:
    if policy not in REPLICA_POLICIES:
        raise PlacementError(f"--capaware-replica-policy {policy!r}: use one of {', '.join(REPLICA_POLICIES)}")
    config = layers[0].config
    ep = config.expert_model_parallel_size
    targets = []
    error: Optional[str] = None
    try:
        targets = _targets(layers, plan, ep, whole_model)
    except PlacementError as err:
        error = str(err)
    # Every rank of the EP group learns every rank's verdict and plan before anything moves:
    # all raise together, and ranks given different plans never meet in a mismatched exchange.
    group = _ep_group(layers[0])
    mine = (_plan_digest(plan, policy), error)
    seen = all_gather_objects(mine, group) if group is not None else [mine]
    failed = next((e for _, e in seen if e is not None), None)
    if failed is not None:
        raise PlacementError(failed)
    if len({d for d, _ in seen}) != 1:
        raise PlacementError(f"EP ranks were given different placement plans or replica policies "
                             f"({[d for d, _ in seen]}): pass the same --capaware-placement file and policy to "
                             "every rank")
    me = group_rank(group) if group is not None else 0
    moved = []
    for layer, now, new, per_now, per_new in targets:
        holders = [now[r * per_now:(r + 1) * per_now] for r in range(ep)]
        wants = [new[r * per_new:(r + 1) * per_new] for r in range(ep)]
        tensors = expert_tensors(layer.experts)
        fresh = tensors if now == new else _exchange(tensors, holders, wants, group)
        moved.append(fresh)
    # Commit: nothing above changed the model.
    for (layer, now, new, per_now, per_new), fresh in zip(targets, moved):
        if now != new:
            _set_expert_tensors(layer.experts, fresh)
            invalidate_weight_caches(layer.experts)  # TE's cached (FP8) weights are the old experts'
        local = list(range(me * per_new, (me + 1) * per_new))
        layer.num_local_experts = per_new
        layer.local_expert_indices = local
        for dispatcher in dispatchers(layer):
            retarget_dispatcher(dispatcher, len(new), local)
        state = layer.router.capaware_state
        state.layout = LayerLayout(list(new), ep, slot_table(new, ep, layer.router.weight.device), policy)
        state.local_experts = [new[s] for s in local]  # logical experts of this rank's slots
        state.local_slots = list(local)
        state.build_tensors(layer.router.weight.device)
        if state.stats is not None:
            state.stats.local_experts = list(state.local_experts)


def _targets(layers: Sequence[Any], plan: Optional[PlacementPlan], ep: int, whole_model: bool
             ) -> List[Tuple[Any, List[int], List[int], int, int]]:
    """Per layer ``(layer, current slots, new slots, slots per rank now, after)``, every check made (no collective)."""
    config = layers[0].config
    if plan is not None and whole_model:
        plan.check_model([int(l.layer_number) for l in layers], config.num_moe_experts, ep)
    if plan is not None:
        missing = sorted(int(l.layer_number) for l in layers if int(l.layer_number) not in plan.layers)
        if missing:
            raise PlacementError(f"the placement plan has no MoE layer {missing} (it covers {sorted(plan.layers)}): "
                                 "it was made for another model; run capaware-plan on this checkpoint")
        plan.check_model(sorted(plan.layers), config.num_moe_experts, ep)

    targets = []
    for layer in layers:
        number = int(layer.layer_number)
        if not getattr(layer.router, "capaware_installed", False):
            raise PlacementError("install the capaware routers before placing experts: "
                                 "install_capaware_routers(model, config, placement=plan)")
        current = getattr(layer.router, "capaware_layout", None)
        now = current.slots if current is not None else contiguous_slots(config.num_moe_experts)
        new = plan.layers[number].slots if plan is not None else contiguous_slots(config.num_moe_experts)
        check_router_for_slots(layer.router.capaware, len(new), config.num_moe_experts)
        check_layer(layer, dispatchers(layer))  # FP8 parameters, single grouped weight, flex (issue 22)
        slot_table(new, ep, torch.device("cpu"))  # its refusals (two replicas on one rank) before anything moves
        per_now, per_new = len(now) // ep, len(new) // ep
        _check_resizable(layer.experts, per_new, number)
        targets.append((layer, now, new, per_now, per_new))
    return targets


def apply_placement(model: torch.nn.Module, plan: PlacementPlan, replica_policy: str = "least-loaded") -> None:
    """Move the experts of every MoE layer of ``model`` into ``plan``'s layout (every EP rank calls this).

    The routers must be installed first (:func:`~megatron_capaware.adapters.install.install_capaware_routers`
    does both when given ``placement=``). Applying another plan to a placed
    model moves from the current layout.

    Raises:
        PlacementError: a plan for another model, layer count, expert count
            or EP size; replicas with TEGroupedMLP experts; ranks with
            different plans. Nothing is changed then.
    """
    _set_layouts(model, plan, replica_policy)


def remove_placement(model: torch.nn.Module) -> None:
    """Move every MoE layer back to Megatron's logical layout (e.g. before saving a checkpoint)."""
    layouts = list(layer_layouts(model).values())
    _set_layouts(model, None, layouts[0].replica_policy if layouts else "least-loaded")


def current_plan(model: torch.nn.Module) -> Optional[PlacementPlan]:
    """The placement in effect as a plan (None: Megatron's contiguous layout everywhere)."""
    layouts = layer_layouts(model)
    if not any(layout.placed for layout in layouts.values()):
        return None
    first = next(iter(layouts.values()))
    return PlacementPlan(
        model={"moe_layer_numbers": sorted(layouts), "num_moe_experts": first.table.num_experts},
        ep=first.num_ranks, redundant=len(first.slots) - first.table.num_experts,
        layers={n: LayerPlacement(list(l.slots), l.num_ranks, 0.0, 0.0) for n, l in layouts.items()},
        provenance={"current": True})


@contextlib.contextmanager
def logical_layout(model: torch.nn.Module) -> Iterator[None]:
    """Megatron's logical layout inside the block, the placement restored after (every EP rank).

    For saving a checkpoint from a placed model: ``with logical_layout(model): save(...)``
    writes an ordinary checkpoint (``models.checkpoint.save_checkpoint`` does this itself).
    """
    plan = current_plan(model)
    if plan is None:
        yield
        return
    policy = next(iter(layer_layouts(model).values())).replica_policy
    remove_placement(model)
    try:
        yield
    finally:
        apply_placement(model, plan, policy)
