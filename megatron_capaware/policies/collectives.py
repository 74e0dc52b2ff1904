"""The few collectives the routing policies need, over an optional process group.

``group=None`` means "this process's tokens are the whole batch": every
function here is then the identity, so one code path serves local and
global routing. Every call is made by every rank of the group in the same
order with the same shapes (the shapes depend only on ``E`` and the group
size, never on the data), so no data-dependent branch can leave a rank
waiting in a collective.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

ProcessGroup = Any  # torch.distributed.ProcessGroup (or None)


def group_size(group: Optional[ProcessGroup]) -> int:
    """Number of ranks whose tokens share the experts (1 without a group)."""
    if group is None:
        return 1
    return dist.get_world_size(group)


def group_rank(group: Optional[ProcessGroup]) -> int:
    """This process's rank in ``group`` (0 without a group)."""
    if group is None:
        return 0
    return dist.get_rank(group)


def all_reduce_sum(tensor: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Sum ``tensor`` over the group, in place; returns it."""
    if group is not None and group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather_stack(tensor: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Gather equal-shaped tensors from every rank: ``[group_size, *tensor.shape]``."""
    size = group_size(group)
    if size == 1:
        return tensor.unsqueeze(0)
    # List all_gather: gloo's all_gather_into_tensor aborts on this torch (2.13 CPU).
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def exclusive_rank_prefix(counts: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Sum of ``counts`` over the ranks before this one (rank order of the group).

    Args:
        counts: ``[*]`` integer tensor, same shape on every rank.

    Returns:
        ``[*]``: zeros on rank 0; on rank r the sum of ranks ``0..r-1``.
    """
    gathered = all_gather_stack(counts, group)  # [W, *]
    rank = group_rank(group)
    return gathered[:rank].sum(dim=0)
