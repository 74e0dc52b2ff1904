"""Generate text with a capaware router, on Megatron's own stack.

``capaware-generate`` (or ``python -m megatron_capaware.generate``) takes
Megatron-LM's command line plus the ``--capaware-*`` flags and:

1. parses and initialises Megatron with ``megatron.training``
   (``parse_and_validate_args`` + ``initialize_megatron``);
2. builds the GPT MoE with Megatron's ``get_model`` and loads ``--load`` with
   Megatron's own ``load_checkpoint``. For a megatron-capaware checkpoint the
   architecture flags default to its ``capaware_model.json`` and the
   tokenizer to its ``tokenizer/tokenizer.json``, so ``--load CKPT`` is
   enough; without ``--load`` the bundled reference model is used;
3. swaps the routers chosen by ``--moe-router-type`` into the loaded model;
4. generates for ``--prompts`` with Megatron-Core's static inference engine
   (``StaticInferenceEngine`` + ``GPTInferenceWrapper`` +
   ``TextGenerationController``), prints each prompt and its continuation on
   rank 0, then the per-layer expert-load statistics.

CPU, expert parallel over 2 processes::

    torchrun --nproc-per-node 2 -m megatron_capaware.generate \\
        --load CKPT --expert-model-parallel-size 2 \\
        --moe-router-type capacity-drop --capaware-gamma 1.0 \\
        --prompts "To be, or not to be" --num-tokens-to-generate 16

The same flags run on GPUs (Transformer Engine layers when installed). Every
rank generates the same prompts with the same sampling seed: the static
engine needs every expert-parallel rank to run the same number of steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from megatron_capaware._compat.cli import run_cli
from megatron_capaware.policies.collectives import barrier


DEFAULT_PROMPTS = ["To be, or not to be,", "My lord, the king"]
PROG = "capaware-generate"


def add_generation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Text generation flags (names as in Megatron-LM's text generation tools)."""
    known = {opt for action in parser._actions for opt in action.option_strings}
    group = parser.add_argument_group(title="text generation (capaware-generate)")

    def add(name: str, **kwargs: Any) -> None:
        if name not in known:
            group.add_argument(name, **kwargs)

    add("--prompts", metavar="TEXT", type=str, nargs="+", default=None,
        help=f"Prompts to continue, each one quoted. Default: {DEFAULT_PROMPTS}.")
    add("--prompts-file", metavar="FILE", type=str, default=None,
        help="A text file with one prompt per line (added after --prompts).")
    add("--num-tokens-to-generate", type=int, default=30,
        help="Tokens generated for each prompt. Default: 30.")
    add("--temperature", type=float, default=1.0, help="Sampling temperature. Default: 1.0.")
    add("--top_k", type=int, default=1,
        help="Top-k sampling; 1 = greedy (the default).")
    add("--top_p", type=float, default=0.0, help="Top-p sampling; 0 = off (the default).")
    add("--return-log-probs", action="store_true", default=False,
        help="Record the log-probability of every generated token (in --output-path).")
    add("--output-path", metavar="FILE", type=str, default=None,
        help="Also write the prompts and generations as JSON to FILE (rank 0).")
    return parser


def default_checkpoint() -> Optional[str]:
    """The bundled reference model's directory, when this install has one."""
    try:
        from megatron_capaware.models.reference_models import REFERENCE_MODEL_DIR
    except ImportError:
        return None
    path = Path(REFERENCE_MODEL_DIR)
    return str(path) if (path / "capaware_model.json").is_file() else None


def with_default_load(argv: List[str]) -> Optional[List[str]]:
    """``argv`` with ``--load`` of the bundled model appended when it names none.

    Returns None when there is neither a ``--load`` nor a bundled model.
    """
    from megatron_capaware.megatron_lm import peek_flag

    if peek_flag(argv, "--load") is not None:
        return list(argv)
    load = default_checkpoint()
    return None if load is None else list(argv) + ["--load", load]


def read_prompts(args: Any) -> List[str]:
    prompts = list(args.prompts or [])
    if args.prompts_file:
        prompts += [line.rstrip("\n") for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    return prompts or list(DEFAULT_PROMPTS)


def build_engine(model: Any, tokenizer: Any, args: Any) -> Any:
    """Megatron-Core's static inference engine around ``model``.

    Every rank seeds sampling alike (Megatron offsets the seed by the data
    parallel rank by default): expert parallelism needs all ranks to step
    together, so they must produce the same tokens.
    """
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.engines import StaticInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
        GPTInferenceWrapper,
    )
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    context = StaticInferenceContext(args.inference_max_requests, args.inference_max_seq_length)
    if hasattr(context, "config") and hasattr(context.config, "offset_sampling_seed_by_dp_rank"):
        context.config.offset_sampling_seed_by_dp_rank = False
    wrapped = GPTInferenceWrapper(model, context)
    controller = TextGenerationController(inference_wrapped_model=wrapped, tokenizer=tokenizer)
    return StaticInferenceEngine(text_generation_controller=controller, random_seed=args.seed, legacy=True)


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, _main, argv, own_flags=False)


