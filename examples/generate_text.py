"""Generate text with a capaware router: the steps of ``capaware-generate``, spelled out.

Megatron-LM style: Megatron's parser and initialisation, Megatron's
``get_model`` and ``load_checkpoint``, Megatron-Core's static inference
engine; megatron-capaware adds its flags and swaps the routers in::

    torchrun --nproc-per-node 2 examples/generate_text.py --load CKPT \\
        --expert-model-parallel-size 2 --moe-router-type laser \\
        --prompts "To be, or not to be" --num-tokens-to-generate 16

``CKPT`` is a megatron-capaware checkpoint (e.g. the bundled reference model):
its ``capaware_model.json`` supplies the architecture flags and its
``tokenizer/tokenizer.json`` the tokenizer. Runs on CPU (gloo) and GPU alike.
"""

import torch

from megatron_capaware import megatron_lm

megatron_lm.import_megatron_training()  # clear error without megatron.training
megatron_lm.enable_cpu_support()  # no-op on a machine with CUDA

from megatron.core.inference.sampling_params import SamplingParams  # noqa: E402
from megatron.training import get_args, get_model, get_tokenizer  # noqa: E402
from megatron.training.arguments import parse_and_validate_args  # noqa: E402
from megatron.training.checkpointing import load_checkpoint  # noqa: E402
from megatron.training.initialize import initialize_megatron  # noqa: E402

from megatron_capaware.adapters import install_capaware_routers  # noqa: E402
from megatron_capaware.megatron_lm.arguments import config_from_args  # noqa: E402
from megatron_capaware.megatron_lm.generate import build_engine  # noqa: E402


def add_prompt_args(parser):
    group = parser.add_argument_group(title="prompts")
    group.add_argument("--prompts", nargs="+", default=["To be, or not to be,"], help="prompts to continue")
    group.add_argument("--num-tokens-to-generate", type=int, default=16, help="tokens per prompt")
    return parser


def main() -> None:
    # 1. Megatron's flags + the script's + megatron-capaware's (checked at parse time);
    #    --load of a capaware checkpoint supplies the architecture flags.
    parse_and_validate_args(
        extra_args_provider=megatron_lm.extra_args_provider(add_prompt_args),
        args_defaults={"no_load_rng": True, "no_load_optim": True, "micro_batch_size": 1},
    )
    initialize_megatron()
    args = get_args()

    # 2. Build with Megatron's get_model, load with Megatron's load_checkpoint.
    model = get_model(megatron_lm.gpt_model_provider, wrap_with_ddp=False)
    load_checkpoint(model, None, None, strict=True)
    model = model[0].eval()

    # 3. Swap the routers in place (weights untouched); keep the stats recorders.
    capaware = config_from_args(args)
    stats = install_capaware_routers(model, capaware)

    # 4. Megatron-Core's static inference engine.
    engine = build_engine(model, get_tokenizer(), args)
    with torch.inference_mode():
        results = engine.generate(
            prompts=args.prompts,
            sampling_params=SamplingParams(top_k=1, num_tokens_to_generate=args.num_tokens_to_generate),
        )
    if megatron_lm.is_rank0():
        for result in results:
            print(f"{result.prompt!r} -> {result.generated_text!r}", flush=True)

    # 5. Per-layer expert loads over the whole run (every rank takes part).
    megatron_lm.report_stats(stats, capaware, args.capaware_stats_output)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
