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
