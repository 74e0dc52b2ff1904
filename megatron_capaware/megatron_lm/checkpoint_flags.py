"""Megatron flag defaults from a megatron-capaware checkpoint, and the ``extra_args_provider``.

A capaware checkpoint records its architecture in ``capaware_model.json`` and
no Megatron ``args`` in its common state, so ``--use-checkpoint-args`` cannot
supply the model flags; :func:`checkpoint_defaults` does, so ``--load CKPT`` is
enough.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from megatron_capaware.models.checkpoint import MODEL_ARGS_FILE, checkpoint_weights_dir, is_capaware_checkpoint
from megatron_capaware.megatron_lm.compat import print_rank0
from megatron_capaware.megatron_lm.cpu_support import CPU_MEGATRON_DEFAULTS, enable_cpu_support
from megatron_capaware.megatron_lm.tokenizer import install_tokenizer_hook


def set_parser_defaults(parser: argparse.ArgumentParser, defaults: Dict[str, Any]) -> Dict[str, Any]:
    """``parser.set_defaults`` for the destinations this parser knows; returns those set."""
    known = {action.dest for action in parser._actions}
    applied = {k: v for k, v in defaults.items() if k in known}
    parser.set_defaults(**applied)
    return applied


def peek_flag(argv: List[str], name: str) -> Optional[str]:
    """The value of ``--name VALUE`` / ``--name=VALUE`` in ``argv`` (last wins), else None."""
    value = None
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(name + "="):
            value = token.split("=", 1)[1]
    return value


def checkpoint_dtype(ckpt_dir: str) -> Optional[torch.dtype]:
    """The dtype of most weight matrices in a dist checkpoint (None if unreadable)."""
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(checkpoint_weights_dir(ckpt_dir))).read_metadata()
    except Exception:
        return None
    counts: Dict[torch.dtype, int] = {}
    for meta in metadata.state_dict_metadata.values():
        properties = getattr(meta, "properties", None)
        size = getattr(meta, "size", None)
        if properties is None or size is None or len(size) < 2:
            continue
        counts[properties.dtype] = counts.get(properties.dtype, 0) + 1
    return max(counts, key=counts.get) if counts else None


def checkpoint_defaults(ckpt_dir: str) -> Dict[str, Any]:
    """Megatron argument defaults (by ``dest``) describing a capaware checkpoint's model.

    From ``capaware_model.json``: the architecture flags (``--num-layers``,
    ``--hidden-size``, ``--num-experts``, ``--moe-router-topk``, ...,
    ``--padded-vocab-size`` = the model's vocabulary); from the weights:
    ``--bf16`` / ``--fp16``. Megatron's ``--use-checkpoint-args`` cannot do
    this: these checkpoints store no ``args``.

    Raises:
        megatron_capaware.models.checkpoint.CheckpointError: no or malformed ``capaware_model.json``.
        ValueError: an architecture Megatron-LM's flags cannot express.
    """
    from megatron_capaware.models.checkpoint import load_model_args

    a = load_model_args(ckpt_dir)
    if a.gated_linear_unit and a.activation != "silu":
        raise ValueError(
            f"{ckpt_dir}: a gated {a.activation} MLP has no Megatron-LM flag (only --swiglu, gated silu)"
        )
    if not a.gated_linear_unit and a.activation not in ("gelu",):
        raise ValueError(f"{ckpt_dir}: a non-gated {a.activation} MLP has no Megatron-LM flag")
    out: Dict[str, Any] = dict(
        num_layers=a.num_layers,
        hidden_size=a.hidden_size,
        num_attention_heads=a.num_attention_heads,
        num_experts=a.num_moe_experts,
        moe_router_topk=a.moe_router_topk,
        moe_ffn_hidden_size=a.moe_ffn_hidden_size,
        ffn_hidden_size=a.ffn_hidden_size or a.moe_ffn_hidden_size,
        padded_vocab_size=a.vocab_size,
        max_position_embeddings=a.max_sequence_length,
        seq_length=a.max_sequence_length,
        moe_layer_freq=a.moe_layer_freq,
        moe_shared_expert_intermediate_size=a.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=a.moe_shared_expert_gate,
        moe_router_score_function=a.moe_router_score_function,
        moe_router_pre_softmax=a.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=a.moe_router_topk_scaling_factor,
        moe_router_dtype="fp32",
        normalization=a.normalization,
        norm_epsilon=a.layernorm_epsilon,
        swiglu=bool(a.gated_linear_unit),
        add_bias_linear=a.add_bias_linear,
        add_qkv_bias=a.add_qkv_bias,
        qk_layernorm=a.qk_layernorm,
        position_embedding_type=a.position_embedding_type,
        rotary_base=int(a.rotary_base),
        rotary_percent=a.rotary_percent,
        untie_embeddings_and_output_weights=not a.share_embeddings_and_output_weights,
    )
    if a.num_query_groups is not None and a.num_query_groups != a.num_attention_heads:
        out.update(group_query_attention=True, num_query_groups=a.num_query_groups)
    if a.kv_channels is not None:
        out["kv_channels"] = a.kv_channels
    dtype = checkpoint_dtype(ckpt_dir)
    if dtype == torch.bfloat16:
        out["bf16"] = True
    elif dtype == torch.float16:
        out["fp16"] = True
    return out


def extra_args_provider(provider: Optional[Callable[[Any], Any]] = None) -> Callable[[Any], Any]:
    """Megatron ``extra_args_provider``: ``provider``'s flags, then megatron-capaware's.

    Besides :func:`megatron_capaware.megatron_lm.arguments.add_capaware_args` it sets, as
    defaults that the command line still overrides: the CPU defaults
    (:data:`CPU_MEGATRON_DEFAULTS`, only without CUDA) and, when ``--load``
    names a megatron-capaware checkpoint, the model's flags
    (:func:`checkpoint_defaults`). It also lets Megatron build that
    checkpoint's tokenizer when no tokenizer flag is given
    (:func:`install_tokenizer_hook`) and, without CUDA, enables
    :func:`enable_cpu_support`.
    """
    from megatron_capaware.megatron_lm.arguments import add_capaware_args

    def extra(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if provider is not None:
            parser = provider(parser)
        install_tokenizer_hook()
        if enable_cpu_support():
            set_parser_defaults(parser, CPU_MEGATRON_DEFAULTS)
        load = peek_flag(sys.argv[1:], "--load")
        if is_capaware_checkpoint(load):
            applied = set_parser_defaults(parser, checkpoint_defaults(load))
            print_rank0(
                f"megatron-capaware: model flags from {Path(load) / MODEL_ARGS_FILE}: "
                f"{describe_defaults(applied)}"
            )
        return escape_help_percents(add_capaware_args(parser))

    extra.capaware_wrapped = provider  # type: ignore[attr-defined]
    return extra


# An escaped %%, a named specifier such as %(default)s, or a lone % (group 1).
_PERCENT = re.compile(r"%%|%\(\w+\)[#0\- +]*\d*(?:\.\d+)?[a-zA-Z]|(%)")


def escape_help_percents(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Escape lone ``%`` in the parser's help strings, so ``--help`` can be printed.

    argparse formats every help string with ``%`` (``%(default)s``); some of
    Megatron's own help strings hold a bare ``%`` (megatron-core 0.19's
    ``--moe-paged-stash-buffer-size-factor-cuda``, main's
    ``--mhc-recompute-layer-num``), so ``--help`` raised ``ValueError:
    unsupported format character``. Remove when Megatron escapes them.
    """
    for action in parser._actions:
        if isinstance(action.help, str) and "%" in action.help:
            action.help = _PERCENT.sub(lambda m: "%%" if m.group(1) else m.group(0), action.help)
    return parser


def describe_defaults(defaults: Dict[str, Any]) -> str:
    """``--num-layers 2 --swiglu ...`` for a log line."""
    parts = []
    for dest, value in defaults.items():
        name = "--" + dest.replace("_", "-")
        if value is True:
            parts.append(name)
        elif value is False or value is None:
            continue
        else:
            parts.append(f"{name} {value}")
    return " ".join(parts)
