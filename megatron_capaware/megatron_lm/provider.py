"""A Megatron-LM style model provider for the GPT MoE models capaware checkpoints hold."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch


def gpt_model_provider(
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    config: Any = None,
    pg_collection: Any = None,
) -> torch.nn.Module:
    """Megatron-LM style model provider for ``megatron.training.get_model``: a GPT MoE.

    Builds ``GPTModel`` from Megatron's parsed arguments
    (``core_transformer_config_from_args``) with Megatron's own decoder block
    spec, Transformer Engine layers when ``--transformer-impl
    transformer_engine``, Megatron's local layers otherwise.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    if config is None:
        config = core_transformer_config_from_args(args)
    use_te = getattr(args, "transformer_impl", "local") == "transformer_engine"
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, vp_stage=vp_stage)
    kwargs: Dict[str, Any] = dict(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=False,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
    )
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    if pg_collection is not None:
        kwargs["pg_collection"] = pg_collection
    return GPTModel(**kwargs)
