"""Functions run on spawned gloo ranks by the multi-rank tests (module level: picklable)."""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from megatron_capaware import parallel


def deterministic_tokens(num_tokens: int, hidden: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, hidden, generator=g)


def deterministic_weights(num_experts: int, hidden: int, ffn: int, seed: int) -> Dict[str, torch.Tensor]:
    """Router and per-expert weights, identical on every rank whatever the layout."""
    g = torch.Generator().manual_seed(seed)
    weights = {"router": torch.randn(num_experts, hidden, generator=g) * 0.5}
    for e in range(num_experts):
        weights[f"fc1.{e}"] = torch.randn(ffn, hidden, generator=g) * hidden ** -0.5
        weights[f"fc2.{e}"] = torch.randn(hidden, ffn, generator=g) * ffn ** -0.5
    return weights


def build_moe_layer(spec: Dict[str, Any]):
    """A standalone Megatron MoELayer (SequentialMLP experts, non-gated) with fixed weights."""
    from megatron_capaware.models.builder import MoEModelArgs, build_moe_layer as build_layer
    from megatron_capaware.models.builder import build_transformer_config
    from megatron.core import parallel_state as ps

    E, H, F = spec["experts"], spec["hidden"], spec["ffn"]
    args = MoEModelArgs(
        num_layers=1, hidden_size=H, num_attention_heads=4, num_moe_experts=E,
        moe_router_topk=spec["k"], moe_ffn_hidden_size=F, vocab_size=8, max_sequence_length=8,
        gated_linear_unit=False, activation="gelu",
    )
    config = build_transformer_config(
        args, tensor_parallel=spec["tp"], expert_parallel=spec["ep"],
        expert_tensor_parallel=spec["etp"], dispatcher=spec["dispatcher"],
        sequence_parallel=spec.get("sequence_parallel", False),
    )
    layer = build_layer(config, use_te=False)
    weights = deterministic_weights(E, H, F, spec["seed"])
    etp, etp_rank = spec["etp"], ps.get_expert_tensor_parallel_rank()
    shard = F // etp
    with torch.no_grad():
        layer.router.weight.copy_(weights["router"])
        for i, e in enumerate(layer.local_expert_indices):
            expert = layer.experts.local_experts[i]
            expert.linear_fc1.weight.copy_(weights[f"fc1.{e}"][etp_rank * shard:(etp_rank + 1) * shard])
            expert.linear_fc2.weight.copy_(weights[f"fc2.{e}"][:, etp_rank * shard:(etp_rank + 1) * shard])
    return layer.eval()


