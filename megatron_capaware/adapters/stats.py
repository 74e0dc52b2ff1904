"""Per-layer routing statistics recorded by the capaware router and dispatcher.

The router records what its policy decided (global loads, drops, reroutes:
all already known to the policy, so recording costs no collective); the
dispatcher records how many tokens each local expert actually received
after dispatch, which is what the capacity guarantee is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from megatron_capaware import metrics
from megatron_capaware.policies.collectives import all_reduce_sum

# Per-layer records kept one per call; older calls are folded into running
# totals so a long-lived server's memory stays bounded while every summary
# still covers all calls since the last reset.
MAX_RECORDS = 1024
_COUNTS = ("requested", "dropped", "rerouted", "tokens", "flexible")


@dataclass
class LayerRoutingStats:
    """Everything recorded for one MoE layer, one entry per forward call.

    Recording costs no host synchronisation: each call's figures stay on the
    device where the policy computed them (:attr:`pending`) and move to the
    host in one copy when something reads them (a summary, a report, the
    attributes below), or when :data:`MAX_RECORDS` calls are pending.

    Attributes:
        layer_number: Megatron's 1-based layer number.
        num_experts: E.
        ep_size: expert-parallel size (experts split in contiguous blocks).
        local_experts: this rank's expert ids.
        duplication: how many ranks hold each token (TP without sequence
            parallelism); measured received counts are divided by it.
        load_group: the group the layer's loads are global over (a
            :class:`~megatron_capaware.policies.collectives.LoadGroup`, a
            process group, or None).
    """

    layer_number: int
    num_experts: int
    ep_size: int
    local_experts: List[int]
    duplication: int = 1
    load_group: Any = None
    max_records: int = MAX_RECORDS
    # Host copies, one entry per call (read through the properties below).
    _global_loads: List[torch.Tensor] = field(default_factory=list)
    _counts: Dict[str, List[int]] = field(default_factory=lambda: {name: [] for name in _COUNTS})
    _capacity: List[Optional[int]] = field(default_factory=list)
    _received: List[torch.Tensor] = field(default_factory=list)
    # Device-side records not yet copied: (loads [E], counts [6]) and received counts.
    pending: List[Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    pending_received: List[torch.Tensor] = field(default_factory=list)
    # Calls folded out of the lists above: count, summed per-call metrics,
    # summed loads, and summed counts.
    folded_calls: int = 0
    folded_metrics: Dict[str, float] = field(default_factory=dict)
    folded_loads: Optional[torch.Tensor] = None
    folded_counts: Dict[str, int] = field(default_factory=dict)
    # Under a placement (adapters/placement.py) each call's global per-slot
    # loads [S] are kept beside its expert loads.
    _slot_loads: List[torch.Tensor] = field(default_factory=list)

    def record_decision(self, decision, slot_loads: Optional[torch.Tensor] = None) -> None:
        """Keep a :class:`~megatron_capaware.policies.RoutingDecision`'s figures (device-side, no sync).

        ``slot_loads [S]``: under a placement, this call's global per-slot loads
        (rank figures come from them); None: Megatron's layout, the expert loads.
        """
        loads = decision.global_loads.detach().to(torch.int64)
        none = torch.full((), -1, dtype=torch.int64, device=loads.device)

        def count(value: Optional[torch.Tensor]) -> torch.Tensor:
            return none if value is None else value.detach().to(device=loads.device, dtype=torch.int64).reshape(())

        counts = torch.stack([count(decision.requested_assignments), count(decision.dropped),
                              count(decision.rerouted), count(decision.global_tokens),
                              count(decision.flexible), count(decision.capacity)])
        slots = loads if slot_loads is None else slot_loads.detach().to(device=loads.device, dtype=torch.int64)
        self.pending.append((loads.clone(), counts, slots.clone()))
        if len(self.pending) >= self.max_records:
            self.flush()

    def slot_loads(self) -> List[torch.Tensor]:
        """Per-call physical slot loads ``[S]``, aligned with :attr:`global_loads` (the expert loads where
        no placement was in effect: Megatron's layout is slots = experts)."""
        self.flush()
        return list(self._slot_loads)

    def record_received(self, tokens_per_local_expert) -> None:
        """Keep the number of tokens each local expert received in this call (device-side, no sync)."""
        counts = torch.as_tensor(tokens_per_local_expert).detach().to(torch.int64).reshape(-1).clone()
        self.pending_received.append(counts)
        if len(self.pending_received) >= self.max_records:
            self.flush()

    def flush(self) -> None:
        """Copy the pending device records to the host (one copy per kind) and fold old calls."""
        if self.pending:
            loads = torch.stack([p[0] for p in self.pending]).to("cpu")  # [n, E]
            counts = torch.stack([p[1] for p in self.pending]).to("cpu").tolist()  # [n, 6]
            # Per-slot loads [n, S]; S may change between calls (re-placement), so one copy per width.
            slots = [p[2] for p in self.pending]
            if len({t.numel() for t in slots}) == 1:
                slots = list(torch.stack(slots).to("cpu").unbind(0))
            else:
                slots = [t.to("cpu") for t in slots]
            self.pending.clear()
            self._slot_loads.extend(slots)
            for row_loads, row in zip(loads, counts):
                self._global_loads.append(row_loads)
                for name, value in zip(_COUNTS, row):
                    self._counts[name].append(0 if name == "flexible" and value < 0 else int(value))
                self._capacity.append(None if row[len(_COUNTS)] < 0 else int(row[len(_COUNTS)]))
            while len(self._global_loads) > self.max_records:
                self._fold_oldest()
        if self.pending_received:
            self._received.extend(torch.stack(self.pending_received).to("cpu").unbind(0))
            self.pending_received.clear()
            del self._received[: max(0, len(self._received) - self.max_records)]

    @property
    def global_loads(self) -> List[torch.Tensor]:
        self.flush()
        return self._global_loads

    @property
    def capacity(self) -> List[Optional[int]]:
        self.flush()
        return self._capacity

    @property
    def received(self) -> List[torch.Tensor]:
        self.flush()
        return self._received

    @property
    def requested(self) -> List[int]:
        self.flush()
        return self._counts["requested"]

    @property
    def dropped(self) -> List[int]:
        self.flush()
        return self._counts["dropped"]

    @property
    def rerouted(self) -> List[int]:
        self.flush()
        return self._counts["rerouted"]

    @property
    def tokens(self) -> List[int]:
        self.flush()
        return self._counts["tokens"]

    @property
    def flexible(self) -> List[int]:
        self.flush()
        return self._counts["flexible"]

    def _fold_oldest(self) -> None:
        slot_loads = self._slot_loads.pop(0)
        loads = self._global_loads.pop(0)
        for key, value in metrics.load_metrics(loads, self.ep_size, self._counts["requested"][0],
                                               slot_loads).items():
            self.folded_metrics[key] = self.folded_metrics.get(key, 0.0) + value
        self.folded_loads = loads.clone() if self.folded_loads is None else self.folded_loads + loads
        for name in _COUNTS:
            self.folded_counts[name] = self.folded_counts.get(name, 0) + self._counts[name].pop(0)
        self._capacity.pop(0)
        self.folded_calls += 1

    @property
    def calls(self) -> int:
        """Forward calls recorded since the last reset (folded ones included)."""
        return self.folded_calls + len(self._global_loads) + len(self.pending)

    def total(self, name: str) -> int:
        """Sum of one count (``requested``, ``dropped``, ...) over all recorded calls."""
        return self.folded_counts.get(name, 0) + sum(getattr(self, name))

    def mean_loads(self) -> Optional[torch.Tensor]:
        """Per-expert global load ``[E]`` averaged over all recorded calls (float64)."""
        if not self.calls:
            return None
        total = torch.stack(self.global_loads).sum(0).double() if self.global_loads else 0.0
        if self.folded_loads is not None:
            total = total + self.folded_loads.double()
        return total / self.calls

    def reset(self) -> None:
        self.pending.clear()
        self.pending_received.clear()
        for values in (self._global_loads, self._capacity, self._received, self._slot_loads,
                       *self._counts.values()):
            values.clear()
        self.folded_calls = 0
        self.folded_metrics = {}
        self.folded_loads = None
        self.folded_counts = {}

    def summary(self) -> Dict[str, float]:
        """Load figures over all recorded calls (drop and reroute fractions from
        this rank's own counts; :func:`reduce_summaries` gives the global ones)."""
        out = metrics.summarize_calls(self.global_loads, self.requested, self.dropped, self.rerouted, self.ep_size,
                                      self.slot_loads())
        if not self.folded_calls:
            return out
        live = len(self.global_loads)
        for key, folded in self.folded_metrics.items():
            out[key] = (out.get(key, 0.0) * live + folded) / self.calls
        total = self.total("requested")
        out["dropped_frac"] = self.total("dropped") / total if total else 0.0
        out["rerouted_frac"] = self.total("rerouted") / total if total else 0.0
        out["calls"] = float(self.calls)
        return out


def reduce_summaries(all_stats: Dict[int, LayerRoutingStats]) -> Dict[int, Dict[str, float]]:
    """Per-layer metrics over the recorded calls, as the whole load group saw them.

    Loads are global already; each rank's drop / reroute / flexible counts are
    summed over the layer's load group (copies of tokens counted once). Every
    rank of the group must call this (it issues one all-reduce per layer).
    """
    out: Dict[int, Dict[str, float]] = {}
    for layer, stats in sorted(all_stats.items()):
        summary = stats.summary()
        counts = torch.tensor([stats.total("dropped"), stats.total("rerouted"), stats.total("flexible")], dtype=torch.int64)
        counts = all_reduce_sum(counts, stats.load_group)
        total = float(stats.total("requested"))
        summary["dropped_frac"] = float(counts[0]) / total if total else 0.0
        summary["rerouted_frac"] = float(counts[1]) / total if total else 0.0
        tokens = float(stats.total("tokens"))
        summary["flexible_frac"] = float(counts[2]) / tokens if tokens else 0.0
        out[layer] = summary
    return out
