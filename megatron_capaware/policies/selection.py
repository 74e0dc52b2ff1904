"""Exact per-expert selection of the highest-priority items across a process group.

This is the one primitive behind every capacity decision: given items
(assignments or reroute proposals), each with an expert and a priority, keep
for every expert ``e`` the ``capacity[e]`` items of highest priority counted
over ALL ranks of the group, exactly as if the ranks' items were concatenated
in rank order. Ties in priority are broken by that concatenated order (lower
rank first, then the item's position on its rank), which is deterministic.

How, without gathering the items: a radix select on the bit patterns of the
priorities. Non-negative float32 values order like their int32 bit patterns,
so the ``capacity[e]``-th largest priority of expert ``e`` is found byte by
byte, most significant first: each round counts the items still in play into
a ``[E, 256]`` histogram, all-reduces it, and fixes one more byte of every
expert's threshold. Four rounds give the exact threshold; a final all-gather
of the per-rank count of items equal to it splits those ties by rank order.

Collective payload per call (independent of the number of tokens):
    4 all-reduces of ``E * 256 + 1`` int32 -> ``4 * 4 * (256 E + 1)`` bytes
    (the device path's last three carry no count slot: 12 bytes less),
    1 all-gather of ``E`` int32 per rank   -> ``4 E * W`` bytes received.
For E = 64 that is 256 KB in all-reduces, against the all-to-all of hidden
states (``T*k*H*2`` bytes: 128 MB for T=8192, k=2, H=4096 in bf16), i.e. 0.2%;
for decode-sized batches the ratio grows (see docs/scaling.md).
The shapes depend only on ``E`` and the group, never on the data. On CUDA
(:func:`_select_sorted`) the items are sorted once and every round is two
``searchsorted`` calls instead of a histogram pass (about 24 ops for a drop
alone, 70 over a group, against 175 before): the number of collectives is
fixed and no host synchronisation is needed;
on the CPU the undecided items are compacted after the first round and
rounds stop early once every expert is settled (often after one or two),
decided from group-wide counts so every rank issues the same calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from megatron_capaware.policies.common import score_bits, use_device_path
from megatron_capaware.policies.collectives import (
    ProcessGroup,
    all_gather_stack,
    all_reduce_sum,
    exclusive_rank_prefix,
    group_rank,
    group_size,
)

RADIX_BITS = 8
RADIX_BINS = 1 << RADIX_BITS
RADIX_SHIFTS = (24, 16, 8, 0)

CapacityArg = Union[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


@dataclass
class Selection:
    """Result of :func:`select_top_per_expert`.

    Attributes:
        keep: ``[N]`` bool, the items this rank keeps.
        global_offered: ``[E]`` int64, items offered to each expert over the group.
        global_kept: ``[E]`` int64, items kept per expert over the group
            (``min(offered, capacity)``).
        capacity: ``[E]`` int64, the capacity that was applied.
        global_items: 0-d int64, ``extra_count`` summed over the group.
    """

    keep: torch.Tensor
    global_offered: torch.Tensor
    global_kept: torch.Tensor
    capacity: torch.Tensor
    global_items: torch.Tensor


def select_top_per_expert(
    priority: torch.Tensor,
    expert: torch.Tensor,
    num_experts: int,
    capacity: CapacityArg,
    group: Optional[ProcessGroup] = None,
    *,
    valid: Optional[torch.Tensor] = None,
    extra_count: Union[int, torch.Tensor, None] = None,
    sync_free: Optional[bool] = None,
) -> Selection:
    """Keep, per expert, the ``capacity[e]`` highest-priority items over the group.

    Args:
        priority: ``[N]`` float, >= 0 (higher is kept first). Items are in
            this rank's tie-break order (earlier kept first on ties).
        expert: ``[N]`` int64 in ``[0, E)``, the expert each item asks for.
        num_experts: ``E``.
        capacity: ``[E]`` int64, or a function ``(global_offered [E],
            global_items 0-d) -> [E]`` called once the group-wide offered
            counts are known (saves a collective when the capacity depends on
            the global load, as ``C = ceil(gamma T k / E)`` does).
        group: process group whose ranks share the experts; ``None``: this
            process alone.
        valid: optional ``[N]`` bool; items marked False are ignored (never
            counted, never kept). Lets callers use fixed-size item arrays.
        extra_count: optional int or 0-d integer tensor summed over the group
            in the first round at no extra cost (e.g. the local token count);
            returned as ``global_items``.
        sync_free: ``True``: the device path (:func:`_select_sorted`: one
            sort, fixed work and collectives, no host sync; the CUDA
            default); ``False``: the CPU path (:func:`select_top_per_expert_radix`
            compacted: after the first round only the still undecided items
            are processed and rounds stop once every expert is settled;
            reading a CPU tensor costs nothing). Both give identical results;
            every early stop is decided from group-wide counts, so all ranks
            take the same branch.

    Returns:
        :class:`Selection`.
    """
    if sync_free is None:
        sync_free = use_device_path(priority)
    if not sync_free:
        return select_top_per_expert_radix(
            priority, expert, num_experts, capacity, group, valid=valid, extra_count=extra_count, sync_free=False)
    return _select_sorted(priority, expert, num_experts, capacity, group, valid, extra_count)


_LOW32 = (1 << 32) - 1


def _select_sorted(
    priority: torch.Tensor,
    expert: torch.Tensor,
    num_experts: int,
    capacity: CapacityArg,
    group: Optional[ProcessGroup],
    valid: Optional[torch.Tensor],
    extra_count: Union[int, torch.Tensor, None],
) -> Selection:
    """The device path of :func:`select_top_per_expert`: few, large ops, no host sync.

    One stable sort of a combined int64 key ``expert << 32 | (2**32 - 1 -
    priority bits)`` lays every expert's items out as one block, best first,
    ties in item order (invalid items go to a block ``E`` after all others).
    Alone, an expert keeps the first ``C`` items of its block. Over a group,
    the same four 8-bit radix rounds as the radix select find the key of
    each expert's last kept item, but each round is one ``searchsorted`` of
    ``E x 256`` query keys into the sorted items (their all-reduced positions
    are the group's cumulative counts) and one ``searchsorted`` of the cut
    into them; the items equal to that key are split in rank order with one
    all-gather. Collectives: those of the radix select, same shapes and order
    (4 all-reduces of ``E*256+1`` int32, 1 all-gather of ``E`` int32).
    """
    device = priority.device
    # The radix's order: the float's 32 bits as an unsigned integer (scores >= 0 order as their value).
    bits = score_bits(priority) & _LOW32
    expert = expert.to(torch.int64)
    bucket = expert if valid is None else torch.where(valid, expert, num_experts)
    sorted_keys, order = torch.sort(torch.add(_LOW32 - bits, bucket, alpha=1 << 32), stable=True)
    position = torch.argsort(order)  # each item's place in its expert's block, best first
    block = torch.arange(num_experts + 1, device=device) << 32  # the first key of each block

    def resolve(offered: torch.Tensor, global_items: torch.Tensor) -> torch.Tensor:
        cap = capacity(offered, global_items) if callable(capacity) else capacity
        return cap.to(device=device, dtype=torch.int64).expand(num_experts).clamp(min=0)

    if group_size(group) == 1:
        bounds = torch.searchsorted(sorted_keys, block)  # [E+1]: where each block starts
        start = bounds[:-1]
        offered = bounds[1:] - start
        from_count = getattr(capacity, "from_count", None)
        if extra_count is None:
            global_items = bounds[0]  # 0: no key lies below block 0
        else:
            global_items = _count_tensor(extra_count, device, torch.int64).reshape(())
        if from_count is not None and isinstance(extra_count, int) and not isinstance(extra_count, bool):
            # The count is known on the host, so the capacity is a constant (same rule, same value).
            cap = torch.full((num_experts,), from_count(extra_count), dtype=torch.int64, device=device)
        else:
            cap = resolve(offered, global_items)
        kept = torch.minimum(offered, cap)
        keep = position < (start + kept)[expert]
        return Selection(keep=keep, global_offered=offered, global_kept=kept, capacity=cap,
                         global_items=global_items)

    # Over the group: find each expert's cut key lo[e] byte by byte. cut[e] is the group-wide
    # position (in the concatenated sorted order) just past its kept items; queries[e, d] =
    # lo[e] + (d+1) << shift, and the number of queries with fewer than cut[e] items below
    # them is the next byte.
    steps = torch.arange(1, RADIX_BINS + 1, device=device)
    lo = block[:-1]
    for round_index, shift in enumerate(RADIX_SHIFTS):
        queries = torch.add(lo.unsqueeze(1), steps, alpha=1 << shift)  # [E, 256]
        below = torch.searchsorted(sorted_keys, queries, out_int32=True).view(-1)
        if round_index == 0:
            below = torch.cat([below, _count_tensor(extra_count, device, torch.int32).reshape(1)])
        below = all_reduce_sum(below, group)
        counts = below[: num_experts * RADIX_BINS].view(num_experts, RADIX_BINS)
        if round_index == 0:
            global_items = below[-1].to(torch.int64)
            ends = counts[:, -1].to(torch.int64)  # the last query of block e is block e+1's first key
            starts = torch.nn.functional.pad(ends[:-1], (1, 0))
            offered = ends - starts
            cap = resolve(offered, global_items)
            kept = torch.minimum(offered, cap)
            cut = (starts + kept).to(torch.int32)
        digit = torch.searchsorted(counts, cut.unsqueeze(1)).squeeze(1)
        lo = torch.add(lo, digit, alpha=1 << shift)
    # lo[e]: the key of expert e's last kept item (or the block's first key when it keeps none).
    # Items below it are kept, above it dropped; of those equal to it, the group's first
    # (cut - items below it) in rank order, then item order.
    tie_bounds = torch.searchsorted(sorted_keys, torch.stack([lo, lo + 1]), out_int32=True)
    first_tie, past_ties = tie_bounds[0], tie_bounds[1]
    ties = all_gather_stack(past_ties - first_tie, group)  # [W, E]
    at_or_below = counts.gather(1, digit.unsqueeze(1)).squeeze(1)  # last round: items <= lo[e]
    # cut - (at_or_below - all ties) - ties before me = cut - at_or_below + ties from me on.
    local_cut = torch.clamp(first_tie + (cut - at_or_below) + ties[group_rank(group):].sum(0),
                            min=first_tie, max=past_ties)
    keep = position < local_cut[expert]
    return Selection(keep=keep, global_offered=offered, global_kept=kept, capacity=cap,
                     global_items=global_items)


def _count_tensor(extra_count: Union[int, torch.Tensor, None], device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """``extra_count`` as a 0-d tensor on ``device`` (a fill for an int: no host-to-device copy)."""
    if isinstance(extra_count, torch.Tensor):
        return extra_count.to(device=device, dtype=dtype)
    return torch.full((), 0 if extra_count is None else int(extra_count), dtype=dtype, device=device)


def select_top_per_expert_radix(
    priority: torch.Tensor,
    expert: torch.Tensor,
    num_experts: int,
    capacity: CapacityArg,
    group: Optional[ProcessGroup] = None,
    *,
    valid: Optional[torch.Tensor] = None,
    extra_count: Union[int, torch.Tensor, None] = None,
    sync_free: Optional[bool] = None,
) -> Selection:
    """The byte-wise radix select (the CPU path of :func:`select_top_per_expert`).

    With ``sync_free=True`` it is the previous device path, kept as the
    reference the sorted device path is tested against (``tests/test_device_path.py``).

    Args: as :func:`select_top_per_expert`, except
        sync_free: ``True``: fixed work and collectives, no host sync (the
            CUDA default); ``False``: after the first round only the still
            undecided items are processed, rounds stop once every expert is
            settled and the tie step is skipped when no tie is split (the CPU
            default: reading a CPU tensor costs nothing). Both give identical
            results; every early stop is decided from group-wide counts, so
            all ranks take the same branch.

    Returns:
        :class:`Selection`.
    """
    if sync_free is None:
        sync_free = use_device_path(priority)
    device = priority.device
    num_items = priority.shape[0]
    keys = score_bits(priority)
    expert = expert.to(torch.int64)
    active = torch.ones(num_items, dtype=torch.bool, device=device) if valid is None else valid.clone()
    kept_above = torch.zeros(num_items, dtype=torch.bool, device=device)
    # Compacted mode works on the positions of the still-undecided items only.
    position = None if sync_free else active.nonzero().squeeze(1)
    # Set by the first round (RADIX_SHIFTS is never empty).
    need: torch.Tensor
    offered: torch.Tensor
    cap: torch.Tensor
    global_items: torch.Tensor
    last_hist: torch.Tensor
    boundary: torch.Tensor
    for round_index, shift in enumerate(RADIX_SHIFTS):
        if position is None:
            item_keys, item_expert, weight = keys, expert, active.to(torch.int64)
        else:
            item_keys, item_expert = keys[position], expert[position]
            weight = torch.ones_like(item_expert)
        digit = (item_keys >> shift) & (RADIX_BINS - 1)
        # int32 on the wire (counts stay below 2**31: T_glob * k items at most).
        hist = torch.zeros(num_experts * RADIX_BINS + 1, dtype=torch.int32, device=device)
        hist.scatter_add_(0, item_expert * RADIX_BINS + digit, weight.to(torch.int32))
        if round_index == 0 and extra_count is not None:
            hist[-1] = extra_count  # an int is a fill, a tensor a device copy: no host sync either way
        hist = all_reduce_sum(hist, group).to(torch.int64)
        hist2d = hist[:-1].view(num_experts, RADIX_BINS)
        if round_index == 0:
            global_items = hist[-1].clone()
            offered = hist2d.sum(dim=1)
            if callable(capacity):
                cap = capacity(offered, global_items).to(device=device, dtype=torch.int64)
            else:
                cap = capacity.to(device=device, dtype=torch.int64)
            cap = cap.expand(num_experts).clamp(min=0)
            need = cap.clone()
        # suffix[e, d] = items of expert e whose current byte is >= d.
        suffix = hist2d.flip(1).cumsum(1).flip(1)
        suffix = torch.cat([suffix, suffix.new_zeros(num_experts, 1)], dim=1)  # [E, 257]
        # Boundary byte b: the largest d with suffix[e, d] >= need[e] (suffix is
        # non-increasing in d); -1 if all remaining items fit (all kept); RADIX_BINS
        # (matches no byte) once nothing more is needed (the rest is dropped).
        fits = suffix[:, :RADIX_BINS] >= need.unsqueeze(1)
        boundary = torch.where(need > 0, fits.sum(dim=1) - 1, torch.full_like(need, RADIX_BINS))
        # Items strictly above the boundary byte: all kept. suffix[:, RADIX_BINS] == 0.
        above_count = suffix.gather(1, (boundary + 1).clamp(max=RADIX_BINS).unsqueeze(1)).squeeze(1)
        item_boundary = boundary[item_expert]
        above, stay = digit > item_boundary, digit == item_boundary
        if position is None:
            kept_above |= active & above
            active &= stay
        else:
            kept_above[position[above]] = True
            position = position[stay]
        need = need - above_count
        last_hist = hist2d
        if not sync_free and not bool(((boundary >= 0) & (boundary < RADIX_BINS)).any()):
            break  # every expert settled group-wide: no item is still undecided anywhere
    if position is not None:
        active = torch.zeros(num_items, dtype=torch.bool, device=device)
        active[position] = True
    # Items still active carry exactly the threshold value of their expert:
    # keep `need[e]` of them, in rank order, then local order.
    unsettled = (boundary >= 0) & (boundary < RADIX_BINS)
    tied = last_hist.gather(1, boundary.clamp(0, RADIX_BINS - 1).unsqueeze(1)).squeeze(1)
    split = unsettled & (need < tied)
    if sync_free or bool(split.any()):
        local_ties = torch.zeros(num_experts, dtype=torch.int32, device=device)
        local_ties.scatter_add_(0, expert, active.to(torch.int32))
        before_me = exclusive_rank_prefix(local_ties, group).to(torch.int64)
        allowance = (need - before_me).clamp(min=0)
        tie_rank = _rank_within_expert(expert, active, num_experts)
        keep = kept_above | (active & (tie_rank < allowance[expert]))
    else:
        keep = kept_above | (active & (need[expert] > 0))
    kept = torch.minimum(offered, cap)
    return Selection(
        keep=keep, global_offered=offered, global_kept=kept, capacity=cap, global_items=global_items
    )


def _rank_within_expert(expert: torch.Tensor, mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For each masked item, how many masked items of its expert come before it."""
    num_items = expert.shape[0]
    if num_items == 0:
        return torch.zeros(0, dtype=torch.int64, device=expert.device)
    key = torch.where(mask, expert, torch.full_like(expert, num_experts))
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=expert.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(num_items, device=expert.device)
    rank_sorted = position - starts[sorted_key]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank
