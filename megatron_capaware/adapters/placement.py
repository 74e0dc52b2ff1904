"""Put a Megatron MoE model's experts into a placement plan's layout, and back.

A model is built and loaded as usual (Megatron's contiguous, *logical*
layout: expert ``e`` on EP rank ``e // (E / W)``). :func:`apply_placement`
then, per MoE layer:

1. moves expert weights over the EP group into the plan's *physical* layout,
   one layer at a time (no disk round trip): experts whose slot keeps its
   expert do not move, experts already on the rank are copied locally, and
   one all-to-all per dtype carries only the rows that change rank; the new
   experts are written in place into the existing parameters (their identity
   is kept where the slot count is unchanged). Rank ``r`` ends holding the
   ``S / W`` slots ``r*S/W ..`` of the plan (with ``R`` redundant slots,
   ``S = E + R``; a replica is a copy of its expert);
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

What "atomic" means (issue 22, item 6; docs/placement.md, "Memory and failures"):

* every check, and a memory pre-check, runs before any weight moves, and the
  ranks agree on the verdicts, the plan and the memory in one all-gather: a
  refusal raises the same error on every rank with nothing changed;
* the peak extra memory is one layer's buffers
  (:func:`~megatron_capaware.placement.moves.transient_rows` x one expert's
  bytes, at most 2 x a layer's local expert bytes without replicas), not a
  copy of the model's experts;
* each layer's move is agreed on by every rank (before its exchange and after
  its writes); a failure raised on any rank (an exception in Python, a bad
  tensor...) makes every rank restore that layer from its snapshot and move
  the layers already moved back by the same mechanism, then raise the same
  error: one consistent layout on every rank, the layout, slot tables and
  dispatcher committed only after every layer moved.

A collective that fails or never returns (an NCCL error or timeout, an OOM
inside the all-to-all, a dead rank) cannot be recovered by the package: the
process group is then unusable (NCCL's watchdog ends the processes). The
pre-check exists to make an OOM there unlikely.
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
from megatron_capaware.placement.moves import PlacementMemoryError, layer_moves, transient_rows
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


# --- the layer-by-layer move (issue 22, item 6) ---------------------------------------------------------------
#
# One layer at a time, on every EP rank in step: (A) pack the rows this rank sends into one buffer, and build
# the new tensors if the slot count changes; the ranks agree (one all-gather of a verdict); (B) one all-to-all
# of rows per dtype (only the experts that change rank), snapshot what the writes overwrite, write the new
# experts in place into the existing parameters, and the ranks agree again. A failure on any rank in (A)
# changes nothing; in (B) every rank restores its overwritten slots from the snapshot and the layers already
# moved are moved back by the same mechanism (placement.moves.transient_rows counts the buffers).


class _StepFailed(PlacementError):
    """Some rank failed a step of the move (the same message on every rank)."""


def _agree(error: Optional[BaseException], group: Any, what: str) -> None:
    """Every rank's verdict for one step (one all-gather); raises :class:`_StepFailed` on every rank if any failed."""
    mine = None if error is None else f"{type(error).__name__}: {error}"
    seen = all_gather_objects(mine, group) if group is not None else [mine]
    failed = [f"rank {rank}: {message}" for rank, message in enumerate(seen) if message is not None]
    if failed:
        raise _StepFailed(f"{what} failed on " + "; ".join(failed)) from error


def _dtype_groups(expert: List[torch.Tensor]) -> List[Tuple[List[int], List[int]]]:
    """The expert's tensors grouped by dtype: ``(tensor indices, their numels)`` per dtype (one row each)."""
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for j, tensor in enumerate(expert):
        by_dtype.setdefault(tensor.dtype, []).append(j)
    return [(members, [expert[j].numel() for j in members]) for members in by_dtype.values()]


def _pack(expert: List[torch.Tensor], members: List[int], sizes: List[int], row: torch.Tensor) -> None:
    """Copy one expert's tensors of one dtype into ``row`` ``[sum(sizes)]`` (no temporary)."""
    offset = 0
    for j, size in zip(members, sizes):
        row[offset:offset + size].view(expert[j].shape).copy_(expert[j])
        offset += size


