"""The routers inside megatron-core 0.19.2's dynamic inference engine (``MegatronLLM``), on CPU.

Runs only where ``megatron.core.inference.apis`` imports (megatron-core >= 0.19;
skipped with the reason on 0.16.1). Marked ``dynamic_engine``; CI's 0.19.2 leg
selects it. The bundled 8x2 reference model generates greedily through
``MegatronLLM.generate`` (direct mode at EP 1, coordinator mode at EP 2):

- ``topk`` installed gives Megatron's tokens without the package, token for token;
- every router generates, and its statistics are split by phase (prefill / decode);
- under the default ``--capaware-phases prefill,mixed`` decode-only steps are routed
  by top-k (nothing dropped at decode), and with ``all`` the policy drops there too;
- one router per phase (``--capaware-decode-router decode-pack``) at EP 1 and EP 2;
- ``MegatronAsyncLLM`` (coordinator mode at every EP): topk equals Megatron at EP 1 and EP 2;
- chunked prefill (a 64-token step budget): mixed steps reported, padded rows take no capacity;
- TP 2 x EP 2 (4 ranks): every router but expanded-drop generates, topk equals Megatron, TP ranks agree.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Dict

import pytest

from megatron_capaware._compat.launcher import run_distributed

pytestmark = [
    pytest.mark.dynamic_engine,
    pytest.mark.skipif(
        importlib.util.find_spec("megatron") is None
        or importlib.util.find_spec("megatron.core.inference.apis") is None,
        reason="needs megatron-core >= 0.19 (megatron.core.inference.apis: MegatronLLM); this is an older one",
    ),
]

ROUTERS: Dict[str, Any] = {
    "megatron": None,  # Megatron's TopKRouter, no package router installed
    "topk": dict(router_type="topk"),
    "drop": dict(router_type="capacity-drop", gamma=1.0),
    "drop-every-step": dict(router_type="capacity-drop", gamma=1.0, phases="all"),
    "reroute": dict(router_type="capacity-reroute", gamma=1.0, reroute_rounds=2),
    "expanded": dict(router_type="expanded-drop", gamma=1.0),
    "laser": dict(router_type="laser", laser_eps_high=0.9, laser_t_fix=0.3, laser_pool=4),
    # One router per phase: capacity-drop on prefill / mixed steps, decode-pack (floor 1) on decode-only steps.
    "drop+pack": dict(router_type="capacity-drop", gamma=1.0, decode_router="decode-pack", decode_floor=1),
}


@pytest.fixture(scope="module")
def ep1() -> Dict[str, Any]:
    from tests.helpers.dynamic_engine_workers import megatron_llm_worker

    return run_distributed(megatron_llm_worker, 1, dict(ep=1, tokens=8, routers=ROUTERS), timeout_s=600)[0]


def test_topk_installed_equals_megatron_token_for_token(ep1) -> None:
    assert ep1["megatron"]["tokens"] == ep1["topk"]["tokens"]
    assert all(len(t) == 8 for t in ep1["megatron"]["tokens"])


def test_every_router_generates_with_stats_split_by_phase(ep1) -> None:
    for name in ROUTERS:
        if name == "megatron":
            continue
        result = ep1[name]
        assert all(len(t) == 8 for t in result["tokens"]), name
        phases = result["phases"]
        assert set(phases) == {"prefill", "decode"}, (name, phases)  # no chunking here: no mixed step
        # 4 MoE layers x (1 prefill step + 7 decode steps); prefill holds the 4 prompts' real tokens.
        assert phases["prefill"]["calls"] == 4 and phases["decode"]["calls"] == 4 * 7, (name, phases)


def test_default_phases_route_decode_by_topk_and_all_applies_the_policy(ep1) -> None:
    drop, every = ep1["drop"]["phases"], ep1["drop-every-step"]["phases"]
    assert drop["prefill"]["dropped"] > 0  # gamma 1 on a popular expert: capacity bites at prefill
    assert drop["decode"]["dropped"] == 0  # decode-only steps: top-k
    assert every["decode"]["dropped"] > 0  # phases=all: the policy drops at decode too
    assert drop["prefill"] == every["prefill"]  # the first step is the same prefill either way
    # Prefill is the same decision, so the first generated token is the same.
    assert [t[0] for t in ep1["drop"]["tokens"]] == [t[0] for t in ep1["drop-every-step"]["tokens"]]


def test_one_router_per_phase_capacity_on_prefill_decode_pack_on_decode(ep1) -> None:
    """``--capaware-decode-router decode-pack``: prefill is capacity-drop's decision (the same as
    capacity-drop alone: same stats, same first token), decode-only steps are decode-pack's (it drops
    the second choices of tokens whose second expert it does not keep active; capacity-drop's default
    phases drop nothing at decode), and each phase's statistics name its router."""
    both, drop = ep1["drop+pack"], ep1["drop"]
    assert all(len(t) == 8 for t in both["tokens"]) and all(both["text"])
    phases = both["phases"]
    assert phases["prefill"]["routers"] == ["capacity-drop"], phases
    assert phases["decode"]["routers"] == ["decode-pack"], phases
    assert drop["phases"]["decode"]["routers"] == ["topk"]
    assert {k: v for k, v in phases["prefill"].items()} == drop["phases"]["prefill"]
    assert [t[0] for t in both["tokens"]] == [t[0] for t in drop["tokens"]]
    decode = phases["decode"]
    assert decode["requested"] == 2 * decode["tokens"] and decode["tokens"] == 4 * 4 * 7  # 4 layers, 4 requests
    assert decode["dropped"] > 0 and decode["rerouted"] == 0
    assert drop["phases"]["decode"]["dropped"] == 0


