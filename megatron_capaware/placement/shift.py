"""Layouts over a stream of forward calls whose traffic changes (pure, torch only; the shift benchmark).

Given every call's top-k expert loads ``[C, L, E]`` (which no layout
changes), this computes which layout each policy serves each call with and
what the busiest rank costs then, exactly as the runtime would:

- a static layout (contiguous, or a plan made ahead of time);
- :class:`~megatron_capaware.adapters.replan.OnlineReplanner` (``every``,
  ``window``, ``redundant``): after call ``c`` (1-based) with ``c % every == 0``
  it plans each layer from the mean loads of the last ``window`` calls and
  serves the next call with that plan (:func:`replanner_layouts` mirrors
  ``OnlineReplanner.replan``);
- the oracle: for each report window, a plan made on that window's own loads.

Shapes: ``C`` calls, ``L`` layers, ``E`` experts, ``W`` EP ranks; a layout
is ``[L]`` lists of slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_capaware.placement.planner import PlacementError, plan_layer

Layout = List[List[int]]  # [L] slots of each layer


@dataclass
class Move:
    """One re-planning: after call ``call`` (1-based), ``transfers`` expert weights crossed ranks (all layers)."""

    call: int
    transfers: int
    layers_changed: int


def call_rank_figures(call_loads: torch.Tensor, layouts: Sequence[Layout], num_ranks: int
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(busiest [C, L], mean [C, L])`` rank loads of each call under the layout serving it.

    ``call_loads [C, L, E]``; ``layouts[c]`` the layout of call ``c`` (replicas share equally).
    """
    call_loads = torch.as_tensor(call_loads, dtype=torch.float64)
    num_calls, num_layers, num_experts = call_loads.shape
    if len(layouts) != num_calls:
        raise PlacementError(f"{len(layouts)} layouts for {num_calls} calls")
    busiest = torch.zeros(num_calls, num_layers, dtype=torch.float64)
    mean = torch.zeros(num_calls, num_layers, dtype=torch.float64)
    cache: Dict[Tuple[int, ...], Tuple[torch.Tensor, torch.Tensor]] = {}
    for c, layout in enumerate(layouts):
        for layer, slots in enumerate(layout):
            key = tuple(slots)
            if key not in cache:
                slots_t = torch.tensor(slots, dtype=torch.int64)
                counts = torch.bincount(slots_t, minlength=num_experts).to(torch.float64)
                cache[key] = (slots_t, counts[slots_t])
            slots_t, share = cache[key]
            ranks = (call_loads[c, layer][slots_t] / share).view(num_ranks, -1).sum(dim=1)
            busiest[c, layer] = ranks.max()
            mean[c, layer] = ranks.mean()
    return busiest, mean


