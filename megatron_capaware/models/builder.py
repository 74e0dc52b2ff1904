"""Build GPT-style Megatron-Core MoE models from a small, serialisable description.

:class:`MoEModelArgs` is what a checkpoint needs beside its weights to be
rebuilt (it is saved as ``capaware_model.json``): the reference models, the
Hugging Face conversions and the evaluation all go through it, so a model is
always built the same way whatever the parallel layout.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from megatron_capaware._compat.cpu_shims import apply_cpu_shims, cuda_available


# MLATransformerConfig fields that MoEModelArgs.mla may set (megatron-core 0.16 to 0.19).
MLA_FIELDS = (
    "q_lora_rank",
    "kv_lora_rank",
    "qk_head_dim",
    "qk_pos_emb_head_dim",
    "v_head_dim",
    "rope_type",
    "rotary_base",
    "rotary_percent",
    "rotary_scaling_factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
)


@dataclass
class MoEModelArgs:
    """Architecture of a GPT-style MoE model (decoder only, rotary positions).

    Field names follow Megatron's ``TransformerConfig`` / ``GPTModel`` where one
    exists. ``moe_layer_freq`` is Megatron's: 1 makes every layer MoE; a list of
    0/1 per layer gives dense (0) and MoE (1) layers, e.g. DeepSeek's first
    dense layer is ``[0, 1, 1, ...]``.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_moe_experts: int
    moe_router_topk: int
    moe_ffn_hidden_size: int
    vocab_size: int
    max_sequence_length: int
    ffn_hidden_size: Optional[int] = None
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    moe_layer_freq: Union[int, List[int]] = 1
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_shared_expert_gate: bool = False
    moe_router_score_function: str = "softmax"
    moe_router_pre_softmax: bool = False
    moe_router_topk_scaling_factor: Optional[float] = None
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    gated_linear_unit: bool = True
    activation: str = "silu"
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    position_embedding_type: str = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    share_embeddings_and_output_weights: bool = True
    family: str = "gpt-moe"
    extra: Dict[str, Any] = field(default_factory=dict)
    # Added for the Hugging Face conversions (megatron_capaware.models.hf.convert); the
    # defaults are Megatron's own, so older capaware_model.json files load unchanged.
    # Group-limited routing (DeepSeek n_group / topk_group).
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    # A per-expert bias added to the scores for the choice only (DeepSeek-V3
    # e_score_correction_bias); a checkpoint buffer.
    moe_router_enable_expert_bias: bool = False
    # "head": Megatron's q/k norm over each head; "all_heads": one RMSNorm over all
    # the (local) heads of q and of k together, OLMoE's q_norm/k_norm.
    qk_norm_scope: str = "head"
    # Multi-latent attention (DeepSeek-V2/V3): MLATransformerConfig fields
    # (q_lora_rank, kv_lora_rank, qk_head_dim, qk_pos_emb_head_dim, v_head_dim,
    # rope_type, rotary_base, rotary_scaling_factor, mscale, ...); None: standard attention.
    mla: Optional[Dict[str, Any]] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when the description is inconsistent."""
        positive = (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_moe_experts",
            "moe_router_topk",
            "moe_ffn_hidden_size",
            "vocab_size",
            "max_sequence_length",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model args: {name} must be a positive integer, got {value!r}")
        if self.moe_router_topk > self.num_moe_experts:
            raise ValueError(
                f"model args: moe_router_topk={self.moe_router_topk} exceeds "
                f"num_moe_experts={self.num_moe_experts}"
            )
        if self.hidden_size % self.num_attention_heads and self.kv_channels is None:
            raise ValueError(
                f"model args: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; set kv_channels"
            )
        if self.moe_router_score_function not in ("softmax", "sigmoid"):
            raise ValueError(
                "model args: moe_router_score_function must be 'softmax' or 'sigmoid', got "
                f"{self.moe_router_score_function!r}"
            )
        if isinstance(self.moe_layer_freq, list):
            if len(self.moe_layer_freq) != self.num_layers or any(
                v not in (0, 1) for v in self.moe_layer_freq
            ):
                raise ValueError(
                    f"model args: moe_layer_freq list must hold num_layers={self.num_layers} "
                    f"entries of 0 or 1, got {self.moe_layer_freq}"
                )
            if 0 in self.moe_layer_freq and not self.ffn_hidden_size:
                raise ValueError("model args: dense layers need ffn_hidden_size")
        if self.activation not in ("silu", "gelu", "relu"):
            raise ValueError(f"model args: unsupported activation {self.activation!r}")
        if (self.moe_router_num_groups is None) != (self.moe_router_group_topk is None):
            raise ValueError(
                "model args: moe_router_num_groups and moe_router_group_topk go together"
            )
        if self.moe_router_num_groups is not None:
            groups, chosen = self.moe_router_num_groups, self.moe_router_group_topk
            if groups <= 0 or self.num_moe_experts % groups or not 0 < chosen <= groups:
                raise ValueError(
                    f"model args: group-limited routing needs num_moe_experts "
                    f"({self.num_moe_experts}) divisible by moe_router_num_groups ({groups}) "
                    f"and 0 < moe_router_group_topk ({chosen}) <= moe_router_num_groups"
                )
        if self.qk_norm_scope not in ("head", "all_heads"):
            raise ValueError(
                f"model args: qk_norm_scope must be 'head' or 'all_heads', got {self.qk_norm_scope!r}"
            )
        if self.qk_norm_scope == "all_heads" and not self.qk_layernorm:
            raise ValueError("model args: qk_norm_scope='all_heads' needs qk_layernorm=True")
        if self.mla is not None:
            unknown = sorted(set(self.mla) - set(MLA_FIELDS))
            if unknown:
                raise ValueError(
                    f"model args: unknown multi-latent attention fields {unknown}; "
                    f"known: {list(MLA_FIELDS)}"
                )

    @property
    def moe_layer_numbers(self) -> List[int]:
        """1-based numbers of the MoE layers, as Megatron numbers layers."""
        if isinstance(self.moe_layer_freq, list):
            return [i + 1 for i, v in enumerate(self.moe_layer_freq) if v]
        return [i + 1 for i in range(self.num_layers) if i % self.moe_layer_freq == 0]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "MoEModelArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"model args: unknown fields {unknown}; this file was written by a newer "
                "megatron-capaware or is not a capaware model description"
            )
        return cls(**data)

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "MoEModelArgs":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _activation(name: str):
    import torch.nn.functional as F

    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[name]


def build_transformer_config(
    args: MoEModelArgs,
    *,
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    expert_tensor_parallel: int = 1,
    dispatcher: str = "alltoall",
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    grouped_gemm: bool = False,
    moe_aux_loss_coeff: float = 0.0,
    **overrides: Any,
):
    """Megatron ``TransformerConfig`` for ``args`` at the given parallel layout.

    ``overrides`` are passed through to ``TransformerConfig`` (e.g. dropout for
    training, ``moe_z_loss_coeff``).
    """
    if not cuda_available():
        apply_cpu_shims()
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    if dispatcher not in ("alltoall", "allgather", "flex"):
        raise ValueError(f"dispatcher must be alltoall, allgather or flex, got {dispatcher!r}")
    kwargs: Dict[str, Any] = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        ffn_hidden_size=args.ffn_hidden_size or args.moe_ffn_hidden_size,
        num_moe_experts=args.num_moe_experts,
        moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_layer_freq=args.moe_layer_freq,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=args.moe_shared_expert_gate,
        moe_router_score_function=args.moe_router_score_function,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
        moe_router_num_groups=args.moe_router_num_groups,
        moe_router_group_topk=args.moe_router_group_topk,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_router_load_balancing_type="aux_loss" if moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=moe_aux_loss_coeff,
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=grouped_gemm,
        moe_router_dtype="fp32",
        normalization=args.normalization,
        layernorm_epsilon=args.layernorm_epsilon,
        gated_linear_unit=args.gated_linear_unit,
        activation_func=_activation(args.activation),
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm,
        tensor_model_parallel_size=tensor_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not cuda_available(),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fused kernels on GPUs (so GPU timings are not pessimistic), none on the CPU:
        # bias-dropout is a jit fusion of plain torch; rope and softmax fusion need
        # Transformer Engine; persistent layer norm needs Apex (never required).
        bias_dropout_fusion=cuda_available(),
        apply_rope_fusion=use_transformer_engine(),
        masked_softmax_fusion=use_transformer_engine(),
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    config_class = TransformerConfig
    if args.mla is not None:
        config_class = MLATransformerConfig
        kwargs.update(multi_latent_attention=True, **args.mla)
    kwargs.update(overrides)
    return config_class(**kwargs)


def use_transformer_engine() -> bool:
    """True when Transformer Engine and CUDA are both present."""
    import importlib.util

    return cuda_available() and importlib.util.find_spec("transformer_engine") is not None


def build_gpt_model(
    args: MoEModelArgs,
    config: Any,
    *,
    use_te: Optional[bool] = None,
    router: Any = None,
) -> torch.nn.Module:
    """Build a Megatron ``GPTModel`` for ``args`` with ``config``.

    Args:
        args: the architecture.
        config: from :func:`build_transformer_config`.
        use_te: Transformer Engine layers (grouped-GEMM experts when
            ``config.moe_grouped_gemm``); default: when TE and CUDA are present.
        router: an optional :class:`megatron_capaware.config.CapawareConfig`;
            when given, every MoE layer is built with the capaware router and
            dispatcher instead of Megatron's.

    Returns:
        The model, on the current CUDA device or the CPU, in eval mode.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    if use_te is None:
        use_te = use_transformer_engine()
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te)
    if args.qk_norm_scope == "all_heads":
        from megatron_capaware.models.hf.layers import with_all_heads_qk_norm

        spec = with_all_heads_qk_norm(spec)
    if args.mla is not None and not use_te:
        from megatron_capaware.models.hf.layers import with_local_mla

        spec = with_local_mla(spec, q_lora=args.mla.get("q_lora_rank") is not None)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.vocab_size,
        max_sequence_length=args.max_sequence_length,
        share_embeddings_and_output_weights=args.share_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_base=int(args.rotary_base),
        rotary_percent=args.rotary_percent,
        parallel_output=False,
    )
    if router is not None:
        from megatron_capaware.adapters import install_capaware_routers

        install_capaware_routers(model, router)
    if cuda_available():
        model = model.cuda()
    return model.eval()


def build_moe_layer(config: Any, *, use_te: Optional[bool] = None, layer_number: int = 1) -> torch.nn.Module:
    """A standalone Megatron ``MoELayer`` (router, dispatcher, experts) for ``config``.

    Works across megatron-core 0.16 (``ModuleSpec``) and 0.19 (``functools.partial``
    specs). Experts are ``TEGroupedMLP`` when Transformer Engine is used and
    ``config.moe_grouped_gemm`` is set, else ``SequentialMLP``.
    """
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    if use_te is None:
        use_te = use_transformer_engine()
    spec = get_moe_module_spec(
        use_te=use_te, num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm
    )
    if isinstance(spec, ModuleSpec):
        layer = build_module(spec, config=config, layer_number=layer_number)
    else:
        layer = spec(config=config, layer_number=layer_number)
    if cuda_available():
        layer = layer.cuda()
    return layer
