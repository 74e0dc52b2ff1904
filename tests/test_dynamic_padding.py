"""The routers in Megatron's dynamic inference engine: its padding rows and idle ranks' dummy steps.

``DynamicInferenceEngine`` pads each step's token dimension to a CUDA-graph size
and runs an all-padding dummy step on an expert-parallel rank with no request,
without a ``padding_mask``; the context's ``gpu_view.real_token_count`` says how
many rows are real (0 on a dummy step). The engine itself does not run on CPU
(see docs/megatron_lm.md), so these tests drive the MoE-facing pieces directly:

- ``install_dynamic_padding_hook`` makes ``TransformerLayer._forward_mlp`` (and
  ``MoETransformerLayer``'s, which drops the context when calling its base) publish a
  dynamic context's padding to the routers, and nothing for static batching;
- in a dynamic step the routers' decision on the real rows equals their decision
  on the real rows alone (padding takes no expert and no capacity) and equals
  Megatron's explicit ``padding_mask`` path; padding rows get no expert;
- at EP = 2, a rank running a dummy step (zero real tokens) joins every routing
  collective, and the busy rank's decision equals routing its tokens alone at
  EP = 1 (global scope: the idle rank adds nothing to ``T_glob`` or the loads);
- a layer whose rows are not the step's (``--mlp-chunks-for-prefill > 1``) raises.
"""

from __future__ import annotations

import types
from typing import Any, Dict

import pytest
import torch

from megatron_capaware._compat.launcher import run_distributed

E, K = 8, 2
ROUTERS = {
    "drop": dict(router_type="capacity-drop", gamma=1.0),
    "drop-rank": dict(router_type="capacity-drop", gamma=1.0, capacity_unit="rank"),
    "reroute": dict(router_type="capacity-reroute", gamma=1.0, reroute_rounds=2),
    "expanded": dict(router_type="expanded-drop", gamma=1.0),
    "laser": dict(router_type="laser", laser_eps_high=0.9, laser_t_fix=0.3, laser_pool=4),
}


class FakeDynamicContext:
    """What the routers read of ``DynamicInferenceContext`` (Megatron-LM core_v0.19.0 / main)."""

    def __init__(self, real: int, padded: int) -> None:
        self.padded_active_token_count = padded
        self.active_token_count = real
        self.gpu_view = types.SimpleNamespace(real_token_count=torch.tensor([real], dtype=torch.int32))

    def is_static_batching(self) -> bool:
        return False


class FakeStaticContext:
    def is_static_batching(self) -> bool:
        return True


def _real_logits(rank: int, rows: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + rank)
    logits = torch.randn(rows, E, generator=gen)
    logits[:, 0] += 2.0  # a popular expert: capacity bites
    return logits


def _padding_rows(rows: int) -> torch.Tensor:
    # Garbage rows that all want expert 1 hard: counted, they would take its capacity.
    logits = torch.zeros(rows, E)
    logits[:, 1] = 8.0
    return logits


def dynamic_padding_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch.distributed as dist

    from megatron_capaware import parallel
    from megatron_capaware.adapters import install_capaware_routers
    from megatron_capaware.adapters.inference_padding import dynamic_step, step_padding
    from megatron_capaware.config import CapawareConfig
    from tests.test_router_inputs import _layer

    world = spec["world"]
    parallel.init_model_parallel(parallel.ParallelSizes(expert_parallel=world), timeout_s=60)
    parallel.set_seed(0)
    rank = dist.get_rank() if dist.is_initialized() else 0
    real_rows, padded = spec["real_rows"][rank], spec["padded"]
    real = _real_logits(rank, real_rows)
    padded_logits = torch.cat([real, _padding_rows(padded - real_rows)]).unsqueeze(1)  # [P, 1, E]
    explicit_mask = torch.zeros(padded, 1, dtype=torch.bool)
    explicit_mask[real_rows:] = True
    layer = _layer(E=E, k=K)
    out: Dict[str, Any] = {"local": list(layer.local_expert_indices)}
    for name, cfg in ROUTERS.items():
        install_capaware_routers(layer, CapawareConfig(**cfg, record_stats=False))
        with torch.no_grad():
            with dynamic_step(step_padding(FakeDynamicContext(real_rows, padded))):
                dyn_probs, dyn_map = layer.router.routing(padded_logits)
            exp_probs, exp_map = layer.router.routing(padded_logits, padding_mask=explicit_mask)
            unmasked_map = layer.router.routing(padded_logits)[1]
            alone = layer.router.routing(real.unsqueeze(1))[1] if spec.get("alone", True) else None
        out[name] = dict(dyn_probs=dyn_probs, dyn_map=dyn_map, exp_probs=exp_probs, exp_map=exp_map,
                         unmasked_map=unmasked_map, alone=alone)
    return out


