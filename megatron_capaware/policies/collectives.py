"""Every ``torch.distributed`` collective of the package goes through this module.

Each function puts its tensors on the group's device first (NCCL: the
current CUDA device; gloo and others: the CPU) and hands the result back on
the caller's device, so a CPU tensor never reaches an NCCL collective (which
raises "No backend type associated with device type cpu"). A tensor already
on the group's device is not copied. ``tests/test_collectives.py`` fails if
any other module of the package calls a collective itself.

The routing policies use :func:`all_reduce_sum`, :func:`all_gather_stack`
and :func:`exclusive_rank_prefix`; ``group=None`` means "this process's
tokens are the whole batch": every function is then the identity, so one
code path serves local and global routing. Every call is made by every rank
of the group in the same order with the same shapes (the shapes depend only
on ``E`` and the group size, never on the data), so no data-dependent branch
can leave a rank waiting in a collective. The tools use :func:`all_reduce`,
:func:`all_gather_objects` and :func:`barrier`; placing expert weights
(:mod:`megatron_capaware.adapters.placement`) uses :func:`all_to_all_rows`.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

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


_DEVICE_OF_BACKEND = {"nccl": "cuda", "xccl": "xpu"}
# Per process group: (device kind, backend name). Keyed by the group object itself (weakly): a group
# destroyed and re-created may reuse an id(), and must not inherit the old group's entry.
_GROUP_INFO: "weakref.WeakKeyDictionary[Any, Tuple[torch.device, str]]" = weakref.WeakKeyDictionary()


def _group_info(group: Optional[ProcessGroup]) -> Tuple[torch.device, str]:
    """``(device kind, backend name)`` of ``group``'s collectives, cached per group object."""
    pg = _process_group(group)
    key = pg if pg is not None else dist.group.WORLD
    try:
        info = _GROUP_INFO.get(key) if key is not None else None
    except TypeError:  # an object that cannot be weakly referenced
        info = None
    if info is None:
        backend = str(dist.get_backend(pg)).lower()
        kind = next((dev for name, dev in _DEVICE_OF_BACKEND.items() if name in backend), "cpu")
        info = (torch.device(kind), backend)
        try:
            if key is not None:
                _GROUP_INFO[key] = info
        except TypeError:
            pass
    return info


def group_device(group: Optional[ProcessGroup] = None) -> torch.device:
    """The device a collective over ``group`` takes its tensors on.

    NCCL: the current CUDA device; gloo (and any other CPU backend): the CPU.
    ``group=None`` is the default group. Cached per group object (the backend
    of a group never changes; the current CUDA device is read at every call).
    """
    if not dist.is_initialized():
        return torch.device("cpu")
    device = _group_info(group)[0]
    if device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def gathers_into_tensor(group: Optional[ProcessGroup]) -> bool:
    """Whether :func:`all_gather_stack` uses ``all_gather_into_tensor`` on ``group`` (every backend but gloo).

    NCCL's list all-gather costs a copy kernel per rank plus a stack; gloo's
    ``all_gather_into_tensor`` aborts on torch 2.13 CPU, so gloo keeps the list form.
    """
    return dist.is_initialized() and "gloo" not in _group_info(group)[1]


def group_timeout_s(group: Optional[ProcessGroup] = None) -> Optional[float]:
    """The timeout, in seconds, of ``group``'s collectives (None when it cannot be read).

    Megatron creates its groups with ``--distributed-timeout-minutes``; this
    reads what the group actually has (its backend's options), not a default.
    """
    if not dist.is_initialized():
        return None
    pg = _process_group(group) or dist.group.WORLD
    if pg is None:
        return None
    try:
        for device in getattr(pg, "_device_types", []) or []:
            options = getattr(pg._get_backend(device), "options", None)
            timeout = getattr(options, "_timeout", None)
            if timeout is not None:
                return float(timeout.total_seconds())
    except (RuntimeError, AttributeError, TypeError):
        return None
    return None


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor if tensor.device == device else tensor.to(device)


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
    """Sum counts over the group (copies of tokens counted once); returns the sum.

    In place when ``tensor`` is on the group's device already (the routing
    hot path); otherwise the sum comes back in ``tensor`` through one copy
    each way.
    """
    pg = _process_group(group)
    if pg is not None and group_size(group) > 1:
        if isinstance(group, LoadGroup) and group.counts_weight != 1:
            tensor.mul_(group.counts_weight)
        _note("all_reduce", tensor, group)
        work = _on(tensor, group_device(group))
        dist.all_reduce(work, op=dist.ReduceOp.SUM, group=pg)
        if work is not tensor:
            tensor.copy_(work)
    return tensor


_REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(tensor: torch.Tensor, group: Optional[ProcessGroup] = None, op: str = "sum") -> torch.Tensor:
    """All-reduce over ``group`` (None: the default group, when initialised); returns the result.

    ``op``: ``sum``, ``max`` or ``min``. The result is on ``tensor``'s device
    (``tensor`` itself is updated when it is on the group's device).
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f"op={op!r}: use one of {sorted(_REDUCE_OPS)}")
    # No shortcut for one rank: the report paths then run the real collective
    # (e.g. on a one-GPU NCCL group), which is what catches a tensor on the wrong device.
    pg = _process_group(group)
    if not dist.is_initialized():
        return tensor
    _note("all_reduce", tensor, group)
    work = _on(tensor, group_device(group))
    dist.all_reduce(work, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]), group=pg)
    return work if work is tensor else work.to(tensor.device)


def all_gather_objects(obj: Any, group: Optional[ProcessGroup] = None) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order (``[obj]`` without a process group).

    On NCCL ``torch.distributed`` serialises through the current CUDA device,
    which :func:`group_device` names; gloo through the CPU.
    """
    pg = _process_group(group)
    if not dist.is_initialized():
        return [obj]
    parts: List[Any] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(parts, obj, group=pg)
    return parts


