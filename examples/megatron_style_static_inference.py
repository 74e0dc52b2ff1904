# Stand-in for a Megatron-LM inference script (tools/run_text_generation_server.py,
# examples/inference/advanced/gpt_static_inference.py): it uses megatron.training the way
# those scripts do and knows nothing of megatron-capaware. Megatron-LM's scripts are
# not on PyPI; this one runs with the megatron-core wheel alone, so the launcher can
# be shown and tested on it:
#
#   torchrun --nproc-per-node 2 -m megatron_capaware.launch \
#       examples/megatron_style_static_inference.py --load CKPT \
#       --expert-model-parallel-size 2 --moe-router-type laser --prompts "To be"
#
# Run directly (python examples/megatron_style_static_inference.py ...) it is plain
# Megatron on a GPU: --moe-router-type is then an unrecognized argument.
"""Generate text with Megatron's static inference engine (a Megatron-LM style script)."""

import torch

from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.engines import StaticInferenceEngine
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
    GPTInferenceWrapper,
)
from megatron.core.inference.sampling_params import SamplingParams
from megatron.core.inference.text_generation_controllers.text_generation_controller import (
    TextGenerationController,
)
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.training import get_args, get_model, get_tokenizer, print_rank_0
from megatron.training.arguments import core_transformer_config_from_args, parse_and_validate_args
from megatron.training.checkpointing import load_checkpoint
from megatron.training.initialize import initialize_megatron


def add_text_generate_args(parser):
    """Text generation arguments (as in Megatron-LM's tools)."""
    group = parser.add_argument_group(title='text generation')
    group.add_argument("--prompts", metavar='N', type=str, nargs='+',
                       help='Input prompts with each prompt within quotes and separated by space')
    group.add_argument("--num-tokens-to-generate", type=int, default=30,
                       help='Number of tokens to generate for each prompt')
    group.add_argument("--top_k", type=int, default=1, help='Top k sampling.')
    return parser


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None,
                   pg_collection=None):
    """Build a GPT model from the parsed arguments (Megatron-LM's gpt_builders, abridged)."""
    args = get_args()
    print_rank_0('building GPT model ...')
    if config is None:
        config = core_transformer_config_from_args(args)
    use_te = args.transformer_impl == "transformer_engine"
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_decoder_block_spec(config, use_transformer_engine=use_te),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=False,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        pg_collection=pg_collection,
    )


@torch.inference_mode()
def main():
    parse_and_validate_args(
        extra_args_provider=add_text_generate_args,
        args_defaults={'no_load_rng': True, 'no_load_optim': True, 'micro_batch_size': 1,
                       'exit_on_missing_checkpoint': True},
    )
    initialize_megatron()
    args = get_args()

    model = get_model(model_provider, wrap_with_ddp=False)
    if args.load is not None:
        _ = load_checkpoint(model, None, None, strict=False)
    model = model[0]
    model.eval()

    inference_context = StaticInferenceContext(args.inference_max_requests,
                                               args.inference_max_seq_length)
    # Expert parallelism needs every rank to generate the same tokens.
    inference_context.config.offset_sampling_seed_by_dp_rank = False
    controller = TextGenerationController(
        inference_wrapped_model=GPTInferenceWrapper(model, inference_context),
        tokenizer=get_tokenizer(),
    )
    engine = StaticInferenceEngine(text_generation_controller=controller, legacy=True)
    results = engine.generate(
        prompts=args.prompts or ["Hello"],
        sampling_params=SamplingParams(top_k=args.top_k,
                                       num_tokens_to_generate=args.num_tokens_to_generate),
    )
    if torch.distributed.get_rank() == 0:
        for i, result in enumerate(results):
            print(f"prompt {i}: {result.prompt}")
            print(f"output {i}: {result.generated_text}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