# ---------------------------------------------------------------- EP 2: MegatronLLM in coordinator mode

EP2_RUNS: Dict[str, Any] = {
    "megatron": None,
    "topk": dict(router_type="topk"),
    "drop": dict(router_type="capacity-drop", gamma=1.0),
    "drop-every-step": dict(router_type="capacity-drop", gamma=1.0, phases="all"),
    "drop-placed": dict(router_type="capacity-drop", gamma=1.0),
    "drop+pack": dict(router_type="capacity-drop", gamma=1.0, decode_router="decode-pack", decode_floor=1),
}
_EP2: Dict[str, Any] = {}


def _ep2(label: str) -> list:
    """One MegatronLLM at EP 2 (2 gloo ranks + Megatron's coordinator process) per configuration."""
    if label not in _EP2:
        from megatron_capaware.models import reference_models
        from tests.helpers.dynamic_engine_workers import megatron_llm_worker

        spec: Dict[str, Any] = dict(ep=2, tokens=8, routers={label: EP2_RUNS[label]})
        if label == "drop-placed":  # the bundled EP 2 plan with 2 replicas
            spec["placement"] = str(reference_models.reference_model_dir() / "placement-ep2-r2.json")
        pytest.importorskip("zmq", reason="MegatronLLM's coordinator mode (needed at EP > 1) needs pyzmq")
        pytest.importorskip("msgpack", reason="MegatronLLM's coordinator mode (needed at EP > 1) needs msgpack")
        _EP2[label] = run_distributed(megatron_llm_worker, 2, spec, timeout_s=600)
    return _EP2[label]


@pytest.mark.multirank
def test_ep2_topk_equals_megatron_and_ep1(ep1) -> None:
    megatron, topk = _ep2("megatron")[0]["megatron"], _ep2("topk")[0]["topk"]
    assert topk["tokens"] == megatron["tokens"]
    assert megatron["tokens"] == ep1["megatron"]["tokens"]  # EP changes nothing for top-k


