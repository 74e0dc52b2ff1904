"""Functions run on spawned gloo ranks by the dynamic-engine tests (module level: picklable).

They drive megatron-core 0.19.2's ``MegatronLLM`` (``megatron.core.inference.apis``)
on the bundled 8x2 reference model, on CPU through the package's CPU support
(:mod:`megatron_capaware._compat.dynamic_engine_cpu`).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

PROMPTS = [
    "ROMEO:\nBut soft, what light",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "KING:\n",
    "Now is the winter of our discontent made glorious summer by this sun of York;",
]


def _setup(spec: Dict[str, Any]):
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch

    from megatron_capaware import parallel
    from megatron_capaware._compat.cpu_shims import apply_cpu_shims, redirect_cuda_tensors_to_cpu

    parallel.init_model_parallel(parallel.ParallelSizes(expert_parallel=spec.get("ep", 1)), timeout_s=120)
    apply_cpu_shims()
    redirect_cuda_tensors_to_cpu()
    parallel.set_seed(0)
    from megatron_capaware.megatron_lm.tokenizer import CapawareTokenizer
    from megatron_capaware.models import checkpoint, reference_models

    model, _ = checkpoint.load_model(reference_models.reference_model_dir(), expert_parallel=spec.get("ep", 1),
                                     params_dtype=torch.float32)
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
    ``tokens`` to generate, ``ep``. Returns ``{label: {"tokens": [[...]], "text": [...],
    "phases": {phase: {"calls": n, "tokens": n, "dropped": n, "requested": n}}}}``.
    """
    from megatron.core.inference.apis import MegatronLLM
    from megatron.core.inference.sampling_params import SamplingParams

    from megatron_capaware.adapters import install_capaware_routers, reset_stats
    from megatron_capaware.config import CapawareConfig

    model, tokenizer = _setup(spec)
    llm = MegatronLLM(model=model, tokenizer=tokenizer, inference_config=_inference_config(spec),
                      use_coordinator=spec.get("ep", 1) > 1)
    params = SamplingParams(num_tokens_to_generate=spec.get("tokens", 8), temperature=1.0, top_k=1,
                            termination_id=-1)
    out: Dict[str, Any] = {}
    prompts: List[str] = spec.get("prompts", PROMPTS)
    for label, cfg in spec["routers"].items():
        if cfg is not None:
            install_capaware_routers(model, CapawareConfig(**cfg), placement=spec.get("placement"))
            reset_stats(model)
        result: Dict[str, Any] = {}
        if llm.is_primary_rank:
            records = llm.generate(prompts, params)
            result["tokens"] = [list(r.generated_tokens) for r in records]
            result["text"] = [r.generated_text for r in records]
        if cfg is not None:
            from megatron_capaware.adapters.phases import phase_totals

            result["phases"] = phase_totals(model)
        out[label] = result
    if spec.get("ep", 1) > 1:
        llm.shutdown()
    return out
