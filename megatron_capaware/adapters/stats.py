"""Per-layer routing statistics recorded by the capaware router and dispatcher.

The router records what its policy decided (global loads, drops, reroutes:
all already known to the policy, so recording costs no collective); the
dispatcher records how many tokens each local expert actually received
after dispatch, which is what the capacity guarantee is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from megatron_capaware import metrics
from megatron_capaware.policies.collectives import all_reduce, all_reduce_sum

# Per-layer records kept one per call; older calls are folded into running
# totals so a long-lived server's memory stays bounded while every summary
# still covers all calls since the last reset.
MAX_RECORDS = 1024
_COUNTS = ("requested", "dropped", "rerouted", "tokens", "flexible")


@dataclass
class LayerRoutingStats:
    """Everything recorded for one MoE layer, one entry per forward call.

    Recording costs no host synchronisation and no collective: each call's
    figures are copied into a preallocated device ring (:attr:`pending` rows)
    and move to the host in one copy when something reads them (a summary, a
    report, the attributes below), or when :data:`MAX_RECORDS` calls are
    pending. With ``--capaware-scope local`` (:attr:`reduce_group` set) a row
    holds this rank's figures; they are summed over the group when reported
    (:meth:`reduce_pending`, called by ``collect_stats`` on every rank), not
    per call.

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
    # Calls folded out of the lists above: count, summed per-call metrics,
    # summed loads, and summed counts.
    folded_calls: int = 0
    folded_metrics: Dict[str, float] = field(default_factory=dict)
    folded_loads: Optional[torch.Tensor] = None
    folded_counts: Dict[str, int] = field(default_factory=dict)
    # Under a placement (adapters/placement.py) each call's global per-slot
    # loads [S] are kept beside its expert loads.
    _slot_loads: List[torch.Tensor] = field(default_factory=list)
    #: ``--capaware-scope local``: the group this layer's pending records are summed over when they
    #: are read (:meth:`reduce_pending`); None: the records are global already (or one rank).
    reduce_group: Any = None
    # The device ring: one row per call not yet copied to the host, ``[max_records, E + 6 + S]``
    # int64: the expert loads, the counts (requested, dropped, rerouted, tokens, flexible, capacity;
    # -1 = none) and the slot loads. Preallocated once (and when S changes), so recording a call is
    # two or three copies into it (no stack, clone or allocation per call).
    _ring: Optional[torch.Tensor] = None
    _ring_rows: int = 0
    _ring_slots: List[bool] = field(default_factory=list)  # host: the row has its own slot loads
    pending_received: List[torch.Tensor] = field(default_factory=list)
    # The first pending rows already summed over ``reduce_group`` (a full ring is reduced and copied).
    _reduced_rows: int = 0

    def record_decision(self, decision, slot_loads: Optional[torch.Tensor] = None) -> None:
        """Keep a :class:`~megatron_capaware.policies.RoutingDecision`'s figures (device-side, no sync).

        ``slot_loads [S]``: under a placement, this call's per-slot loads (rank figures come from them);
        None: Megatron's layout, the expert loads. With :attr:`reduce_group` set (local scope) the
        figures are this rank's and are summed over the group when read (:meth:`reduce_pending`).
        Costs two device copies per call (three with slot loads) into the preallocated ring.
        """
        loads = decision.global_loads.detach()
        width = loads.numel() + len(_COUNTS) + 1 + (loads.numel() if slot_loads is None else slot_loads.numel())
        ring = self._ring
        if ring is None or ring.shape[1] != width or ring.device != loads.device:
            if self._ring_rows:  # S changed (a re-placement) or the device did: copy the old rows first
                self.reduce_pending()
                self.flush()
            rows = min(self.max_records, MAX_RECORDS)
            ring = self._ring = torch.empty((rows, width), dtype=torch.int64, device=loads.device)
            self._none = torch.full((), -1, dtype=torch.int64, device=loads.device)
            self._loads_width = loads.numel()
        row = ring[self._ring_rows]
        num = loads.numel()
        row[:num].copy_(loads)
        none = self._none
        torch.stack([none if value is None else value.detach().reshape(())
                     for value in (decision.requested_assignments, decision.dropped, decision.rerouted,
                                   decision.global_tokens, decision.flexible, decision.capacity)],
                    out=row[num:num + len(_COUNTS) + 1])
        if slot_loads is not None:
            row[num + len(_COUNTS) + 1:].copy_(slot_loads.detach())
        self._ring_slots.append(slot_loads is not None)
        self._ring_rows += 1
        if self._ring_rows >= ring.shape[0]:
            # Local scope: one reduction per MAX_RECORDS calls, at the same call on every rank.
            self.reduce_pending()
            self.flush()

    @property
    def pending(self) -> int:
        """Calls recorded on the device and not yet copied to the host."""
        return self._ring_rows

    def needs_reduction(self) -> bool:
        """Whether pending records must be summed over :attr:`reduce_group` before they can be read."""
        return self.reduce_group is not None and self._ring_rows > self._reduced_rows

    def reduce_pending(self) -> None:
        """Sum the pending local records over :attr:`reduce_group` (local scope): COLLECTIVE.

        Every rank of the group must call it at the same point (``collect_stats`` does, on every
        rank, for every layer in the same order; a full ring does it at the same call on every
        rank). Two all-reduces: the ranks first agree on the number of rows to sum (a fixed-size
        ``[2]``: the sum of n and of n squared, equal to ``(W n, W n^2)`` on every rank exactly
        when every rank's n is the same), then sum the ``[n, width]`` rows: the loads, the
        requested assignments, the tokens and the slot loads become the group's; the dropped,
        rerouted and flexible counts stay this rank's (as at global scope: :func:`reduce_summaries`
        sums them); the capacity is per rank, so none is reported. A rank whose count differs
        makes every rank raise the same error: no rank is left waiting. Nothing is issued
        without a group or on one rank.
        """
        group = self.reduce_group
        if group is None:
            return
        from megatron_capaware.policies.collectives import group_size

        size = group_size(group)
        start, n = self._reduced_rows, self._ring_rows - self._reduced_rows
        if size <= 1:
            self._reduced_rows = self._ring_rows
            return
        device = self._ring.device if self._ring is not None else torch.device("cpu")
        # Unweighted (all_reduce, not all_reduce_sum): ranks holding copies of tokens count here too.
        agree = all_reduce(torch.tensor([n, n * n], dtype=torch.int64, device=device), group).tolist()
        if agree[0] * agree[0] != size * agree[1]:
            raise RuntimeError(
                f"MoE layer {self.layer_number}: the ranks of the load group recorded different numbers of "
                f"routing calls since the last report ({agree[0]} in all over {size} ranks; this rank {n}): "
                "with --capaware-scope local the statistics are summed over the group when read, so every "
                "rank must route the same calls and call collect_stats / reset_stats together")
        if n:
            rows = self._ring[start:start + n]
            summed = all_reduce_sum(rows.clone(), group)
            num = self._loads_width
            own = [num + _COUNTS.index(name) for name in ("dropped", "rerouted", "flexible")]
            summed[:, own] = rows[:, own]
            summed[:, num + len(_COUNTS)] = -1  # the capacity: per rank at local scope
            rows.copy_(summed)
        self._reduced_rows = self._ring_rows

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
        """Copy the pending device records to the host (one copy) and fold old calls.

        Raises:
            RuntimeError: local-scope records not yet summed over the group (:meth:`reduce_pending`,
                which ``collect_stats`` calls on every rank): reading them here would give this
                rank's figures as the group's, and summing them here would be a collective one
                rank might issue alone.
        """
        if self._ring_rows:
            if self.needs_reduction():
                raise RuntimeError(
                    f"MoE layer {self.layer_number}: with --capaware-scope local the statistics stay on the "
                    "device as this rank's figures and are summed over the load group when reported: call "
                    "megatron_capaware.adapters.collect_stats(model) on every rank of the group first (it is "
                    "collective), then read the returned stats")
            n, num = self._ring_rows, self._loads_width
            rows = self._ring[:n].to("cpu")  # [n, E + 6 + S]: the one copy
            has_slots = list(self._ring_slots)
            self._ring_rows = self._reduced_rows = 0
            self._ring_slots.clear()
            counts = rows[:, num:num + len(_COUNTS) + 1].tolist()
            for row, row_counts, own_slots in zip(rows, counts, has_slots):
                loads = row[:num].clone()
                self._global_loads.append(loads)
                self._slot_loads.append(row[num + len(_COUNTS) + 1:].clone() if own_slots else loads)
                for name, value in zip(_COUNTS, row_counts):
                    self._counts[name].append(0 if name == "flexible" and value < 0 else int(value))
                self._capacity.append(None if row_counts[len(_COUNTS)] < 0 else int(row_counts[len(_COUNTS)]))
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
        return self.folded_calls + len(self._global_loads) + self._ring_rows

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
        self._ring_rows = self._reduced_rows = 0
        self._ring_slots.clear()
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
        stats.reduce_pending()  # local scope: the group's loads first (collective, as this function is)
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
