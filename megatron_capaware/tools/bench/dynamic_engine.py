"""Megatron's dynamic engine (``MegatronLLM``) on the bundled 8x2 model, with each router (issue 23 item 4).

The one-GPU check's ``dynamic_engine`` step (``tools/gpu_check.py``) runs this
module in a process of its own (its own time bound; a CUDA error or a hang in
graph capture cannot take the other steps' results with it). At EP 1, direct
mode (no coordinator), greedy generation of a few prompts:

1. with Megatron's own router (nothing installed): the reference text;
2. for each router of :data:`ENGINE_ROUTERS`, installed by the one installer
   (``adapters.install_capaware_routers``) **before** a fresh ``MegatronLLM`` is
   built, so that the engine captures its CUDA graphs with the router in place
   (a captured step routes capture-safe: ``adapters.phases``); the previous
   engine's graphs are deleted first (Megatron's ``delete_cuda_graphs``).

Per configuration it records the generated text and its hash, the engine
steps (real tokens, and whether the step ran as a CUDA graph:
``context.using_cuda_graph_this_step()``), the CUDA-graph replays (calls of
Megatron's ``_CudaGraphRunner.replay_graph_capture`` during ``generate``: one
per graphed layer per captured step), the per-phase routing statistics
(``adapters.phases.phase_totals``), and on CUDA the host syncs counted under
``torch.cuda.set_sync_debug_mode("warn")`` (the engine itself syncs every step
to read the sampled tokens, so the figure to read is the router's count minus
Megatron's) and a closing ``torch.cuda.synchronize()`` (a CUDA error of the
replays surfaces there).

On CUDA the model is built with ``cuda_graph_impl="local"`` (the dynamic
engine's graphs, whole layers at inference) in bf16 and the engine captures
decode-only and small prefill/mixed graphs (``InferenceConfig``:
``num_cuda_graphs``, ``cuda_graph_max_tokens``,
``use_cuda_graphs_for_non_decode_steps``). On the CPU (``--device cpu``, what
the tests run) graphs are off (they need CUDA): replays are 0 and the verdict
is the text alone.

Verdict: ``topk``'s text equals Megatron's, every router generated, and on CUDA
graph replays > 0 for every configuration and the closing synchronize passed.

Needs megatron-core >= 0.19 (``megatron.core.inference.apis.MegatronLLM``); on
CUDA also flash-attn (the dynamic engine's attention). :func:`skip_reason`
says what is missing.

Example::

    python -m megatron_capaware.tools.bench.dynamic_engine --device cpu --json de.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from megatron_capaware.registry import CAPACITY_DROP, CAPACITY_REROUTE, DECODE_PACK, EXPANDED_DROP, LASER, TOPK

#: The configurations run after Megatron's own router: ``label -> CapawareConfig`` keyword arguments.
ENGINE_ROUTERS: Dict[str, Dict[str, Any]] = {
    TOPK: dict(router_type=TOPK),
    f"{CAPACITY_DROP}:gamma=1": dict(router_type=CAPACITY_DROP, gamma=1.0),
    f"{CAPACITY_REROUTE}:gamma=1": dict(router_type=CAPACITY_REROUTE, gamma=1.0),
    f"{EXPANDED_DROP}:gamma=1": dict(router_type=EXPANDED_DROP, gamma=1.0),
    # LASER's knobs as the dynamic-engine tests set them (no calibration file needed).
    LASER: dict(router_type=LASER, laser_eps_high=0.9, laser_t_fix=0.3, laser_pool=4),
    DECODE_PACK: dict(router_type=DECODE_PACK),
    f"{CAPACITY_DROP}:gamma=1+decode_router={DECODE_PACK}": dict(router_type=CAPACITY_DROP, gamma=1.0,
                                                                  decode_router=DECODE_PACK),
}
#: Label of the reference run (Megatron's router, nothing installed).
MEGATRON = "megatron"

PROMPTS = [
    "ROMEO:\nBut soft, what light",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "KING:\n",
]

MIN_MEGATRON_CORE = (0, 19)
#: The flash-attention packages megatron-core 0.19.2's attention imports (FA2, FA3, FA3 for Hopper).
FLASH_ATTENTION = ("flash_attn", "flash_attn_3", "flashattn_hopper")


def _version_tuple(version: str) -> Tuple[int, ...]:
    out = []
    for part in version.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def skip_reason(device: str) -> Optional[str]:
    """Why this check cannot run here (None when it can): megatron-core < 0.19 or without
    ``megatron.core.inference.apis.MegatronLLM``, or on CUDA no flash-attn."""
    from megatron_capaware._compat.cpu_shims import apply_cpu_shims

    apply_cpu_shims()  # without CUDA megatron-core imports only with them (no-op with CUDA)
    try:
        import megatron.core
    except ImportError as err:
        return f"megatron-core is not importable ({err}): pip install 'megatron-core>=0.19.2'"
    version = getattr(megatron.core, "__version__", "unknown")
    if _version_tuple(version) < MIN_MEGATRON_CORE:
        return (f"megatron-core {version} is installed; the dynamic engine's MegatronLLM needs megatron-core "
                f">= 0.19 (pip install 'megatron-core>=0.19.2', or its wheel in --wheels)")
    try:
        from megatron.core.inference.apis import MegatronLLM  # noqa: F401
    except ImportError as err:
        return (f"megatron-core {version} has no megatron.core.inference.apis.MegatronLLM ({err}): "
                "pip install 'megatron-core>=0.19.2'")
    if device == "cuda" and not any(importlib.util.find_spec(name) for name in FLASH_ATTENTION):
        return ("flash-attn is not importable: Megatron's dynamic engine needs it on CUDA for its paged KV "
                "cache (pip install flash-attn, or its wheel in --wheels)")
    return None


def build_reference_model(device: str, cuda_graphs: bool, moe_pad: bool = False) -> Tuple[Any, Any]:
    """The bundled 8x2 reference model and its tokenizer at EP 1, TP 1, ready for the dynamic engine.

    Megatron's model-parallel groups must be initialised (world size 1). On CUDA: bf16, and
    ``cuda_graph_impl="local"`` when ``cuda_graphs`` (the dynamic engine's graphs, whole layers,
    with Megatron's inference RNG tracker as ``--inference-rng-tracker`` sets it);
    on the CPU: fp32, the package's CPU support for the dynamic engine switched on first.
    ``moe_pad``: Megatron's ``moe_pad_experts_for_cuda_graph_inference`` (drop-and-pad at capacity
    factor E / k on graph steps, what Megatron's own CUDA-graph MoE tests set and what megatron-core 0.19
    asserts at EP > 1; every router accepts it: padded steps route by Megatron's own top-k).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    import torch

    from megatron_capaware import parallel
    from megatron_capaware.megatron_lm.tokenizer import CapawareTokenizer
    from megatron_capaware.models import checkpoint, reference_models

    if device == "cpu":
        from megatron_capaware._compat.cpu_shims import enable_dynamic_engine_on_cpu, redirect_cuda_tensors_to_cpu

        enable_dynamic_engine_on_cpu()
        redirect_cuda_tensors_to_cpu()
    parallel.set_seed(0)
    overrides: Dict[str, Any] = {}
    if cuda_graphs:
        # Megatron's graphs need a graph-safe RNG tracker; its inference examples and CUDA-graph MoE
        # tests pass --inference-rng-tracker (no dropout at inference: the tracker holds no state).
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0, inference_rng_tracker=True, force_reset_rng=True)
        overrides = {"cuda_graph_impl": "local", "inference_rng_tracker": True}
    if moe_pad:
        overrides["moe_pad_experts_for_cuda_graph_inference"] = True
    model, _ = checkpoint.load_model(reference_models.reference_model_dir(),
                                     params_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                     **overrides)
    tokenizer = CapawareTokenizer.from_file(reference_models.reference_model_dir() / "tokenizer")
    return model.eval(), tokenizer


