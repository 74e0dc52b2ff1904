"""Hugging Face side of the conversion tests and the functions their spawned ranks run.

The tiny models are built from ``transformers``' own config classes with
random weights (nothing is downloaded). DeepSeek-MoE (V1, ``model_type
"deepseek"``) has no class in ``transformers``: its reference is a
``LlamaForCausalLM`` (V1's attention is Llama's) whose MLPs from
``first_k_dense_replace`` on are ``transformers``' own ``DeepseekV2Moe``
(V1's MoE block: softmax gate, greedy top-k, no normalisation, shared experts),
written to disk under V1's tensor names and config keys.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from megatron_capaware import parallel

VOCAB = 96
SEQ = 32
BATCH = 4  # sequences; EP=2 runs give each rank BATCH // 2
GAMMA = 0.5


# --------------------------------------------------------------------------- HF models


def _common(**kw: Any) -> Dict[str, Any]:
    base = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=False,
    )
    base.update(kw)
    return base


def hf_config(family: str):
    import transformers

    if family == "mixtral":
        return transformers.MixtralConfig(**_common(
            intermediate_size=24, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ))
    if family == "qwen2_moe":  # Qwen2-57B style: renormalised top-k, a dense layer
        return transformers.Qwen2MoeConfig(**_common(
            intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
            mlp_only_layers=[1], rms_norm_eps=1e-6,
        ))
    if family == "qwen1.5_moe":  # Qwen1.5-MoE: same class, norm_topk_prob=False, all MoE
        return transformers.Qwen2MoeConfig(**_common(
            intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_key_value_heads=4, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
            rms_norm_eps=1e-6, tie_word_embeddings=True,
        ))
    if family == "olmoe":
        return transformers.OlmoeConfig(**_common(
            intermediate_size=16, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=False,
        ))
    if family == "deepseek_v2":  # V2-Lite style MLA (no query LoRA) + YaRN, V2 group routing
        return transformers.DeepseekV2Config(**_common(
            intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=4, n_routed_experts=8,
            n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
            q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                "original_max_position_embeddings": 32, "mscale": 0.707, "mscale_all_dim": 0.707,
                "beta_fast": 32, "beta_slow": 1,
            },
        ))
    if family == "deepseek_v3":  # sigmoid + expert bias + noaux_tc groups, query LoRA, halves rope
        return transformers.DeepseekV3Config(**_common(
            intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=4, n_routed_experts=8,
            n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, kv_lora_rank=16,
            q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=4,
            topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=False,
            rms_norm_eps=1e-6,
        ))
    raise ValueError(family)


def _randomize_router_extras(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.1)


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer (``<unk> <s> </s> w3 .. w{VOCAB-1}``) in Hugging Face format."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"]
    vocab = {name: i for i, name in enumerate(special)}
    vocab.update({f"w{i}": i for i in range(len(special), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))


def build_hf(family: str, folder: Path, *, seed: int = 0, max_shard_size: Optional[str] = None):
    """A tiny random HF model of ``family`` saved (safetensors + tokenizer) in ``folder``; returns it in eval mode."""
    import transformers

    torch.manual_seed(seed)
    if family == "deepseek":
        model = _build_deepseek_v1(folder, seed, max_shard_size)
    else:
        config = hf_config(family)
        config._attn_implementation = "eager"
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        _randomize_router_extras(model, seed + 1)
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(str(folder), safe_serialization=True, **kwargs)
    write_tokenizer(folder)
    return model.eval()


DEEPSEEK_V1 = dict(  # DeepSeek-MoE-16B's config keys, tiny sizes
    architectures=["DeepseekForCausalLM"], model_type="deepseek", vocab_size=VOCAB, hidden_size=32,
    intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, n_routed_experts=6, n_shared_experts=2, num_experts_per_tok=2,
    first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False, scoring_func="softmax",
    aux_loss_alpha=0.001, seq_aux=True, hidden_act="silu", max_position_embeddings=128,
    rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, attention_bias=False,
    tie_word_embeddings=False, torch_dtype="float32", bos_token_id=1, eos_token_id=2,
)


def _build_deepseek_v1(folder: Path, seed: int, max_shard_size: Optional[str]):
    import transformers
    from safetensors.torch import save_file
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    c = DEEPSEEK_V1
    llama = transformers.LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], max_position_embeddings=c["max_position_embeddings"],
        rms_norm_eps=c["rms_norm_eps"], rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]},
        tie_word_embeddings=False, initializer_range=0.1, attention_bias=False,
    )
    llama._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(llama).eval()
    moe_cfg = transformers.DeepseekV2Config(
        hidden_size=c["hidden_size"], moe_intermediate_size=c["moe_intermediate_size"],
        n_routed_experts=c["n_routed_experts"], n_shared_experts=c["n_shared_experts"],
        num_experts_per_tok=c["num_experts_per_tok"], topk_method="greedy", routed_scaling_factor=1.0,
        norm_topk_prob=False, hidden_act="silu",
    )
    g = torch.Generator().manual_seed(seed + 7)
    for i in range(c["first_k_dense_replace"], c["num_hidden_layers"]):
        moe = DeepseekV2Moe(moe_cfg)
        with torch.no_grad():
            for p in moe.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.model.layers[i].mlp = moe
    model.eval()
    # V1's tensor names: experts one by one, gate_proj / up_proj / down_proj.
    tensors: Dict[str, torch.Tensor] = {}
    inter = c["moe_intermediate_size"]
    for name, value in model.state_dict().items():
        if ".mlp.experts.gate_up_proj" in name:
            prefix = name[: -len("gate_up_proj")]
            for e in range(value.shape[0]):
                tensors[f"{prefix}{e}.gate_proj.weight"] = value[e, :inter].clone()
                tensors[f"{prefix}{e}.up_proj.weight"] = value[e, inter:].clone()
        elif ".mlp.experts.down_proj" in name:
            prefix = name[: -len("down_proj")]
            for e in range(value.shape[0]):
                tensors[f"{prefix}{e}.down_proj.weight"] = value[e].clone()
        else:
            tensors[name] = value.clone()
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2:]] if max_shard_size else [names]
    weight_map = {}
    for n, shard in enumerate(shards):
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        save_file({k: tensors[k].contiguous() for k in shard}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(c, indent=2))
    return model


# --------------------------------------------------------------------------- HF references


def token_batch(seed: int = 1234) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean next-token NLL) over all sequences, in float64."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return math.exp(nll.mean().item())


def _gates(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The MoE gates of a transformers model (they return logits, top-k weights, top-k indices)."""
    return [m for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]


