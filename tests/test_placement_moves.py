"""The pure layer-move plan (placement/moves.py): a simulation on expert ids reaches the new layout."""

from __future__ import annotations

import random

import pytest

from megatron_capaware.placement.moves import layer_moves, transient_rows


def simulate(now, new, ranks):
    """Apply every rank's moves to lists of expert ids: the new layout, rows over the network, buffer rows."""
    per_now, per_new = len(now) // ranks, len(new) // ranks
    held = [list(now[r * per_now:(r + 1) * per_now]) for r in range(ranks)]
    moves = [layer_moves(now, new, ranks, r) for r in range(ranks)]
    sent = {(s, d): [held[s][p] for p in moves[s].send[d]] for s in range(ranks) for d in range(ranks)}
    after = []
    for r, m in enumerate(moves):
        assert m.send[r] == [] and m.recv_counts[r] == 0  # local moves never use the network
        assert [m.recv_counts[s] for s in range(ranks)] == [len(sent[(s, r)]) for s in range(ranks)]
        arrived = [e for s in range(ranks) for e in sent[(s, r)]]
        out = [held[r][slot] if slot < per_now else None for slot in range(per_new)]
        for slot, expert in zip(m.recv_slots, arrived):
            out[slot] = expert
        for slot, pos in m.local:
            out[slot] = held[r][pos]  # the old value: the adapter snapshots overwritten sources
        after.extend(out)
    return after, moves


@pytest.mark.parametrize("seed", range(60))
def test_moves_reach_the_new_layout_and_only_missing_experts_cross_the_network(seed: int) -> None:
    rng = random.Random(seed)
    ranks = rng.choice([1, 2, 3, 4])
    experts = ranks * rng.choice([1, 2, 3])

    def layout(redundant: int):
        slots = list(range(experts)) + [rng.randrange(experts) for _ in range(redundant)]
        rng.shuffle(slots)
        return slots

    def valid(redundant: int):
        while True:
            slots = layout(redundant)
            per = len(slots) // ranks
            if all(len(set(slots[r * per:(r + 1) * per])) == per for r in range(ranks)):
                return slots

    now = valid(rng.choice([0, ranks]) if ranks > 1 else 0)
    new = valid(rng.choice([0, ranks]) if ranks > 1 else 0)
    after, moves = simulate(now, new, ranks)
    assert after == new
    for r, m in enumerate(moves):
        held_now = set(now[r * m.per_now:(r + 1) * m.per_now])
        mine = new[r * m.per_new:(r + 1) * m.per_new]
        assert len(m.recv_slots) == sum(e not in held_now for e in mine)  # only what the rank lacks
        assert sorted(m.stay + m.recv_slots + [s for s, _ in m.local]) == list(range(m.per_new))
        if len(now) == len(new) == experts:  # a permutation: at most 2 x the rank's experts in buffers
            assert transient_rows(m, in_place=True) <= 2 * m.per_new


def test_unchanged_layout_moves_nothing_and_a_swap_moves_two_rows() -> None:
    m = layer_moves([0, 1, 2, 3], [0, 1, 2, 3], 2, 0)
    assert m.network_rows == 0 and not m.moves_anything and transient_rows(m, True) == 0
    m0, m1 = layer_moves([0, 1, 2, 3], [0, 2, 1, 3], 2, 0), layer_moves([0, 1, 2, 3], [0, 2, 1, 3], 2, 1)
    assert m0.send == [[], [1]] and m0.recv_slots == [1] and m0.stay == [0]
    assert m1.send == [[0], []] and m1.recv_slots == [0] and m1.stay == [1]
    assert transient_rows(m0, True) == 2  # one row out, one in; the overwritten one is the one sent


def test_a_local_cycle_snapshots_its_sources() -> None:
    m = layer_moves([0, 1, 2], [1, 2, 0], 1, 0)
    assert sorted(m.local) == [(0, 1), (1, 2), (2, 0)] and m.network_rows == 0
    assert transient_rows(m, True) == 3