def transfers(old: Sequence[int], new: Sequence[int], num_ranks: int) -> int:
    """Expert weights that cross ranks when one layer goes from ``old`` to ``new`` slots.

    As the runtime's exchange (``adapters/placement.py``): each wanted slot is
    sent by the first rank holding its expert now; a slot whose sender is
    its own rank costs nothing, and an unchanged layer moves nothing.
    """
    if list(old) == list(new):
        return 0
    per_old, per_new = len(old) // num_ranks, len(new) // num_ranks
    first: Dict[int, int] = {}
    for s, e in enumerate(old):
        first.setdefault(int(e), s // per_old)
    return sum(1 for s, e in enumerate(new) if first[int(e)] != s // per_new)


def align_ranks(old: Sequence[int], new: Sequence[int], num_ranks: int) -> List[int]:
    """``new`` with its rank groups re-assigned to ranks so that the fewest expert weights move from ``old``.

    Which rank holds which group of experts changes no rank's load (every
    rank is alike), so this keeps the plan's balance exactly and only
    relabels ranks: group ``g`` goes to the rank ``r`` maximising, over all
    groups, the experts of ``g`` whose first holder in ``old`` is ``r`` (what
    :func:`transfers` counts). Exhaustive over rank permutations up to 7
    ranks, greedy (largest overlap first) above.
    """
    import itertools

    per_old, per_new = len(old) // num_ranks, len(new) // num_ranks
    first: Dict[int, int] = {}
    for s, e in enumerate(old):
        first.setdefault(int(e), s // per_old)
    groups = [list(new[g * per_new:(g + 1) * per_new]) for g in range(num_ranks)]
    score = [[sum(1 for e in grp if first[int(e)] == r) for r in range(num_ranks)] for grp in groups]
    if num_ranks <= 7:
        best = max(itertools.permutations(range(num_ranks)),
                   key=lambda perm: (sum(score[g][perm[g]] for g in range(num_ranks)), tuple(-p for p in perm)))
        rank_of = list(best)
    else:
        rank_of = [-1] * num_ranks
        free = set(range(num_ranks))
        pairs = sorted(((score[g][r], -g, -r) for g in range(num_ranks) for r in range(num_ranks)), reverse=True)
        for _, ng, nr in pairs:
            g, r = -ng, -nr
            if rank_of[g] < 0 and r in free:
                rank_of[g] = r
                free.discard(r)
    out: List[int] = [0] * len(new)
    for g, r in enumerate(rank_of):
        out[r * per_new:(r + 1) * per_new] = groups[g]
    return out


def static_layouts(layout: Layout, num_calls: int) -> List[Layout]:
    return [layout] * num_calls


def replanner_layouts(call_loads: torch.Tensor, num_ranks: int, every: int, window: int, redundant: int = 0,
                      initial: Optional[Layout] = None, align: bool = True, objective: str = "mean"
                      ) -> Tuple[List[Layout], List[Move]]:
    """The layout :class:`OnlineReplanner` serves each call with, and its moves.

    ``initial``: the layout before the first re-plan (default contiguous).
    After call ``c`` (1-based) with ``c % every == 0`` every layer is planned
    (``plan_layer``, ``redundant`` slots) from the mean loads of calls
    ``max(1, c - window + 1) .. c``; call ``c + 1`` runs on it. ``align``:
    its ranks relabelled to move the fewest experts (:func:`align_ranks`), as
    ``OnlineReplanner(align=True)`` does. ``objective="per-call"``: each
    layer fitted on the window's calls (:func:`~megatron_capaware.placement.validate.fit_layer`).
    """
    from megatron_capaware.placement.validate import fit_layer

    call_loads = torch.as_tensor(call_loads, dtype=torch.float64)
    num_calls, num_layers, num_experts = call_loads.shape
    if every < 1 or window < 1:
        raise PlacementError(f"every={every}, window={window}: use integers >= 1")
    current: Layout = [list(s) for s in initial] if initial is not None else \
        [list(range(num_experts)) for _ in range(num_layers)]
    layouts: List[Layout] = []
    moves: List[Move] = []
    for c in range(num_calls):
        layouts.append(current)
        done = c + 1
        if done % every == 0 and done < num_calls:
            recent = call_loads[max(0, done - window):done].mean(dim=0)  # [L, E]
            if objective == "per-call":
                calls = call_loads[max(0, done - window):done]
                new = [fit_layer(calls[:, layer], num_ranks, redundant, None, objective).slots
                       for layer in range(num_layers)]
            else:
                new = [plan_layer(recent[layer], num_ranks, redundant).slots for layer in range(num_layers)]
            if align:
                new = [align_ranks(a, b, num_ranks) for a, b in zip(current, new)]
            moved = [transfers(a, b, num_ranks) for a, b in zip(current, new)]
            moves.append(Move(done, sum(moved), sum(1 for a, b in zip(current, new) if a != b)))
            current = new
    return layouts, moves


def oracle_layouts(call_loads: torch.Tensor, num_ranks: int, windows: Sequence[Tuple[int, int]],
                   redundant: int = 0) -> List[Layout]:
    """Each report window ``[start, stop)`` served by a plan made on its own summed loads."""
    call_loads = torch.as_tensor(call_loads, dtype=torch.float64)
    layouts: List[Layout] = []
    for start, stop in windows:
        total = call_loads[start:stop].sum(dim=0)
        layout = [plan_layer(total[layer], num_ranks, redundant).slots for layer in range(total.shape[0])]
        layouts += [layout] * (stop - start)
    return layouts


def report_windows(segments: Sequence[Tuple[str, int]], size: int) -> List[Tuple[int, int, str]]:
    """``[start, stop, segment name]`` windows of ``size`` calls, restarting at each segment (the last may be short)."""
    out, start = [], 0
    for name, length in segments:
        for a in range(start, start + length, size):
            out.append((a, min(a + size, start + length), name))
        start += length
    return out


def window_peaks(busiest: torch.Tensor, mean: torch.Tensor, windows: Sequence[Tuple[int, int, str]]) -> List[float]:
    """Per window: ``sum_c max_r / sum_c mean_r`` per layer, averaged over layers."""
    out = []
    for start, stop, _ in windows:
        per_layer = busiest[start:stop].sum(0) / mean[start:stop].sum(0).clamp_min(1e-12)
        out.append(float(per_layer.mean()))
    return out


def recovery_calls(regret: Sequence[float], windows: Sequence[Tuple[int, int, str]], threshold: float = 1.05
                   ) -> List[Dict[str, object]]:
    """After each segment switch: calls from the switch to the end of the first window whose regret is
    within ``threshold`` (None: not within the segment)."""
    out = []
    for i, (start, _, name) in enumerate(windows):
        if i == 0 or windows[i - 1][2] == name:
            continue
        calls = None
        for j in range(i, len(windows)):
            if windows[j][2] != name:
                break
            if regret[j] <= threshold:
                calls = windows[j][1] - start
                break
        out.append({"switch_call": start, "to": name, "calls_to_within": calls,
                    "first_window_regret": regret[i]})
    return out
