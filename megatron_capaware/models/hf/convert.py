"""Convert Hugging Face MoE checkpoints to Megatron dist checkpoints (``capaware-convert``).

Supported ``model_type`` values (config.json):

=================  ==========================================================
``mixtral``        Mixtral: softmax over the top-k logits (renormalised top-k)
``qwen2_moe``      Qwen2-MoE and Qwen1.5-MoE: ``norm_topk_prob``, sigmoid-gated
                   shared expert, ``mlp_only_layers`` / ``decoder_sparse_step``
``olmoe``          OLMoE: ``norm_topk_prob``, q/k RMSNorm over all heads
``deepseek``       DeepSeek-MoE (V1, remote code): shared experts,
                   ``first_k_dense_replace`` dense layers, ``norm_topk_prob``
``deepseek_v2``    DeepSeek-V2 / V2-Lite: as V1 plus multi-latent attention
                   (MLA), YaRN rope, ``routed_scaling_factor``, group-limited
                   routing (``n_group`` / ``topk_group``)
``deepseek_v3``    DeepSeek-V3 style: sigmoid scores, expert bias
                   (``e_score_correction_bias``), group-limited routing
=================  ==========================================================

The result is Megatron-LM's release layout written by
:func:`megatron_capaware.models.checkpoint.save_checkpoint` (``release/`` torch_dist
files, ``capaware_model.json`` with the :class:`MoEModelArgs`, ``tokenizer/``
with the Hugging Face tokenizer files), which
:func:`megatron_capaware.models.checkpoint.load_model` loads at any TP / EP that
divides the sizes.

Memory: the Megatron model is built once, in the checkpoint's dtype without
random initialisation, and filled one Hugging Face tensor at a time
(``safetensors.safe_open``, memory-mapped); no second copy of the model is
ever held. In one process (TP=1 / EP=1) peak memory is about the model's
size in its dtype. Under ``torchrun --nproc-per-node N`` the experts are
split over N ranks (EP=N): each rank holds and reads only its experts plus
the non-expert weights, so N machines (or N processes on one large one) can
convert a model too big for one.

Every check that needs no weights runs first (``--check-only`` stops there):
an unknown ``model_type``, missing config keys, an option this converter
cannot express exactly in Megatron, and missing, unexpected or misshapen
tensors all raise :class:`ConversionError` naming what is wrong.
"""

from __future__ import annotations

from megatron_capaware.errors import ConversionError  # noqa: F401 (defined there; re-exported)

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from megatron_capaware.models.builder import MoEModelArgs

from megatron_capaware._compat.cli import add_cli_flags, progress_enabled, run_cli
from megatron_capaware.policies.collectives import barrier

PROG = "capaware-convert"

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "olmoe", "deepseek", "deepseek_v2", "deepseek_v3")

# Files copied to CKPT/tokenizer/ when present in the Hugging Face folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# Tensors a checkpoint may carry that hold nothing the model needs.
_IGNORABLE = (re.compile(r"\.rotary_emb\.inv_freq$"),)

HF_CONFIG_COPY = "hf_config.json"



# --------------------------------------------------------------------------- config