def _main(argv: List[str]) -> int:
    """Entry point of ``capaware-generate``; returns the exit status."""
    if argv is not None:
        sys.argv = [PROG] + list(argv)
    from megatron_capaware import megatron_lm

    try:
        megatron_lm.import_megatron_training()
    except megatron_lm.MegatronTrainingUnavailable as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    argv_with_load = with_default_load(sys.argv[1:])
    if argv_with_load is None:
        print(f"{PROG}: error: give --load CHECKPOINT (no bundled reference model in this "
              "install)", file=sys.stderr)
        return 2
    sys.argv = [sys.argv[0]] + argv_with_load
    megatron_lm.enable_cpu_support()
    megatron_lm.install_tokenizer_hook()

    import torch
    import megatron.training.initialize as initialize
    from megatron.training import get_args, get_model, get_tokenizer
    from megatron.training.checkpointing import load_checkpoint

    from megatron_capaware.adapters import install_capaware_routers
    from megatron_capaware.megatron_lm.arguments import config_from_args, placement_from_args

    defaults = {"no_load_rng": True, "no_load_optim": True, "micro_batch_size": 1,
                "exit_on_missing_checkpoint": True}
    provider = megatron_lm.extra_args_provider(add_generation_args)
    try:
        from megatron.training.arguments import parse_and_validate_args
    except ImportError:  # Megatron-LM before 0.18: initialize_megatron parses
        parse_and_validate_args = None
    if parse_and_validate_args is not None:
        parse_and_validate_args(extra_args_provider=provider, args_defaults=defaults)
        initialize.initialize_megatron()
    else:
        initialize.initialize_megatron(extra_args_provider=provider, args_defaults=defaults)
    args = get_args()
    capaware = config_from_args(args)

    model_chunks = get_model(megatron_lm.gpt_model_provider, wrap_with_ddp=False)
    load_checkpoint(model_chunks, None, None, strict=True)
    if len(model_chunks) != 1:
        raise SystemExit(f"{PROG}: pipeline / virtual pipeline parallelism is not supported")
    model = model_chunks[0].eval()
    placement = placement_from_args(args)
    stats = install_capaware_routers(model, capaware, placement=placement,
                                     replica_policy=args.capaware_replica_policy)
    megatron_lm.print_rank0(
        f"megatron-capaware: router {capaware.describe()} in {len(stats)} MoE layers "
        f"(EP={args.expert_model_parallel_size}, TP={args.tensor_model_parallel_size}, "
        f"world={args.world_size})" + (f", experts placed by {placement}" if placement else "")
    )

    from megatron.core.inference.sampling_params import SamplingParams

    prompts = read_prompts(args)
    engine = build_engine(model, get_tokenizer(), args)
    sampling = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        num_tokens_to_generate=args.num_tokens_to_generate, return_log_probs=args.return_log_probs,
    )
    start = time.perf_counter()
    with torch.inference_mode():
        results = engine.generate(prompts=prompts, sampling_params=sampling)
    seconds = time.perf_counter() - start
    generations = []
    for r in results:
        item: Dict[str, Any] = {"prompt": r.prompt, "generated_text": r.generated_text,
                                "generated_tokens": [int(t) for t in r.generated_tokens]}
        if args.return_log_probs and r.generated_log_probs is not None:
            item["generated_log_probs"] = [float(x) for x in r.generated_log_probs]
        generations.append(item)
    if megatron_lm.is_rank0():
        for i, item in enumerate(generations):
            print(f"prompt {i}: {item['prompt']}")
            print(f"output {i}: {item['generated_text']}", flush=True)
        print(f"megatron-capaware: generated {sum(len(g['generated_tokens']) for g in generations)} "
              f"tokens for {len(generations)} prompts in {seconds:.2f} s", flush=True)
    record = megatron_lm.report_stats(
        stats, capaware, args.capaware_stats_output,
        extra={"prompts": len(prompts), "num_tokens_to_generate": args.num_tokens_to_generate,
               "checkpoint": str(args.load)},
    )
    if megatron_lm.is_rank0() and args.output_path:
        out: Dict[str, Any] = {"router": capaware.describe(), "generations": generations,
                               "seconds": seconds, "load_stats": record}
        Path(args.output_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_path).write_text(json.dumps(out, indent=2) + "\n")
    if torch.distributed.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
