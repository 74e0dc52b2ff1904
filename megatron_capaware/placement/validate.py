"""Plans checked on loads they were not fitted on (pure, torch only).

A placement fitted on one calibration text can be worse than Megatron's
contiguous layout on other text, and replicas fitted to the calibration's hot
experts can be worse than no replicas (issue 25). Here the recorded calls are
split in time: the plan is fitted on the first part (``fit``) and measured on
the rest (``validation``); what is written is only what did not lose there.

The figure is the **per-call busiest rank**: a MoE layer waits, at every
forward call, for its busiest EP rank, so over calls ``c`` the cost is
``sum_c max_r load[c, r]``, reported over ``sum_c mean_r load[c, r]`` (1.0 =
every call perfectly balanced). It is never below the rank peak of the mean
loads (:func:`~megatron_capaware.placement.planner.rank_peak`), which is what
the planner minimises.

Shapes: ``C`` calls, ``L`` layers, ``E`` experts, ``S`` slots, ``W`` ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_capaware.placement.planner import (
    LayerPlacement,
    PlacementError,
    check_layout,
    contiguous_slots,
    plan_layer,
    rank_peak,
)

OBJECTIVES = ("mean", "per-call")


def per_call_rank_loads(call_loads: torch.Tensor, slots: Sequence[int], num_ranks: int) -> torch.Tensor:
    """``[C, W]`` rank loads of each call's expert loads ``call_loads [C, E]`` (replicas share equally)."""
    call_loads = torch.as_tensor(call_loads, dtype=torch.float64)
    slots_t = torch.as_tensor(list(slots), dtype=torch.int64)
    counts = torch.bincount(slots_t, minlength=call_loads.shape[1]).to(torch.float64)
    per_slot = call_loads[:, slots_t] / counts[slots_t]  # [C, S]
    return per_slot.view(call_loads.shape[0], num_ranks, -1).sum(dim=2)


def per_call_peak(call_loads: torch.Tensor, slots: Sequence[int], num_ranks: int) -> float:
    """``sum_c max_r load[c, r] / sum_c mean_r load[c, r]`` of ``call_loads [C, E]`` under ``slots``.

    1.0: every call balanced. No calls or no load: 1.0.
    """
    ranks = per_call_rank_loads(call_loads, slots, num_ranks)  # [C, W]
    mean = float(ranks.mean(dim=1).sum())
    return float(ranks.max(dim=1).values.sum()) / mean if mean > 0 else 1.0


def per_call_peak_reference(call_loads: torch.Tensor, slots: Sequence[int], num_ranks: int) -> float:
    """Loop reference of :func:`per_call_peak` (tests only)."""
    slots = list(slots)
    per = len(slots) // num_ranks
    worst = mean = 0.0
    for row in torch.as_tensor(call_loads, dtype=torch.float64).tolist():
        ranks = [sum(row[e] / slots.count(e) for e in slots[r * per:(r + 1) * per]) for r in range(num_ranks)]
        worst += max(ranks)
        mean += sum(ranks) / num_ranks
    return worst / mean if mean > 0 else 1.0