class HFConfig:
    """A config.json read as a plain dict, with errors that name the missing key."""

    def __init__(self, data: Dict[str, Any], path: Union[str, Path] = "config.json") -> None:
        self.data = data
        self.path = str(path)

    @classmethod
    def read(cls, hf_dir: Union[str, Path]) -> "HFConfig":
        path = Path(hf_dir) / "config.json"
        if not Path(hf_dir).is_dir():
            raise ConversionError(f"{hf_dir} is not a directory (expected a Hugging Face checkpoint folder)")
        if not path.exists():
            raise ConversionError(f"{path} is missing: a Hugging Face checkpoint folder has a config.json")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConversionError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ConversionError(f"{path} does not hold a JSON object")
        return cls(data, path)

    @property
    def model_type(self) -> str:
        value = self.data.get("model_type")
        if not value:
            raise ConversionError(f"{self.path} has no 'model_type'; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        return str(value)

    def require(self, *keys: str) -> Any:
        missing = [k for k in keys if self.data.get(k) is None]
        if missing:
            raise ConversionError(
                f"{self.path} ({self.data.get('model_type')}) lacks required keys {missing}"
            )
        values = [self.data[k] for k in keys]
        return values[0] if len(values) == 1 else values

    def get(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def rope(self) -> Tuple[float, Optional[Dict[str, Any]]]:
        """``(rope_theta, scaling dict or None)`` from the v4 (rope_theta, rope_scaling) or v5 (rope_parameters) keys."""
        params = self.data.get("rope_parameters")
        scaling = self.data.get("rope_scaling")
        theta = self.data.get("rope_theta")
        if isinstance(params, dict):
            if theta is None:
                theta = params.get("rope_theta")
            if scaling is None:
                scaling = params
        if theta is None:
            theta = 10000.0  # every supported family's default
        if isinstance(scaling, dict):
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind in (None, "default"):
                scaling = None
            else:
                scaling = dict(scaling, rope_type=kind)
        elif scaling is not None:
            raise ConversionError(f"{self.path}: rope scaling {scaling!r} is not a dict")
        return float(theta), scaling

    def dtype(self) -> Optional[torch.dtype]:
        name = self.data.get("torch_dtype") or self.data.get("dtype")
        if name is None:
            return None
        return _DTYPES.get(str(name).replace("torch.", ""))


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- plan


@dataclass
class Piece:
    """One Hugging Face tensor copied into (rows of) one Megatron tensor.

    ``rows``: the Megatron rows (dim 0) that receive the Hugging Face tensor's
    rows in order; None: the whole Megatron tensor, same shape.
    """

    hf_name: str
    target: str
    hf_shape: Tuple[int, ...]
    rows: Optional[torch.Tensor] = None


@dataclass
class ConversionPlan:
    """What a conversion will do, computed from config.json alone."""

    model_type: str
    args: MoEModelArgs
    pieces: List[Piece]
    # Hugging Face tensors that are present but deliberately not converted, with why.
    skip: List[Tuple[re.Pattern, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def hf_names(self) -> List[str]:
        return [p.hf_name for p in self.pieces]


class _Builder:
    """Collects the pieces of one family's plan with the Llama-like parts shared by all."""

    def __init__(self, cfg: HFConfig) -> None:
        self.cfg = cfg
        self.pieces: List[Piece] = []
        self.notes: List[str] = []
        self.skip: List[Tuple[re.Pattern, str]] = []

    def add(self, hf_name: str, target: str, hf_shape: Sequence[int], rows: Optional[torch.Tensor] = None) -> None:
        self.pieces.append(Piece(hf_name, target, tuple(int(s) for s in hf_shape), rows))

    # --- shared parts

    def embeddings(self, vocab: int, hidden: int, tied: bool) -> None:
        self.add("model.embed_tokens.weight", "embedding.word_embeddings.weight", (vocab, hidden))
        self.add("model.norm.weight", "decoder.final_layernorm.weight", (hidden,))
        if tied:
            self.skip.append((re.compile(r"^lm_head\.weight$"), "tied to the embeddings"))
        else:
            self.add("lm_head.weight", "output_layer.weight", (vocab, hidden))

    def norms(self, i: int, hidden: int) -> None:
        src, dst = f"model.layers.{i}", f"decoder.layers.{i}"
        self.add(f"{src}.input_layernorm.weight", f"{dst}.input_layernorm.weight", (hidden,))
        self.add(f"{src}.post_attention_layernorm.weight", f"{dst}.pre_mlp_layernorm.weight", (hidden,))

    def attention(self, i: int, hidden: int, heads: int, groups: int, head_dim: int, qkv_bias: bool) -> None:
        """q/k/v/o projections into Megatron's fused ``linear_qkv`` (per group: its q heads, k, v)."""
        src, dst = f"model.layers.{i}.self_attn", f"decoder.layers.{i}.self_attention"
        per_group = heads // groups
        block = (per_group + 2) * head_dim
        q_rows = torch.cat([
            torch.arange(head_dim) + (h // per_group) * block + (h % per_group) * head_dim for h in range(heads)
        ])
        k_rows = torch.cat([torch.arange(head_dim) + g * block + per_group * head_dim for g in range(groups)])
        v_rows = k_rows + head_dim
        for name, rows, out in (("q_proj", q_rows, heads), ("k_proj", k_rows, groups), ("v_proj", v_rows, groups)):
            self.add(f"{src}.{name}.weight", f"{dst}.linear_qkv.weight", (out * head_dim, hidden), rows)
            if qkv_bias:
                self.add(f"{src}.{name}.bias", f"{dst}.linear_qkv.bias", (out * head_dim,), rows)
        self.add(f"{src}.o_proj.weight", f"{dst}.linear_proj.weight", (hidden, heads * head_dim))

    def gated_mlp(self, src: str, dst: str, hidden: int, ffn: int, names=("gate_proj", "up_proj", "down_proj")) -> None:
        gate, up, down = names
        self.add(f"{src}.{gate}.weight", f"{dst}.linear_fc1.weight", (ffn, hidden), torch.arange(ffn))
        self.add(f"{src}.{up}.weight", f"{dst}.linear_fc1.weight", (ffn, hidden), torch.arange(ffn, 2 * ffn))
        self.add(f"{src}.{down}.weight", f"{dst}.linear_fc2.weight", (hidden, ffn))

    def experts(self, i: int, prefix: str, num: int, hidden: int, ffn: int, names=("gate_proj", "up_proj", "down_proj")) -> None:
        for e in range(num):
            self.gated_mlp(
                f"model.layers.{i}.{prefix}.experts.{e}",
                f"decoder.layers.{i}.mlp.experts.local_experts.{e}",
                hidden, ffn, names,
            )

    def check_plain_rope(self, family: str) -> float:
        theta, scaling = self.cfg.rope()
        if scaling is not None:
            raise ConversionError(
                f"{family}: rope scaling {scaling.get('rope_type')!r} ({scaling}) is not supported by this "
                "converter for standard attention (Megatron's GPTModel rope has no such scaling); "
                "remove it only if you evaluate within the original context length"
            )
        return theta

    def check_silu(self, family: str) -> None:
        act = self.cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConversionError(f"{family}: hidden_act={act!r} is not supported (only silu gated MLPs)")


def _common_sizes(cfg: HFConfig) -> Dict[str, int]:
    vocab, hidden, layers, heads = cfg.require("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    groups = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim", None) or hidden // heads
    if heads % groups:
        raise ConversionError(f"{cfg.path}: num_attention_heads={heads} not divisible by num_key_value_heads={groups}")
    return dict(vocab=int(vocab), hidden=int(hidden), layers=int(layers), heads=int(heads), groups=int(groups),
                head_dim=int(head_dim))


def _hf_extra(cfg: HFConfig, plan_notes: List[str]) -> Dict[str, Any]:
    return {
        "tokenizer": "hf",
        "tokenizer_dir": "tokenizer",
        "hf_model_type": cfg.model_type,
        "hf_architectures": list(cfg.get("architectures", []) or []),
        "hf_config": HF_CONFIG_COPY,
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "pad_token_id": cfg.get("pad_token_id"),
        "notes": list(plan_notes),
    }


def _plan_mixtral(cfg: HFConfig) -> ConversionPlan:
    b = _Builder(cfg)
    s = _common_sizes(cfg)
    experts, topk, ffn = cfg.require("num_local_experts", "num_experts_per_tok", "intermediate_size")
    b.check_silu("mixtral")
    theta = b.check_plain_rope("mixtral")
    window = cfg.get("sliding_window")
    max_pos = int(cfg.get("max_position_embeddings", 32768))
    if window is not None and int(window) < max_pos:
        b.notes.append(
            f"sliding_window={window}: Megatron attends to the whole causal context, so sequences longer "
            f"than {window} tokens differ from the Hugging Face model; shorter ones are exact"
        )
    tied = bool(cfg.get("tie_word_embeddings", False))
    b.embeddings(s["vocab"], s["hidden"], tied)
    for i in range(s["layers"]):
        b.norms(i, s["hidden"])
        b.attention(i, s["hidden"], s["heads"], s["groups"], s["head_dim"], qkv_bias=False)
        b.add(f"model.layers.{i}.block_sparse_moe.gate.weight", f"decoder.layers.{i}.mlp.router.weight",
              (experts, s["hidden"]))
        b.experts(i, "block_sparse_moe", experts, s["hidden"], ffn, names=("w1", "w3", "w2"))
    args = MoEModelArgs(
        num_layers=s["layers"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
        num_query_groups=s["groups"], kv_channels=s["head_dim"], num_moe_experts=int(experts),
        moe_router_topk=int(topk), moe_ffn_hidden_size=int(ffn), vocab_size=s["vocab"],
        max_sequence_length=max_pos, moe_router_score_function="softmax",
        # softmax over the k best logits == softmax over all, renormalised over the top k
        moe_router_pre_softmax=False, layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-5)),
        rotary_base=theta, share_embeddings_and_output_weights=tied, family="mixtral",
    )
    return ConversionPlan("mixtral", args, b.pieces, b.skip, b.notes)


def _moe_layers_qwen(cfg: HFConfig, layers: int) -> List[int]:
    step = int(cfg.get("decoder_sparse_step", 1))
    only_mlp = set(cfg.get("mlp_only_layers", []) or [])
    experts = int(cfg.require("num_experts"))
    return [int(i not in only_mlp and experts > 0 and (i + 1) % step == 0) for i in range(layers)]


def _plan_qwen2_moe(cfg: HFConfig) -> ConversionPlan:
    b = _Builder(cfg)
    s = _common_sizes(cfg)
    experts, topk, moe_ffn, shared_ffn = cfg.require(
        "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"
    )
    b.check_silu("qwen2_moe")
    theta = b.check_plain_rope("qwen2_moe")
    if cfg.get("use_sliding_window", False):
        raise ConversionError(
            "qwen2_moe: use_sliding_window=true is not supported (Megatron attends to the whole context)"
        )
    if int(shared_ffn) <= 0:
        raise ConversionError("qwen2_moe: shared_expert_intermediate_size must be > 0")
    pattern = _moe_layers_qwen(cfg, s["layers"])
    dense_ffn = int(cfg.get("intermediate_size", 0) or 0)
    if 0 in pattern and not dense_ffn:
        raise ConversionError(f"{cfg.path}: dense layers (mlp_only_layers / decoder_sparse_step) need intermediate_size")
    norm = bool(cfg.get("norm_topk_prob", False))
    qkv_bias = bool(cfg.get("qkv_bias", True))
    tied = bool(cfg.get("tie_word_embeddings", False))
    b.embeddings(s["vocab"], s["hidden"], tied)
    for i in range(s["layers"]):
        b.norms(i, s["hidden"])
        b.attention(i, s["hidden"], s["heads"], s["groups"], s["head_dim"], qkv_bias=qkv_bias)
        src, dst = f"model.layers.{i}.mlp", f"decoder.layers.{i}.mlp"
        if pattern[i]:
            b.add(f"{src}.gate.weight", f"{dst}.router.weight", (experts, s["hidden"]))
            b.experts(i, "mlp", experts, s["hidden"], moe_ffn)
            b.gated_mlp(f"{src}.shared_expert", f"{dst}.shared_experts", s["hidden"], shared_ffn)
            b.add(f"{src}.shared_expert_gate.weight", f"{dst}.shared_experts.gate_weight", (1, s["hidden"]))
        else:
            b.gated_mlp(src, dst, s["hidden"], dense_ffn)
    args = MoEModelArgs(
        num_layers=s["layers"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
        num_query_groups=s["groups"], kv_channels=s["head_dim"], num_moe_experts=int(experts),
        moe_router_topk=int(topk), moe_ffn_hidden_size=int(moe_ffn), vocab_size=s["vocab"],
        max_sequence_length=int(cfg.get("max_position_embeddings", 32768)),
        ffn_hidden_size=dense_ffn or None,
        moe_layer_freq=pattern if 0 in pattern else 1,
        moe_shared_expert_intermediate_size=int(shared_ffn), moe_shared_expert_gate=True,
        moe_router_score_function="softmax",
        # norm_topk_prob: softmax over the top-k logits (renormalised); else softmax over all, then top-k
        moe_router_pre_softmax=not norm, add_qkv_bias=qkv_bias,
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)), rotary_base=theta,
        share_embeddings_and_output_weights=tied, family="qwen2_moe",
    )
    return ConversionPlan("qwen2_moe", args, b.pieces, b.skip, b.notes)


def _plan_olmoe(cfg: HFConfig) -> ConversionPlan:
    b = _Builder(cfg)
    s = _common_sizes(cfg)
    experts, topk, ffn = cfg.require("num_experts", "num_experts_per_tok", "intermediate_size")
    b.check_silu("olmoe")
    theta = b.check_plain_rope("olmoe")
    if cfg.get("clip_qkv") is not None:
        raise ConversionError(
            f"olmoe: clip_qkv={cfg.get('clip_qkv')} is not supported (Megatron's attention has no q/k/v clamp)"
        )
    if cfg.get("attention_bias", False):
        raise ConversionError("olmoe: attention_bias=true is not supported (Megatron adds biases to every linear)")
    norm = bool(cfg.get("norm_topk_prob", False))
    tied = bool(cfg.get("tie_word_embeddings", False))
    b.embeddings(s["vocab"], s["hidden"], tied)
    for i in range(s["layers"]):
        b.norms(i, s["hidden"])
        b.attention(i, s["hidden"], s["heads"], s["groups"], s["head_dim"], qkv_bias=False)
        src, dst = f"model.layers.{i}.self_attn", f"decoder.layers.{i}.self_attention"
        b.add(f"{src}.q_norm.weight", f"{dst}.q_layernorm.weight", (s["heads"] * s["head_dim"],))
        b.add(f"{src}.k_norm.weight", f"{dst}.k_layernorm.weight", (s["groups"] * s["head_dim"],))
        b.add(f"model.layers.{i}.mlp.gate.weight", f"decoder.layers.{i}.mlp.router.weight", (experts, s["hidden"]))
        b.experts(i, "mlp", experts, s["hidden"], ffn)
    b.notes.append(
        "q_norm/k_norm normalise all heads together: converted to megatron_capaware.models.hf.layers."
        "AllHeadsQNorm/AllHeadsKNorm (qk_norm_scope='all_heads'), exact at any TP dividing the kv heads"
    )
    args = MoEModelArgs(
        num_layers=s["layers"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
        num_query_groups=s["groups"], kv_channels=s["head_dim"], num_moe_experts=int(experts),
        moe_router_topk=int(topk), moe_ffn_hidden_size=int(ffn), vocab_size=s["vocab"],
        max_sequence_length=int(cfg.get("max_position_embeddings", 4096)),
        moe_router_score_function="softmax", moe_router_pre_softmax=not norm,
        qk_layernorm=True, qk_norm_scope="all_heads",
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-5)), rotary_base=theta,
        share_embeddings_and_output_weights=tied, family="olmoe",
    )
    return ConversionPlan("olmoe", args, b.pieces, b.skip, b.notes)


def _deepseek_moe_layers(cfg: HFConfig, layers: int) -> List[int]:
    first_dense = int(cfg.get("first_k_dense_replace", 0))
    freq = int(cfg.get("moe_layer_freq", 1))
    return [int(i >= first_dense and i % freq == 0) for i in range(layers)]


def _deepseek_routing(cfg: HFConfig, family: str, topk: int, experts: int) -> Tuple[Dict[str, Any], List[str]]:
    """Megatron router fields reproducing a DeepSeek gate exactly, or ConversionError."""
    notes: List[str] = []
    scoring = cfg.get("scoring_func", "sigmoid" if family == "deepseek_v3" else "softmax")
    method = cfg.get("topk_method", "noaux_tc" if family == "deepseek_v3" else "greedy")
    norm = bool(cfg.get("norm_topk_prob", family == "deepseek_v3"))
    scale = float(cfg.get("routed_scaling_factor", 1.0)) if family != "deepseek" else 1.0
    groups = cfg.get("n_group")
    chosen = cfg.get("topk_group")
    out: Dict[str, Any] = {}
    if scoring == "softmax":
        if method not in ("greedy", "group_limited_greedy"):
            raise ConversionError(f"{family}: topk_method={method!r} with softmax scores is not supported")
        out["moe_router_score_function"] = "softmax"
        if norm and topk > 1:
            # DeepSeek's own gate: normalise the top-k weights and do not scale them.
            out["moe_router_pre_softmax"] = False
            if scale != 1.0:
                notes.append(
                    f"norm_topk_prob=true: routed_scaling_factor={scale} is not applied (DeepSeek's "
                    "reference gate scales only unnormalised weights; transformers' DeepseekV2 differs)"
                )
        else:
            out["moe_router_pre_softmax"] = True
            out["moe_router_topk_scaling_factor"] = scale if scale != 1.0 else None
        if method == "group_limited_greedy" and groups and int(groups) > 1:
            groups, chosen = int(groups), int(chosen or 0)
            if not chosen or topk // chosen != 1:
                raise ConversionError(
                    f"{family}: topk_method=group_limited_greedy ranks groups by their best expert; "
                    f"Megatron ranks them by the sum of their top (top_k // topk_group) = "
                    f"{topk // max(chosen, 1)} experts, which differs unless num_experts_per_tok "
                    f"({topk}) // topk_group ({chosen}) == 1; not convertible exactly"
                )
            out["moe_router_num_groups"], out["moe_router_group_topk"] = groups, chosen
    elif scoring == "sigmoid":
        if method != "noaux_tc":
            raise ConversionError(f"{family}: scoring_func=sigmoid needs topk_method=noaux_tc, got {method!r}")
        if topk > 1 and not norm:
            raise ConversionError(
                f"{family}: sigmoid scores with norm_topk_prob=false: Megatron's sigmoid router always "
                "normalises the top-k weights (k > 1); not convertible exactly"
            )
        out["moe_router_score_function"] = "sigmoid"
        out["moe_router_enable_expert_bias"] = True
        out["moe_router_topk_scaling_factor"] = scale if scale != 1.0 else None
        if groups and int(groups) > 1:
            groups, chosen = int(groups), int(chosen or 0)
            if not chosen or topk // chosen != 2:
                raise ConversionError(
                    f"{family}: noaux_tc ranks groups by the sum of their top-2 experts; Megatron sums the "
                    f"top (top_k // topk_group) = {topk // max(chosen, 1)}; equal only when "
                    f"num_experts_per_tok ({topk}) // topk_group ({chosen}) == 2; not convertible exactly"
                )
            out["moe_router_num_groups"], out["moe_router_group_topk"] = groups, chosen
    else:
        raise ConversionError(f"{family}: scoring_func={scoring!r} is not supported (softmax or sigmoid)")
    if out.get("moe_router_num_groups") and experts % out["moe_router_num_groups"]:
        raise ConversionError(f"{family}: n_routed_experts={experts} not divisible by n_group={groups}")
    return out, notes


def _mla_rope(cfg: HFConfig, family: str) -> Tuple[Dict[str, Any], float]:
    theta, scaling = cfg.rope()
    if scaling is None:
        return dict(rope_type="rope", rotary_base=theta, rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0), theta
    kind = scaling["rope_type"]
    if kind != "yarn":
        raise ConversionError(f"{family}: rope scaling {kind!r} is not supported with MLA (only yarn)")
    if scaling.get("attention_factor") is not None:
        raise ConversionError(f"{family}: yarn attention_factor is not supported (set mscale/mscale_all_dim)")
    if scaling.get("truncate", True) is False:
        raise ConversionError(f"{family}: yarn truncate=false is not supported")
    original = scaling.get("original_max_position_embeddings")
    if original is None:
        raise ConversionError(f"{family}: yarn rope scaling lacks original_max_position_embeddings")
    factor = scaling.get("factor")
    if factor is None:
        factor = float(cfg.require("max_position_embeddings")) / float(original)
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale_all and not mscale:
        raise ConversionError(f"{family}: yarn with mscale_all_dim but no mscale is not supported")
    if not (mscale and mscale_all):
        mscale, mscale_all = 1.0, 0.0
    return dict(
        rope_type="yarn", rotary_base=theta, rotary_scaling_factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(scaling.get("beta_fast") or 32), beta_slow=float(scaling.get("beta_slow") or 1),
        mscale=float(mscale), mscale_all_dim=float(mscale_all),
    ), theta


def _interleave(dim: int) -> torch.Tensor:
    """Megatron row of each Hugging Face rope row when Hugging Face rotates halves.

    Megatron's MLA expects DeepSeek's interleaved rope layout (pairs (2i, 2i+1))
    and de-interleaves it itself; a checkpoint whose rope rows rotate halves
    (i, i + dim/2) (DeepSeek-V3 with rope_interleave=false) is re-interleaved.
    """
    half = dim // 2
    rows = torch.empty(dim, dtype=torch.long)
    rows[:half] = torch.arange(half) * 2
    rows[half:] = torch.arange(half) * 2 + 1
    return rows


def _plan_deepseek(cfg: HFConfig) -> ConversionPlan:
    family = cfg.model_type
    b = _Builder(cfg)
    s = _common_sizes(cfg)
    experts, topk, moe_ffn = cfg.require("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")
    experts, topk, moe_ffn = int(experts), int(topk), int(moe_ffn)
    b.check_silu(family)
    if cfg.get("quantization_config") is not None:
        raise ConversionError(
            f"{family}: quantized checkpoints ({cfg.get('quantization_config', {}).get('quant_method', '?')}) "
            "are not supported; dequantize to bfloat16 first"
        )
    if cfg.get("attention_bias", False):
        raise ConversionError(f"{family}: attention_bias=true is not supported")
    pattern = _deepseek_moe_layers(cfg, s["layers"])
    dense_ffn = int(cfg.get("intermediate_size", 0) or 0)
    if 0 in pattern and not dense_ffn:
        raise ConversionError(f"{cfg.path}: first_k_dense_replace dense layers need intermediate_size")
    shared = int(cfg.get("n_shared_experts", 0) or 0)
    routing, notes = _deepseek_routing(cfg, family, topk, experts)
    b.notes.extend(notes)
    tied = bool(cfg.get("tie_word_embeddings", False))
    mla: Optional[Dict[str, Any]] = None
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    if family == "deepseek":
        theta = b.check_plain_rope(family)
    else:
        q_lora = cfg.get("q_lora_rank")
        kv_lora, nope, rope_dim, v_dim = (int(x) for x in cfg.require(
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
        rope_cfg, theta = _mla_rope(cfg, family)
        mla = dict(q_lora_rank=int(q_lora) if q_lora else None, kv_lora_rank=kv_lora, qk_head_dim=nope,
                   qk_pos_emb_head_dim=rope_dim, v_head_dim=v_dim, **rope_cfg)
        if eps != 1e-6:
            b.notes.append(
                f"rms_norm_eps={eps}: DeepSeek's q_a/kv_a latent norms use eps 1e-6, Megatron uses "
                f"rms_norm_eps for them too (a relative difference of about {abs(eps - 1e-6) / 2:.1e} "
                "on unit-scale latents)"
            )
        interleaved = family == "deepseek_v2" or bool(cfg.get("rope_interleave", True))
    b.embeddings(s["vocab"], s["hidden"], tied)
    for i in range(s["layers"]):
        b.norms(i, s["hidden"])
        if mla is None:
            b.attention(i, s["hidden"], s["heads"], s["groups"], s["head_dim"], qkv_bias=False)
        else:
            _mla_pieces(b, i, s, mla, interleaved)
        src, dst = f"model.layers.{i}.mlp", f"decoder.layers.{i}.mlp"
        if pattern[i]:
            b.add(f"{src}.gate.weight", f"{dst}.router.weight", (experts, s["hidden"]))
            if routing.get("moe_router_enable_expert_bias"):
                b.add(f"{src}.gate.e_score_correction_bias", f"{dst}.router.expert_bias", (experts,))
            b.experts(i, "mlp", experts, s["hidden"], moe_ffn)
            if shared:
                b.gated_mlp(f"{src}.shared_experts", f"{dst}.shared_experts", s["hidden"], shared * moe_ffn)
        else:
            b.gated_mlp(src, dst, s["hidden"], dense_ffn)
    first_k = int(cfg.get("first_k_dense_replace", 0))
    mtp = int(cfg.get("num_nextn_predict_layers", 0) or 0)
    if mtp:
        # Multi-token-prediction layers (DeepSeek-V3) are not part of the language model.
        numbers = "|".join(str(s["layers"] + j) for j in range(mtp))
        b.skip.append((re.compile(rf"^model\.layers\.(?:{numbers})\."), "multi-token-prediction layer"))
        b.notes.append(f"{mtp} multi-token-prediction layer(s) not converted (not used for next-token logits)")
    args = MoEModelArgs(
        num_layers=s["layers"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
        num_query_groups=None if mla else s["groups"], kv_channels=None if mla else s["head_dim"],
        num_moe_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=moe_ffn,
        vocab_size=s["vocab"], max_sequence_length=int(cfg.get("max_position_embeddings", 4096)),
        ffn_hidden_size=dense_ffn or None, moe_layer_freq=pattern if 0 in pattern else 1,
        moe_shared_expert_intermediate_size=shared * moe_ffn if shared else None,
        layernorm_epsilon=eps, rotary_base=theta, share_embeddings_and_output_weights=tied,
        qk_layernorm=mla is not None,  # MLA: Megatron's q/kv latent norms (q_a_layernorm, kv_a_layernorm)
        mla=mla, family=family, **routing,
    )
    if first_k:
        b.notes.append(f"first_k_dense_replace={first_k}: layers 0..{first_k - 1} are dense")
    return ConversionPlan(family, args, b.pieces, b.skip, b.notes)


def _mla_pieces(b: _Builder, i: int, s: Dict[str, int], mla: Dict[str, Any], interleaved: bool) -> None:
    src, dst = f"model.layers.{i}.self_attn", f"decoder.layers.{i}.self_attention"
    hidden, heads = s["hidden"], s["heads"]
    nope, rope_dim, v_dim = mla["qk_head_dim"], mla["qk_pos_emb_head_dim"], mla["v_head_dim"]
    kv_lora, q_lora = mla["kv_lora_rank"], mla["q_lora_rank"]
    q_head = nope + rope_dim
    # Megatron's MLA takes DeepSeek's interleaved rope rows as they are; rows laid out as
    # halves are re-interleaved (q's and k's alike).
    perm = torch.arange(rope_dim) if interleaved else _interleave(rope_dim)
    q_rows = torch.cat([torch.cat([torch.arange(nope), nope + perm]) + h * q_head for h in range(heads)])
    if q_lora is None:
        b.add(f"{src}.q_proj.weight", f"{dst}.linear_q_proj.weight", (heads * q_head, hidden), q_rows)
    else:
        b.add(f"{src}.q_a_proj.weight", f"{dst}.linear_q_down_proj.weight", (q_lora, hidden))
        b.add(f"{src}.q_a_layernorm.weight", f"{dst}.q_layernorm.weight", (q_lora,))
        b.add(f"{src}.q_b_proj.weight", f"{dst}.linear_q_up_proj.weight", (heads * q_head, q_lora), q_rows)
    kv_rows = torch.cat([torch.arange(kv_lora), kv_lora + perm])
    b.add(f"{src}.kv_a_proj_with_mqa.weight", f"{dst}.linear_kv_down_proj.weight", (kv_lora + rope_dim, hidden), kv_rows)
    b.add(f"{src}.kv_a_layernorm.weight", f"{dst}.kv_layernorm.weight", (kv_lora,))
    b.add(f"{src}.kv_b_proj.weight", f"{dst}.linear_kv_up_proj.weight", (heads * (nope + v_dim), kv_lora))
    b.add(f"{src}.o_proj.weight", f"{dst}.linear_proj.weight", (hidden, heads * v_dim))


_PLANNERS: Dict[str, Callable[[HFConfig], ConversionPlan]] = {
    "mixtral": _plan_mixtral,
    "qwen2_moe": _plan_qwen2_moe,
    "olmoe": _plan_olmoe,
    "deepseek": _plan_deepseek,
    "deepseek_v2": _plan_deepseek,
    "deepseek_v3": _plan_deepseek,
}


def plan_conversion(hf_config: Union[HFConfig, Dict[str, Any], str, Path]) -> ConversionPlan:
    """The conversion plan (Megatron args and tensor mapping) for a config; reads no weights.

    Raises:
        ConversionError: unknown model_type, missing keys, or an option not convertible exactly.
    """
    if isinstance(hf_config, (str, Path)):
        cfg = HFConfig.read(hf_config)
    elif isinstance(hf_config, dict):
        cfg = HFConfig(hf_config)
    else:
        cfg = hf_config
    model_type = cfg.model_type
    planner = _PLANNERS.get(model_type)
    if planner is None:
        hint = ""
        if "moe" in model_type or "mixtral" in model_type or "deepseek" in model_type:
            hint = " (a MoE family this converter does not map yet)"
        raise ConversionError(
            f"unsupported model_type {model_type!r}{hint}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        plan = planner(cfg)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConversionError):
            raise
        raise ConversionError(f"{cfg.path} ({model_type}): {err}") from err
    plan.args.extra = _hf_extra(cfg, plan.notes)
    return plan


# --------------------------------------------------------------------------- reading


class SafetensorsIndex:
    """Which file holds each tensor of a Hugging Face folder, read from headers only."""

    def __init__(self, hf_dir: Union[str, Path]) -> None:
        from safetensors import safe_open

        self.hf_dir = Path(hf_dir)
        files = sorted(self.hf_dir.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in self.hf_dir.glob("*.bin"))
            extra = f" (found {bins[:3]}: PyTorch .bin checkpoints are not supported; re-save with " \
                    "safe_serialization=True)" if bins else ""
            raise ConversionError(f"{self.hf_dir} has no *.safetensors files{extra}")
        self.files = files
        self.location: Dict[str, Path] = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.dtypes: Dict[str, str] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        if name in self.location:
                            raise ConversionError(f"tensor {name} is in both {self.location[name].name} and {path.name}")
                        sl = f.get_slice(name)
                        self.location[name] = path
                        self.shapes[name] = tuple(int(x) for x in sl.get_shape())
                        self.dtypes[name] = str(sl.get_dtype())
            except ConversionError:
                raise
            except Exception as err:  # safetensors raises its own error types
                raise ConversionError(f"cannot read {path}: {err}") from err
        index = self.hf_dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map", {})
            except json.JSONDecodeError as err:
                raise ConversionError(f"{index} is not valid JSON: {err}") from err
            absent = sorted(name for name in weight_map if name not in self.location)
            if absent:
                files_named = sorted({weight_map[n] for n in absent})
                raise ConversionError(
                    f"{index} lists {len(absent)} tensors that no *.safetensors file holds (missing shard "
                    f"files {files_named[:5]}?), e.g. {absent[:5]}"
                )


def check_tensors(plan: ConversionPlan, index: SafetensorsIndex) -> None:
    """Raise ConversionError for missing, unexpected or misshapen tensors."""
    wanted: Dict[str, Tuple[int, ...]] = {}
    for piece in plan.pieces:
        wanted[piece.hf_name] = piece.hf_shape
    missing = [n for n in wanted if n not in index.location]
    if missing:
        raise ConversionError(
            f"{index.hf_dir}: {len(missing)} tensors that config.json ({plan.model_type}) implies are missing, "
            f"e.g. {missing[:8]}"
        )
    bad = [(n, index.shapes[n], shape) for n, shape in wanted.items() if index.shapes[n] != shape]
    if bad:
        text = "; ".join(f"{n}: file {tuple(a)} vs config {tuple(b)}" for n, a, b in bad[:6])
        raise ConversionError(f"{index.hf_dir}: {len(bad)} tensors have shapes config.json does not imply: {text}")
    unexpected = [
        n for n in index.location
        if n not in wanted
        and not any(p.search(n) for p in _IGNORABLE)
        and not any(p.search(n) for p, _ in plan.skip)
    ]
    if unexpected:
        raise ConversionError(
            f"{index.hf_dir}: {len(unexpected)} tensors this converter does not know for {plan.model_type} "
            f"(an architecture variant it cannot express?), e.g. {sorted(unexpected)[:8]}"
        )
    for name in wanted:
        dtype = index.dtypes[name]
        if dtype not in ("F32", "BF16", "F16", "F64"):
            raise ConversionError(
                f"{name} is stored as {dtype}: only floating-point (fp32/bf16/fp16) checkpoints are supported; "
                "dequantize first"
            )


# --------------------------------------------------------------------------- conversion


def find_tokenizer_files(folder: Union[str, Path]) -> List[Path]:
    folder = Path(folder)
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def _resolve_dtype(dtype: Union[None, str, torch.dtype], cfg: HFConfig, index: SafetensorsIndex) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in _DTYPES:
            raise ConversionError(f"dtype {dtype!r} must be auto, float32, bfloat16 or float16")
        return _DTYPES[dtype]
    from_config = cfg.dtype()
    if from_config is not None:
        return from_config
    stored = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for name in index.location:
        if index.dtypes[name] in stored:
            return stored[index.dtypes[name]]
    return torch.float32


def convert_checkpoint(
    hf_dir: Union[str, Path],
    out_dir: Union[str, Path],
    *,
    dtype: Union[None, str, torch.dtype] = None,
    tokenizer_dir: Union[None, str, Path] = None,
    require_tokenizer: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    expert_parallel: Optional[int] = None,
) -> MoEModelArgs:
    """Convert a Hugging Face MoE checkpoint folder to a Megatron checkpoint at ``out_dir``.

    In a single process (no ``torch.distributed`` group yet) it builds the whole
    model at TP=1 / EP=1, using a one-rank gloo group it tears down again. Under
    ``torchrun`` (a group of N ranks already initialised) every rank calls it
    and the experts are split over ``expert_parallel`` (default N) ranks: each
    rank builds and reads only its own experts (plus the non-expert weights),
    which divides the memory the experts need by the EP size.

    Args:
        hf_dir: folder with config.json, ``*.safetensors`` (sharded or not) and tokenizer files.
        out_dir: the Megatron checkpoint root to write (must be empty or absent unless ``overwrite``).
        dtype: parameter dtype of the result; default (None / "auto"): the checkpoint's.
        tokenizer_dir: where the tokenizer files are (default: ``hf_dir``).
        require_tokenizer: raise when no tokenizer file is found (else convert without one).
        overwrite: replace an existing checkpoint at ``out_dir``.
        progress: show a tqdm progress bar (rank 0).
        expert_parallel: EP size of the conversion under an initialised group (default: world size).

    Returns:
        The :class:`MoEModelArgs` written to ``capaware_model.json``.

    Raises:
        ConversionError: see the module docstring.
    """
    import torch.distributed as dist

    hf_dir, out = Path(hf_dir), Path(out_dir)
    cfg = HFConfig.read(hf_dir)
    plan = plan_conversion(cfg)
    index = SafetensorsIndex(hf_dir)
    check_tensors(plan, index)
    tokenizer_files = find_tokenizer_files(tokenizer_dir or hf_dir)
    if require_tokenizer and not any(p.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for p in tokenizer_files):
        raise ConversionError(
            f"no tokenizer in {tokenizer_dir or hf_dir} (expected tokenizer.json, tokenizer.model or vocab.json); "
            "pass --tokenizer DIR, or --no-tokenizer to convert the weights alone"
        )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out} exists and is not empty; pass --force to replace it")
    owns_group = not dist.is_initialized()
    world = 1 if owns_group else dist.get_world_size()
    ep = expert_parallel or world
    if world % ep or plan.args.num_moe_experts % ep:
        raise ConversionError(
            f"expert parallel size {ep} must divide the world size ({world}) and the number of experts "
            f"({plan.args.num_moe_experts})"
        )
    target_dtype = _resolve_dtype(dtype, cfg, index)
    args = plan.args
    args.extra["dtype"] = _dtype_name(target_dtype)
    args.extra["tokenizer"] = "hf" if tokenizer_files else None
    args.extra["tokenizer_dir"] = "tokenizer" if tokenizer_files else None

    from megatron_capaware import parallel

    parallel.init_model_parallel(parallel.ParallelSizes(expert_parallel=ep))
    rank = dist.get_rank()
    try:
        if rank == 0 and out.exists() and any(out.iterdir()):
            shutil.rmtree(out)
        barrier()
        model = _build_empty_model(args, target_dtype)
        _fill(model, plan, index, progress and rank == 0)
        from megatron_capaware.models.checkpoint import TOKENIZER_DIR, save_checkpoint

        save_checkpoint(model, out, args)
        del model
        if rank == 0:
            (out / HF_CONFIG_COPY).write_text(json.dumps(cfg.data, indent=2, sort_keys=True) + "\n")
            if tokenizer_files:
                tok = out / TOKENIZER_DIR
                tok.mkdir(parents=True, exist_ok=True)
                for path in tokenizer_files:
                    shutil.copy2(path, tok / path.name)
                # AutoTokenizer resolves the tokenizer class through config.json when
                # tokenizer_config.json does not name it.
                shutil.copy2(hf_dir / "config.json", tok / "config.json")
        barrier()
    finally:
        if owns_group:
            parallel.destroy()
        else:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
    return args


def _build_empty_model(args: MoEModelArgs, dtype: torch.dtype) -> torch.nn.Module:
    from megatron_capaware.models.builder import build_gpt_model, build_transformer_config

    config = build_transformer_config(
        args, params_dtype=dtype, perform_initialization=False, use_cpu_initialization=True
    )
    return build_gpt_model(args, config, use_te=False)


_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")


def _local_pieces(model: torch.nn.Module, pieces: List[Piece]) -> List[Piece]:
    """The pieces this rank fills: every non-expert piece, and its own experts renamed to local indices."""
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    layers = [m for m in model.modules() if isinstance(m, BaseMoELayer)]
    if not layers:
        return list(pieces)
    local = {int(e): j for j, e in enumerate(layers[0].local_expert_indices)}
    out = []
    for piece in pieces:
        match = _EXPERT.match(piece.target)
        if match is None:
            out.append(piece)
        elif int(match.group(2)) in local:
            target = f"{match.group(1)}{local[int(match.group(2))]}{match.group(3)}"
            out.append(Piece(piece.hf_name, target, piece.hf_shape, piece.rows))
    return out


def _fill(model: torch.nn.Module, plan: ConversionPlan, index: SafetensorsIndex, progress: bool) -> None:
    """Copy every planned Hugging Face tensor into the model, one tensor at a time."""
    from safetensors import safe_open

    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
    pieces = _local_pieces(model, plan.pieces)
    by_name: Dict[str, List[Piece]] = {}
    for piece in pieces:
        by_name.setdefault(piece.hf_name, []).append(piece)
    # The plan must cover every model tensor exactly once: check before reading anything.
    filled: Dict[str, torch.Tensor] = {}
    for piece in pieces:
        if piece.target not in state:
            raise ConversionError(
                f"internal: {piece.hf_name} maps to {piece.target}, which this megatron-core model does not have"
            )
        target = state[piece.target]
        if piece.rows is None:
            if tuple(target.shape) != piece.hf_shape:
                raise ConversionError(
                    f"internal: {piece.hf_name} {piece.hf_shape} does not fit {piece.target} {tuple(target.shape)}"
                )
        elif tuple(target.shape[1:]) != piece.hf_shape[1:] or len(piece.rows) != piece.hf_shape[0]:
            raise ConversionError(
                f"internal: {piece.hf_name} {piece.hf_shape} does not fit rows of {piece.target} {tuple(target.shape)}"
            )
        count = filled.setdefault(piece.target, torch.zeros(target.shape[0] if target.dim() else 1, dtype=torch.int32))
        if piece.rows is None:
            count += 1
        else:
            count.index_add_(0, piece.rows, torch.ones(len(piece.rows), dtype=torch.int32))
    uncovered = sorted(k for k in state if k not in filled)
    if uncovered:
        raise ConversionError(f"internal: no Hugging Face tensor fills Megatron tensors {uncovered[:8]}")
    twice = sorted(k for k, c in filled.items() if not bool((c == 1).all()))
    if twice:
        raise ConversionError(f"internal: the plan fills rows of {twice[:8]} not exactly once")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(by_name), unit="tensor", desc="converting", file=sys.stderr)
    done = set()
    try:
        with torch.no_grad():
            for path in index.files:
                names = [n for n in by_name if index.location[n] == path]
                if not names:
                    continue
                with safe_open(str(path), framework="pt") as f:
                    for name in names:
                        tensor = f.get_tensor(name)
                        for piece in by_name[name]:
                            target = state[piece.target]
                            if piece.rows is None:
                                target.copy_(tensor)
                            else:
                                target.index_copy_(0, piece.rows, tensor.to(target.dtype))
                        del tensor
                        done.add(name)
                        if bar is not None:
                            bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    left = sorted(set(by_name) - done)
    if left:  # cannot happen after check_tensors; kept as a guard
        raise ConversionError(f"tensors not read: {left[:8]}")


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="capaware-convert",
        description="Convert a Hugging Face MoE checkpoint (Mixtral, Qwen2-MoE / Qwen1.5-MoE, OLMoE, "
        "DeepSeek-MoE / V2 / V3) to a Megatron dist checkpoint that megatron_capaware.models.checkpoint.load_model "
        "loads at any TP / EP.",
    )
    parser.add_argument("hf_dir", type=Path, help="Hugging Face folder: config.json, *.safetensors, tokenizer files")
    parser.add_argument("out_dir", type=Path, nargs="?", help="Megatron checkpoint folder to write")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="parameter dtype of the result (default: the checkpoint's)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="folder with the tokenizer files (default: HF_DIR)")
    parser.add_argument("--no-tokenizer", action="store_true", help="convert without a tokenizer")
    parser.add_argument("--check-only", action="store_true",
                        help="check config and tensor names / shapes, print the Megatron args, write nothing")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--use-gpu", action="store_true",
                        help="build the model on the GPU (default: CUDA devices are hidden; conversion is a CPU job)")
    args = add_cli_flags(parser).parse_args(argv)
    if not args.check_only and args.out_dir is None:
        parser.error("OUT_DIR is required (or pass --check-only)")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, _main, argv)


def _main(argv: List[str]) -> int:
    options = parse_args(argv)
    if not options.use_gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA
    if not torch.cuda.is_available():  # Megatron's jit_fuser compiles for ~17 s on a CPU
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    try:
        if options.check_only:
            cfg = HFConfig.read(options.hf_dir)
            plan = plan_conversion(cfg)
            check_tensors(plan, SafetensorsIndex(options.hf_dir))
            print(json.dumps(plan.args.to_dict(), indent=2, sort_keys=True))
            for note in plan.notes:
                print(f"note: {note}", file=sys.stderr)
            print(f"{options.hf_dir}: {plan.model_type}, {len(set(plan.hf_names()))} tensors, OK", file=sys.stderr)
            return 0
        if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from megatron_capaware import parallel

            parallel.init_distributed()  # torchrun: the experts are split over the ranks
        args = convert_checkpoint(
            options.hf_dir, options.out_dir, dtype=options.dtype, tokenizer_dir=options.tokenizer,
            require_tokenizer=not options.no_tokenizer, overwrite=options.force, progress=progress_enabled(not options.quiet),
        )
    except ConversionError as err:
        print(f"capaware-convert: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    for note in args.extra.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {options.out_dir} ({args.family}, {args.num_layers} layers, {args.num_moe_experts} experts, "
          f"top-{args.moe_router_topk}, {args.extra['dtype']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
