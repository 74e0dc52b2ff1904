"""The Megatron router's inputs beyond the logits (issue 12, items 5, 7, 8a).

One spawned rank (Megatron needs its parallel state) builds real MoE layers and
checks, through ``CapawareRouter.routing``:

- group-limited routing (``moe_router_num_groups`` / ``moe_router_group_topk``):
  capacity-reroute and expanded-drop keep every token inside the groups
  Megatron selected for it (before the fix reroute moved tokens across groups);
- ``padding_mask`` (True = padding, as Megatron's own code reads it): padding
  tokens take no expert and no capacity, and the decision on the real tokens is
  the policy's on the real tokens alone; ``topk`` stays Megatron's own routing;
- an empty batch's gate returns the router dtype (fp64 included).
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

from megatron_capaware._compat.launcher import run_distributed

pytestmark = pytest.mark.multirank

K = 2


def _layer(**overrides: Any):
    from megatron_capaware.models.builder import MoEModelArgs, build_moe_layer, build_transformer_config

    args = MoEModelArgs(num_layers=1, hidden_size=32, num_attention_heads=4, num_moe_experts=overrides.pop("E", 8),
                        moe_router_topk=overrides.pop("k", K), moe_ffn_hidden_size=16, vocab_size=8,
                        max_sequence_length=8, **{k: overrides.pop(k) for k in list(overrides)
                                                 if k.startswith("moe_router_num") or k.startswith("moe_router_group")})
    return build_moe_layer(build_transformer_config(args, **overrides), use_te=False).eval()


def router_inputs_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    from megatron_capaware import parallel
    from megatron_capaware.adapters import install_capaware_routers
    from megatron_capaware.config import CapawareConfig

    parallel.init_model_parallel(parallel.ParallelSizes(), timeout_s=60)
    parallel.set_seed(0)
    out: Dict[str, Any] = {}
    gen = torch.Generator().manual_seed(7)

    # --- group-limited routing: 64 tokens, 16 experts in 4 groups, one group per token.
    layer = _layer(E=16, moe_router_num_groups=4, moe_router_group_topk=1)
    hidden = torch.randn(64, 1, 32, generator=gen)
    with torch.no_grad():
        logits = layer.router.gating(hidden)
        _, vanilla_map = layer.router.routing(logits)
        out["groups_vanilla_map"] = vanilla_map.clone()
        for name, cfg in spec["group_routers"].items():
            install_capaware_routers(layer, CapawareConfig(**cfg))
            out[f"groups_{name}"] = layer.router.routing(logits)[1].clone()

    # --- padding: real tokens peaked (a weak second choice), padding tokens uniform
    # (a zero hidden state's logits), the padding first in token order (first on ties).
    layer = _layer()
    real = torch.zeros(24, 8)
    real[torch.arange(24), torch.arange(24) % 8] = 4.0
    real[torch.arange(24), (torch.arange(24) * 3 + 1) % 8] = 0.5
    logits = torch.cat([torch.zeros(4, 8), real[:12], torch.zeros(4, 8), real[12:]]).unsqueeze(1)  # [32, 1, 8]
    padding_mask = torch.zeros(32, 1, dtype=torch.bool)
    padding_mask[:4] = True
    padding_mask[16:20] = True
    with torch.no_grad():
        out["pad_logits"] = logits.reshape(-1, 8).clone()
        out["pad_mask"] = padding_mask.reshape(-1).clone()
        vanilla = layer.router.routing(logits, padding_mask=padding_mask)
        out["pad_vanilla"] = (vanilla[0].clone(), vanilla[1].clone())
        for name, cfg in spec["pad_routers"].items():
            install_capaware_routers(layer, CapawareConfig(**cfg))
            probs, routing_map = layer.router.routing(logits, padding_mask=padding_mask)
            unmasked = layer.router.routing(logits)[1]
            out[f"pad_{name}"] = (probs.clone(), routing_map.clone(), unmasked.clone(),
                                  list(layer.local_expert_indices))

    # --- the whole CapawareRouter.routing on the device path (issue 12's shape), score
    # check and stats off (theirs are counted elsewhere): syncs and ops per router.
    import os

    from megatron_capaware.tools.bench.launch_count import count_call

    os.environ["CAPAWARE_DEVICE_PATH"] = "1"
    counted: Dict[str, Any] = {}
    for groups in (None, (8, 4)):
        extra = dict(moe_router_num_groups=groups[0], moe_router_group_topk=groups[1]) if groups else {}
        layer = _layer(E=64, k=8, **extra)
        logits = torch.randn(2048, 1, 64, generator=gen)
        padding_mask = torch.zeros(2048, 1, dtype=torch.bool)
        padding_mask[::9] = True
        for name, cfg in spec["count_routers"].items():
            if groups and name == "laser":
                continue  # refused with group-limited routing
            install_capaware_routers(layer, CapawareConfig(**cfg, check_scores=False, record_stats=False))
            for pads in (None, padding_mask):
                with torch.no_grad():
                    layer.router.routing(logits, padding_mask=pads)  # builds the cached local experts once
                    work = count_call(lambda: layer.router.routing(logits, padding_mask=pads))
                key = f"{name}{' groups' if groups else ''}{' padding' if pads is not None else ''}"
                counted[key] = (work.syncs, work.ops, sorted(set(work.sync_sites)))
    os.environ.pop("CAPAWARE_DEVICE_PATH")
    out["router_counts"] = counted

    # --- empty batch: the gate's dtype follows moe_router_dtype.
    for dtype in ("fp32", "fp64", None):
        layer = _layer(moe_router_dtype=dtype)
        install_capaware_routers(layer, CapawareConfig("capacity-drop"))
        with torch.no_grad():
            out[f"empty_{dtype}"] = layer.router.gating(torch.zeros(0, 1, 32, dtype=torch.bfloat16)).dtype
    return out


GROUP_ROUTERS = {
    "reroute": dict(router_type="capacity-reroute", gamma=1.0, reroute_rounds=2),
    "reroute_load": dict(router_type="capacity-reroute", gamma=1.0, reroute_rounds=2, reroute_policy="load"),
    "expanded": dict(router_type="expanded-drop", gamma=1.0),
    "drop": dict(router_type="capacity-drop", gamma=1.0),
}
PAD_ROUTERS = {
    "topk": dict(router_type="topk"),
    "drop": dict(router_type="capacity-drop", gamma=1.0),
    "reroute": dict(router_type="capacity-reroute", gamma=1.0, reroute_rounds=2),
    "expanded": dict(router_type="expanded-drop", gamma=1.0),
    "laser": dict(router_type="laser", laser_eps_high=0.9, laser_t_fix=0.3, laser_pool=4),
}


COUNT_ROUTERS = {
    "topk": dict(router_type="topk"),
    "capacity-drop": dict(router_type="capacity-drop"),
    "capacity-reroute": dict(router_type="capacity-reroute"),
    "capacity-reroute(load, rho=0.3)": dict(router_type="capacity-reroute", reroute_policy="load",
                                            reroute_min_ratio=0.3),
    "expanded-drop": dict(router_type="expanded-drop"),
    "laser": dict(router_type="laser", laser_eps_high=0.9, laser_t_fix=0.3, laser_pool=16),
}


@pytest.fixture(scope="module")
def results() -> Dict[str, Any]:
    spec = dict(group_routers=GROUP_ROUTERS, pad_routers=PAD_ROUTERS, count_routers=COUNT_ROUTERS)
    return run_distributed(router_inputs_worker, 1, spec, timeout_s=300)[0]


def _groups_of(routing_map: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[T, G]`` bool: the groups each token's experts lie in."""
    return routing_map.view(routing_map.shape[0], num_groups, -1).any(dim=2)