class HFCapacityDrop:
    """An independent capacity drop written into a transformers model's gates.

    docs/routers.md: over the whole forward batch (T tokens), ``C = ceil(gamma * T * k / E)``;
    each expert keeps its ``C`` assignments with the highest router probability
    ``s[t, e]`` (softmax over all experts; sigmoid for sigmoid gates) and drops the
    rest (weight 0); the kept weights stay what the model's own gate made them
    (its normalisation and scaling), survivors are not renormalised.
    """

    def __init__(self, model: torch.nn.Module, gamma: float, sigmoid: bool = False) -> None:
        self.gamma, self.sigmoid = gamma, sigmoid
        self.dropped: List[int] = []
        self.assignments: List[int] = []
        self.max_load: List[int] = []
        self.capacity: List[int] = []
        self._originals = []
        for gate in _gates(model):
            self._originals.append((gate, gate.forward))
            gate.forward = self._wrap(gate.forward)

    def _wrap(self, forward):
        def gated(hidden_states):
            logits, weights, indices = forward(hidden_states)
            logits32 = logits.float()
            s = torch.sigmoid(logits32) if self.sigmoid else torch.softmax(logits32, dim=-1)
            tokens, k = indices.shape
            experts = s.shape[-1]
            capacity = math.ceil(self.gamma * tokens * k / experts)
            keep = torch.zeros_like(indices, dtype=torch.bool)
            loads = []
            for e in range(experts):
                t_idx, slot = (indices == e).nonzero(as_tuple=True)
                order = torch.argsort(s[t_idx, e], descending=True, stable=True)[:capacity]
                keep[t_idx[order], slot[order]] = True
                loads.append(len(order))
            self.dropped.append(int((~keep).sum()))
            self.assignments.append(tokens * k)
            self.max_load.append(max(loads))
            self.capacity.append(capacity)
            return logits, torch.where(keep, weights, torch.zeros_like(weights)), indices

        return gated

    def remove(self) -> None:
        for gate, forward in self._originals:
            gate.forward = forward


