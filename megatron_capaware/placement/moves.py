"""Which expert rows move where when one MoE layer changes layout (pure; no torch, no Megatron).

A layer's layout is a list of slots (``slots[s]``: the logical expert in slot
``s``); with ``W`` EP ranks, rank ``r`` holds the ``len(slots) / W`` slots
``r * per .. (r + 1) * per - 1``, its *local positions* ``0 .. per - 1``.
Moving from ``now`` to ``new`` (:func:`layer_moves`), each of rank ``r``'s new
local slots is filled in one of three ways:

* **stay**: the slot's position held the same expert before (nothing moves);
* **local**: the rank held the expert at another position (copied within the
  rank, no network);
* **network**: the first rank (in rank order) holding the expert sends it
  (one row of an all-to-all).

Every rank computes every rank's moves from the same ``now`` / ``new`` (the
ranks agreed on both), so send and receive counts agree without a
collective. :func:`transient_rows` counts the expert-sized buffers one rank
holds at once while it moves one layer (``adapters/placement.py`` allocates
exactly these; the memory pre-check and docs/placement.md use the count).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

from megatron_capaware.placement.planner import PlacementError


class PlacementMemoryError(PlacementError):
    """The placement's transient buffers would not fit in some rank's free memory (nothing was moved)."""


@dataclass(frozen=True)
class LayerMoves:
    """One rank's part of moving one layer from ``now`` to ``new`` slots.

    Attributes:
        send: ``[W][*]``: for each destination rank, this rank's *old* local
            positions to send, in the order the destination receives them
            (empty for this rank itself: local moves never use the network).
        recv_counts: ``[W]``: rows this rank receives from each rank.
        recv_slots: this rank's *new* local slots filled by the received rows,
            in arrival order (by source rank, then slot).
        local: ``(new slot, old position)`` pairs copied within the rank
            (``new slot != old position``, or a slot that is new).
        stay: new local slots whose position already holds their expert.
        per_now: slots per rank before; ``per_new``: after.
    """

    send: List[List[int]]
    recv_counts: List[int]
    recv_slots: List[int]
    local: List[Tuple[int, int]]
    stay: List[int]
    per_now: int
    per_new: int
    network_rows: int = field(default=0)  # rows sent over the whole group (0: no collective needed)

    @property
    def moves_anything(self) -> bool:
        """Whether this rank's weights change (the group may still exchange rows among other ranks)."""
        return bool(self.recv_slots or self.local or self.per_now != self.per_new)


def _fill(now: Sequence[int], new: Sequence[int], ranks: int, rank: int
          ) -> Tuple[List[int], List[Tuple[int, int]], List[Tuple[int, int]]]:
    """Rank ``rank``'s new slots split into stays, local copies and network slots ``(slot, source rank)``."""
    per_now, per_new = len(now) // ranks, len(new) // ranks
    held = list(now[rank * per_now:(rank + 1) * per_now])
    stay: List[int] = []
    local: List[Tuple[int, int]] = []
    network: List[Tuple[int, int]] = []
    for slot in range(per_new):
        expert = new[rank * per_new + slot]
        if slot < per_now and held[slot] == expert:
            stay.append(slot)
        elif expert in held:
            local.append((slot, held.index(expert)))
        else:
            source = next((r for r in range(ranks) if expert in now[r * per_now:(r + 1) * per_now]), None)
            if source is None:
                raise PlacementError(f"expert {expert} of the new layout is in no slot of the current one "
                                     f"({list(now)}): the layouts are for different expert counts")
            network.append((slot, source))
    return stay, local, network


def layer_moves(now: Sequence[int], new: Sequence[int], ranks: int, rank: int) -> LayerMoves:
    """Rank ``rank``'s moves for one layer going from slots ``now`` to ``new`` over ``ranks`` EP ranks.

    Args:
        now, new: ``[S_now]``, ``[S_new]`` logical expert per slot; each a
            multiple of ``ranks`` long.
        ranks: EP size ``W``; rank: this rank, ``0 <= rank < W``.

    Returns:
        :class:`LayerMoves` (stays, local copies, rows to send / receive).

    Raises:
        PlacementError: a length not divisible by ``ranks``, or an expert of
            ``new`` that ``now`` does not hold.
    """
    if ranks < 1 or len(now) % ranks or len(new) % ranks or not 0 <= rank < ranks:
        raise PlacementError(f"layer_moves: {len(now)} -> {len(new)} slots over {ranks} ranks (rank {rank})")
    per_now, per_new = len(now) // ranks, len(new) // ranks
    fills = [_fill(now, new, ranks, r) for r in range(ranks)]
    stay, local, network = fills[rank]
    send: List[List[int]] = []
    for dest in range(ranks):
        held = list(now[rank * per_now:(rank + 1) * per_now])
        send.append([held.index(new[dest * per_new + slot]) for slot, source in fills[dest][2] if source == rank])
    recv_counts = [sum(1 for _, source in network if source == r) for r in range(ranks)]
    recv_slots = [slot for slot, _ in sorted(network, key=lambda item: (item[1], item[0]))]
    total = sum(len(f[2]) for f in fills)
    return LayerMoves(send, recv_counts, recv_slots, local, stay, per_now, per_new, total)


def transient_rows(moves: LayerMoves, in_place: bool) -> int:
    """Expert-sized buffers one rank holds at once while moving one layer (the memory formula).

    ``adapters/placement.py`` moves a layer as: pack the rows it sends into one
    buffer (``s`` rows), receive into one buffer (``r`` rows), snapshot the
    local sources that the move overwrites (``c``), keep the old value of every
    other overwritten slot for the rollback (``b``: a slot whose old expert is
    neither sent nor copied elsewhere, only with replicas); with new target
    tensors (a slot count change of stacked weights, ``in_place`` False) the
    layer's new tensors (``per_new``), or for a growing module list its new
    experts (``per_new - per_now``, permanent afterwards) are counted too.
    All are freed before the next layer. Peak extra memory per rank:

        ``peak_extra <= max over layers of transient_rows x expert bytes (+ O(small))``

    which for a plan without replicas (a permutation) is at most ``2 x`` the
    layer's local expert bytes (``s + c <= n`` and ``r <= n``).

    Args:
        moves: this rank's :class:`LayerMoves`.
        in_place: the new slots are written into the existing tensors (for
            positions ``< min(per_now, per_new)``); False: into new tensors.
    """
    sent = sum(len(rows) for rows in moves.send)
    received = len(moves.recv_slots)
    written = set(moves.recv_slots) | {slot for slot, _ in moves.local}
    aliased = set(range(min(moves.per_now, moves.per_new))) if in_place else set()
    overwritten = written & aliased
    snapshot = {pos for _, pos in moves.local if pos in overwritten}
    sent_positions = {pos for rows in moves.send for pos in rows}
    backup = overwritten - snapshot - sent_positions
    fresh = moves.per_new if not in_place else max(0, moves.per_new - moves.per_now)
    return sent + received + len(snapshot) + len(backup) + fresh
