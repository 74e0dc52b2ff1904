"""Online re-planning (vLLM-style EPLB for long runs): re-plan from recent loads, move weights between forwards.

:class:`OnlineReplanner` hooks a model whose routers are installed with
stats on. The routers already keep each call's global expert loads
device-side (:class:`~megatron_capaware.adapters.stats.LayerRoutingStats`);
every ``every`` forward calls of the model the replanner reads the last
``window`` calls' loads (one host copy per layer, at re-plan time only),
plans each layer (:func:`~megatron_capaware.placement.plan_layer`) and moves
the experts (:func:`~megatron_capaware.adapters.placement.apply_placement`)
after that forward returns, before the next starts.

Every EP rank holds the same global loads, so every rank makes the same
plan; the placement step checks that in its first all-gather (a rank that
disagrees raises on all of them). Every rank must run the same number of
forwards (as Megatron's inference does, idle ranks included).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional

import torch

from megatron_capaware.placement.plan_file import PlacementPlan
from megatron_capaware.placement.planner import PlacementError, plan_layer
from megatron_capaware.adapters.install import collect_stats, moe_layers
from megatron_capaware.adapters.placement import apply_placement, layer_layouts
from megatron_capaware.placement.planner import contiguous_slots
from megatron_capaware.placement.shift import align_ranks, transfers
from megatron_capaware.placement.validate import fit_layer


@dataclass
class ReplanEvent:
    """One re-planning: when, how long it took, and the predicted busiest rank before and after."""

    call: int
    seconds: float
    rank_peak_before: float
    rank_peak_after: float
    transfers: int = 0  # expert weights that crossed ranks (all layers)


@dataclass
class OnlineReplanner:
    """Re-plan every ``every`` forward calls from the last ``window`` calls' loads.

    Attributes:
        every: forwards between re-plannings (>= 1).
        window: recent calls whose loads the plan is made from (>= 1, <= ``every``
            is typical; at most the calls recorded since the last move).
        redundant: replica slots ``R`` of each plan.
        replica_policy: as :func:`~megatron_capaware.adapters.placement.apply_placement`.
        objective: ``mean`` (plan the window's mean loads) or ``per-call`` (then
            swap experts to lower the window calls' summed busiest rank:
            :func:`~megatron_capaware.placement.validate.fit_layer`).
        align: relabel each new plan's ranks so the fewest experts move
            (:func:`~megatron_capaware.placement.shift.align_ranks`; the balance is the same).
        events: the re-plannings done so far.

    Defaults (``docs/placement.md``, "When your traffic changes"): every 2
    calls from the last 2, measured by ``capaware-bench-shift`` on both
    bundled models at EP 2 and 4 (drama -> verse -> drama -> prose -> drama):
    back within 5% of the oracle's busiest rank at most 4 calls after every
    switch with ``redundant=0`` (6 with ``redundant=EP`` on the fine-grained
    model at EP 4), with half the moves of re-planning every call at about
    the same balance; longer windows and intervals lag the switches.
    """

    every: int = 2
    window: int = 2
    redundant: int = 0
    replica_policy: str = "least-loaded"
    objective: str = "mean"
    align: bool = True
    events: List[ReplanEvent] = field(default_factory=list)
    calls: int = 0
    _handle: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or self.every < 1:
            raise PlacementError(f"re-plan every={self.every!r} forward calls: use an integer >= 1")
        if not isinstance(self.window, int) or self.window < 1:
            raise PlacementError(f"re-plan window={self.window!r} calls: use an integer >= 1")
        if self.objective not in ("mean", "per-call"):
            raise PlacementError(f"objective={self.objective!r}: use 'mean' or 'per-call'")
        if self.redundant < 0:
            raise PlacementError(f"redundant={self.redundant}: use >= 0 replica slots")

    def attach(self, model: torch.nn.Module) -> "OnlineReplanner":
        """Hook ``model``'s forward (its routers must be installed with ``record_stats``)."""
        if not collect_stats(model):
            raise PlacementError("online re-planning reads the routers' load statistics: install the routers "
                                 "with record_stats=True first (install_capaware_routers)")
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.after_forward(module)  # returns None: a forward hook's return value would replace the output

        self._handle = model.register_forward_hook(hook)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def after_forward(self, model: torch.nn.Module) -> Optional[ReplanEvent]:
        """Count one forward; every ``every`` calls, re-plan and move (collective: every rank calls it)."""
        self.calls += 1
        if self.calls % self.every:
            return None
        return self.replan(model)

    def replan(self, model: torch.nn.Module) -> ReplanEvent:
        """Plan from the recent loads and move the experts now (every EP rank, between forwards)."""
        start = time.perf_counter()
        stats = collect_stats(model)
        layers = moe_layers(model)
        config = layers[0].config
        ep = config.expert_model_parallel_size
        placements: Dict[int, Any] = {}
        before, after = [], []
        current = layer_layouts(model)
        moved = 0
        for number, layer_stats in sorted(stats.items()):
            recent = layer_stats.global_loads[-self.window:]
            if not recent:
                raise PlacementError(f"MoE layer {number} recorded no forward call since the last move: "
                                     "re-plan after at least one forward")
            loads = torch.stack(recent).double().mean(0)  # [E]
            if self.objective == "per-call":
                placement = fit_layer(torch.stack(recent).double(), ep, self.redundant, None, "per-call")
            else:
                placement = plan_layer(loads, ep, self.redundant)
            now = current[number].slots if number in current else contiguous_slots(config.num_moe_experts)
            if self.align:
                placement = replace(placement, slots=align_ranks(now, placement.slots, ep))
            moved += transfers(now, placement.slots, ep)
            placements[number] = placement
            before.append(placement.contiguous_rank_peak)
            after.append(placement.predicted_rank_peak)
        model_info = {"moe_layer_numbers": sorted(placements), "num_moe_experts": config.num_moe_experts,
                      "moe_router_topk": config.moe_router_topk}
        plan = PlacementPlan(model=model_info, ep=ep, redundant=self.redundant, layers=placements,
                             provenance={"online": True, "call": self.calls, "window": self.window})
        apply_placement(model, plan, self.replica_policy)
        event = ReplanEvent(self.calls, time.perf_counter() - start, sum(before) / len(before),
                            sum(after) / len(after), moved)
        self.events.append(event)
        return event
