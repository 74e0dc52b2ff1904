"""Shared pieces of the benchmarks: score sources, score injection, timing."""

from __future__ import annotations

import math
import statistics
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from megatron_capaware.policies.collectives import all_reduce, barrier


def skewed_scores(num_tokens: int, num_experts: int, skew: float, seed: int, spread: float = 1.5) -> torch.Tensor:
    """Synthetic router probabilities ``[T, E]`` with controlled imbalance.

    Expert ``e`` gets a popularity bias ``skew * log(1 / (e + 1))`` (Zipf-like:
    expert 0 hottest; with experts split over EP ranks in contiguous blocks the
    first rank is the straggler); token-level noise of scale ``spread``. ``skew
    = 0`` gives balanced loads; larger ``skew`` a hotter expert 0.
    """
    g = torch.Generator().manual_seed(seed)
    bias = -skew * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float32))
    logits = torch.randn(num_tokens, num_experts, generator=g) * spread + bias
    return torch.softmax(logits, dim=-1)


def synthetic_scores(num_tokens: int, num_experts: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Router probabilities ``[T, E]`` of a given character.

    ``mode``: ``random``, ``skewed`` (a few hot experts, as trained gates have),
    ``ties`` (many exactly equal probabilities), ``uniform``, ``one_hot_expert``
    (every token prefers expert 0 overwhelmingly) or ``peaked``.
    """
    T, E = num_tokens, num_experts
    if mode == "random":
        logits = torch.randn(T, E, generator=generator)
    elif mode == "skewed":  # a few hot experts, as trained gates have
        logits = torch.randn(T, E, generator=generator) * 2 + torch.linspace(3, 0, E)
    elif mode == "ties":  # many exactly equal probabilities
        logits = torch.randint(0, 3, (T, E), generator=generator).float()
    elif mode == "uniform":
        logits = torch.zeros(T, E)
    elif mode == "one_hot_expert":  # every token prefers expert 0 overwhelmingly
        logits = torch.randn(T, E, generator=generator) * 0.1
        logits[:, 0] += 30.0
    elif mode == "peaked":
        logits = torch.randn(T, E, generator=generator) * 6
    else:
        raise ValueError(f"unknown score mode {mode!r}: use random, skewed, ties, uniform, one_hot_expert or peaked")
    return torch.softmax(logits, dim=-1)


def load_score_trace(path: Path) -> Dict[str, Any]:
    """A score trace saved by ``capaware-calibrate --save-scores``."""
    trace = torch.load(path, weights_only=False)
    if "layers" not in trace:
        raise ValueError(f"{path} is not a score trace (no 'layers'); make one with capaware-calibrate --save-scores")
    return trace


def inject_scores(router: torch.nn.Module, num_experts: int) -> Callable[[Optional[torch.Tensor]], None]:
    """Make ``router.gating`` return prescribed logits; returns a setter.

    ``setter(scores [T, E])`` makes the next gate output ``log(scores)`` (the
    softmax of which is ``scores``), shaped like the layer's input; the rest
    of the layer (routing, dispatch, experts, combine) runs unchanged.
    ``setter(None)`` restores the real gate.
    """
    original = router.gating
    state: Dict[str, Optional[torch.Tensor]] = {"logits": None}

    def gating(self: Any, hidden: torch.Tensor) -> torch.Tensor:
        if state["logits"] is None:
            return original(hidden)
        return state["logits"].view(*hidden.shape[:-1], num_experts).to(hidden.device)

    router.gating = types.MethodType(gating, router)

    def setter(scores: Optional[torch.Tensor]) -> None:
        state["logits"] = None if scores is None else torch.log(scores.float().clamp_min(1e-30))

    return setter


def bench_moe_layer(options: Dict[str, Any], ep: int, dispatcher: str = "alltoall", grouped_gemm: bool = False
                    ) -> Tuple[Any, Any, torch.device, Callable[[Optional[torch.Tensor]], None]]:
    """One Megatron MoE layer of the benchmarks' shape (``options``: hidden, experts, topk, ffn) on this rank.

    Returns ``(config, layer in eval mode, its device, set_scores)``, ``set_scores`` from
    :func:`inject_scores`. Call on every EP rank after the model-parallel groups exist.
    """
    # Megatron is imported here, inside the rank workers (after the CPU switch), not by the CLI.
    from megatron_capaware.models.builder import MoEModelArgs, build_moe_layer, build_transformer_config

    args = MoEModelArgs(
        num_layers=1, hidden_size=options["hidden"], num_attention_heads=8, num_moe_experts=options["experts"],
        moe_router_topk=options["topk"], moe_ffn_hidden_size=options["ffn"], vocab_size=8, max_sequence_length=8,
    )
    config = build_transformer_config(args, expert_parallel=ep, dispatcher=dispatcher, grouped_gemm=grouped_gemm)
    layer = build_moe_layer(config).eval()
    device = next(layer.parameters()).device
    return config, layer, device, inject_scores(layer.router, options["experts"])


def timed(fn: Callable[[], Any], group: Any = None) -> float:
    """Seconds ``fn()`` takes, as the slowest rank of ``group`` saw it (barrier first).

    On CUDA the device is synchronised before and after.
    """
    barrier(group)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    return float(all_reduce(elapsed, group, op="max"))


def summarize_times(samples: List[float]) -> Dict[str, float]:
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "repeats": float(len(samples)),
    }


def geometric_mean(values: List[float]) -> float:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")