def _write_row(layer_number: int, expert: List[torch.Tensor], members: List[int], sizes: List[int],
               row: torch.Tensor) -> None:
    """Write ``row`` (one dtype's tensors of one expert, packed) into ``expert``'s tensors in place.

    Every write of a move goes through here (tests inject a failure in a given layer by replacing it).
    """
    offset = 0
    for j, size in zip(members, sizes):
        expert[j].copy_(row[offset:offset + size].view(expert[j].shape))
        offset += size


class _Target:
    """The tensors a layer's new slots are written into, and how to make them the module's.

    Same slot count: the existing parameters (written in place, identity kept:
    optimizer, TE and CUDA-graph references stay valid). A ``SequentialMLP``
    whose count changes: its first ``min(now, new)`` experts in place, new
    experts cloned from the first. A ``GroupedMLP`` whose count changes: two
    new stacked parameters (its parameter attributes copied), installed by
    :meth:`commit`.
    """

    def __init__(self, experts: Any, old: List[List[torch.Tensor]], per_now: int, per_new: int) -> None:
        self.experts, self.per_new = experts, per_new
        kind = _kind(experts)
        self.modules: Optional[torch.nn.ModuleList] = None
        self.params: Dict[str, torch.Tensor] = {}
        if per_now == per_new:
            self.dst, self.aliased = old, per_now
        elif kind == "SequentialMLP":
            modules = list(experts.local_experts)[:per_new]
            while len(modules) < per_new:
                modules.append(_clone_expert(experts.local_experts[0]))
            self.modules = torch.nn.ModuleList(modules)
            self.dst = [[p for _, p in sorted(m.named_parameters())] for m in modules]
            self.aliased = min(per_now, per_new)
        else:  # GroupedMLP (TEGroupedMLP's count never changes: refused in _targets)
            hidden = experts.config.hidden_size
            w1, w2 = experts.weight1, experts.weight2
            self.params = {"weight1": w1.new_empty((hidden, w1.shape[1] // per_now * per_new)),
                           "weight2": w2.new_empty((w2.shape[0] // per_now * per_new, hidden))}
            v1 = self.params["weight1"].view(per_new, hidden, -1)
            v2 = self.params["weight2"].view(per_new, -1, hidden)
            self.dst, self.aliased = [[v1[i], v2[i]] for i in range(per_new)], 0

    def commit(self) -> None:
        """Make the new tensors the module's (nothing to do when written in place)."""
        experts = self.experts
        if self.modules is not None:
            experts.local_experts = self.modules
        for name, value in self.params.items():
            old = getattr(experts, name)
            param = torch.nn.Parameter(value, requires_grad=old.requires_grad)
            param.__dict__.update({k: v for k, v in old.__dict__.items() if not k.startswith("_")})
            setattr(experts, name, param)
        experts.num_local_experts = self.per_new


@torch.no_grad()
def _move_layer(layer: Any, now: List[int], new: List[int], ep: int, me: int, group: Any,
                agree: Any = None) -> None:
    """Move one layer's expert weights from slots ``now`` to ``new`` (every EP rank; weights only).

    ``group``: the EP group (the exchange); ``agree``: the ranks that agree on
    each step (default ``group``). Raises :class:`_StepFailed` on every rank
    when any rank failed; this rank's weights of this layer are then as before.
    """
    agree = group if agree is None else agree
    number = int(layer.layer_number)
    experts = layer.experts
    moves = layer_moves(now, new, ep, me)
    error: Optional[BaseException] = None
    sends: List[torch.Tensor] = []
    try:  # (A) local: the send buffers and the new tensors
        old = expert_tensors(experts)
        groups = _dtype_groups(old[0])
        target = _Target(experts, old, moves.per_now, moves.per_new)
        sent = [pos for rows in moves.send for pos in rows]
        for members, sizes in groups:
            buffer = old[0][members[0]].new_empty((len(sent), sum(sizes)))
            for k, pos in enumerate(sent):
                _pack(old[pos], members, sizes, buffer[k])
            sends.append(buffer)
    except Exception as err:  # noqa: BLE001 - any local failure is agreed on, then re-raised on every rank
        error = err
    _agree(error, agree, f"preparing the move of MoE layer {number}")

    backups: Dict[int, List[torch.Tensor]] = {}
    try:  # (B) the exchange, the snapshot, the writes
        send_counts = [len(rows) for rows in moves.send]
        received = [all_to_all_rows(buffer, send_counts, moves.recv_counts, group) if moves.network_rows
                    else buffer for buffer in sends]
        written = set(moves.recv_slots) | {slot for slot, _ in moves.local}
        sent_at = {pos: k for k, pos in reversed(list(enumerate(sent)))}
        for slot in sorted(s for s in written if s < target.aliased):  # what the writes overwrite
            if slot in sent_at:
                backups[slot] = [buffer[sent_at[slot]] for buffer in sends]
            else:
                backups[slot] = []
                for members, sizes in groups:
                    row = old[slot][members[0]].new_empty(sum(sizes))
                    _pack(old[slot], members, sizes, row)
                    backups[slot].append(row)
        for k, slot in enumerate(moves.recv_slots):
            for (members, sizes), rows in zip(groups, received):
                _write_row(number, target.dst[slot], members, sizes, rows[k])
        copies = list(moves.local) + ([] if target.aliased else [(slot, slot) for slot in moves.stay])
        for slot, pos in copies:
            if pos in backups:  # its old value is overwritten by now: read the snapshot
                for (members, sizes), row in zip(groups, backups[pos]):
                    _write_row(number, target.dst[slot], members, sizes, row)
            else:
                for dst, src in zip(target.dst[slot], old[pos]):
                    dst.copy_(src)
        del received
    except Exception as err:  # noqa: BLE001
        error = err
    try:
        _agree(error, agree, f"moving MoE layer {number}")
    except _StepFailed:
        for slot, rows in backups.items():  # every overwritten slot back to its old expert
            for (members, sizes), row in zip(groups, rows):
                _write_row(number, old[slot], members, sizes, row)
        raise
    target.commit()
    invalidate_weight_caches(experts)  # TE's cached (FP8) weights are the old experts'


def _move_weights(targets: Sequence[Tuple[Any, List[int], List[int], int, int]], ep: int, me: int,
                  group: Any, agree: Any) -> None:
    """Move every target layer's weights, one layer at a time; on a failure move the moved ones back."""
    moved: List[Tuple[Any, List[int], List[int]]] = []
    for layer, now, new, _, _ in targets:
        if now == new:
            continue
        try:
            _move_layer(layer, now, new, ep, me, group, agree)
        except _StepFailed as failure:
            for done, before, after in reversed(moved):
                try:
                    _move_layer(done, after, before, ep, me, group, agree)
                except _StepFailed as again:
                    raise PlacementError(
                        f"placement failed ({failure}) and moving MoE layer {int(done.layer_number)} back "
                        f"failed too ({again}): the experts are in no consistent layout; reload the checkpoint"
                    ) from again
            raise PlacementError(
                f"placement failed: {failure}. The {len(moved)} MoE layer(s) moved before were moved back: every "
                "rank has its previous layout, slot tables and dispatcher (nothing was committed)") from failure
        moved.append((layer, now, new))


# --- the memory pre-check -------------------------------------------------------------------------------------


def expert_bytes(experts: Any) -> int:
    """Bytes of one local expert of a layer (all its tensors)."""
    return sum(t.numel() * t.element_size() for t in expert_tensors(experts)[0])


def transient_bytes(targets: Sequence[Tuple[Any, List[int], List[int], int, int]], ep: int, me: int) -> int:
    """This rank's peak extra bytes for moving ``targets`` (and for moving them back on a rollback).

    ``max over layers and both directions of transient_rows x expert bytes``
    (:func:`megatron_capaware.placement.moves.transient_rows`).
    """
    need = 0
    for layer, now, new, _, _ in targets:
        if now == new:
            continue
        size = expert_bytes(layer.experts)
        sequential = _kind(layer.experts) == "SequentialMLP"
        for a, b in ((now, new), (new, now)):
            in_place = len(a) == len(b) or sequential
            need = max(need, transient_rows(layer_moves(a, b, ep, me), in_place) * size)
    return need


def free_bytes(device: torch.device) -> Tuple[Optional[int], str]:
    """Memory this rank can still allocate on ``device``, and where the figure comes from (None: unknown).

    CUDA: ``torch.cuda.mem_get_info``'s free bytes plus the caching
    allocator's reserved-but-unallocated bytes. CPU: ``MemAvailable`` of
    ``/proc/meminfo`` (None where there is no such file: the check is skipped).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached), "torch.cuda.mem_get_info + the caching allocator's free blocks"
    if device.type != "cpu":
        return None, f"no free-memory figure for {device.type} tensors: check skipped"
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable of /proc/meminfo"
    except OSError:
        pass
    return None, "no /proc/meminfo MemAvailable: check skipped"


def _memory_refusal(seen: List[Tuple[Any, ...]]) -> Optional[str]:
    """The refusal every rank raises when some rank's transient buffers would not fit (None: all fit)."""
    short = [(rank, need, free, how) for rank, (_, _, need, free, how) in enumerate(seen)
             if free is not None and need > free]
    if not short:
        return None
    mib = 2 ** 20
    where = "; ".join(f"rank {rank} needs {need / mib:.1f} MiB ({need} bytes) and has {free / mib:.1f} MiB "
                      f"({free} bytes) free ({how})"
                      for rank, need, free, how in short)
    return (f"placement refused before any weight moved: {where}. It moves one MoE layer at a time and needs, "
            "per rank, (rows sent + rows received + overwritten rows kept for a rollback) x one expert's bytes "
            "for its largest layer (docs/placement.md, 'Memory and failures'). Free memory on that rank (place before the KV "
            "cache is allocated, or make it smaller), or use a plan that moves fewer experts")


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


def _agreement_group(ep_group: Any) -> Any:
    """The ranks that must agree on a placement: the expert tensor-and-model-parallel group.

    With expert TP each EP group moves its own shards, and Megatron's
    dispatcher exchanges tokens over EP x expert-TP: every such rank takes part
    in each verdict, so one EP group cannot commit while another rolls back.
    Without expert TP it is the EP group.
    """
    try:
        wide = parallel_state.get_expert_tensor_and_model_parallel_group(check_initialized=False)
    except (AttributeError, AssertionError, RuntimeError):
        wide = None
    if wide is not None and group_size(wide) > (group_size(ep_group) if ep_group is not None else 1):
        return wide
    return ep_group


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
    # Every rank of the EP group learns every rank's verdict, plan and memory before anything moves (one
    # all-gather): all raise together, and ranks given different plans never meet in a mismatched exchange.
    group = _ep_group(layers[0])
    me = group_rank(group) if group is not None else 0
    need, free, how = 0, None, "not checked (refused)"
    if error is None:
        try:
            need = transient_bytes(targets, ep, me)
            if need:
                free, how = free_bytes(expert_tensors(layers[0].experts)[0][0].device)
        except Exception as err:  # noqa: BLE001 - agreed on below like any refusal
            error = f"the memory pre-check failed on EP rank {me}: {type(err).__name__}: {err}"
    mine = (_plan_digest(plan, policy), error, need, free, how)
    agree = _agreement_group(group)
    seen = all_gather_objects(mine, agree) if agree is not None else [mine]
    failed = next((entry[1] for entry in seen if entry[1] is not None), None)
    if failed is not None:
        raise PlacementError(failed)
    if len({entry[0] for entry in seen}) != 1:
        raise PlacementError(f"EP ranks were given different placement plans or replica policies "
                             f"({[entry[0] for entry in seen]}): pass the same --capaware-placement file and "
                             "policy to every rank")
    refusal = _memory_refusal(seen)
    if refusal is not None:
        raise PlacementMemoryError(refusal)
    me = group_rank(group) if group is not None else 0
    _move_weights(targets, ep, me, group, agree)
    # Commit the layouts: every layer's weights moved, on every rank (agreed per layer).
    for layer, now, new, per_now, per_new in targets:
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
