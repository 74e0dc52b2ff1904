"""Megatron's own top-k for the capaware routers, whatever megatron-core is installed (issue 22, item 1).

The capaware routers start from Megatron's top-k decision and change it. That
decision must be the one Megatron's ``TopKRouter`` makes, bit for bit, on the
installed megatron-core: its numerics changed at core_v0.18.0 (scores,
sigmoid normalisation, pre-softmax probabilities and group scores in float32
instead of the logits' dtype; unsorted ``torch.topk`` under ``no_grad``), so
this module never re-implements the selection. It calls
``moe_utils.topk_routing_with_score_function`` with the arguments
``TopKRouter.routing`` passes, and derives from its output what the policies
need. Only the group selection (which Megatron does not return) is
recomputed, on the tensor the installed version ranks groups on
(:func:`ranked_for_groups`).

Inputs are 2-D logits ``[T, E]`` in the router's dtype (bf16 when the model
runs without ``--moe-router-dtype fp32``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional, Tuple

import torch

from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

#: First megatron-core release whose top-k ranks on float32 scores (softmax with
#: pre-softmax, sigmoid, sigmoid + expert bias) and normalises in float32.
FP32_RANKING_SINCE = (0, 18)


@functools.lru_cache(maxsize=None)
def megatron_core_version() -> Tuple[int, int]:
    """``(major, minor)`` of the installed megatron-core (``(0, 0)`` when unknown)."""
    try:
        from megatron.core import __version__ as version
    except ImportError:  # pragma: no cover - very old releases
        try:
            from megatron.core.package_info import __version__ as version
        except ImportError:
            return (0, 0)
    parts = str(version).split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):  # pragma: no cover - a development tag
        return (0, 0)


def ranks_in_fp32() -> bool:
    """Whether the installed megatron-core ranks experts and groups on float32 scores (>= 0.18)."""
    return megatron_core_version() >= FP32_RANKING_SINCE


@functools.lru_cache(maxsize=None)
def _accepted() -> frozenset:
    return frozenset(inspect.signature(topk_routing_with_score_function).parameters)


def megatron_topk(router: Any, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Megatron's top-k routing of ``logits [T, E]`` as ``TopKRouter.routing`` computes it.

    Args:
        router: a Megatron ``TopKRouter`` (its config, ``topk``, ``score_function``,
            ``expert_bias`` and, where present, ``router_replay``).
        logits: ``[T, E]`` in the router's dtype.

    Returns:
        ``(probs [T, E], routing_map [T, E] bool)``: Megatron's output before
        token dropping, aux losses and the expert-bias update.
    """
    config = router.config
    kwargs = dict(
        use_pre_softmax=config.moe_router_pre_softmax,
        num_groups=config.moe_router_num_groups,
        group_topk=config.moe_router_group_topk,
        scaling_factor=config.moe_router_topk_scaling_factor,
        score_function=router.score_function,
        expert_bias=router.expert_bias,
        fused=config.moe_router_fusion,
    )
    if "router_replay" in _accepted():
        kwargs["router_replay"] = getattr(router, "router_replay", None)
    return topk_routing_with_score_function(logits, router.topk, **kwargs)


def map_to_indices(scores: torch.Tensor, routing_map: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` experts of each row of a top-k map, best ``scores`` first: ``[T, k]`` int64.

    A function of the chosen set only (not of the order Megatron's ``torch.topk``
    returned it in, which is unsorted under ``no_grad`` since 0.19). ``scores``
    are >= 0 (softmax or sigmoid; the score check catches NaN), so the ``-1``
    outside the map never outranks a chosen expert. Two ops: a ``where`` with a
    scalar and a ``topk``.
    """
    return torch.where(routing_map, scores, -1.0).topk(k, dim=1).indices


def vanilla_topk(router: Any, logits: torch.Tensor, scores: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's choice as ``(probs [T, E], routing_map [T, E] bool, experts [T, k])``.

    ``probs`` and ``routing_map`` are Megatron's own outputs (its probabilities, with
    normalisation and scaling factor, in the logits' dtype, zero off the map), so a caller
    keeping Megatron's weights reads them as they are (no gather and scatter back).
    ``experts`` are each token's k experts, best ``scores [T, E]`` (float32, the model's
    score distribution) first: the policies' ``topk_indices``.
    """
    probs, routing_map = megatron_topk(router, logits)
    return probs, routing_map, map_to_indices(scores, routing_map, router.topk)


def ranked_for_groups(router: Any, logits: torch.Tensor) -> torch.Tensor:
    """``[T, E]``: the tensor Megatron's ``group_limited_topk`` ranks groups on, on this megatron-core.

    softmax: the logits, or with pre-softmax the probabilities; sigmoid: the
    scores plus the expert bias. In the logits' dtype before 0.18, float32 since.
    """
    config = router.config
    fp32 = ranks_in_fp32()
    if router.score_function == "softmax":
        if not config.moe_router_pre_softmax:
            return logits
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        return probs if fp32 else probs.type_as(logits)
    scores = torch.sigmoid(logits.float())
    if not fp32:
        scores = scores.type_as(logits)
    bias: Optional[torch.Tensor] = router.expert_bias
    if bias is not None:
        scores = scores + (bias.float() if fp32 else bias)
    return scores
