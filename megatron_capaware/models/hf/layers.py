"""Megatron-Core layers that some Hugging Face architectures need beside Megatron's own.

OLMoE normalises the projected queries and keys with one RMSNorm over *all*
heads together (``q_norm = RMSNorm(num_heads * head_dim)``, ``k_norm =
RMSNorm(num_kv_heads * head_dim)``), before splitting them into heads.
Megatron's ``qk_layernorm`` normalises each head on its own (``RMSNorm(head_dim)``
applied to ``[s, b, heads, head_dim]``): a different function, not a
re-parametrisation of it. :class:`AllHeadsQNorm` / :class:`AllHeadsKNorm` are
exact stand-ins for OLMoE's norms that plug into Megatron's ``q_layernorm`` /
``k_layernorm`` slots: they receive Megatron's per-head tensors, take the mean
square over all heads (summed over the tensor-parallel ranks, which hold
disjoint heads), and scale with a ``[heads * head_dim]`` weight sharded over
TP along the heads, so a checkpoint loads at any TP that divides the heads.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Dict, Optional, Tuple

import torch


class _AllHeadsRMSNorm(torch.nn.Module):
    """RMSNorm over the last two dims ``[heads, head_dim]`` of ``[s, b, heads, head_dim]``.

    Built by Megatron's attention with ``(hidden_size=head_dim, config, eps)``.
    """

    kind = "q"

    def __init__(self, hidden_size: int, config: Any, eps: float = 1e-5, **_: Any) -> None:
        super().__init__()
        tp = int(getattr(config, "tensor_model_parallel_size", 1) or 1)
        heads = config.num_attention_heads if self.kind == "q" else (
            config.num_query_groups or config.num_attention_heads
        )
        if heads % tp:
            raise ValueError(
                f"all-heads {self.kind}-norm (OLMoE): {heads} {'query' if self.kind == 'q' else 'key/value'} "
                f"heads are not divisible by tensor parallel size {tp}; use a TP that divides {heads}"
            )
        self.head_dim = hidden_size
        self.total_heads = heads
        self.local_heads = heads // tp
        self.tp = tp
        self.eps = eps
        self.config = config
        weight = torch.ones(self.local_heads * hidden_size, dtype=config.params_dtype)
        self.weight = torch.nn.Parameter(weight)
        # Megatron's conventions for tensor-parallel parameters (grads, optimizer).
        self.weight.tensor_model_parallel = tp > 1
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.local_heads or x.shape[-1] != self.head_dim:
            raise RuntimeError(
                f"all-heads {self.kind}-norm expected [..., {self.local_heads}, {self.head_dim}], "
                f"got {tuple(x.shape)}"
            )
        dtype = x.dtype
        xf = x.float()
        square_sum = xf.pow(2).sum(dim=(-2, -1), keepdim=True)
        if self.tp > 1:
            from megatron.core import parallel_state
            from torch.distributed.nn.functional import all_reduce

            square_sum = all_reduce(square_sum, group=parallel_state.get_tensor_model_parallel_group())
        variance = square_sum / float(self.total_heads * self.head_dim)
        normed = (xf * torch.rsqrt(variance + self.eps)).to(dtype)
        return self.weight.view(self.local_heads, self.head_dim) * normed

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: Tuple[Tuple[int, int, int], ...] = (), metadata: Optional[dict] = None
    ) -> Any:
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)

    def extra_repr(self) -> str:
        return f"heads={self.total_heads} (local {self.local_heads}), head_dim={self.head_dim}, eps={self.eps}"


class AllHeadsQNorm(_AllHeadsRMSNorm):
    """OLMoE's ``q_norm``: RMSNorm over all query heads together."""

    kind = "q"


class AllHeadsKNorm(_AllHeadsRMSNorm):
    """OLMoE's ``k_norm``: RMSNorm over all key heads together."""

    kind = "k"


def with_all_heads_qk_norm(block_spec: Any) -> Any:
    """A copy of a GPT decoder block spec whose attention q/k norms are :class:`AllHeadsQNorm` / :class:`AllHeadsKNorm`.

    Works on the block specs of megatron-core 0.16 and 0.19 (``ModuleSpec`` layers whose
    ``self_attention`` is a ``ModuleSpec`` with ``SelfAttentionSubmodules``).
    """
    spec = copy.deepcopy(block_spec)
    layer_specs = getattr(spec, "layer_specs", None)
    if layer_specs is None:
        raise TypeError(f"expected a TransformerBlockSubmodules with layer_specs, got {type(spec).__name__}")
    patched = 0
    for layer in layer_specs:
        attention = getattr(getattr(layer, "submodules", None), "self_attention", None)
        sub = getattr(attention, "submodules", None)
        if sub is None or not hasattr(sub, "q_layernorm") or not hasattr(sub, "k_layernorm"):
            raise TypeError(
                "all-heads q/k norm: this megatron-core's layer spec has no self_attention "
                "q_layernorm/k_layernorm slots to fill"
            )
        attention.submodules = dataclasses.replace(sub, q_layernorm=AllHeadsQNorm, k_layernorm=AllHeadsKNorm)
        patched += 1
    if not patched:
        raise TypeError("all-heads q/k norm: the block spec has no layers")
    return spec


