"""The device (CUDA) code path, counted on CPU tensors: host syncs and ATen ops.

``CAPAWARE_DEVICE_PATH=1`` makes the policies take the code path they take on
CUDA; :mod:`megatron_capaware.tools.bench.launch_count` counts what would
make the host wait for the device there.
"""

from __future__ import annotations

import torch

from megatron_capaware.tools.bench.launch_count import count_call, count_device_work


def test_the_counter_sees_host_reads_and_data_dependent_shapes() -> None:
    x = torch.arange(6.0)
    with count_device_work() as work:
        float(x.sum())
        x.nonzero()
        torch.tensor(3, device=x.device)
        x.tolist()
        y = x * 2 + 1  # device work, no sync
    assert work.syncs == 4, work.sync_sites
    assert work.ops >= 4 and y.shape == x.shape
    assert any("nonzero" in site for site in work.sync_sites)


def test_pure_device_work_counts_no_sync() -> None:
    x = torch.randn(64, 8)
    work = count_call(lambda: torch.topk(torch.softmax(x, -1), 2, dim=1))
    assert work.syncs == 0 and work.ops >= 2


def test_recording_stats_costs_no_sync() -> None:
    """The router records every forward; that must not read anything back to the host."""
    from megatron_capaware import policies
    from megatron_capaware.adapters.stats import LayerRoutingStats

    scores = torch.softmax(torch.randn(256, 16, generator=torch.Generator().manual_seed(0)), -1)
    decision = policies.capacity_drop(scores, 4, 1.0, check_values=False, return_decision=True)
    stats = LayerRoutingStats(layer_number=1, num_experts=16, ep_size=2, local_experts=list(range(8)))
    received = decision.global_loads[:8].clone()
    work = count_call(lambda: (stats.record_decision(decision), stats.record_received(received)))
    assert work.syncs == 0, work.sync_sites
    assert len(stats.pending) == 1 and stats.calls == 1
    # Reading copies the pending records to the host, once.
    assert torch.equal(stats.global_loads[-1], decision.global_loads) and not stats.pending
    assert stats.capacity[-1] == int(decision.capacity) and stats.dropped[-1] == int(decision.dropped)
    assert torch.equal(stats.received[-1], received)