@pytest.mark.multirank
def test_ep2_idle_dummy_steps_take_no_capacity(ep1) -> None:
    """Rank 0 asks for all prompts; the coordinator spreads them, and a rank with nothing to do runs
    dummy steps. With the policy on every step (``phases=all``) the capacity is global: the decisions
    are EP 1's, token for token, and dummy steps count nothing."""
    ranks = _ep2("drop-every-step")
    assert ranks[0]["drop-every-step"]["tokens"] == ep1["drop-every-step"]["tokens"]
    every = ep1["drop-every-step"]["phases"]
    for phase in ("prefill", "decode"):
        per_rank = [r["drop-every-step"]["phases"][phase] for r in ranks]
        assert per_rank[0]["tokens"] == every[phase]["tokens"], phase  # global T: the same real tokens
        assert sum(p["dropped"] for p in per_rank) == every[phase]["dropped"], phase
    for r in ranks:
        idle = r["drop-every-step"]["phases"].get("idle", {"tokens": 0, "dropped": 0, "requested": 0})
        assert idle["tokens"] == 0 and idle["requested"] == 0 and idle["dropped"] == 0


@pytest.mark.multirank
def test_ep2_default_phases_agree_and_route_decode_by_topk(ep1) -> None:
    """The default phases at EP 2: the ranks agree on each eager step (one all-reduce per step); steps
    decode-only on both ranks take top-k on the layout (no drop), steps with a prefill anywhere the
    policy with global capacity, so the prefill is EP 1's (same first tokens, same prefill drops)."""
    ranks = _ep2("drop")
    result = ranks[0]["drop"]
    assert [t[0] for t in result["tokens"]] == [t[0] for t in ep1["drop"]["tokens"]]
    prefill = [r["drop"]["phases"]["prefill"] for r in ranks]
    assert sum(p["dropped"] for p in prefill) == ep1["drop"]["phases"]["prefill"]["dropped"]
    for r in ranks:
        decode = r["drop"]["phases"]["decode"]
        assert "topk" in decode["routers"], decode  # the agreed decode-only steps
        # An idle rank's dummy step drops nothing: beside another rank's prefill the policy sees 0 real
        # tokens; in an agreed decode-only step it is top-k's (its dummy rows routed and counted as
        # Megatron routes them: top-k steps count padded rows).
        idle = r["drop"]["phases"].get("idle", {"dropped": 0})
        assert idle["dropped"] == 0, idle
    every = sum(r["drop-every-step"]["phases"]["decode"]["dropped"] for r in _ep2("drop-every-step"))
    assert sum(r["drop"]["phases"]["decode"]["dropped"] for r in ranks) < every


@pytest.mark.multirank
def test_ep2_with_a_placement_plan_generates() -> None:
    ranks = _ep2("drop-placed")
    result = ranks[0]["drop-placed"]
    assert len(result["tokens"]) == 4 and all(len(t) == 8 for t in result["tokens"])
    assert all(r["drop-placed"]["phases"]["prefill"]["calls"] > 0 for r in ranks)


@pytest.mark.multirank
def test_ep2_one_router_per_phase(ep1) -> None:
    """At EP 2 the ranks agree on each eager step's phase (one all-reduce per step): steps that are
    decode-only on both ranks go to decode-pack, the rest to capacity-drop. capacity-drop's global
    capacity makes the prefill EP 1's (the same first tokens, the same drops); decode-pack packs per
    EP rank, so its decode decisions depend on the EP size (not compared with EP 1)."""
    ranks = _ep2("drop+pack")
    result = ranks[0]["drop+pack"]
    assert len(result["tokens"]) == 4 and all(len(t) == 8 for t in result["tokens"]) and all(result["text"])
    assert [t[0] for t in result["tokens"]] == [t[0] for t in ep1["drop"]["tokens"]]
    prefill = [r["drop+pack"]["phases"]["prefill"] for r in ranks]
    assert sum(p["dropped"] for p in prefill) == ep1["drop"]["phases"]["prefill"]["dropped"]
    for r in ranks:
        phases = r["drop+pack"]["phases"]
        assert phases["prefill"]["routers"] == ["capacity-drop"], phases
        assert "decode-pack" in phases["decode"]["routers"], phases
        idle = phases.get("idle", {"tokens": 0, "requested": 0})
        assert idle["tokens"] == 0 and idle["requested"] == 0
    assert sum(r["drop+pack"]["phases"]["decode"]["dropped"] for r in ranks) > 0


