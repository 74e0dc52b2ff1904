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
from megatron_capaware.policies.phases import PHASES, StepComposition, parse_phases
from tests.helpers.dynamic_context import FakeContext


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
    from megatron_capaware.policies.phases import POLICY, step_route

    default = parse_phases("prefill,mixed")
    assert step_route(None, default, 1) == POLICY  # no dynamic step (static engine): the policy
    assert step_route(StepComposition(8, 0), default, 1) == POLICY
    assert step_route(StepComposition(8, 2), default, 1) == POLICY
    assert step_route(StepComposition(0, 4), default, 1) != POLICY  # decode-only at EP 1: top-k
    assert step_route(StepComposition(0, 4), PHASES, 1) == POLICY
    assert step_route(StepComposition(8, 0, captured=True), PHASES, 1) != POLICY  # captured: never
    # Eager at EP > 1 without an agreement: another rank may be prefilling; every rank keeps the policy's
    # collectives. A captured step is top-k there too.
    assert step_route(StepComposition(0, 4), default, 2) == POLICY
    assert step_route(StepComposition(0, 4, captured=True), default, 2) != POLICY


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


# ---------------------------------------------------------------- one router per phase (--capaware-decode-router)

def test_step_route_with_a_decode_router() -> None:
    from megatron_capaware.policies.phases import DECODE, POLICY, TOPK_ON_LAYOUT, step_route

    default = parse_phases("prefill,mixed")
    assert step_route(StepComposition(0, 4), default, 1, decode_router=True) == DECODE
    assert step_route(StepComposition(0, 4), default, 1) == TOPK_ON_LAYOUT
    assert step_route(StepComposition(8, 0), default, 1, decode_router=True) == POLICY
    assert step_route(StepComposition(8, 2), default, 1, decode_router=True) == POLICY
    assert step_route(StepComposition(0, 4, captured=True), default, 1, decode_router=True) == TOPK_ON_LAYOUT
    # EP > 1: the ranks' agreement decides; not agreed (None) or a prefill somewhere: the policy.
    assert step_route(StepComposition(0, 4), default, 2, True, group_decode_only=True) == DECODE
    assert step_route(StepComposition(0, 0), default, 2, True, group_decode_only=True) == DECODE  # idle rank
    assert step_route(StepComposition(0, 4), default, 2, True, group_decode_only=False) == POLICY
    assert step_route(StepComposition(0, 4), default, 2, True, group_decode_only=None) == POLICY


def test_step_route_at_ep2_follows_the_agreed_group_phase() -> None:
    """Without a decode router the default phases also route by the agreed group phase at EP > 1:
    a step decode-only on every rank takes top-k on the layout (capacity at decode costs quality and buys
    nothing, docs/decode.md), a step with a prefill anywhere the policy, on every rank alike."""
    from megatron_capaware.policies.phases import POLICY, TOPK_ON_LAYOUT, needs_group_phase, step_route

    default = parse_phases("prefill,mixed")
    assert step_route(StepComposition(0, 4), default, 2, group_decode_only=True) == TOPK_ON_LAYOUT
    assert step_route(StepComposition(0, 0), default, 2, group_decode_only=True) == TOPK_ON_LAYOUT  # idle
    assert step_route(StepComposition(0, 4), default, 2, group_decode_only=False) == POLICY  # another prefills
    assert step_route(StepComposition(8, 0), default, 2, group_decode_only=False) == POLICY
    decode_only = parse_phases("decode")
    assert step_route(StepComposition(0, 4), decode_only, 2, group_decode_only=True) == POLICY
    assert step_route(StepComposition(8, 0), decode_only, 2, group_decode_only=False) == TOPK_ON_LAYOUT
    # When the ranks must agree: an eager step at EP > 1 whose route depends on the phase.
    assert needs_group_phase(StepComposition(0, 4), default, 2)
    assert needs_group_phase(StepComposition(0, 4), decode_only, 2)
    assert needs_group_phase(StepComposition(0, 4), PHASES, 2, decode_router=True)
    assert not needs_group_phase(StepComposition(0, 4), PHASES, 2)  # 'all': the policy on every step
    assert not needs_group_phase(StepComposition(0, 4), default, 1)  # one rank decides alone
    assert not needs_group_phase(StepComposition(0, 4, captured=True), default, 2)  # captured: top-k
    assert not needs_group_phase(None, default, 2)  # outside a dynamic step: the policy


