"""The few collectives the routing policies need, over an optional process group.

``group=None`` means "this process's tokens are the whole batch": every
function here is then the identity, so one code path serves local and
global routing. Every call is made by every rank of the group in the same
order with the same shapes (the shapes depend only on ``E`` and the group
size, never on the data), so no data-dependent branch can leave a rank
waiting in a collective.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

ProcessGroup = Any  # torch.distributed.ProcessGroup, LoadGroup, or None


@dataclass(frozen=True)
class LoadGroup:
    """A process group some of whose ranks hold copies of another rank's tokens.

    With tensor parallelism and no sequence parallelism, the ranks of an
    attention-TP group enter the MoE layer with the same tokens. Such a token
    must count once in the loads, and every copy must be routed identically.
    Each copy-holding rank therefore contributes its counts with weight 0 and
    takes the position (rank) of the rank holding the original, so all of them
    reach the decision of that rank bit for bit.

    Attributes:
        group: the process group (ranks whose tokens reach the same experts).
        counts_weight: 1 on the rank whose counts are used, 0 on its copies.
        primary_rank: the group rank whose tokens this rank holds (its own
            rank when it holds no copy).
    """

    group: Any
    counts_weight: int
    primary_rank: int


@dataclass
class CollectiveLog:
    """Collectives issued while recording: ``(op, bytes sent by this rank, group size)``."""

    calls: List[Tuple[str, int, int]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.calls)

    def bytes_sent(self) -> int:
        return sum(b for _, b, _ in self.calls)

    def bytes_received(self) -> int:
        """All-reduce: ~ what was sent (ring); all-gather: every rank's part."""
        return sum(b * (w if op == "all_gather" else 1) for op, b, w in self.calls)


_LOG: Optional[CollectiveLog] = None


@contextlib.contextmanager
def record_collectives() -> Iterator[CollectiveLog]:
    """Record the routing collectives issued inside the block (payload accounting)."""
    global _LOG
    previous, _LOG = _LOG, CollectiveLog()
    try:
        yield _LOG
    finally:
        _LOG = previous


def _note(op: str, tensor: torch.Tensor, group: Optional[ProcessGroup]) -> None:
    if _LOG is not None:
        _LOG.calls.append((op, tensor.numel() * tensor.element_size(), group_size(group)))


def _process_group(group: Optional[ProcessGroup]) -> Any:
    return group.group if isinstance(group, LoadGroup) else group


def _weighted(tensor: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    if isinstance(group, LoadGroup) and group.counts_weight != 1:
        return tensor * group.counts_weight
    return tensor


def group_size(group: Optional[ProcessGroup]) -> int:
    """Number of ranks whose tokens share the experts (1 without a group)."""
    pg = _process_group(group)
    if pg is None:
        return 1
    return dist.get_world_size(pg)


def group_rank(group: Optional[ProcessGroup]) -> int:
    """The rank whose place this process takes in ``group`` (0 without a group)."""
    if isinstance(group, LoadGroup):
        return group.primary_rank
    if group is None:
        return 0
    return dist.get_rank(group)


def all_reduce_sum(tensor: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Sum counts over the group (copies of tokens counted once); returns the sum."""
    pg = _process_group(group)
    if pg is not None and group_size(group) > 1:
        if isinstance(group, LoadGroup) and group.counts_weight != 1:
            tensor.mul_(group.counts_weight)
        _note("all_reduce", tensor, group)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=pg)
    return tensor


def all_gather_stack(tensor: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Gather equal-shaped counts from every rank: ``[group_size, *tensor.shape]``."""
    size = group_size(group)
    if size == 1:
        return tensor.unsqueeze(0)
    tensor = _weighted(tensor, group)
    _note("all_gather", tensor, group)
    # List all_gather: gloo's all_gather_into_tensor aborts on this torch (2.13 CPU).
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=_process_group(group))
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