def barrier(group: Optional[ProcessGroup] = None) -> None:
    """Wait for every rank of ``group`` (no-op without a process group)."""
    pg = _process_group(group)
    if not dist.is_initialized():
        return
    if group_device(group).type == "cuda":
        dist.barrier(group=pg, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=pg)


def all_gather_padded(tensor: torch.Tensor, sizes: List[int], group: Any) -> torch.Tensor:
    """Gather ``tensor`` ``[n_r, *]`` from every rank, ``sizes[r] = n_r``, concatenated in rank order.

    For backends whose list all-gather wants equal sizes (gloo): every part is
    padded to the largest.
    """
    largest = max(sizes)
    padded = tensor.new_zeros((largest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = all_gather_stack(padded, group)
    return torch.cat([part[:n] for part, n in zip(gathered, sizes)], dim=0)


def all_gather_stack(tensor: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Gather equal-shaped counts from every rank: ``[group_size, *tensor.shape]``."""
    size = group_size(group)
    if size == 1:
        return tensor.unsqueeze(0)
    tensor = _weighted(tensor, group)
    _note("all_gather", tensor, group)
    work = _on(tensor, group_device(group)).contiguous()
    if gathers_into_tensor(group):  # NCCL: one collective into the [W, *] output, no copies nor stack
        out = work.new_empty((size, *work.shape))
        dist.all_gather_into_tensor(out, work, group=_process_group(group))
        return _on(out, tensor.device)
    # List all_gather: gloo's all_gather_into_tensor aborts on this torch (2.13 CPU).
    parts = [torch.empty_like(work) for _ in range(size)]
    dist.all_gather(parts, work, group=_process_group(group))
    return _on(torch.stack(parts), tensor.device)


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


def all_to_all_rows(rows: torch.Tensor, send_counts: List[int], recv_counts: List[int],
                    group: Optional[ProcessGroup]) -> torch.Tensor:
    """Exchange rows: ``rows [sum(send_counts), *]`` -> ``[sum(recv_counts), *]``, by source rank.

    Rank ``r`` sends its next ``send_counts[d]`` rows to rank ``d`` and
    receives ``recv_counts[s]`` rows from rank ``s``, concatenated in source
    order (expert-weight moves of a placement; never on the routing path).
    Every rank calls it with counts that agree (``send_counts[d]`` here is
    ``recv_counts[r]`` on ``d``).
    """
    size = group_size(group)
    if size == 1:
        return rows.clone()
    if len(send_counts) != size or len(recv_counts) != size or sum(send_counts) != rows.shape[0]:
        raise ValueError(f"all_to_all_rows: {rows.shape[0]} rows, send {send_counts}, receive {recv_counts} over "
                         f"{size} ranks")
    row = int(torch.Size(rows.shape[1:]).numel())
    _note("all_to_all", rows, group)
    device = group_device(group)
    work = _on(rows, device).contiguous().reshape(-1)
    out = torch.empty(sum(recv_counts) * row, dtype=rows.dtype, device=device)
    dist.all_to_all_single(out, work, [n * row for n in recv_counts], [n * row for n in send_counts],
                           group=_process_group(group))
    return _on(out.reshape(sum(recv_counts), *rows.shape[1:]), rows.device)


def backend_self_test(group: Optional[ProcessGroup] = None) -> Dict[str, Any]:
    """Run each collective form the routing and the weight exchange use once, even on one rank.

    The routing helpers skip their collectives on a group of one rank; the
    one-GPU check (``tools/gpu_check.py``) calls this so that NCCL itself runs
    ``all_gather_into_tensor`` (routing counts, int64), the list all-gather,
    ``all_reduce`` and ``all_to_all_single`` (expert rows, bf16 on CUDA) on the
    group's device. Returns each result's correctness, by form.
    """
    if not dist.is_initialized():
        return {"initialized": False}
    pg = _process_group(group)
    size = dist.get_world_size(pg)
    rank = dist.get_rank(pg)
    device = group_device(group)
    counts = torch.arange(6, dtype=torch.int64, device=device) + rank
    expected = torch.stack([torch.arange(6, dtype=torch.int64, device=device) + r for r in range(size)])
    out: Dict[str, Any] = {"world_size": size, "device": str(device)}
    if gathers_into_tensor(group):
        into = counts.new_empty((size, 6))
        dist.all_gather_into_tensor(into, counts, group=pg)
        out["all_gather_into_tensor"] = bool(torch.equal(into, expected))
    parts = [torch.empty_like(counts) for _ in range(size)]
    dist.all_gather(parts, counts, group=pg)
    out["all_gather_list"] = bool(torch.equal(torch.stack(parts), expected))
    total = counts.clone()
    dist.all_reduce(total, group=pg)
    out["all_reduce"] = bool(torch.equal(total, expected.sum(0)))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = torch.arange(size * 4, dtype=dtype, device=device).reshape(size, 4) + 100 * rank
    got = torch.empty_like(rows)
    dist.all_to_all_single(got, rows, group=pg)
    want = torch.stack([torch.arange(4, dtype=dtype, device=device) + 4 * rank + 100 * r for r in range(size)])
    out["all_to_all_single"] = bool(torch.equal(got, want))
    out["ok"] = all(v for k, v in out.items() if isinstance(v, bool))
    return out