# ---------------------------------------------------------------- MegatronAsyncLLM (coordinator mode at every EP)

_ASYNC: Dict[Any, Any] = {}


def _async(label: str, ep: int) -> list:
    """``MegatronAsyncLLM.generate`` (awaited) with one configuration on ``ep`` gloo ranks."""
    if (label, ep) not in _ASYNC:
        from tests.helpers.dynamic_engine_workers import megatron_llm_worker

        pytest.importorskip("zmq", reason="MegatronAsyncLLM needs the coordinator (pyzmq)")
        pytest.importorskip("msgpack", reason="MegatronAsyncLLM needs the coordinator (msgpack)")
        spec = dict(ep=ep, tokens=8, api="async", routers={label: ROUTERS[label]})
        _ASYNC[(label, ep)] = run_distributed(megatron_llm_worker, ep, spec, timeout_s=600)
    return _ASYNC[(label, ep)]


def test_async_api_topk_equals_megatron(ep1) -> None:
    """MegatronAsyncLLM at EP 1 with the routers installed: topk's text is Megatron's (without the package),
    which is also the sync API's; a capacity router generates there too."""
    megatron, topk = _async("megatron", 1)[0]["megatron"], _async("topk", 1)[0]["topk"]
    assert topk["tokens"] == megatron["tokens"] == ep1["megatron"]["tokens"]
    drop = _async("drop+pack", 1)[0]["drop+pack"]
    assert all(len(t) == 8 for t in drop["tokens"])
    assert drop["phases"]["prefill"]["routers"] == ["capacity-drop"]


@pytest.mark.multirank
def test_async_api_ep2_topk_equals_megatron(ep1) -> None:
    ranks = _async("topk", 2)
    assert ranks[0]["topk"]["tokens"] == ep1["megatron"]["tokens"]
    assert all("decode" in r["topk"]["phases"] for r in ranks)


# ---------------------------------------------------------------- chunked prefill: mixed steps

CHUNKED: Dict[str, Any] = {
    "megatron": None,
    "topk": dict(router_type="topk"),
    "drop": dict(router_type="capacity-drop", gamma=1.0),
}


@pytest.fixture(scope="module")
def chunked() -> Dict[str, Any]:
    """Megatron's chunked prefill with a 64-token step budget (the smallest: 0.19.2 pads a step to a
    multiple of 64 tokens) and a 92-token prompt among three short ones: its prefill spans two steps,
    and the second mixes its chunk with the other requests' decode tokens."""
    from tests.helpers.dynamic_engine_workers import LONG_PROMPT, PROMPTS, megatron_llm_worker

    prompts = [PROMPTS[0], LONG_PROMPT, PROMPTS[2], PROMPTS[1]]
    spec = dict(ep=1, tokens=8, routers=CHUNKED, max_tokens=64, chunked_prefill=True, prompts=prompts)
    return run_distributed(megatron_llm_worker, 1, spec, timeout_s=600)[0]