def inference_config(cuda_graphs: bool) -> Any:
    """The engine's ``InferenceConfig``: a small paged KV cache; with ``cuda_graphs``, decode-only
    graphs up to ``max_requests`` tokens and prefill/mixed graphs up to 64 tokens (the prompts'
    prefill fits: it runs as a graph too), at most 4 graph sizes of each kind."""
    from megatron.core.inference.config import InferenceConfig

    graphs: Dict[str, Any] = (dict(num_cuda_graphs=4, cuda_graph_max_tokens=64, cuda_graph_mixed_prefill_count=4,
                                   use_cuda_graphs_for_non_decode_steps=True)
                              if cuda_graphs else dict(num_cuda_graphs=None))
    # On CUDA Megatron's default block size (flash-attn's paged KV cache wants multiples of 256).
    blocks: Dict[str, Any] = dict(buffer_size_gb=0.25) if cuda_graphs else dict(buffer_size_gb=0.02,
                                                                                block_size_tokens=16)
    return InferenceConfig(max_sequence_length=128, max_requests=4, **blocks, **graphs)


class ReplayCounter:
    """Counts Megatron's CUDA-graph replays (``_CudaGraphRunner.replay_graph_capture`` calls) while on.

    Patches the class method once (``install``); ``count`` is reset by the caller. One replay is
    one graphed layer's forward in one captured step.
    """

    def __init__(self) -> None:
        self.count = 0
        self.on = False
        self._original: Any = None

    def install(self) -> None:
        from megatron.core.transformer import cuda_graphs

        runner = cuda_graphs._CudaGraphRunner
        original = runner.replay_graph_capture
        counter = self

        def counted(self_: Any, *args: Any, **kwargs: Any) -> Any:
            if counter.on:
                counter.count += 1
            return original(self_, *args, **kwargs)

        self._original = original
        runner.replay_graph_capture = counted

    def remove(self) -> None:
        if self._original is not None:
            from megatron.core.transformer import cuda_graphs

            cuda_graphs._CudaGraphRunner.replay_graph_capture = self._original
            self._original = None