@pytest.mark.parametrize("kwargs, match", [
    (dict(router_type="topk", decode_router="decode-pack"), "use --moe-router-type decode-pack alone"),
    (dict(router_type="decode-pack", decode_router="decode-pack"), "is a decode router itself"),
    (dict(router_type="capacity-drop", decode_router="laser"), "not a decode router"),
    (dict(router_type="capacity-drop", decode_router="nope"), "not a router type"),
    (dict(router_type="capacity-drop", decode_router="decode-pack", phases="all"), "remove decode from"),
    (dict(router_type="capacity-drop", decode_floor=1), "--capaware-decode-router decode-pack"),
])
def test_decode_router_refusals(kwargs, match) -> None:
    with pytest.raises(CapawareConfigError, match=match):
        CapawareConfig(**kwargs)


def test_decode_router_through_spec_flags_and_label(capsys) -> None:
    import argparse

    from megatron_capaware.megatron_lm.arguments import add_capaware_args, config_from_args
    from megatron_capaware.tools.router_specs import format_router_spec, megatron_flags, parse_router_spec

    cases = [CapawareConfig(router_type="capacity-drop", gamma=1.0, decode_router="decode-pack"),
             CapawareConfig(router_type="capacity-drop", gamma=1.0, decode_router="decode-pack", decode_floor=1),
             CapawareConfig(router_type="laser", decode_router="decode-pack", decode_pool=4, laser_pool=6)]
    for cfg in cases:
        spec = format_router_spec(cfg)
        assert parse_router_spec(spec)[0] == cfg, spec
        parser = add_capaware_args(argparse.ArgumentParser())
        args = parser.parse_args(megatron_flags(cfg))  # checked: the decode router's knobs apply here
        assert config_from_args(args) == cfg, megatron_flags(cfg)
    assert format_router_spec(cases[2]) == "laser:eps_high=0.6,t_fix=0.5,pool=6,decode_router=decode-pack,decode_pool=4"
    assert cases[1].describe() == "capacity-drop(gamma=1)+decode:decode-pack(floor=1)"
    assert cases[1].decode_config().router_type == "decode-pack" and cases[1].decode_config().decode_floor == 1
    parser = add_capaware_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(["--moe-router-type", "capacity-drop", "--capaware-decode-floor", "1"])
    assert "--capaware-decode-floor has no effect" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--moe-router-type", "capacity-drop", "--capaware-decode-router", "laser"])
    assert "invalid choice" in capsys.readouterr().err


def _decode_router_worker(spec):
    from megatron_capaware import parallel, policies
    from megatron_capaware.adapters import install_capaware_routers
    from megatron_capaware.adapters.inference_padding import dynamic_step, step_padding
    from megatron_capaware.adapters.phases import phase_totals
    from megatron_capaware.errors import CapawareConfigError as UserError
    from tests.test_router_inputs import _layer

    parallel.init_model_parallel(parallel.ParallelSizes(), timeout_s=60)
    parallel.set_seed(0)
    layer = _layer(E=8, k=2)
    logits = torch.randn(16, 1, 8, generator=torch.Generator().manual_seed(5))
    logits[..., 0] += 3.0
    install_capaware_routers(layer, CapawareConfig(router_type="capacity-drop", gamma=0.5,
                                                   decode_router="decode-pack", decode_floor=1))
    router = layer.router
    out = {}
    with torch.no_grad():
        scores = torch.softmax(logits.reshape(16, 8).float(), dim=-1)
        out["pack"] = policies.decode_pack(scores, 2, 1, return_decision=True).routing_map
        out["drop"] = policies.capacity_drop(scores, 2, 0.5, return_decision=True).routing_map
        with dynamic_step(step_padding(FakeContext(0, 16, 16))):
            out["decode"] = router.routing(logits)[1]
        with dynamic_step(step_padding(FakeContext(16, 0, 16))):
            out["prefill"] = router.routing(logits)[1]
        try:
            router.routing(logits)  # outside a dynamic step: refused
        except UserError as err:
            out["outside"] = str(err)
    out["phases"] = phase_totals(layer)
    return out


