"""Functions run on spawned gloo ranks by the dynamic-engine tests (module level: picklable).

They drive megatron-core 0.19.2's ``MegatronLLM`` (``megatron.core.inference.apis``)
on the bundled 8x2 reference model, on CPU through the package's CPU support
(:mod:`megatron_capaware._compat.dynamic_engine_cpu`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List

PROMPTS = [
    "ROMEO:\nBut soft, what light",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "KING:\n",
    "Now is the winter of our discontent made glorious summer by this sun of York;",
]

#: A prompt of 92 tokens (longer than a 64-token step budget: its prefill is chunked).
LONG_PROMPT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
               "that lour'd upon our house in the deep bosom of the ocean buried. Now are our brows bound with "
               "victorious wreaths; our bruised arms hung up for monuments; our stern alarums changed to merry "
               "meetings, our dreadful marches to delightful measures.")


def _setup(spec: Dict[str, Any]):
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch

    from megatron_capaware import parallel
    from megatron_capaware._compat.cpu_shims import redirect_cuda_tensors_to_cpu
    from megatron_capaware._compat.cpu_shims import enable_dynamic_engine_on_cpu

    parallel.init_model_parallel(parallel.ParallelSizes(tensor_parallel=spec.get("tp", 1),
                                                        expert_parallel=spec.get("ep", 1)),
                                timeout_s=spec.get("collective_timeout_s", 600))
    enable_dynamic_engine_on_cpu()
    redirect_cuda_tensors_to_cpu()
    parallel.set_seed(0)
    from megatron_capaware.megatron_lm.tokenizer import CapawareTokenizer
    from megatron_capaware.models import checkpoint, reference_models

    model, _ = checkpoint.load_model(reference_models.reference_model_dir(), tensor_parallel=spec.get("tp", 1),
                                     expert_parallel=spec.get("ep", 1), params_dtype=torch.float32,
                                     **({"sequence_parallel": True} if spec.get("sequence_parallel") else {}))
    tokenizer = CapawareTokenizer.from_file(reference_models.reference_model_dir() / "tokenizer")
    return model.eval(), tokenizer


def _inference_config(spec: Dict[str, Any]):
    from megatron.core.inference.config import InferenceConfig

    return InferenceConfig(
        buffer_size_gb=0.02, block_size_tokens=16, max_sequence_length=128,
        max_requests=spec.get("max_requests", 4), max_tokens=spec.get("max_tokens", None),
        enable_chunked_prefill=spec.get("chunked_prefill", False), num_cuda_graphs=None,
    )


def megatron_llm_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Greedy ``MegatronLLM.generate`` with Megatron's router, then with each capaware config.

    ``spec``: ``routers`` ``{label: CapawareConfig kwargs}`` (``"megatron"``: no install),
    ``tokens`` to generate, ``ep``, ``api`` (``sync``: ``MegatronLLM``; ``async``: ``MegatronAsyncLLM``,
    coordinator mode at every EP), ``max_tokens`` / ``chunked_prefill`` (the engine's step budget and
    Megatron's chunked prefill), ``tp``. In coordinator mode with ``MegatronLLM`` the configurations
    run one after the other in the same engines (paused and resumed between them; Megatron's own
    router, None, only first); with ``MegatronAsyncLLM`` only the first
    configuration runs (install it before the engine loop starts). Returns ``{label: {"tokens": [[...]], "text": [...],
    "phases": {phase: {"calls": n, "tokens": n, "dropped": n, "requested": n}}}}``.
    """
    import asyncio

    from megatron.core.inference.apis import MegatronAsyncLLM, MegatronLLM
    from megatron.core.inference.sampling_params import SamplingParams

    from megatron_capaware.adapters import install_capaware_routers, reset_stats
    from megatron_capaware.adapters.phases import phase_totals
    from megatron_capaware.config import CapawareConfig

    start = time.perf_counter()
    model, tokenizer = _setup(spec)
    # The context allocates buffers for the inference-optimized EP dispatcher it expects at EP > 1:
    # NVLS (symmetric memory, Hopper + NVLink) by default; this model's layers use the training
    # alltoall dispatcher, so ask for the NCCL all-gather one's (plain tensors).
    model.config.inference_moe_token_dispatcher_type = "nccl"
    use_async = spec.get("api", "sync") == "async"
    # MegatronLLM requires the coordinator at EP > 1; MegatronAsyncLLM always does.
    coordinator = spec.get("ep", 1) > 1 or spec.get("tp", 1) > 1 or use_async
    routers = list(spec["routers"].items())
    switch = coordinator and len(routers) > 1 and not use_async
    if switch and any(cfg is None for _, cfg in routers[1:]):
        raise ValueError("in coordinator mode Megatron's own router (None) can only be the first configuration")
    sync_group = None
    if switch:  # made before the engine threads start: only the main threads ever use it
        import torch.distributed as dist

        sync_group = dist.new_group(backend="gloo")
    if coordinator and routers[0][1] is not None:
        # Install before the engine loops start: the install's rank-agreement collective must not
        # interleave with the other ranks' engine steps (they run on a background thread).
        install_capaware_routers(model, CapawareConfig(**routers[0][1]), placement=spec.get("placement"))
    if coordinator and not switch:
        routers = routers[:1]
    api = MegatronAsyncLLM if use_async else MegatronLLM
    llm = api(model=model, tokenizer=tokenizer, inference_config=_inference_config(spec), use_coordinator=coordinator)
    steps: List[Any] = []  # per engine step: (real, padded, prefill tokens), from the context's host bookkeeping
    context = llm.context
    initialize = context.initialize_attention_state

    def initialize_and_record(*args: Any, **kwargs: Any) -> Any:
        out = initialize(*args, **kwargs)
        real = 0 if getattr(context, "_bookkeeping_no_real_work", False) else int(context.active_token_count)
        decode = min(real, int(context.num_decode_requests))
        steps.append((real, int(context.padded_active_token_count), real - decode))
        return out

    context.initialize_attention_state = initialize_and_record
    params = SamplingParams(num_tokens_to_generate=spec.get("tokens", 8), temperature=1.0, top_k=1,
                            termination_id=-1)
    out: Dict[str, Any] = {}
    prompts: List[str] = spec.get("prompts", PROMPTS)
    timings: Dict[str, float] = {"setup_s": time.perf_counter() - start}
    previous = None
    for label, cfg in routers:
        if switch and previous is not None:
            # Another configuration in the same engines: pause them all (Megatron's RL weight-update
            # path), read the previous configuration's stats, reinstall (its collectives run while the
            # engine threads are paused), wait for every rank, and resume.
            llm.pause()
            if previous[1] is not None:
                out[previous[0]]["phases"] = phase_totals(model)
            install_capaware_routers(model, CapawareConfig(**cfg), placement=spec.get("placement"))
            reset_stats(model)
            import torch.distributed as dist

            dist.barrier(group=sync_group)
            llm.unpause()
        elif cfg is not None and not coordinator:
            install_capaware_routers(model, CapawareConfig(**cfg), placement=spec.get("placement"))
            reset_stats(model)
        result: Dict[str, Any] = {}
        if llm.is_primary_rank:
            t0 = time.perf_counter()
            records = asyncio.run(llm.generate(prompts, params)) if use_async else llm.generate(prompts, params)
            timings[f"generate_{label}_s"] = time.perf_counter() - t0
            result["tokens"] = [list(r.generated_tokens) for r in records]
            result["text"] = [r.generated_text for r in records]
            result["prompt_lengths"] = [len(tokenizer.tokenize(p)) for p in prompts]
            result["steps"] = list(steps)
        steps.clear()
        out[label] = result
        previous = (label, cfg)
        if cfg is not None and not coordinator:
            result["phases"] = phase_totals(model)
    if coordinator:
        if use_async:
            asyncio.run(llm.shutdown())
        else:
            llm.shutdown()  # every rank's engine loop has stopped: its stats are complete
        label, cfg = previous
        if cfg is not None:
            out[label]["phases"] = phase_totals(model)
    out["timings"] = timings
    return out
