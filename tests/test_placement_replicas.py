"""Logical experts -> physical slots (placement/replicas.py): fast path against the loop reference."""

from __future__ import annotations

from typing import List

import pytest
import torch

from megatron_capaware.placement import PlacementError, plan_layer
from megatron_capaware.placement.replicas import (
    even_slot_loads,
    replica_choice,
    slot_table,
    to_physical,
    to_physical_reference,
)
from megatron_capaware.tools.bench.sim_dist import run_ranks


def random_decision(num_tokens: int, num_experts: int, k: int, seed: int, pad_every: int = 0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g) ** 3
    top = scores.topk(k, dim=1)
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top.indices, True)
    if pad_every:
        routing_map[::pad_every] = False  # padding rows / dropped assignments: no expert
    probs = torch.where(routing_map, scores, torch.zeros_like(scores))
    return probs, routing_map


def placement_for(num_experts: int, ranks: int, redundant: int, seed: int) -> List[int]:
    g = torch.Generator().manual_seed(seed)
    loads = torch.rand(num_experts, generator=g) ** 2 * 100
    return plan_layer(loads, ranks, redundant).slots


@pytest.mark.parametrize("policy", ["least-loaded", "round-robin"])
@pytest.mark.parametrize("experts,ranks,redundant", [(8, 2, 0), (8, 2, 2), (8, 4, 4), (6, 3, 3), (16, 4, 8)])
def test_fast_path_equals_reference(policy: str, experts: int, ranks: int, redundant: int) -> None:
    for seed in range(3):
        slots = placement_for(experts, ranks, redundant, seed)
        table = slot_table(slots, ranks)
        probs, routing_map = random_decision(37, experts, 2, seed, pad_every=5)
        replica = replica_choice(routing_map, table, policy)
        got_probs, got_map = to_physical(probs, routing_map, table, replica)
        want_probs, want_map = to_physical_reference(probs, routing_map, slots, ranks, policy)
        assert torch.equal(got_map, want_map)
        assert torch.equal(got_probs, want_probs)
        # Nothing is lost or invented: per token, the same weights on the same logical experts.
        assert torch.equal(got_map.sum(1), routing_map.sum(1))
        logical = torch.zeros_like(probs).index_add_(1, table.slot_expert, got_probs)
        assert torch.equal(logical, probs)


def test_least_loaded_splits_every_expert_evenly_and_even_slot_loads_is_exact() -> None:
    slots = placement_for(8, 4, 4, seed=1)
    table = slot_table(slots, 4)
    _, routing_map = random_decision(203, 8, 2, seed=7)
    replica = replica_choice(routing_map, table, "least-loaded")
    _, physical = to_physical(torch.zeros(routing_map.shape), routing_map, table, replica)
    slot_loads = physical.sum(0)
    assert torch.equal(slot_loads, even_slot_loads(routing_map.sum(0), table))
    for e in range(8):
        mine = slot_loads[table.slot_expert == e]
        assert int(mine.max() - mine.min()) <= 1, f"expert {e}: replicas took {mine.tolist()}"


def test_without_replicas_it_is_a_column_permutation_for_both_policies() -> None:
    slots = placement_for(8, 2, 0, seed=3)
    table = slot_table(slots, 2)
    probs, routing_map = random_decision(20, 8, 2, seed=3)
    for policy in ("least-loaded", "round-robin"):
        got_probs, got_map = to_physical(probs, routing_map, table, replica_choice(routing_map, table, policy))
        assert torch.equal(got_map, routing_map[:, slots]) and torch.equal(got_probs, probs[:, slots])