def split_calls(num_calls: int, validation_fraction: float) -> Tuple[slice, slice]:
    """``(fit, validation)`` slices of ``num_calls`` calls in time order: the last
    ``ceil(fraction * C)`` calls validate, the rest fit (at least one each).

    Raises:
        PlacementError: a fraction outside ``(0, 1)`` or fewer than two calls.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise PlacementError(f"validation fraction {validation_fraction}: use a value in (0, 1), e.g. 0.25")
    if num_calls < 2:
        raise PlacementError(f"{num_calls} recorded call(s): a validation split needs at least 2; give more "
                             "calibration text or fewer sequences per call")
    held = min(max(1, math.ceil(validation_fraction * num_calls)), num_calls - 1)
    return slice(0, num_calls - held), slice(num_calls - held, num_calls)


def refine_per_call(call_loads: torch.Tensor, slots: Sequence[int], num_ranks: int,
                    max_swaps: int = 256) -> List[int]:
    """Pairwise slot swaps that lower ``sum_c max_r load[c, r]`` (best swap first) until none does.

    ``call_loads [C, E]``; ``slots [S]`` a valid placement (replicas allowed:
    a swap never puts two replicas of an expert on one rank). All ``S^2``
    swaps are scored at once (``[C, S, S, W]``), so keep ``C * S^2 * W``
    within memory (64 experts, 64 calls, 8 ranks: 16 M values).
    Returns the new ``slots [S]`` (each rank's slots sorted).
    """
    call_loads = torch.as_tensor(call_loads, dtype=torch.float64)
    slots = [int(e) for e in slots]
    num_slots = len(slots)
    per = num_slots // num_ranks
    rank_of = torch.arange(num_slots) // per  # [S]
    onehot = torch.nn.functional.one_hot(rank_of, num_ranks).to(torch.float64)  # [S, W]
    for _ in range(max_swaps):
        slots_t = torch.tensor(slots)
        counts = torch.bincount(slots_t, minlength=call_loads.shape[1]).to(torch.float64)
        share = call_loads[:, slots_t] / counts[slots_t]  # [C, S]
        ranks = share @ onehot  # [C, W]
        current = float(ranks.max(dim=1).values.sum())
        delta = share.unsqueeze(1) - share.unsqueeze(2)  # [C, i, j]: p_j - p_i, what rank(i) gains
        shift = onehot.unsqueeze(1) - onehot.unsqueeze(0)  # [i, j, W]: +1 on rank(i), -1 on rank(j)
        new = ranks[:, None, None, :] + delta.unsqueeze(-1) * shift.unsqueeze(0)  # [C, S, S, W]
        cost = new.max(dim=3).values.sum(dim=0)  # [S, S]
        # Valid swaps: different ranks, different experts, neither rank already holding the other's expert.
        holds = torch.zeros(num_ranks, call_loads.shape[1], dtype=torch.bool)
        holds[rank_of, slots_t] = True
        valid = (rank_of.unsqueeze(1) != rank_of.unsqueeze(0)) & (slots_t.unsqueeze(1) != slots_t.unsqueeze(0))
        valid &= ~holds[rank_of.unsqueeze(1), slots_t.unsqueeze(0)] & ~holds[rank_of.unsqueeze(0), slots_t.unsqueeze(1)]
        cost = torch.where(valid, cost, torch.full_like(cost, math.inf))
        best = int(torch.argmin(cost))
        i, j = divmod(best, num_slots)
        if not float(cost[i, j]) < current * (1 - 1e-9):
            break
        slots[i], slots[j] = slots[j], slots[i]
    return [e for r in range(num_ranks) for e in sorted(slots[r * per:(r + 1) * per])]


def fit_layer(call_loads: torch.Tensor, num_ranks: int, redundant: int = 0, nodes: Optional[int] = None,
              objective: str = "mean") -> LayerPlacement:
    """A placement fitted on ``call_loads [C, E]``: the planner on their mean, then (``per-call``)
    :func:`refine_per_call` on the calls themselves (not with ``nodes``: swaps would cross nodes)."""
    if objective not in OBJECTIVES:
        raise PlacementError(f"objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
    call_loads = torch.as_tensor(call_loads, dtype=torch.float64)
    placement = plan_layer(call_loads.sum(dim=0), num_ranks, redundant, nodes)
    if objective == "per-call" and not (nodes and nodes > 1):
        mean = call_loads.sum(dim=0)
        slots = refine_per_call(call_loads, placement.slots, num_ranks)
        placement = replace(placement, slots=slots, predicted_rank_peak=rank_peak(mean, slots, num_ranks))
    return placement


@dataclass
class ValidatedPlan:
    """What :func:`plan_validated` decided.

    Attributes:
        placements: ``[L]`` the layouts to write (``redundant`` slots each).
        redundant: ``R`` of the written plan (0 when replicas lost on validation).
        figures: ``[L]`` per layer: per-call busiest rank on ``fit`` and
            ``validation`` of ``contiguous``, ``replica_free`` (the fitted
            R = 0 plan), ``replicated`` (R > 0 only) and ``written``; and
            ``choice`` (which layout the layer got).
        summary: the same figures averaged over layers, the split sizes, the objective.
        warnings: what was not written as asked, and why (one line each).
    """

    placements: List[LayerPlacement]
    redundant: int
    figures: List[Dict[str, object]]
    summary: Dict[str, object]
    warnings: List[str] = field(default_factory=list)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def plan_validated(call_loads: torch.Tensor, num_ranks: int, redundant: int = 0, nodes: Optional[int] = None,
                   validation_fraction: float = 0.25, objective: str = "mean",
                   keep_replicas: bool = False) -> ValidatedPlan:
    """Fit on the first calls, check on the last; write only what does not lose there.

    Args:
        call_loads: ``[C, L, E]`` expert loads of each recorded call and layer.
        num_ranks, redundant, nodes: as :func:`~megatron_capaware.placement.planner.plan_layer`.
        validation_fraction: share of the calls (the last ones) held out.
        objective: ``mean`` (the planner on mean loads) or ``per-call``
            (then swaps lowering the fit calls' summed busiest rank).
        keep_replicas: write the replicated plan even when it loses to the
            replica-free one on validation (a warning says so).

    Rules, in order: (1) a layer whose fitted R = 0 plan has a higher
    validation busiest rank than contiguous keeps the contiguous layout;
    (2) with ``R > 0`` the replicated plan is written only when its
    validation busiest rank (mean over layers) is not above that of the
    R = 0 layouts from (1); otherwise those are written with ``R = 0`` and a
    warning. Each layer's ``predicted_rank_peak`` stays the planner's
    in-sample figure (fit mean loads).

    Raises:
        PlacementError: bad shapes or sizes, too few calls to split.
    """
    call_loads = torch.as_tensor(call_loads, dtype=torch.float64)
    if call_loads.dim() != 3:
        raise PlacementError(f"call loads must be [calls, layers, experts], got {tuple(call_loads.shape)}")
    if not bool(torch.isfinite(call_loads).all()) or bool((call_loads < 0).any()):
        raise PlacementError("call loads must be finite and >= 0: record them again from a clean run")
    num_calls, num_layers, num_experts = call_loads.shape
    check_layout(num_experts, num_ranks, redundant)
    fit, val = split_calls(num_calls, validation_fraction)
    cont = contiguous_slots(num_experts)
    written: List[LayerPlacement] = []
    replicated: List[LayerPlacement] = []
    figures: List[Dict[str, object]] = []
    for layer in range(num_layers):
        loads = call_loads[:, layer]
        fig: Dict[str, object] = {}

        def both(name: str, slots: Sequence[int]) -> None:
            fig[f"{name}_fit"] = per_call_peak(loads[fit], slots, num_ranks)
            fig[f"{name}_validation"] = per_call_peak(loads[val], slots, num_ranks)

        both("contiguous", cont)
        free = fit_layer(loads[fit], num_ranks, 0, nodes, objective)
        both("replica_free", free.slots)
        if fig["replica_free_validation"] > fig["contiguous_validation"]:  # type: ignore[operator]
            free = replace(free, slots=list(cont), predicted_rank_peak=free.contiguous_rank_peak)
            fig["choice"] = "contiguous"
        else:
            fig["choice"] = "planned"
        both("kept_free", free.slots)
        if redundant:
            rep = fit_layer(loads[fit], num_ranks, redundant, nodes, objective)
            both("replicated", rep.slots)
            replicated.append(rep)
        written.append(free)
        figures.append(fig)
    warnings: List[str] = []
    out_redundant = 0
    mean_free = _mean([f["kept_free_validation"] for f in figures])  # type: ignore[misc]
    if redundant:
        mean_rep = _mean([f["replicated_validation"] for f in figures])  # type: ignore[misc]
        if mean_rep <= mean_free or keep_replicas:
            written, out_redundant = replicated, redundant
            for f in figures:
                f["choice"] = "replicated"
            if mean_rep > mean_free:
                warnings.append(f"the plan with {redundant} replica slots has a higher validation busiest rank "
                                f"({mean_rep:.3f}) than without replicas ({mean_free:.3f}); written anyway "
                                "(--keep-replicas)")
        else:
            warnings.append(f"the plan with {redundant} replica slots has a higher validation busiest rank "
                            f"({mean_rep:.3f}) than without replicas ({mean_free:.3f}): the replicas went to "
                            "experts hot in the fit part only; writing the replica-free plan (R = 0) instead "
                            "(--keep-replicas to write it anyway)")
    contiguous_layers = [i for i, f in enumerate(figures) if f["choice"] == "contiguous"]
    if contiguous_layers and not out_redundant:
        warnings.append(f"{len(contiguous_layers)} of {num_layers} layer(s) keep the contiguous layout: their "
                        "fitted plan was worse than contiguous on the validation calls")
    for layer, (f, p) in enumerate(zip(figures, written)):
        f["written_fit"] = per_call_peak(call_loads[fit, layer], p.slots, num_ranks)
        f["written_validation"] = per_call_peak(call_loads[val, layer], p.slots, num_ranks)
    keys = [k for k in figures[0] if k != "choice"]
    summary: Dict[str, object] = {k: _mean([f[k] for f in figures]) for k in keys}  # type: ignore[misc]
    summary.update({"fit_calls": fit.stop - fit.start, "validation_calls": val.stop - val.start,
                    "validation_fraction": validation_fraction, "objective": objective,
                    "requested_redundant": redundant, "written_redundant": out_redundant})
    return ValidatedPlan(written, out_redundant, figures, summary, warnings)