def _digest(texts: List[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]


def run_config(model: Any, tokenizer: Any, device: str, cuda_graphs: bool, cfg: Optional[Dict[str, Any]],
               prompts: List[str], tokens: int, counter: ReplayCounter) -> Dict[str, Any]:
    """One configuration: install (``cfg`` None: Megatron's router), a fresh engine, greedy generation.

    Returns ``{"text", "text_sha256_16", "tokens", "steps", "graph_steps", "eager_steps",
    "graph_replays", "phases", "seconds", ...}`` (``syncs`` and ``synchronize_ok`` on CUDA).
    """
    import torch
    from megatron.core.inference.apis import MegatronLLM
    from megatron.core.inference.sampling_params import SamplingParams

    from megatron_capaware.adapters import install_capaware_routers, reset_stats
    from megatron_capaware.adapters.phases import phase_totals
    from megatron_capaware.config import CapawareConfig

    row: Dict[str, Any] = {}
    started = time.perf_counter()
    if cuda_graphs:
        from megatron.core.transformer.cuda_graphs import delete_cuda_graphs

        delete_cuda_graphs()  # the previous engine's graphs: the next engine captures with this router
    if cfg is not None:
        install_capaware_routers(model, CapawareConfig(**cfg))
        reset_stats(model)
    llm = MegatronLLM(model=model, tokenizer=tokenizer, inference_config=inference_config(cuda_graphs),
                      use_coordinator=False)
    row["build_s"] = time.perf_counter() - started
    context = llm.context
    steps: List[Tuple[int, bool]] = []  # per engine step: (real tokens, ran as a CUDA graph)
    initialize = context.initialize_attention_state

    def initialize_and_record(*args: Any, **kwargs: Any) -> Any:
        out = initialize(*args, **kwargs)
        real = 0 if getattr(context, "_bookkeeping_no_real_work", False) else int(context.active_token_count)
        steps.append((real, bool(context.using_cuda_graph_this_step())))
        return out

    context.initialize_attention_state = initialize_and_record
    params = SamplingParams(num_tokens_to_generate=tokens, temperature=1.0, top_k=1, termination_id=-1)
    caught: List[Any] = []
    counter.count = 0
    counter.on = True
    t0 = time.perf_counter()
    try:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records = llm.generate(prompts, params)
    finally:
        counter.on = False
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    row["generate_s"] = time.perf_counter() - t0
    if device == "cuda":
        try:
            torch.cuda.synchronize()
            row["synchronize_ok"] = True
        except RuntimeError as err:  # a CUDA error of the replays surfaces here
            row.update(synchronize_ok=False, cuda_error=str(err))
        row["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
    row["text"] = [r.generated_text for r in records]
    row["tokens"] = [list(r.generated_tokens) for r in records]
    row["text_sha256_16"] = _digest(row["text"])
    row["steps"] = len(steps)
    row["graph_steps"] = sum(1 for _, graph in steps if graph)
    row["eager_steps"] = len(steps) - row["graph_steps"]
    row["graph_replays"] = counter.count
    if not cuda_graphs:
        row["graph_replays_note"] = "graphs need CUDA"
    if cfg is not None:
        row["phases"] = phase_totals(model)
    row["generated"] = all(len(t) == tokens for t in row["tokens"])
    context.initialize_attention_state = initialize
    del llm  # the engine's KV buffers go before the next engine allocates its own
    if device == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return row


def run(device: str, tokens: int = 8, prompts: Optional[List[str]] = None,
        routers: Optional[Dict[str, Dict[str, Any]]] = None, moe_pad: bool = False) -> Dict[str, Any]:
    """The whole check in this process (world size 1). Returns the step's record (see the module doc)."""
    reason = skip_reason(device)
    if reason is not None:
        return {"skipped": True, "ok": False, "reason": reason}
    if device == "cpu":
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import megatron.core
    import torch

    from megatron_capaware import parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from megatron_capaware._compat.launcher import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(name, value)
    if device == "cuda":
        torch.cuda.set_device(0)
    cuda_graphs = device == "cuda"
    routers = ENGINE_ROUTERS if routers is None else routers
    prompts = PROMPTS if prompts is None else prompts
    out: Dict[str, Any] = {"megatron_core": megatron.core.__version__, "device": device, "ep": 1,
                           "mode": "direct", "cuda_graphs": cuda_graphs, "moe_pad_experts_for_cuda_graph_inference":
                           moe_pad, "tokens": tokens, "prompts": prompts,
                           "configs": {}}
    parallel.init_model_parallel(parallel.ParallelSizes())
    counter = ReplayCounter()
    counter.install()
    try:
        model, tokenizer = build_reference_model(device, cuda_graphs, moe_pad)
        for label, cfg in [(MEGATRON, None), *routers.items()]:
            try:
                out["configs"][label] = run_config(model, tokenizer, device, cuda_graphs, cfg, prompts, tokens,
                                                   counter)
            except Exception as err:  # record and go on: the JSON says which configuration failed
                out["configs"][label] = {"error": f"{type(err).__name__}: {err}",
                                         "traceback": traceback.format_exc()[-2000:], "generated": False}
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
    finally:
        counter.remove()
        parallel.destroy()
    return verdict(out)


def verdict(out: Dict[str, Any]) -> Dict[str, Any]:
    """Add ``topk_equals_megatron``, the extra syncs against Megatron's run, and ``ok`` to a record."""
    configs = out["configs"]
    reference = configs.get(MEGATRON, {})
    out["topk_equals_megatron"] = bool(reference.get("generated") and configs.get(TOPK, {}).get("generated")
                                       and configs[TOPK]["tokens"] == reference["tokens"])
    for label, row in configs.items():
        if label == MEGATRON:
            continue
        if "tokens" in row and "tokens" in reference:
            row["text_equals_megatron"] = row["tokens"] == reference["tokens"]
        if "syncs" in row and "syncs" in reference:
            row["syncs_minus_megatron"] = row["syncs"] - reference["syncs"]
    ok = out["topk_equals_megatron"] and all(row.get("generated") for row in configs.values())
    if out["cuda_graphs"]:
        ok = ok and all(row.get("graph_replays", 0) > 0 and row.get("synchronize_ok") for row in configs.values())
    out["ok"] = bool(ok)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_capaware.tools.bench.dynamic_engine",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tokens", type=int, default=8, help="tokens generated per prompt (greedy)")
    parser.add_argument("--json", type=Path, required=True, help="where the record goes")
    parser.add_argument("--moe-pad", action="store_true",
                        help="set Megatron's moe_pad_experts_for_cuda_graph_inference (drop-and-pad on graph "
                             "steps; megatron-core 0.19 requires it only at EP > 1; every router accepts it)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    record = run(args.device, tokens=args.tokens, moe_pad=args.moe_pad)
    record["seconds"] = time.perf_counter() - started
    args.json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return 0 if record.get("ok") or record.get("skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