@pytest.fixture(scope="module")
def ep1() -> Dict[str, Any]:
    return run_distributed(dynamic_padding_worker, 1, dict(world=1, real_rows=[21], padded=32), timeout_s=300)[0]


@pytest.fixture(scope="module")
def ep2_dummy() -> list:
    # Rank 1 has no request: its step is a dummy one, all 32 rows padding. It cannot route
    # "alone" (that would be a call rank 0 does not make), so only the padded calls run.
    return run_distributed(dynamic_padding_worker, 2, dict(world=2, real_rows=[21, 0], padded=32, alone=False),
                           timeout_s=300)


def test_dynamic_step_padding_takes_no_expert_and_no_capacity(ep1) -> None:
    for name in ROUTERS:
        r = ep1[name]
        assert not torch.any(r["dyn_map"][21:]) and torch.all(r["dyn_probs"][21:] == 0), f"{name}: padding routed"
        assert torch.equal(r["dyn_map"], r["exp_map"]) and torch.equal(r["dyn_probs"], r["exp_probs"]), (
            f"{name}: the dynamic step's padding differs from Megatron's padding_mask")
        assert torch.equal(r["dyn_map"][:21], r["alone"]), f"{name}: real rows not routed as without padding"
    # The case tests something: counted, the padding rows would have changed the real rows' routing.
    assert any(not torch.equal(ep1[n]["unmasked_map"][:21], ep1[n]["alone"]) for n in ROUTERS)


@pytest.mark.multirank
def test_an_idle_rank_dummy_step_joins_the_collectives_and_changes_nothing(ep1, ep2_dummy) -> None:
    busy, idle = ep2_dummy
    for name in ROUTERS:
        assert not torch.any(idle[name]["dyn_map"]), f"{name}: the dummy step routed a token"
        assert torch.equal(idle[name]["dyn_map"], idle[name]["exp_map"])
        assert torch.equal(busy[name]["dyn_map"], busy[name]["exp_map"]), name
        if name in ("expanded", "drop-rank"):
            continue  # these depend on which experts are local (EP 2 vs EP 1): not comparable
        # Global scope: the idle rank adds no tokens and no load, so rank 0 decides as alone at EP 1.
        assert torch.equal(busy[name]["dyn_map"][:21], ep1[name]["alone"]), (
            f"{name}: rank 0's decision changed with an idle rank's dummy step")


def test_padding_hook_publishes_only_dynamic_steps(monkeypatch) -> None:
    pytest.importorskip("megatron.core")
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_capaware.adapters import inference_padding as ip

    seen = []

    def probe(self, hidden_states, inference_context=None, padding_mask=None, packed_seq_params=None):
        seen.append(ip._STEP.get())
        return hidden_states

    monkeypatch.setattr(TransformerLayer, "_forward_mlp", probe)
    from megatron.core.transformer import transformer_layer

    moe_layer_cls = getattr(transformer_layer, "MoETransformerLayer", None)
    if moe_layer_cls is not None and "_forward_mlp" in moe_layer_cls.__dict__:
        # It calls super()._forward_mlp without the context: it must publish the step itself.
        def moe_probe(self, hidden_states, inference_context=None, padding_mask=None, packed_seq_params=None):
            return TransformerLayer._forward_mlp(self, hidden_states, padding_mask=padding_mask)

        monkeypatch.setattr(moe_layer_cls, "_forward_mlp", moe_probe)
    assert ip.install_dynamic_padding_hook() and ip.install_dynamic_padding_hook()  # idempotent
    wrapped = TransformerLayer._forward_mlp
    assert wrapped.__wrapped__ is probe
    if moe_layer_cls is not None and "_forward_mlp" in moe_layer_cls.__dict__:
        moe_layer_cls._forward_mlp(None, "h", FakeDynamicContext(3, 4))
        assert seen.pop().padded_count == 4
    wrapped(None, "h", FakeDynamicContext(5, 8))
    wrapped(None, "h", inference_context=FakeDynamicContext(0, 4))
    wrapped(None, "h", FakeStaticContext())
    wrapped(None, "h")
    assert [s.padded_count if s else None for s in seen] == [8, 4, None, None]
    assert int(seen[0].real_count) == 5 and int(seen[1].real_count) == 0
    assert ip._STEP.get() is None  # reset after the call
    with ip.dynamic_step(seen[0]):
        mask = ip.step_padding_mask(8, torch.device("cpu"))
        assert mask.tolist() == [False] * 5 + [True] * 3
        with pytest.raises(RuntimeError, match="mlp-chunks-for-prefill"):
            ip.step_padding_mask(3, torch.device("cpu"), layer_number=2)
    assert ip.step_padding_mask(8, torch.device("cpu")) is None
