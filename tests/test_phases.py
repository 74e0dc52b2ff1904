"""Phase-aware routing (adapters/phases.py) with mocked dynamic-engine contexts.

- a step's composition is read from the context's host bookkeeping;
- ``--capaware-phases`` parsing and the per-step choice (policy or top-k), including
  why an eager step at EP > 1 keeps the policy;
- a step marked as captured takes the capture-safe path: Megatron's top-k exactly, no
  statistics; a decode-only eager step at EP 1 is top-k with its stats under ``decode``;
  a prefill step runs the policy;
- the CUDA-graph refusal is narrowed to the implementations that capture the policy itself,
  and a capture outside a marked step raises.
"""

from __future__ import annotations

import types

import pytest
import torch

from megatron_capaware.config import CapawareConfig, CapawareConfigError
from megatron_capaware.policies.phases import PHASES, StepComposition, parse_phases, route_with_policy


class FakeContext:
    """What the routers read of ``DynamicInferenceContext`` (megatron-core 0.19.2)."""

    def __init__(self, prefill: int, decode: int, padded: int, captured: bool = False) -> None:
        self.active_token_count = prefill + decode
        self.num_decode_requests = decode
        self.num_speculative_tokens = 0
        self.padded_active_token_count = padded
        self.gpu_view = types.SimpleNamespace(real_token_count=torch.tensor([prefill + decode], dtype=torch.int32))
        self._captured = captured

    def is_static_batching(self) -> bool:
        return False

    def using_cuda_graph_this_step(self) -> bool:
        return self._captured


def test_composition_and_phase_from_the_context() -> None:
    from megatron_capaware.adapters.phases import step_composition

    assert step_composition(FakeContext(10, 0, 16)).phase == "prefill"
    assert step_composition(FakeContext(0, 3, 4)).phase == "decode"
    mixed = step_composition(FakeContext(5, 3, 8, captured=True))
    assert (mixed.phase, mixed.prefill_tokens, mixed.decode_tokens, mixed.captured) == ("mixed", 5, 3, True)
    assert step_composition(FakeContext(0, 0, 4)).phase == "idle"
    assert step_composition(None) is None
    assert step_composition(types.SimpleNamespace(is_static_batching=lambda: True)) is None


def test_phase_knob_parsing() -> None:
    assert parse_phases("prefill,mixed") == ("prefill", "mixed")
    assert parse_phases(" decode ") == ("decode",)
    assert parse_phases("all") == PHASES
    for bad in ("", "decoding", "prefill,,x"):
        with pytest.raises(CapawareConfigError, match="--capaware-phases"):
            CapawareConfig(router_type="capacity-drop", phases=bad)
    # Unset: the router type's default (the registry): the policy on prefill and mixed steps;
    # decode-pack, the decode router, on decode steps.
    assert CapawareConfig().phases is None
    from megatron_capaware.registry import router_type

    assert router_type("capacity-drop").phases == "prefill,mixed"
    assert router_type("decode-pack").phases == "decode"


def test_the_choice_per_step() -> None:
    default = parse_phases("prefill,mixed")
    assert route_with_policy(None, default, None)  # no dynamic step (static engine): the policy
    assert route_with_policy(StepComposition(8, 0), default, None)
    assert route_with_policy(StepComposition(8, 2), default, None)
    assert not route_with_policy(StepComposition(0, 4), default, None)  # decode-only at EP 1: top-k
    assert route_with_policy(StepComposition(0, 4), PHASES, None)
    assert not route_with_policy(StepComposition(8, 0, captured=True), PHASES, None)  # captured: never
    ep2 = types.SimpleNamespace(primary_rank=0)

    import megatron_capaware.policies.collectives as collectives

    original = collectives.group_size
    collectives.group_size = lambda group: 2 if group is ep2 else original(group)
    try:
        # Eager at EP > 1: another rank may be prefilling; every rank keeps the policy's collectives.
        assert route_with_policy(StepComposition(0, 4), default, ep2)
        assert not route_with_policy(StepComposition(0, 4, captured=True), default, ep2)
    finally:
        collectives.group_size = original


def _phase_worker(spec):
    from megatron_capaware import parallel
    from megatron_capaware.adapters import collect_stats, install_capaware_routers
    from megatron_capaware.adapters.inference_padding import dynamic_step, step_padding
    from megatron_capaware.adapters.phases import phase_totals
    from megatron.core.transformer.moe.router import TopKRouter
    from tests.test_router_inputs import _layer

    parallel.init_model_parallel(parallel.ParallelSizes(), timeout_s=60)
    parallel.set_seed(0)
    layer = _layer(E=8, k=2)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 1, 8, generator=gen)
    logits[..., 0] += 3.0  # one popular expert: gamma 0.5 drops
    install_capaware_routers(layer, CapawareConfig(router_type="capacity-drop", gamma=0.5))
    router = layer.router
    out = {}
    with torch.no_grad():
        out["megatron"] = TopKRouter.routing(router, logits)
        with dynamic_step(step_padding(FakeContext(0, 16, 16, captured=True))):
            out["captured"] = router.routing(logits)
        out["after_captured"] = {k: v.calls for k, v in collect_stats(layer).items()}
        with dynamic_step(step_padding(FakeContext(0, 16, 16))):
            out["decode"] = router.routing(logits)
        with dynamic_step(step_padding(FakeContext(16, 0, 16))):
            out["prefill"] = router.routing(logits)
    out["phases"] = phase_totals(layer)
    return out


def test_a_captured_step_takes_the_capture_safe_path() -> None:
    pytest.importorskip("megatron.core")
    from megatron_capaware._compat.launcher import run_distributed

    out = run_distributed(_phase_worker, 1, {}, timeout_s=300)[0]
    probs, routing_map = out["megatron"]
    for step in ("captured", "decode"):
        assert torch.equal(out[step][1], routing_map) and torch.equal(out[step][0], probs), step
    assert out["after_captured"] == {1: 0}  # nothing recorded on the captured step
    assert not torch.equal(out["prefill"][1], routing_map)  # prefill: the policy drops
    assert out["phases"]["decode"]["calls"] == 1 and out["phases"]["decode"]["dropped"] == 0
    assert out["phases"]["prefill"]["calls"] == 1 and out["phases"]["prefill"]["dropped"] > 0


def test_capture_outside_a_marked_step_raises(monkeypatch) -> None:
    from megatron_capaware.adapters import phases

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="--cuda-graph-impl none"):
        phases.check_not_capturing(3)


def test_cuda_graph_refusal_is_narrowed() -> None:
    from megatron_capaware.refusals import REFUSALS

    row = next(r for r in REFUSALS if r.option == "--cuda-graph-impl")

    def get(values):
        return lambda field: values.get(field)

    assert not row.refused(get({"cuda_graph_impl": "local"}))  # the dynamic engine's graphs
    assert not row.refused(get({"cuda_graph_impl": "none"}))
    for unsafe in ({"cuda_graph_impl": "transformer_engine"}, {"cuda_graph_impl": "full_iteration"},
                   {"enable_cuda_graph": True}, {"external_cuda_graph": True}):
        assert row.refused(get(unsafe)), unsafe
    message = row.message("capacity-drop", get({"cuda_graph_impl": "transformer_engine"}))
    assert "--cuda-graph-impl local" in message and "transformer_engine" in message