@pytest.mark.parametrize("policy", ["least-loaded", "round-robin"])
def test_over_simulated_ranks_equals_the_reference_with_earlier_ranks_counts(policy: str) -> None:
    """Least-loaded numbers an expert's assignments over the group (rank, then token)."""
    world, experts = 3, 6
    slots = placement_for(experts, world, 3, seed=5)
    table = slot_table(slots, world)
    decisions = [random_decision(17, experts, 2, seed=10 + r) for r in range(world)]

    def one_rank(rank: int, group) -> tuple:
        probs, routing_map = decisions[rank]
        return to_physical(probs, routing_map, table, replica_choice(routing_map, table, policy, group))

    results = run_ranks(one_rank, world)
    before = torch.zeros(experts, dtype=torch.int64)
    total = torch.zeros(len(slots), dtype=torch.int64)
    for rank, (got_probs, got_map) in enumerate(results):
        probs, routing_map = decisions[rank]
        want = to_physical_reference(probs, routing_map, slots, world, policy, rank=rank, counts_before=before.tolist())
        assert torch.equal(got_map, want[1]) and torch.equal(got_probs, want[0]), f"rank {rank}"
        before += routing_map.sum(0)
        total += got_map.sum(0)
    if policy == "least-loaded":
        assert torch.equal(total, even_slot_loads(before, table))


def test_empty_batch_maps_to_an_empty_physical_decision() -> None:
    table = slot_table(placement_for(8, 2, 2, seed=0), 2)
    routing_map = torch.zeros(0, 8, dtype=torch.bool)
    probs, physical = to_physical(torch.zeros(0, 8), routing_map, table, replica_choice(routing_map, table))
    assert physical.shape == (0, 10) and probs.shape == (0, 10)


@pytest.mark.parametrize("slots,ranks,match", [
    ([0, 1, 2], 2, "split evenly"),
    ([0, 0, 1, 2], 2, "two replicas"),
    ([0, 2, 2, 3], 2, "every expert"),
])
def test_bad_slot_layouts_are_refused(slots, ranks, match) -> None:
    with pytest.raises(PlacementError, match=match):
        slot_table(slots, ranks)


def test_unknown_replica_policy_is_refused() -> None:
    table = slot_table([1, 0, 2, 0], 2)
    with pytest.raises(PlacementError, match="least-loaded, round-robin"):
        replica_choice(torch.zeros(3, 3, dtype=torch.bool), table, "random")


# --- expert modules (adapters/placement.py): the per-expert views and their rebuild ---------------------------


