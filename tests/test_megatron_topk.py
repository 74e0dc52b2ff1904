"""bf16 router logits: the capaware routers start from Megatron's top-k bit for bit (issue 22, item 1).

On the installed megatron-core (CI: 0.16.1 and 0.19.2, whose numerics differ:
0.18 moved the ranking to float32), one spawned rank builds real MoE layers and
routes the same bf16 logits ``[T, 1, E]`` through Megatron's ``TopKRouter`` and
through ``CapawareRouter``:

- ``topk`` == ``TopKRouter`` (probs and map, bit for bit);
- ``capacity-drop`` with gamma = inf == ``TopKRouter`` (nothing is over capacity);
- capacity-reroute with gamma = inf keeps Megatron's choice too.

Configurations: softmax, softmax + pre-softmax, sigmoid (k > 1 normalisation),
group-limited (softmax pre-softmax and sigmoid), sigmoid with expert bias, and
a top-k scaling factor. The logits are drawn so that bf16 and float32 rankings
disagree often (many near ties), which is what broke on 0.19 before.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

from megatron_capaware._compat.launcher import run_distributed

pytestmark = pytest.mark.multirank

E, K, T = 64, 8, 2048

CASES: Dict[str, Dict[str, Any]] = {
    "softmax": dict(moe_router_score_function="softmax"),
    "pre-softmax": dict(moe_router_score_function="softmax", moe_router_pre_softmax=True),
    "sigmoid": dict(moe_router_score_function="sigmoid"),
    "sigmoid scaled": dict(moe_router_score_function="sigmoid", moe_router_topk_scaling_factor=2.5),
    "pre-softmax groups": dict(moe_router_score_function="softmax", moe_router_pre_softmax=True,
                               moe_router_num_groups=8, moe_router_group_topk=4),
    "sigmoid groups": dict(moe_router_score_function="sigmoid", moe_router_num_groups=8, moe_router_group_topk=4),
    "sigmoid expert bias": dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
    "sigmoid expert bias groups": dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                                       moe_router_num_groups=8, moe_router_group_topk=4),
}
ROUTERS = {
    "topk": dict(router_type="topk"),
    "drop inf": dict(router_type="capacity-drop", gamma=float("inf")),
    "reroute inf": dict(router_type="capacity-reroute", gamma=float("inf")),
}


def _layer(case: Dict[str, Any]):
    from megatron_capaware.models.builder import MoEModelArgs, build_moe_layer, build_transformer_config

    case = dict(case)
    groups = {k: case.pop(k) for k in list(case) if k.startswith("moe_router_num") or k.startswith("moe_router_group")}
    args = MoEModelArgs(num_layers=1, hidden_size=32, num_attention_heads=4, num_moe_experts=E, moe_router_topk=K,
                        moe_ffn_hidden_size=16, vocab_size=8, max_sequence_length=8, **groups)
    return build_moe_layer(build_transformer_config(args, **case), use_te=False).eval()


def topk_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    from megatron.core import __version__ as version

    from megatron_capaware import parallel
    from megatron_capaware.adapters import install_capaware_routers
    from megatron_capaware.config import CapawareConfig

    parallel.init_model_parallel(parallel.ParallelSizes(), timeout_s=60)
    gen = torch.Generator().manual_seed(3)
    # Near ties: a coarse grid of logits, so many experts share a bf16 score but not an fp32 one.
    logits = ((torch.randn(T, 1, E, generator=gen) * 8).round() / 8).to(torch.bfloat16)
    logits = logits + (torch.rand(T, 1, E, generator=gen) * 1e-2).to(torch.bfloat16)
    out: Dict[str, Any] = {"version": version}
    for case_name, case in CASES.items():
        layer = _layer(case)
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.randn(E, generator=gen) * 0.05)
        with torch.no_grad():
            vanilla = [t.clone() for t in layer.router.routing(logits)]
            for name, cfg in spec["routers"].items():
                install_capaware_routers(layer, CapawareConfig(**cfg, check_scores=False))
                probs, routing_map = layer.router.routing(logits)
                out[(case_name, name)] = (vanilla, (probs.clone(), routing_map.clone()))
    return out


@pytest.fixture(scope="module")
def results() -> Dict[str, Any]:
    return run_distributed(topk_worker, 1, {"routers": ROUTERS})[0]


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_logits_route_as_megatron_topk_bit_for_bit(results, case: str, router: str, record_property) -> None:
    record_property("megatron_core", results["version"])
    (vanilla_probs, vanilla_map), (probs, routing_map) = results[(case, router)]
    assert vanilla_probs.dtype == torch.bfloat16
    assert torch.equal(routing_map, vanilla_map), (
        f"{case}/{router} on megatron-core {results['version']}: "
        f"{int((routing_map != vanilla_map).any(dim=1).sum())} tokens with a different expert set")
    assert probs.dtype == vanilla_probs.dtype
    assert torch.equal(probs, vanilla_probs), f"{case}/{router}: weights differ on megatron-core {results['version']}"


def test_the_logits_tell_bf16_from_fp32_ranking() -> None:
    """The test data would catch the old numerics: bf16 and fp32 sigmoid rankings disagree on some tokens."""
    gen = torch.Generator().manual_seed(3)
    logits = ((torch.randn(T, E, generator=gen) * 8).round() / 8).to(torch.bfloat16)
    logits = logits + (torch.rand(T, E, generator=gen) * 1e-2).to(torch.bfloat16)
    fp32 = torch.zeros(T, E, dtype=torch.bool).scatter_(1, torch.sigmoid(logits.float()).topk(K).indices, True)
    bf16 = torch.zeros(T, E, dtype=torch.bool).scatter_(
        1, torch.sigmoid(logits.float()).to(torch.bfloat16).topk(K).indices, True)
    assert (fp32 != bf16).any(dim=1).sum() > T // 100
