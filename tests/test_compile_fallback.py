"""Compiled regions never end a rank, and the ranks stay on one path (issue 22, items 8, 9).

- Any exception while compiling (not only dynamo's two backend errors) falls
  back to eager with one warning.
- An injected compile failure on rank 1 only (2 gloo ranks): both ranks agree
  on the region's first call and both run it eagerly (rank 0 discards its
  compiled result), then neither compiles it again; nobody hangs.
- Shape-generic: one graph per region for every token count.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict

import pytest
import torch

from megatron_capaware._compat.launcher import run_distributed


def _affine(x, k: int):
    return x * k + 1


@pytest.fixture
def dynamo_on(monkeypatch):
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    yield


@pytest.mark.parametrize("error", [ValueError, KeyError, AssertionError, NotImplementedError, MemoryError])
def test_any_compile_error_falls_back_to_eager_once(dynamo_on, error) -> None:
    from megatron_capaware.policies import compiled

    def boom(gm, example_inputs):
        raise error("injected")

    region = compiled.Region(_affine)
    x = torch.arange(4)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        assert torch.equal(region(boom, x, 3), _affine(x, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert torch.equal(region(boom, x, 3), _affine(x, 3))


def test_one_graph_serves_every_token_count(dynamo_on, monkeypatch) -> None:
    """dynamic=True: 30 distinct token counts compile one graph (plus at most dynamo's 0/1 specialisations)."""
    from megatron_capaware.policies import compiled

    monkeypatch.setenv(compiled.DYNAMIC_ENV, "1")

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    region = compiled.Region(_affine)
    for n in range(2, 32):
        x = torch.arange(n)
        assert torch.equal(region(counting, x, 2), _affine(x, 2))
    assert 1 <= len(graphs) <= 2, len(graphs)


def fallback_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    import os

    import torch._dynamo
    import torch.distributed as dist

    from megatron_capaware import parallel
    from megatron_capaware.policies import compiled

    os.environ.pop("TORCHDYNAMO_DISABLE", None)
    parallel.init_model_parallel(parallel.ParallelSizes(), timeout_s=60)
    rank = dist.get_rank()
    compiles = []

    def ok(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    def boom(gm, example_inputs):
        raise RuntimeError("injected compile failure")

    backend = boom if rank in spec["failing_ranks"] else ok
    region = compiled.Region(_affine)
    out: Dict[str, Any] = {"rank": rank}
    before = dict(compiled.STATS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with compiled.agreement_group(dist.group.WORLD):
            results = [region(backend, torch.arange(n) + rank, 5) for n in (3, 7, 11)]
    out["correct"] = all(torch.equal(r, _affine(torch.arange(n) + rank, 5)) for r, n in zip(results, (3, 7, 11)))
    out["compiled_calls"] = compiled.STATS["compiled_calls"] - before["compiled_calls"]
    out["fallbacks"] = compiled.STATS["fallbacks"] - before["fallbacks"]
    out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    out["compiles"] = len(compiles)
    dist.barrier()  # both ranks reach it: nobody is stuck in the agreement
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("failing", [(1,), ()])
def test_a_compile_failure_on_one_rank_sends_every_rank_to_eager(failing) -> None:
    # Shape-generic compile (one graph for the three token counts below): the opt-in path.
    ranks = run_distributed(fallback_worker, 2, {"failing_ranks": list(failing)}, timeout_s=540,
                            extra_env={"TORCHDYNAMO_DISABLE": "0", "CAPAWARE_COMPILE_DYNAMIC": "1"})
    for out in ranks:
        assert out["correct"], out
        if failing:
            assert out["compiled_calls"] == 0 and out["fallbacks"] == 3, out
            assert len(out["warnings"]) == 1, out
            expected = "injected compile failure" if out["rank"] in failing else "failed on another rank"
            assert expected in out["warnings"][0], out
        else:
            assert out["compiled_calls"] == 3 and out["fallbacks"] == 0 and out["warnings"] == [], out
            assert 1 <= out["compiles"] <= 2, out