class GroupedMLP(torch.nn.Module):
    """Megatron-Core 0.16's GroupedMLP weight layout (its forward views, without the grouped GEMM kernel)."""

    def __init__(self, num_local: int, hidden: int, ffn: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = type("Config", (), {"hidden_size": hidden})()
        self.num_local_experts = num_local
        self.weight1 = torch.nn.Parameter(torch.randn(hidden, num_local * ffn, generator=g))
        self.weight2 = torch.nn.Parameter(torch.randn(num_local * ffn, hidden, generator=g))
        self.weight1.allreduce = False

    def expert(self, i: int, x: torch.Tensor) -> torch.Tensor:
        w1 = self.weight1.view(self.num_local_experts, self.config.hidden_size, -1)
        w2 = self.weight2.view(self.num_local_experts, -1, self.config.hidden_size)
        return torch.relu(x @ w1[i]) @ w2[i]


class TEGroupedMLP(torch.nn.Module):
    """Transformer Engine grouped linears' parameter names (weight{i}, bias{i})."""

    def __init__(self, num_local: int, hidden: int, ffn: int) -> None:
        super().__init__()
        self.num_local_experts = num_local
        self.linear_fc1, self.linear_fc2 = torch.nn.Module(), torch.nn.Module()
        for i in range(num_local):
            self.linear_fc1.register_parameter(f"weight{i}", torch.nn.Parameter(torch.randn(ffn, hidden)))
            self.linear_fc1.register_parameter(f"bias{i}", torch.nn.Parameter(torch.randn(ffn)))
            self.linear_fc2.register_parameter(f"weight{i}", torch.nn.Parameter(torch.randn(hidden, ffn)))


def relayout(experts, now, new) -> None:
    """Move one module's experts from slots ``now`` to ``new`` at EP 1 (the placement's layer move)."""
    from types import SimpleNamespace

    from megatron_capaware.adapters.placement import _move_layer

    _move_layer(SimpleNamespace(layer_number=1, experts=experts), now, new, 1, 0, None)


def test_grouped_mlp_experts_move_and_replicate_with_their_function() -> None:
    experts = GroupedMLP(4, hidden=6, ffn=5, seed=0)
    x = torch.randn(3, 6)
    before = [experts.expert(i, x) for i in range(4)]
    order = [2, 0, 3, 2, 1]  # a permutation plus one replica: 5 local experts
    relayout(experts, [0, 1, 2, 3], order)
    assert experts.num_local_experts == 5 and experts.weight1.shape == (6, 25)
    assert experts.weight1.allreduce is False  # Megatron's parameter attributes survive the rebuild
    for slot, e in enumerate(order):
        assert torch.equal(experts.expert(slot, x), before[e])


def test_te_grouped_experts_permute_in_place_and_refuse_replicas() -> None:
    from megatron_capaware.adapters.placement import _check_resizable, expert_tensors

    experts = TEGroupedMLP(3, hidden=4, ffn=2)
    tensors = [[t.clone() for t in ts] for ts in expert_tensors(experts)]
    assert len(tensors[0]) == 3  # fc1 weight, fc1 bias, fc2 weight
    storage = experts.linear_fc1.weight0.data_ptr()
    relayout(experts, [0, 1, 2], [2, 0, 1])
    assert experts.linear_fc1.weight0.data_ptr() == storage  # in place: TE's buffers stay registered
    assert torch.equal(experts.linear_fc1.weight0, tensors[2][0]) and torch.equal(experts.linear_fc1.bias1,
                                                                                   tensors[0][1])
    with pytest.raises(PlacementError, match="redundant-experts 0"):
        _check_resizable(experts, 4, layer_number=3)


@pytest.mark.parametrize("policy", ["least-loaded", "round-robin"])
def test_slot_mapping_is_host_sync_free_and_launch_light_on_the_device_path(policy, monkeypatch) -> None:
    """What the router adds under a placement: replica choice, the scatter to slots, the stats' slot loads."""
    from megatron_capaware.tools.bench.launch_count import count_call

    monkeypatch.setenv("CAPAWARE_DEVICE_PATH", "1")
    table = slot_table(placement_for(64, 8, 8, seed=2), 8)
    probs, routing_map = random_decision(2048, 64, 8, seed=2)

    def placed() -> None:
        replica = replica_choice(routing_map, table, policy)
        to_physical(probs, routing_map, table, replica)
        even_slot_loads(routing_map.sum(0), table)

    work = count_call(placed)
    print(f"placement, {policy}: syncs={work.syncs} ops={work.ops}")
    assert work.syncs == 0 and work.ops <= 30


def test_free_memory_figures_and_the_transient_bytes_of_a_move() -> None:
    """The pre-check's inputs: free bytes on CPU (MemAvailable) or unknown (skipped), the formula's bytes."""
    from types import SimpleNamespace

    from megatron_capaware.adapters.placement import free_bytes, transient_bytes

    free, how = free_bytes(torch.device("cpu"))
    assert (free is None and "skipped" in how) or (free > 0 and "MemAvailable" in how)
    assert free_bytes(torch.device("meta")) == (None, "no free-memory figure for meta tensors: check skipped")
    experts = GroupedMLP(4, hidden=6, ffn=5, seed=0)  # 2 x 6 x 5 fp32 = 240 bytes an expert
    layer = SimpleNamespace(layer_number=1, experts=experts)
    assert transient_bytes([(layer, [0, 1, 2, 3], [0, 1, 2, 3], 4, 4)], 1, 0) == 0  # nothing moves
    # a cycle of 3 at EP 1: 3 local sources overwritten, snapshotted
    assert transient_bytes([(layer, [0, 1, 2, 3], [1, 2, 0, 3], 4, 4)], 1, 0) == 3 * 240
    # a new stacked tensor (4 -> 5 slots): 5 experts, either way (the rollback moves back)
    assert transient_bytes([(layer, [0, 1, 2, 3], [0, 1, 2, 3, 2], 4, 5)], 1, 0) == 5 * 240
