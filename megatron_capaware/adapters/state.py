"""One routing state per MoE layer: everything the capaware router and dispatcher read.

The installer (:mod:`megatron_capaware.adapters.install`) creates a
:class:`LayerRoutingState` for each MoE layer and hands the same object to the
layer's router and token dispatchers (their one ``capaware_state``
attribute); nothing else of the package is attached to Megatron objects. The
device tensors a routing call needs (this rank's experts, each expert's EP
rank, this rank's replica of each expert, the slot table) are built when the
state is built or its layout changes, on the router's device: no routing
call copies from the host, the first one included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from megatron_capaware.adapters.stats import LayerRoutingStats
from megatron_capaware.config import CapawareConfig
from megatron_capaware.placement.planner import contiguous_slots
from megatron_capaware.placement.replicas import SlotTable
from megatron_capaware.policies.capacity import expert_rank_map, local_experts_tensor
from megatron_capaware.policies.phases import parse_phases
from megatron_capaware.registry import router_type


@dataclass
class LayerLayout:
    """Where one MoE layer's experts are now.

    Attributes:
        slots: ``[S]`` logical expert of each physical slot (contiguous layout: ``0..E-1``).
        num_ranks: EP size ``W``.
        table: the slots as index tensors (routing), on the router's device.
        replica_policy: ``least-loaded`` or ``round-robin``.
    """

    slots: List[int]
    num_ranks: int
    table: SlotTable
    replica_policy: str

    @property
    def placed(self) -> bool:
        return self.slots != contiguous_slots(self.table.num_experts)


@dataclass
class LayerRoutingState:
    """The routing state of one MoE layer (one object, shared by its router and dispatchers).

    Attributes:
        name: the layer's qualified module name (its identity: MTP layers reuse ``layer_number``);
            empty when the layer was built from a spec before the model knew its name.
        config: the router configuration.
        num_experts: ``E``, the model's logical experts.
        ep_size: the expert-parallel size.
        load_group: the group over which loads are global (None: one rank).
        local_experts: logical experts this rank computes (under a placement: those of its slots).
        local_slots: this rank's physical slots under a placement (else empty).
        layout: the placement in effect (None: Megatron's contiguous layout).
        stats: the load recorder (None: stats off).
        score_check: the model's deferred score check (None: checked per layer).
        score_hook: optional callable receiving each call's scores ``[T, E]`` (calibration, traces).
        score_check_hook: the handle of the layer's forward hook that runs the deferred score check.
        padded: whether the current routing call had padding tokens (host-side; read by the dispatcher).
        phase_stats: the dynamic engine's per-phase load recorders (:mod:`megatron_capaware.adapters.phases`).
        phase_routers: per phase, the labels of the routers that routed it (a decode router's on decode steps).
        installed: whether the installer attached the state to a layer.
        device: where the tensors below live (the router's parameters' device).
        local_experts_t: ``[n]`` int64, :attr:`local_experts` checked (expanded-drop).
        local_slots_t: ``[n]`` int64, :attr:`local_slots` as a policy's local experts over the ``S`` slots.
        expert_ranks: ``[E]`` (or ``[S]`` when deciding on slots) EP rank of each expert / slot.
        local_replica: ``[E]`` int64, this rank's replica index of each expert (-1: none); placed layouts only.
    """

    config: CapawareConfig
    num_experts: int
    ep_size: int
    name: str = ""
    load_group: Any = None
    local_experts: List[int] = field(default_factory=list)
    local_slots: List[int] = field(default_factory=list)
    layout: Optional[LayerLayout] = None
    stats: Optional[LayerRoutingStats] = None
    score_check: Any = None
    score_hook: Optional[Callable[[torch.Tensor], None]] = None
    score_check_hook: Any = None
    phase_stats: Dict[str, LayerRoutingStats] = field(default_factory=dict)
    phase_routers: Dict[str, List[str]] = field(default_factory=dict)
    padded: bool = False
    installed: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    local_experts_t: Optional[torch.Tensor] = None
    local_slots_t: Optional[torch.Tensor] = None
    expert_ranks: Optional[torch.Tensor] = None
    local_replica: Optional[torch.Tensor] = None

    @property
    def phases(self) -> Any:
        """The dynamic engine's steps the policy applies to (parsed ``config.phases``, cached per value)."""
        text = self.config.phases or router_type(self.config.router_type).phases
        if getattr(self, "_phases_text", None) != text:
            self._phases = parse_phases(text)
            self._phases_text = text
        return self._phases

    @property
    def decides_on_slots(self) -> bool:
        """Capacity routers under a plan with replicas decide on the ``S`` physical slots."""
        return (self.layout is not None and self.layout.table.num_slots > self.layout.table.num_experts
                and router_type(self.config.router_type).capacity)

    def build_tensors(self, device: Optional[torch.device] = None) -> "LayerRoutingState":
        """(Re)build every device tensor of the state on ``device`` (default: its own). Returns self.

        Called at install, after a placement moves the layer, and when the
        model moves to another device; never inside a routing call on the
        device the state was built for.
        """
        self.device = torch.device(device) if device is not None else self.device
        device = self.device
        self.local_experts_t = local_experts_tensor(list(self.local_experts), self.num_experts, device) \
            if self.local_experts else None
        layout = self.layout
        if layout is not None:
            layout.table = layout.table.to(device)
            per = len(layout.slots) // layout.num_ranks
            self.local_slots_t = local_experts_tensor(list(self.local_slots), len(layout.slots), device) \
                if self.local_slots else None
            if self.decides_on_slots:  # [S]: the rank of each slot
                self.expert_ranks = torch.arange(len(layout.slots), device=device) // per
            elif layout.placed:  # [E]: one slot per expert
                self.expert_ranks = torch.tensor([layout.slots.index(e) // per for e in range(self.num_experts)],
                                                 dtype=torch.int64, device=device)
            else:
                self.expert_ranks = expert_rank_map(self.num_experts, self.ep_size, device)
            replica = torch.full((self.num_experts,), -1, dtype=torch.int64)
            cpu = layout.table.to(torch.device("cpu"))
            for s in self.local_slots:
                replica[int(cpu.slot_expert[s])] = int(cpu.slot_replica[s])
            self.local_replica = replica.to(device)
        else:
            self.local_slots_t = None
            self.expert_ranks = expert_rank_map(self.num_experts, self.ep_size, device)
            self.local_replica = None
        return self

    def on(self, device: torch.device) -> "LayerRoutingState":
        """The state with its tensors on ``device`` (rebuilt only when the model moved)."""
        if self.device != device:
            self.build_tensors(device)
        return self
