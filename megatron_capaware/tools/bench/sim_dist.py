"""Several simulated ranks in one process: threads standing in for a process group.

The routing policies talk to other ranks only through
:mod:`megatron_capaware.policies.collectives`, which calls a handful of
``torch.distributed`` functions (``get_world_size``, ``get_rank``,
``all_reduce``, ``all_gather``). :func:`run_ranks` swaps that module's
``dist`` for a stand-in whose collectives meet at a ``threading.Barrier``, and
runs one thread per simulated rank. The sums and gathers are exact (int64
counts; the policies exchange no floats), so a policy run on W threads
decides exactly as on W real ranks, in milliseconds instead of seconds.

A collective that some threads never reach (a data-dependent branch that
would hang a real cluster) breaks the barrier after ``timeout_s`` and fails
the run instead of hanging the tests. ``tests/test_faults.py`` checks the
simulation against real gloo ranks on a few cases.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch

from megatron_capaware.policies import collectives
from megatron_capaware.policies.collectives import LoadGroup


class SimulatedHang(RuntimeError):
    """Some simulated ranks waited in a collective the others never issued."""


class SimGroup:
    """A process group of ``world`` threads (pass it as ``group=``)."""

    def __init__(self, world: int, timeout_s: float = 30.0) -> None:
        self.world = world
        self.timeout_s = timeout_s
        self.barrier = threading.Barrier(world, timeout=timeout_s)
        self.slots: List[Optional[torch.Tensor]] = [None] * world
        self.calls = [0] * world  # collectives issued by each rank

    def _exchange(self, rank: int, tensor: torch.Tensor) -> List[torch.Tensor]:
        self.calls[rank] += 1
        self.slots[rank] = tensor.detach().clone()
        try:
            self.barrier.wait()
            values = [t.clone() for t in self.slots]  # type: ignore[union-attr]
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise SimulatedHang(f"ranks passed different shapes to one collective: {sorted(shapes)}")
            self.barrier.wait()
        except threading.BrokenBarrierError:
            raise SimulatedHang(
                f"rank {rank} waited {self.timeout_s:.0f} s in collective #{self.calls[rank]} that "
                f"not every rank issued (collectives per rank so far: {self.calls})"
            ) from None
        return values


_local = threading.local()


class _SimDist:
    """The part of ``torch.distributed`` the policies' collectives use."""

    class ReduceOp:
        SUM = "sum"

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def get_backend(group: Any = None) -> str:
        return "gloo"  # the simulated ranks exchange CPU tensors

    @staticmethod
    def get_world_size(group: Any = None) -> int:
        return group.world

    @staticmethod
    def get_rank(group: Any = None) -> int:
        return _local.rank

    @staticmethod
    def all_reduce(tensor: torch.Tensor, op: Any = None, group: Any = None) -> None:
        values = group._exchange(_local.rank, tensor)
        tensor.copy_(torch.stack(values).sum(dim=0))

    @staticmethod
    def all_gather(parts: List[torch.Tensor], tensor: torch.Tensor, group: Any = None) -> None:
        for part, value in zip(parts, group._exchange(_local.rank, tensor)):
            part.copy_(value)


_patch_lock = threading.Lock()


@contextmanager
def simulated_collectives():
    """Route the policies' collectives through :class:`SimGroup` while active."""
    with _patch_lock:
        saved = collectives.dist
        collectives.dist = _SimDist  # type: ignore[assignment]
        try:
            yield
        finally:
            collectives.dist = saved


@dataclass
class RankSpec:
    """One simulated rank: which group rank it is, and whose tokens it holds."""

    rank: int
    primary_rank: int  # == rank unless this rank holds copies of another's tokens


def run_ranks(
    fn: Callable[[int, Any], Any],
    world: int,
    *,
    copies_of: Optional[Sequence[int]] = None,
    timeout_s: float = 30.0,
) -> List[Any]:
    """Run ``fn(rank, group)`` on ``world`` simulated ranks; their results by rank.

    Args:
        fn: called in each rank's thread with that rank and the group object to
            pass to the policies (a :class:`SimGroup`, or a ``LoadGroup`` over
            it when ``copies_of`` is given).
        copies_of: optional ``[world]``: rank ``r`` holds copies of the tokens of
            rank ``copies_of[r]`` (tensor parallelism without sequence
            parallelism); such ranks get a ``LoadGroup`` with weight 0.

    Raises:
        the first rank's exception (a :class:`SimulatedHang` if ranks diverged).
    """
    group = SimGroup(world, timeout_s)
    results: List[Any] = [None] * world
    errors: List[Optional[BaseException]] = [None] * world

    def target(rank: int) -> None:
        _local.rank = rank
        try:
            if copies_of is None:
                handle: Any = group
            else:
                primary = copies_of[rank]
                handle = LoadGroup(group=group, counts_weight=1 if primary == rank else 0, primary_rank=primary)
            results[rank] = fn(rank, handle)
        except BaseException as err:  # noqa: BLE001 - reported to the caller
            errors[rank] = err
            group.barrier.abort()

    with simulated_collectives():
        threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s * 4)
    real = [e for e in errors if e is not None and not isinstance(e, SimulatedHang)]
    if real:
        raise real[0]
    hangs = [e for e in errors if e is not None]
    if hangs:
        raise hangs[0]
    if any(t.is_alive() for t in threads):
        raise SimulatedHang("a simulated rank did not finish")
    if len(set(group.calls)) != 1:
        raise SimulatedHang(f"ranks issued different numbers of collectives: {group.calls}")
    return results
