"""Phase-aware routing in Megatron's dynamic inference engine: prefill, mixed and decode steps.

Each ``DynamicInferenceContext`` step holds the new tokens of prefilling
requests (whole prompts or chunks of them) and one token per decoding request.
The measurements (``docs/decode.md``) say capacity at decode costs much more
quality and buys no weight reads, while on prefill it pays. So a router here
knows each step's **composition** and chooses where the configured policy
applies (``CapawareConfig.phases`` / ``--capaware-phases``; default
``prefill,mixed``):

* ``prefill``: only prefill tokens; ``decode``: only decode tokens; ``mixed``:
  both; ``idle``: no real token (an expert-parallel rank's dummy step).
* A step outside ``phases`` is routed by ``topk`` on the placement's layout
  (Megatron's top-k, then each expert's replica by the placement's rule).
* A step that runs as a **captured CUDA graph**
  (``context.using_cuda_graph_this_step()``) always takes the capture-safe
  path: ``topk`` on the placement with ``round-robin`` replicas (a static slot
  map, the replica given by token index: no collective, no host sync, no
  data-dependent shape), and records no statistics (Python does not run when
  a graph is replayed).

The composition comes from the context's host-side bookkeeping
(``active_token_count``, ``num_decode_requests``, ``num_speculative_tokens``,
``using_cuda_graph_this_step()``, and ``_bookkeeping_no_real_work``, which
0.19.2 sets on an idle rank's dummy step and on graph capture, the steps it
publishes ``real_token_count = 0`` for): plain Python values the engine
already holds, so reading them is no host sync.

**Agreement across ranks.** The policies' collectives span the load group, so
every rank of it must choose the same path in the same step, or they would
wait on each other. Megatron agrees on the step only when it uses CUDA graphs
(``match_graph_config`` all-reduces the batch dimensions over the EP group and
runs a graph only when every rank is decode-only), so: a captured step (the
same on every rank) takes the capture-safe path; an eager step chooses by its
own phase when the load group is one rank; at EP > 1, where the route depends
on the phase (the default phases, or a decode router), the ranks agree once per
step whether it is decode-only on every rank (:func:`group_decode_only`: one
all-reduce of one integer and one host read, at the step's first routed MoE
layer) and choose by that group phase: a decode-only step everywhere goes to
top-k on the layout (or the decode router), any other step to the policy (a
decode-only rank's capacity then is that of its tokens with the others'). The
per-phase statistics still label each call with its own rank's phase.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from megatron_capaware.policies.collectives import all_reduce_sum, group_size
from megatron_capaware.policies.phases import (  # noqa: F401  (re-exported)
    DECODE,
    DEFAULT_PHASES,
    PHASES,
    POLICY,
    TOPK_ON_LAYOUT,
    PhaseConfigError,
    StepComposition,
    parse_phases,
    needs_group_phase,
    step_route,
)
from megatron_capaware.adapters.inference_padding import current_step, step_composition  # noqa: F401
from megatron_capaware.adapters.layers import moe_layers


def current_composition() -> Optional[StepComposition]:
    """The composition published for the MoE layer now running (by the ``_forward_mlp`` hook), or None."""
    step = current_step()
    return None if step is None else step.composition


_AGREED = "_capaware_group_decode_only"


def group_decode_only(load_group: Any, device: torch.device) -> bool:
    """Whether the current dynamic step is decode-only (or idle) on every rank of ``load_group``.

    The ranks agree once per step (at the first routed MoE layer; cached on the
    inference context, keyed by the step's ``batch_dimensions`` object, which
    ``initialize_attention_state`` makes anew each step): one all-reduce of one
    integer (the ranks with prefill tokens) and one host read of it, the same
    exchange Megatron's CUDA-graph matching (``adjust_batch_dims_for_expert_parallelism``)
    makes each step. Asked for at EP > 1 when the route depends on the phase
    (:func:`~megatron_capaware.policies.phases.needs_group_phase`: the default
    phases, or a decode router).
    """
    padding = current_step()
    step = None if padding is None else padding.composition
    if step is None:
        return False
    context = padding.context
    key = getattr(context, "batch_dimensions", None)
    cached = getattr(context, _AGREED, None)
    if key is not None and cached is not None and cached[0] is key:
        return bool(cached[1])
    with_prefill = torch.tensor([1 if step.prefill_tokens else 0], dtype=torch.int64, device=device)
    agreed = int(all_reduce_sum(with_prefill, load_group).item()) == 0  # one read per step
    if key is not None and context is not None:
        setattr(context, _AGREED, (key, agreed))
    return agreed


def choose_route(state: Any, device: torch.device) -> str:
    """:data:`POLICY`, :data:`DECODE` or :data:`TOPK_ON_LAYOUT` for a routed call of the layer with ``state``.

    Raises:
        CapawareConfigError: a decode router outside Megatron's dynamic engine (no decode step to route).
    """
    step = current_composition()
    decode_router = state.config.decode_router is not None
    if decode_router and step is None:
        from megatron_capaware.errors import CapawareConfigError

        raise CapawareConfigError(
            f"--capaware-decode-router {state.config.decode_router} routes the decode-only steps of Megatron's "
            "dynamic inference engine, and this forward runs outside one (the static engine, training or "
            "evaluation): use the dynamic engine (MegatronLLM, gpt_dynamic_inference.py), or drop the flag")
    size = group_size(state.load_group)
    agreed = None
    if needs_group_phase(step, state.phases, size, decode_router):
        agreed = group_decode_only(state.load_group, device)
    return step_route(step, state.phases, size, decode_router, agreed)


def check_not_capturing(layer_number: Any) -> None:
    """Refuse to run a policy while a CUDA graph is being captured outside a marked dynamic step.

    The dynamic engine marks the steps it captures (those take the capture-safe
    path); any other capture (a static engine, a training graph) would record
    the policy's data-dependent work. ``torch.cuda.is_current_stream_capturing``
    is a host-side query (no sync).

    Raises:
        RuntimeError: naming the flags to change.
    """
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"MoE layer {layer_number}: a CUDA graph is being captured around a capaware routing policy "
            "outside Megatron's dynamic inference engine (whose captured steps route by top-k); use "
            "--cuda-graph-impl none there, or the dynamic engine, or --moe-router-type topk"
        )


# ---------------------------------------------------------------- statistics per phase

def record_phase(state: Any, decision: Any, slot_loads: Optional[torch.Tensor], router: str = "") -> None:
    """Record one call of a dynamic step in the layer's per-phase stats too (device-side, no sync).

    ``state``: the layer's :class:`~megatron_capaware.adapters.state.LayerRoutingState`. A call
    outside a dynamic step (the static engine, evaluation) records nothing here: its figures are
    the totals (``collect_stats``) already, and recording them twice doubled the stats work of
    every such call. ``router``: the label of the router that made the decision (the phase's
    statistics name every router that routed it).
    """
    step = current_composition()
    if step is None:
        return
    phase = step.phase
    per_phase: Dict[str, Any] = state.phase_stats
    stats = per_phase.get(phase)
    if stats is None:
        base = state.stats
        stats = type(base)(layer_number=base.layer_number, num_experts=base.num_experts, ep_size=base.ep_size,
                           local_experts=list(base.local_experts), duplication=base.duplication,
                           load_group=base.load_group)
        per_phase[phase] = stats
    stats.record_decision(decision, slot_loads)
    if router:
        routers = state.phase_routers.setdefault(phase, [])
        if router not in routers:
            routers.append(router)


def _phase_records(layer: Any) -> Dict[str, Any]:
    state = getattr(layer.router, "capaware_state", None)
    return state.phase_stats if state is not None else {}


def phase_stats(model: torch.nn.Module) -> Dict[str, Dict[int, Any]]:
    """``{phase: {layer_number: LayerRoutingStats}}`` recorded since the routers' last reset.

    Phases: ``prefill``, ``mixed``, ``decode``, ``idle`` (calls outside a dynamic step are in
    the totals only: ``collect_stats``).
    """
    out: Dict[str, Dict[int, Any]] = {}
    for layer in moe_layers(model):
        for phase, stats in _phase_records(layer).items():
            out.setdefault(phase, {})[int(layer.layer_number)] = stats
    return out


def reset_phase_stats(model: torch.nn.Module) -> None:
    """Forget the per-phase records (``adapters.reset_stats`` resets the totals)."""
    for layer in moe_layers(model):
        for stats in _phase_records(layer).values():
            stats.reset()
        state = getattr(layer.router, "capaware_state", None)
        if state is not None:
            state.phase_routers.clear()


def phase_routers(model: torch.nn.Module) -> Dict[str, List[str]]:
    """``{phase: [router label, ...]}``: which routers routed each phase on this rank (in first-use order)."""
    out: Dict[str, List[str]] = {}
    for layer in moe_layers(model):
        state = getattr(layer.router, "capaware_state", None)
        for phase, routers in (state.phase_routers.items() if state is not None else ()):
            seen = out.setdefault(phase, [])
            seen.extend(r for r in routers if r not in seen)
    return out


def phase_totals(model: torch.nn.Module) -> Dict[str, Dict[str, Any]]:
    """This rank's counts per phase, summed over layers: ``calls``, ``tokens``, ``requested``, ``dropped``,
    ``rerouted``, and ``routers``: the labels of the routers that routed the phase."""
    out: Dict[str, Dict[str, Any]] = {}
    labels = phase_routers(model)
    for phase, layers in phase_stats(model).items():
        totals: Dict[str, Any] = {"calls": 0, "tokens": 0, "requested": 0, "dropped": 0, "rerouted": 0}
        for stats in layers.values():
            totals["calls"] += stats.calls
            for name in ("tokens", "requested", "dropped", "rerouted"):
                totals[name] += stats.total(name)
        totals["routers"] = labels.get(phase, [])
        out[phase] = totals
    return out
