"""Load-balance metrics of ``docs/routers.md`` (pure functions, torch only).

Per layer and forward call: ``I = max_e L_e / mean_e L_e``, ``MaxVio = I - 1``,
the same over EP ranks (sum of each rank's local experts: what sets the
layer's latency), the coefficient of variation of ``L_e``, the fraction of
experts with no load, and the dropped / rerouted fractions of the requested
assignments. ``I_agg`` is the mean of ``I`` over layers.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional

import torch


def imbalance(loads: torch.Tensor) -> float:
    """``max / mean`` of loads ``[E]`` (1.0 for perfectly balanced; 0 loads -> 1.0)."""
    loads = loads.to(torch.float64)
    mean = float(loads.mean()) if loads.numel() else 0.0
    return float(loads.max()) / mean if mean > 0 else 1.0


def rank_loads(loads: torch.Tensor, ep_size: int) -> torch.Tensor:
    """Loads per EP rank ``[ep_size]``: experts are split over ranks in contiguous blocks."""
    num_experts = loads.shape[-1]
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"{num_experts} experts cannot be split over EP size {ep_size}")
    return loads.reshape(*loads.shape[:-1], ep_size, num_experts // ep_size).sum(-1)


def load_metrics(loads: torch.Tensor, ep_size: int = 1, requested: Optional[float] = None,
                 slot_loads: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Metrics of one layer's per-expert loads ``[E]`` in one forward call.

    ``slot_loads [S]``: under a placement, the loads of the physical slots
    (rank ``r`` owns a contiguous block of ``S / W``); the rank figures then
    come from them, the expert figures (``I``, ...) from ``loads``.

    With ``requested`` (the assignments top-k asked for, ``T_glob * k``) also
    ``peak_load`` and ``rank_peak_load``: the busiest expert's (EP rank's) load
    over top-k's *mean* expert (rank) load. Unlike ``I``, these compare routers
    that compute different numbers of assignments (drops lower the mean;
    expanded-drop raises it): the rank figure is what the layer's expert time
    follows, relative to a perfectly balanced top-k.
    """
    loads = loads.to(torch.float64)
    per_slot = loads if slot_loads is None else slot_loads.to(torch.float64)
    mean = float(loads.mean())
    i_expert = imbalance(loads)
    std = float(loads.std(unbiased=False)) if loads.numel() > 1 else 0.0
    return {
        "imbalance": i_expert,
        "max_vio": i_expert - 1.0,
        "rank_imbalance": imbalance(rank_loads(per_slot, ep_size)),
        "cv": std / mean if mean > 0 else 0.0,
        "zero_load_frac": float((loads == 0).double().mean()),
        "max_load": float(loads.max()),
        "mean_load": mean,
        **_peaks(loads, per_slot, ep_size, requested),
    }


def _peaks(loads: torch.Tensor, per_slot: torch.Tensor, ep_size: int, requested: Optional[float]) -> Dict[str, float]:
    if requested is None or requested <= 0 or not loads.numel():
        return {}
    requested = float(requested)
    return {
        "peak_load": float(loads.max()) * loads.numel() / requested,
        "rank_peak_load": float(rank_loads(per_slot, ep_size).max()) * ep_size / requested,
    }


def summarize_calls(
    loads_per_call: Iterable[torch.Tensor],
    requested: Iterable[int],
    dropped: Iterable[int],
    rerouted: Iterable[int],
    ep_size: int = 1,
    slot_loads_per_call: Optional[Iterable[Optional[torch.Tensor]]] = None,
) -> Dict[str, float]:
    """One layer over several forward calls: per-call metrics averaged, fractions pooled."""
    requested = list(requested)
    loads_per_call = list(loads_per_call)
    slots = list(slot_loads_per_call) if slot_loads_per_call is not None else [None] * len(loads_per_call)
    per_call: List[Dict[str, float]] = [load_metrics(l, ep_size, r, s)
                                        for l, r, s in zip(loads_per_call, requested, slots)]
    out: Dict[str, float] = {}
    # A call with no requested assignment here (an idle EP rank's dummy forward) has no peak
    # figures: each figure is the mean over the calls that have it.
    for key in dict.fromkeys(k for m in per_call for k in m):
        values = [m[key] for m in per_call if key in m]
        out[key] = sum(values) / len(values)
    total = sum(int(r) for r in requested)
    out["dropped_frac"] = sum(int(d) for d in dropped) / total if total else 0.0
    out["rerouted_frac"] = sum(int(r) for r in rerouted) / total if total else 0.0
    out["calls"] = float(len(per_call))
    return out


def aggregate_layers(per_layer: Mapping[int, Mapping[str, float]]) -> Dict[str, float]:
    """``I_agg`` and friends: the mean over layers of each per-layer figure.

    ``dropped_frac`` / ``rerouted_frac`` are averaged over layers too (every MoE
    layer is asked for the same number of assignments).
    """
    keys = ("imbalance", "max_vio", "rank_imbalance", "cv", "zero_load_frac", "dropped_frac", "rerouted_frac",
            "peak_load", "rank_peak_load")
    layers = list(per_layer.values())
    if not layers:
        return {}
    result = {f"{k}_agg" if k == "imbalance" else k: sum(l.get(k, 0.0) for l in layers) / len(layers) for k in keys}
    result["i_agg"] = result.pop("imbalance_agg")
    result["max_imbalance_layer"] = max(l.get("imbalance", 0.0) for l in layers)
    return result


def fraction(numerator: float, denominator: float) -> Optional[float]:
    return numerator / denominator if denominator else None