def test_group_limited_routing_keeps_every_token_in_its_groups(results) -> None:
    vanilla = _groups_of(results["groups_vanilla_map"], 4)
    assert torch.all(vanilla.sum(1) == 1), "Megatron's top-k takes one group per token (group_topk=1)"
    for name in GROUP_ROUTERS:
        used = _groups_of(results[f"groups_{name}"], 4)
        assert not torch.any(used & ~vanilla), f"{name}: a token left the group Megatron selected for it"
    # The case is one where leaving the group would pay (the drop lost slots), and the
    # mask does not just switch rerouting off: slots still move inside their group.
    assert int((results["groups_vanilla_map"] & ~results["groups_drop"]).sum()) > 0
    assert int(results["groups_reroute"].sum()) > int(results["groups_drop"].sum())


def test_padding_tokens_take_no_expert_and_no_capacity(results) -> None:
    from megatron_capaware import policies as P

    pad, logits = results["pad_mask"], results["pad_logits"]
    real = ~pad
    scores = torch.softmax(logits.float(), dim=-1)
    # The case: a padding token's (uniform) score beats some real token's second choice.
    second = scores[real].topk(K, dim=1).values[:, 1]
    assert float(second.min()) < float(scores[pad].max())
    v_probs, v_map = results["pad_vanilla"]
    t_probs, t_map, _, _ = results["pad_topk"]
    assert torch.equal(t_map, v_map) and torch.equal(t_probs, v_probs), "topk must stay Megatron's routing"
    assert torch.all(v_map[pad].sum(1) == K), "Megatron's top-k routes padding tokens too (unchanged)"
    expected = {
        "drop": P.capacity_drop(scores[real], K, 1.0, normalize=True)[1],
        "reroute": P.capacity_reroute(scores[real], K, 1.0, rounds=2, normalize=True)[1],
        "laser": P.laser(scores[real], K, 0.9, 0.3, 4, normalize=True)[1],
    }
    for name in ("drop", "reroute", "expanded", "laser"):
        probs, routing_map, unmasked, local = results[f"pad_{name}"]
        assert not torch.any(routing_map[pad]) and torch.all(probs[pad] == 0), f"{name}: a padding token was routed"
        if name == "expanded":
            want = P.expanded_drop(scores[real], K, 1.0, local, normalize=True)[1]
        else:
            want = expected[name]
        assert torch.equal(routing_map[real], want), f"{name}: real tokens not routed as without the padding"
        if name != "laser":
            # Without the mask the padding would have taken capacity from real tokens.
            assert not torch.equal(unmasked[real], routing_map[real]), f"{name}: the case tests nothing"


def test_empty_batch_gate_has_the_router_dtype(results) -> None:
    assert results["empty_fp32"] == torch.float32
    assert results["empty_fp64"] == torch.float64
    assert results["empty_None"] == torch.bfloat16  # no router dtype: the input's


def test_the_router_makes_no_host_sync_on_the_device_path(results, record_property) -> None:
    """Issue 12, item 2, through CapawareRouter.routing (Megatron's own top-k included) at
    T=2048, E=64, k=8 with the score check and stats off: no host sync for any router, also
    with padding and group-limited routing. Op counts are printed and recorded, not asserted."""
    failures = []
    for key, (syncs, ops, sites) in results["router_counts"].items():
        print(f"router, device path: {key:45s} syncs={syncs} ops={ops}")
        record_property(f"router:{key}:ops", ops)
        if syncs:
            failures.append(f"{key}: {syncs} syncs at {sites}")
    assert not failures, failures