# --------------------------------------------------------------------------- multi-latent attention


@functools.lru_cache(maxsize=None)
def _local_dot_product_attention_class():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        """Megatron's local ``DotProductAttention`` for multi-latent attention.

        MLA builds its core attention with ``k_channels`` (q/k head size,
        nope + rope) and ``v_channels`` (value head size), which only
        Transformer Engine's attention accepts. The local one computes
        ``softmax(q k^T * scale) v`` with any q/k and v head sizes already;
        only its output width (heads x value head size) comes from
        ``kv_channels``. This subclass takes the two sizes and fixes that width.
        """

        def __init__(self, *args: Any, k_channels: Optional[int] = None, v_channels: Optional[int] = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            if v_channels is not None:
                self.hidden_size_per_attention_head = v_channels
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return MLADotProductAttention


@functools.lru_cache(maxsize=None)
def _local_mla_class():
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    class LocalMLASelfAttention(MLASelfAttention):
        """``MLASelfAttention`` with explicit (unfused) latent norms, without a query LoRA too.

        megatron-core 0.19 resolves MLA's norms through ``QKNormConfigResolver``, which
        without ``q_lora_rank`` (DeepSeek-V2-Lite) demands a fused norm+linear
        ``linear_q_proj`` that only Transformer Engine provides. DeepSeek has no query
        norm then: plain ``linear_q_proj``, no ``q_layernorm``, an explicit
        ``kv_layernorm``. (0.16 has no resolver; this override is then never called.)
        """

        def _resolve_qk_norm_config(self, submodules):
            if self.config.q_lora_rank is not None or not self.config.qk_layernorm:
                return super()._resolve_qk_norm_config(submodules)
            return dict(
                linear_q_proj=submodules.linear_q_proj,
                linear_q_up_proj=IdentityOp,
                linear_kv_up_proj=submodules.linear_kv_up_proj,
                q_layernorm=IdentityOp,
                kv_layernorm=submodules.kv_layernorm,
            )

    return LocalMLASelfAttention


# Local MLA norms under the names Transformer Engine's MLA spec gives them (fused into the
# up-projections), as Megatron's local spec does for input_layernorm: one checkpoint for both.
MLA_TE_KEYS_MAP = {  # prefix in the local model -> prefix in the checkpoint
    "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
}


def _builds_moe(spec: Any) -> bool:
    """Whether a layer's mlp spec builds a MoE layer (0.16 ModuleSpec or 0.19 functools.partial)."""
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    target = getattr(spec, "module", None) or getattr(spec, "func", None) or spec
    target = getattr(target, "__self__", target)  # a bound classmethod builder
    return isinstance(target, type) and issubclass(target, BaseMoELayer)


def with_local_mla(block_spec: Any, *, q_lora: bool = True) -> Any:
    """A copy of a local-spec GPT block spec whose MLA layers run without Transformer Engine.

    Replaces the MLA core attention with :func:`MLADotProductAttention <_local_dot_product_attention_class>`
    and maps the q/kv latent norms to Transformer Engine's checkpoint names. Without a
    query LoRA (``q_lora=False``, DeepSeek-V2-Lite) there is no query norm: megatron-core
    0.19 rejects a non-identity ``q_layernorm`` then.
    """
    from megatron.core.transformer import multi_latent_attention as mla_module
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from megatron.core.extensions import transformer_engine as te_extension

    if mla_module.HAVE_TE and not te_extension.HAVE_TE:
        # megatron-core 0.16 sets multi_latent_attention.HAVE_TE = True whenever its TE
        # extension module imports, which it also does without Transformer Engine (with
        # MagicMock stand-ins); MLA then calls isinstance(x, <MagicMock>) and fails.
        # 0.19 takes HAVE_TE from the extension module: do the same.
        mla_module.HAVE_TE = False
    core = _local_dot_product_attention_class()
    mla_class = _local_mla_class()
    spec = copy.deepcopy(block_spec)
    patched = 0
    for layer in getattr(spec, "layer_specs", []):
        attention = getattr(layer.submodules, "self_attention", None)
        module = getattr(attention, "module", None)
        if module is mla_class:
            patched += 1  # the same spec object met again (layers share specs)
            continue
        if module is not MLASelfAttention:
            continue
        changes: Dict[str, Any] = {"core_attention": core}
        if not q_lora:
            changes["q_layernorm"] = IdentityOp
        attention.module = mla_class
        attention.submodules = dataclasses.replace(attention.submodules, **changes)
        keys = dict(getattr(layer.submodules, "sharded_state_dict_keys_map", None) or {})
        keys.update(MLA_TE_KEYS_MAP)
        if not _builds_moe(layer.submodules.mlp):
            # Dense layer: Transformer Engine fuses this norm into linear_fc1 (as in
            # Megatron's standard local spec's map); MoE layers keep a separate norm.
            keys["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
        layer.submodules = dataclasses.replace(layer.submodules, sharded_state_dict_keys_map=keys)
        patched += 1
    if not patched:
        raise TypeError("local MLA: the block spec has no MLASelfAttention layers")
    return spec