def test_decode_only_steps_take_the_decode_router() -> None:
    pytest.importorskip("megatron.core")
    from megatron_capaware._compat.launcher import run_distributed

    out = run_distributed(_decode_router_worker, 1, {}, timeout_s=300)[0]
    assert torch.equal(out["decode"], out["pack"])  # decode-pack's decision, as the policy gives it
    assert torch.equal(out["prefill"], out["drop"])  # capacity-drop's
    assert not torch.equal(out["pack"], out["drop"])
    assert out["phases"]["decode"]["routers"] == ["decode-pack"]
    assert out["phases"]["prefill"]["routers"] == ["capacity-drop"]
    assert "dynamic inference engine" in out["outside"] and "drop the flag" in out["outside"]


def test_phase_split_composes_each_deployment_from_its_routers_records() -> None:
    """scripts/phase_split.py: prefill figures from the policy's record, decode figures from the record
    of the router that routes decode-only steps in each deployment."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "phase_split.py"
    spec = importlib.util.spec_from_file_location("phase_split", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def record(label, ppl, speed, dppl_decode, active, peak=1.0):
        return dict(label=label, ppl=ppl, predicted_speedup=speed, dropped_frac=0.0, decode_ppl=dppl_decode,
                    decode_active_speedup=active, decode_rank_peak_load=peak, decode_dropped_frac=0.0)

    drop = CapawareConfig(router_type="capacity-drop", gamma=1.0).describe()
    pack = CapawareConfig(router_type="decode-pack", decode_floor=1).describe()
    records = {"topk": record("topk", 10.0, 1.0, 20.0, 1.0), drop: record(drop, 11.0, 1.3, 30.0, 0.9, 0.8),
               pack: record(pack, 10.0, 1.0, 21.0, 1.5)}
    rows = module.compose(records, ["capacity-drop:gamma=1"], "decode-pack:floor=1")
    assert [r["decode_router"] for r in rows] == ["topk", drop, "topk", pack]
    every, default, with_pack = rows[1:]
    assert every["prefill_dppl"] == default["prefill_dppl"] == with_pack["prefill_dppl"] == pytest.approx(10.0)
    assert every["decode_dppl"] == pytest.approx(50.0) and every["decode_speedup"] == 0.9
    assert default["decode_dppl"] == 0.0 and default["decode_speedup"] == 1.0
    assert with_pack["decode_dppl"] == pytest.approx(5.0) and with_pack["decode_speedup"] == 1.5
    assert "| capacity-drop(gamma=1) |" in module.table(rows, 16)


def test_a_decode_router_makes_laser_calls_variable_for_the_dispatcher() -> None:
    """LASER keeps k per token (Megatron's sync point stays); decode-pack on its decode steps may not."""
    pytest.importorskip("megatron.core")
    from megatron_capaware.adapters.dispatcher import CapawareDispatcherMixin

    def variable(cfg, padded=False):
        stub = types.SimpleNamespace(capaware_state=types.SimpleNamespace(config=cfg, padded=padded))
        return CapawareDispatcherMixin.capaware_variable_counts.fget(stub)

    assert not variable(CapawareConfig(router_type="laser"))
    assert variable(CapawareConfig(router_type="laser"), padded=True)
    assert variable(CapawareConfig(router_type="laser", decode_router="decode-pack"))
    assert variable(CapawareConfig(router_type="capacity-drop", decode_router="decode-pack"))
    assert not variable(CapawareConfig(router_type="topk"))


def test_a_decode_router_is_refused_under_a_plan_with_replicas() -> None:
    pytest.importorskip("megatron.core")
    from megatron_capaware.adapters.placement import check_router_for_slots
    from megatron_capaware.placement import PlacementError

    cfg = CapawareConfig(router_type="capacity-drop", decode_router="decode-pack")
    check_router_for_slots(cfg, 8, 8)  # no replica: fine
    with pytest.raises(PlacementError, match="--capaware-decode-router decode-pack"):
        check_router_for_slots(cfg, 10, 8)