def hf_reference(model: torch.nn.Module, ids: torch.Tensor, gamma: float, sigmoid: bool) -> Dict[str, Any]:
    with torch.no_grad():
        logits = model(ids).logits.float()
        drop = HFCapacityDrop(model, gamma, sigmoid)
        try:
            drop_logits = model(ids).logits.float()
        finally:
            drop.remove()
    return dict(logits=logits, drop_logits=drop_logits, dropped=drop.dropped, assignments=drop.assignments,
                max_load=drop.max_load, capacity=drop.capacity)


# --------------------------------------------------------------------------- Megatron ranks


def _forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, attention_mask=None).float()


def _run_routers(ckpt: str, ids: torch.Tensor, sizes: "parallel.ParallelSizes", gamma: float) -> Dict[str, Any]:
    from megatron_capaware.adapters import collect_stats, install_capaware_routers
    from megatron_capaware.models.checkpoint import load_model
    from megatron_capaware.config import CapawareConfig

    parallel.init_model_parallel(sizes)
    parallel.set_seed(0)
    model, _ = load_model(ckpt, tensor_parallel=sizes.tensor_parallel, expert_parallel=sizes.expert_parallel)
    out: Dict[str, Any] = {"topk": _forward(model, ids)}
    install_capaware_routers(model, CapawareConfig("capacity-drop", gamma=gamma))
    out["drop"] = _forward(model, ids)
    stats = collect_stats(model)
    out["max_load"] = [int(stats[n].global_loads[-1].max()) for n in sorted(stats)]
    out["capacity"] = [int(stats[n].capacity[-1]) for n in sorted(stats)]
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    return out


def convert(spec: Dict[str, Any]) -> None:
    """Convert spec["hf"] to spec["ckpt"] on the calling ranks (the CLI's main() when spec["cli"])."""
    from megatron_capaware.models.hf import convert as checkpoints

    if spec.get("cli"):
        rc = checkpoints.main([spec["hf"], spec["ckpt"], "--quiet"])
        if rc != 0:
            raise RuntimeError(f"capaware-convert exited with {rc}")
    else:
        checkpoints.convert_checkpoint(spec["hf"], spec["ckpt"], progress=False)


def convert_alone(spec: Dict[str, Any]) -> None:
    """One rank: the single-process conversion."""
    convert(spec)
    parallel.destroy()


def run_layouts(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Two ranks: convert at EP=2 if asked, then load and run at EP=1, EP=2 and TP=2.

    EP=1: both ranks hold every expert and run the whole batch (as one rank would).
    EP=2: each rank runs its half of the batch; capacity is global over both.
    TP=2: both ranks run the whole batch, attention heads and experts' FFNs split.
    """
    import torch.distributed as dist

    parallel.init_distributed()
    if spec.get("convert"):
        convert(spec)
    rank = dist.get_rank()
    ids = spec["ids"]
    half = ids.shape[0] // 2
    out = {
        "ep1": _run_routers(spec["ckpt"], ids, parallel.ParallelSizes(), spec["gamma"]),
        "ep2": _run_routers(spec["ckpt"], ids[rank * half:(rank + 1) * half],
                            parallel.ParallelSizes(expert_parallel=2), spec["gamma"]),
        "tp2": _run_routers(spec["ckpt"], ids, parallel.ParallelSizes(tensor_parallel=2), spec["gamma"]),
    }
    parallel.destroy()
    return out