def test_chunked_prefill_topk_equals_megatron_and_mixed_steps_are_reported(chunked) -> None:
    assert chunked["topk"]["tokens"] == chunked["megatron"]["tokens"]
    assert all(len(t) == 8 for t in chunked["megatron"]["tokens"])
    lengths = chunked["drop"]["prompt_lengths"]
    assert max(lengths) > 64  # a prompt longer than the step budget: its prefill is chunked
    for name in ("topk", "drop"):
        phases = chunked[name]["phases"]
        assert phases.get("mixed", {}).get("calls", 0) > 0, (name, phases)  # chunk + decode tokens in one step
    # capacity-drop routes each prefill / mixed step's real tokens (the context's active_token_count) once per
    # MoE layer (4); the padded rows (a step is padded to a multiple of 64 tokens) take no expert and no
    # capacity. Top-k (decode-only steps here, and the topk router) is Megatron's routing unchanged: it
    # routes the padded rows too, as Megatron does, and the statistics count what it routes.
    drop, steps = chunked["drop"]["phases"], chunked["drop"]["steps"]
    policy_steps = [(r, p) for r, p, prefill in steps if prefill]
    real, padded = sum(r for r, _ in policy_steps), sum(p for _, p in policy_steps)
    assert padded > real  # the policy's steps have padded rows
    assert drop["prefill"]["tokens"] + drop["mixed"]["tokens"] == 4 * real, (drop, steps)
    assert drop["prefill"]["requested"] + drop["mixed"]["requested"] == 2 * 4 * real
    assert real == sum(lengths) + sum(r - prefill for r, _, prefill in steps if prefill)  # every prompt token
    assert drop["decode"]["tokens"] == 4 * sum(p for _, p, prefill in steps if not prefill and p)
    topk_padded = sum(p for _, p, _ in chunked["topk"]["steps"])
    assert sum(p["tokens"] for p in chunked["topk"]["phases"].values()) == 4 * topk_padded
    assert drop["mixed"]["routers"] == ["capacity-drop"]  # the policy on mixed steps (default phases)
    assert drop["decode"]["routers"] == ["topk"] and drop["decode"]["dropped"] == 0
    assert drop["mixed"]["dropped"] + drop["prefill"]["dropped"] > 0
    assert all(len(t) == 8 for t in chunked["drop"]["tokens"])


# ---------------------------------------------------------------- TP 2 x EP 2: 4 gloo ranks, coordinator mode

TP2_EP2: Dict[str, Any] = {
    "megatron": None,
    "topk": dict(router_type="topk"),
    "drop": dict(router_type="capacity-drop", gamma=1.0),
    "reroute": dict(router_type="capacity-reroute", gamma=1.0, reroute_rounds=2),
    "laser": dict(router_type="laser", laser_eps_high=0.9, laser_t_fix=0.3, laser_pool=4),
    "drop+pack": dict(router_type="capacity-drop", gamma=1.0, decode_router="decode-pack", decode_floor=1),
}


@pytest.mark.multirank
def test_tp2_ep2_every_router_generates_and_tp_ranks_agree() -> None:
    """TP 2 x EP 2 on 4 ranks (Megatron's layout: two data-parallel engines of two TP ranks, which are
    also the MoE layers' EP group). One short prompt, 4 tokens; the configurations run one after the
    other in the same engines (paused and resumed between them, Megatron's RL weight-update path).
    expanded-drop is left out: it decides by the token's own EP rank, so at TP > 1 it needs
    --sequence-parallel (refused without it: refusals.py, tests/test_arguments.py), which the dynamic engine's
    CPU path here does not run."""
    from tests.helpers.dynamic_engine_workers import PROMPTS, megatron_llm_worker

    pytest.importorskip("zmq", reason="MegatronLLM's coordinator mode (needed at EP > 1) needs pyzmq")
    pytest.importorskip("msgpack", reason="MegatronLLM's coordinator mode (needed at EP > 1) needs msgpack")
    spec = dict(ep=2, tp=2, tokens=4, prompts=[PROMPTS[0]], routers=TP2_EP2)
    ranks = run_distributed(megatron_llm_worker, 4, spec, timeout_s=600)
    primary = ranks[0]
    assert primary["topk"]["tokens"] == primary["megatron"]["tokens"]
    for name in TP2_EP2:
        assert len(primary[name]["tokens"]) == 1 and len(primary[name]["tokens"][0]) == 4, name
    # The engine that served the prompt: its two TP ranks hold the same tokens and record the same stats.
    serving = [r for r in ranks if r["drop"].get("phases")]
    assert len(serving) == 2, [bool(r["drop"].get("phases")) for r in ranks]
    for name, cfg in TP2_EP2.items():
        if cfg is None:
            continue
        assert serving[0][name]["phases"] == serving[1][name]["phases"], name
        assert serving[0][name]["phases"]["prefill"]["tokens"] > 0, name
    both = serving[0]["drop+pack"]["phases"]
    assert both["prefill"]["routers"] == ["capacity-drop"] and both["decode"]["routers"] == ["decode-pack"]
    assert serving[0]["drop"]["phases"]["prefill"]["dropped"] > 0