def moe_layer_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Route this rank's slice of a fixed token set through a MoE layer under each router config.

    ``spec["tokens_per_slice"]`` gives the token count of each attention-data-
    parallel slice; TP ranks of a slice hold the same tokens (copies, no SP).
    """
    from megatron.core import parallel_state as ps
    from megatron_capaware.adapters import collect_stats, install_capaware_routers
    from megatron_capaware.config import CapawareConfig

    parallel.init_model_parallel(
        parallel.ParallelSizes(spec["tp"], spec["ep"], spec["etp"]),
        timeout_s=float(spec.get("collective_timeout_s", 120)),
    )
    layer = build_moe_layer(spec)
    dp_rank = ps.get_data_parallel_rank()
    sizes: List[int] = spec["tokens_per_slice"]
    start = sum(sizes[:dp_rank])
    tokens = deterministic_tokens(sum(sizes), spec["hidden"], spec["seed"] + 1)[start:start + sizes[dp_rank]]
    hidden = tokens.unsqueeze(1)  # [S, B=1, H]: token order = position order
    captured: Dict[str, Any] = {}
    layer.router.register_forward_hook(lambda mod, inp, out: captured.update(probs=out[0], map=out[1]))
    import torch.distributed as dist

    world = dist.get_world_size()
    dp_of_rank = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(dp_of_rank, torch.tensor([dp_rank]))
    dp_of_rank = [int(x) for x in dp_of_rank]
    members = dist.get_process_group_ranks(layer.token_dispatcher.tp_ep_group)
    domain_slices: List[int] = []
    for r in members:
        if dp_of_rank[r] not in domain_slices:
            domain_slices.append(dp_of_rank[r])
    if 0 in sizes:
        # Vanilla Megatron's gate fails on a rank with no tokens; the capaware
        # topk router (equal to vanilla elsewhere) handles it.
        install_capaware_routers(layer, CapawareConfig("topk"))
    with torch.no_grad():
        scores = torch.softmax(layer.router.gating(hidden).view(-1, spec["experts"]).float(), dim=-1)
    results: Dict[str, Any] = {
        "scores": scores,
        "domain_slices": domain_slices,
        "rank": torch.distributed.get_rank(), "dp_rank": dp_rank, "tp_rank": ps.get_tensor_model_parallel_rank(),
        "ep_rank": ps.get_expert_model_parallel_rank(), "local_experts": list(layer.local_expert_indices),
        "routers": {},
    }
    with torch.no_grad():
        vanilla_out, _ = layer(hidden)
        results["vanilla_map"] = captured["map"].clone()
        results["vanilla_probs"] = captured["probs"].clone()
        results["vanilla_out"] = vanilla_out.clone()
        for name, kwargs in spec["routers"].items():
            install_capaware_routers(layer, CapawareConfig(**kwargs))
            out, _ = layer(hidden)
            stats = collect_stats(layer)[1]
            results["routers"][name] = {
                "map": captured["map"].clone(),
                "probs": captured["probs"].clone(),
                "out": out.clone(),
                "received": stats.received[-1].clone() if stats.received else None,
                "global_loads": stats.global_loads[-1].clone(),
                "capacity": stats.capacity[-1],
                "duplication": stats.duplication,
            }
            stats.reset()
    parallel.destroy()
    return results


TINY_GPT = dict(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=8, moe_router_topk=2,
    moe_ffn_hidden_size=32, vocab_size=128, max_sequence_length=64,
)


def gpt_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Tiny GPT MoE at EP=spec['ep']: vanilla vs swapped routers vs spec-built, and checkpoints."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_capaware.adapters import capaware_spec, collect_stats, install_capaware_routers
    from megatron_capaware.models.checkpoint import load_weights, save_checkpoint
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.models.builder import MoEModelArgs, build_gpt_model, build_transformer_config

    ep = spec["ep"]
    parallel.init_model_parallel(parallel.ParallelSizes(expert_parallel=ep))
    parallel.set_seed(7)
    args = MoEModelArgs(**TINY_GPT)
    config = build_transformer_config(args, expert_parallel=ep, dispatcher=spec["dispatcher"])
    vanilla = build_gpt_model(args, config)
    save_checkpoint(vanilla, spec["ckpt"], args)
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, args.vocab_size, (2, 32), generator=g)
    pos = torch.arange(32).unsqueeze(0).expand(2, 32)
    out: Dict[str, Any] = {"state_keys_vanilla": sorted(vanilla.state_dict().keys())}
    with torch.no_grad():
        out["vanilla"] = vanilla(ids, pos, attention_mask=None)
        for kwargs in spec["routers"]:
            cfg = CapawareConfig(**kwargs)
            install_capaware_routers(vanilla, cfg)
            out[cfg.describe()] = vanilla(ids, pos, attention_mask=None)
            out[cfg.describe() + ":layers"] = sorted(collect_stats(vanilla))
        # A model built with capaware specs from the start loads the vanilla checkpoint.
        block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
        built = GPTModel(
            config=config, transformer_layer_spec=capaware_spec(block, CapawareConfig(**spec["routers"][1])),
            vocab_size=args.vocab_size, max_sequence_length=args.max_sequence_length,
            share_embeddings_and_output_weights=True, position_embedding_type="rope", parallel_output=False,
        ).eval()
        out["state_keys_capaware"] = sorted(built.state_dict().keys())
        load_weights(built, spec["ckpt"], args)
        out["spec_built"] = built(ids, pos, attention_mask=None)
        out["spec_built_router_types"] = sorted({type(m).__name__ for m in built.modules() if "Router" in type(m).__name__})
        # ... and a capaware model's checkpoint loads back into a vanilla model.
        save_checkpoint(built, spec["ckpt"] + "-capaware", args)
        fresh = build_gpt_model(args, config)
        load_weights(fresh, spec["ckpt"] + "-capaware", args)
        out["roundtrip"] = fresh(ids, pos, attention_mask=None)
    parallel.destroy()
    return out


def te_style_keys_worker(ckpt: str) -> Dict[str, Any]:
    """Load a local-spec checkpoint into a model whose norms use TE-style separate keys."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_capaware.models.checkpoint import load_weights, save_checkpoint
    from megatron_capaware.models.builder import MoEModelArgs, build_gpt_model, build_transformer_config

    parallel.init_model_parallel(parallel.ParallelSizes())
    parallel.set_seed(5)
    args = MoEModelArgs(**TINY_GPT)
    config = build_transformer_config(args)
    saved = build_gpt_model(args, config)
    save_checkpoint(saved, ckpt, args)
    # The Transformer Engine spec keeps an MoE layer's pre-MLP norm as its own module
    # (key "pre_mlp_layernorm.weight"); emulate that naming on CPU by dropping the map.
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    for layer_spec in block.layer_specs:
        layer_spec.submodules.sharded_state_dict_keys_map = {}
    te_style = GPTModel(config=config, transformer_layer_spec=block, vocab_size=args.vocab_size,
                        max_sequence_length=args.max_sequence_length, share_embeddings_and_output_weights=True,
                        position_embedding_type="rope", parallel_output=False).eval()
    keys = [t.key for t in te_style.sharded_state_dict().values() if hasattr(t, "key")]
    load_weights(te_style, ckpt, args)
    ids = torch.randint(0, args.vocab_size, (1, 16))
    pos = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        same = torch.equal(te_style(ids, pos, attention_mask=None), saved(ids, pos, attention_mask=None))
    parallel.destroy()
    return {"same_logits": same, "te_style_keys": keys}
