"""Every collective goes through policies/collectives.py, on its group's device.

gloo accepts CPU tensors wherever they come from, so the CPU suite cannot see
a CPU tensor handed to an NCCL collective; these tests make that mistake
impossible to reintroduce.
"""

from __future__ import annotations

import re
from pathlib import Path

import weakref

import pytest
import torch
import torch.distributed as dist

from megatron_capaware.policies import collectives

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_capaware"
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "barrier", "monitored_barrier", "gather", "gather_object", "scatter",
               "send", "recv", "isend", "irecv")
CALL = re.compile(r"\b(?:dist|torch\.distributed)\.(" + "|".join(COLLECTIVES) + r")\(")
IMPORT = re.compile(r"from torch\.distributed import [^\n]*\b(" + "|".join(COLLECTIVES) + r")\b")


def test_no_module_but_collectives_calls_a_collective() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "policies" / "collectives.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if CALL.search(line) or IMPORT.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "call megatron_capaware.policies.collectives instead:\n" + "\n".join(offenders)


def test_the_scan_finds_a_direct_call() -> None:
    assert CALL.search("    dist.all_reduce(totals)") and CALL.search("torch.distributed.barrier()")
    assert not CALL.search("    collectives.all_reduce(totals)")


class _FakeGroup:
    pass


def test_an_nccl_group_asks_for_the_current_cuda_device(monkeypatch) -> None:
    group = _FakeGroup()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda pg=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(collectives, "_GROUP_INFO", weakref.WeakKeyDictionary())
    assert collectives.group_device(group) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # the device is read at every call
    assert collectives.group_device(group) == torch.device("cuda", 1)


def test_a_gloo_group_takes_cpu_tensors(monkeypatch) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda pg=None: "gloo")
    monkeypatch.setattr(collectives, "_GROUP_INFO", weakref.WeakKeyDictionary())
    assert collectives.group_device(_FakeGroup()) == torch.device("cpu")


@pytest.mark.parametrize("call", ["all_reduce", "all_reduce_sum", "all_gather_stack"])
def test_a_cpu_tensor_reaches_the_collective_on_the_group_device(monkeypatch, call) -> None:
    """The collective is handed the tensor on the group's device (here a stand-in device, 'meta')."""
    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda pg=None: 2)
    monkeypatch.setattr(collectives, "group_device", lambda group=None: torch.device("meta"))
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: seen.append(t.device))
    monkeypatch.setattr(dist, "all_gather", lambda parts, t, group=None: seen.append(t.device))
    monkeypatch.setattr(collectives, "gathers_into_tensor", lambda group=None: False)
    counts = torch.arange(4, dtype=torch.int64)
    with pytest.raises((NotImplementedError, RuntimeError)):  # a meta result cannot come back
        getattr(collectives, call)(counts, _FakeGroup())
    assert seen == [torch.device("meta")]


class _Gloo2:
    """A stand-in two-rank group (the backend name comes from the patched dist.get_backend)."""


def _two_ranks(monkeypatch, backend: str, calls: list) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda pg=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda pg=None: backend)
    monkeypatch.setattr(collectives, "_GROUP_INFO", weakref.WeakKeyDictionary())
    monkeypatch.setattr(collectives, "group_device", lambda group=None: torch.device("cpu"))

    def into_tensor(out, t, group=None):
        calls.append("all_gather_into_tensor")
        out[0].copy_(t)
        out[1].copy_(t + 100)

    def as_list(parts, t, group=None):
        calls.append("all_gather")
        parts[0].copy_(t)
        parts[1].copy_(t + 100)

    monkeypatch.setattr(dist, "all_gather_into_tensor", into_tensor)
    monkeypatch.setattr(dist, "all_gather", as_list)


@pytest.mark.parametrize("backend, expected", [("nccl", "all_gather_into_tensor"), ("gloo", "all_gather"),
                                               ("cpu:gloo,cuda:nccl", "all_gather")])
def test_all_gather_stack_uses_one_tensor_collective_except_on_gloo(monkeypatch, backend, expected) -> None:
    """Issue 22 item 11: all_gather_into_tensor on NCCL-like groups (no W copies + stack), list form on gloo."""
    calls: list = []
    _two_ranks(monkeypatch, backend, calls)
    counts = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    out = collectives.all_gather_stack(counts, _Gloo2())
    assert calls == [expected]
    assert torch.equal(out, torch.stack([counts, counts + 100]))


def test_group_info_is_keyed_by_the_group_object_not_its_id(monkeypatch) -> None:
    """Issue 22 item 15: a group re-created at the same id() does not inherit the old group's backend."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(collectives, "_GROUP_INFO", weakref.WeakKeyDictionary())
    monkeypatch.setattr(dist, "get_backend", lambda pg=None: "gloo")
    group = _FakeGroup()
    assert collectives.group_device(group) == torch.device("cpu")
    assert len(collectives._GROUP_INFO) == 1
    del group
    import gc

    gc.collect()
    assert len(collectives._GROUP_INFO) == 0  # weakly held: gone with the group
    monkeypatch.setattr(dist, "get_backend", lambda pg=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert collectives.group_device(_FakeGroup()) == torch.device("cuda", 0)


def test_group_timeout_is_the_groups_own(tmp_path) -> None:
    """Issue 22 item 15: the timeout in the messages is the group's (Megatron: --distributed-timeout-minutes)."""
    from megatron_capaware._compat.launcher import run_distributed

    assert run_distributed(_timeout_worker, 1)[0] == (47.0, 33.0, None)


def _timeout_worker() -> tuple:
    import datetime

    from megatron_capaware import parallel

    parallel.init_model_parallel(parallel.ParallelSizes(), timeout_s=47)
    group = dist.new_group([0], timeout=datetime.timedelta(seconds=33))
    return collectives.group_timeout_s(None), collectives.group_timeout_s(group), \
        collectives.group_timeout_s(_FakeGroup())
