"""What a placement refuses before anything moves, and what it resets after a move (issue 22, items 3, 4, 14).

Every function here is local (no collective): :func:`check_layer` runs in
``placement._targets``, whose verdict the EP ranks gather before any weight
moves, so a refusal raises on every rank and changes nothing.

* FP8 parameters (``--fp8-param-gather`` / ``fp8_param``, or any expert tensor
  that is a Transformer Engine quantized tensor): moving them as plain tensors
  would dequantise, move bf16 and requantise with the destination slot's old
  scale (saturation). Refused until the raw data and the scales are moved.
* TE's single grouped weight (``--moe-single-grouped-weight``): the per-expert
  ``weight{i}`` are None (one ``[n, ...]`` parameter). Refused (moving the
  grouped tensor's rows is not built yet).
* A token dispatcher other than ``alltoall`` / ``allgather`` (flex / DeepEP):
  its expert layout is not retargeted. Refused with a message (not a TypeError).

:func:`invalidate_weight_caches`: with FP8 compute, Megatron's TE wrappers
cache the quantized weights from the first microbatch on
(``is_first_microbatch`` False afterwards) and TE keeps them in
``_fp8_workspaces``: after a move, experts would compute with the old
experts' weights. Setting ``is_first_microbatch`` back to True and clearing the
workspaces makes the next forward quantize the moved weights.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_capaware.placement.planner import PlacementError

#: Dispatcher classes (and subclasses) whose expert layout placement retargets.
PLACEABLE_DISPATCHERS = ("MoEAlltoAllTokenDispatcher", "MoEAllGatherTokenDispatcher")


def is_quantized(tensor: Any) -> bool:
    """Whether ``tensor`` is a Transformer Engine quantized tensor (FP8 / MXFP8 / NVFP4 ...)."""
    names = {cls.__name__ for cls in type(tensor).__mro__}
    return bool(names & {"QuantizedTensor", "Float8Tensor", "MXFP8Tensor", "Float8BlockwiseQTensor",
                         "NVFP4Tensor", "QuantizedTensorBase", "Float8TensorBase"})


def check_layer(layer: Any, dispatchers: Any) -> None:
    """Refuse a layer whose experts placement cannot move correctly (no collective, nothing changed).

    Raises:
        PlacementError: FP8 parameters, TE's single grouped weight, or a flex / DeepEP dispatcher.
    """
    number = int(layer.layer_number)
    config = layer.config
    experts = layer.experts
    if getattr(config, "moe_single_grouped_weight", False) or (
            type(experts).__name__.endswith("TEGroupedMLP")
            and getattr(experts.linear_fc1, "weight0", None) is None):
        raise PlacementError(
            f"MoE layer {number}: placement cannot move Transformer Engine's single grouped expert weight "
            "(--moe-single-grouped-weight: one [experts, ...] parameter, no weight0..n): build the model "
            "without --moe-single-grouped-weight to use a placement, or run without --capaware-placement")
    fp8_params = bool(getattr(config, "fp8_param", False)) or any(
        is_quantized(p) for p in experts.parameters())
    if fp8_params:
        raise PlacementError(
            f"MoE layer {number}: placement does not move FP8 parameters yet (moving them as plain tensors "
            "would requantise each expert with the destination slot's old scale): load the model without "
            "--fp8-param-gather (FP8 compute with bf16 parameters is fine), or run without --capaware-placement")
    for dispatcher in dispatchers:
        names = {cls.__name__ for cls in type(dispatcher).__mro__}
        if not names & set(PLACEABLE_DISPATCHERS):
            raise PlacementError(
                f"MoE layer {number}: placement retargets the alltoall and allgather token dispatchers, not "
                f"{type(dispatcher).__name__}: use --moe-token-dispatcher-type alltoall or allgather with "
                "--capaware-placement")


def invalidate_weight_caches(module: torch.nn.Module) -> int:
    """Make the next forward re-read the experts' weights: returns how many modules were reset.

    For each submodule: ``is_first_microbatch = True`` (Megatron's TE linear
    wrappers) and TE's ``_fp8_workspaces`` (cached quantized weights) cleared.
    Harmless without Transformer Engine (no such attributes).
    """
    reset = 0
    for sub in module.modules():
        touched = False
        if hasattr(sub, "is_first_microbatch"):
            sub.is_first_microbatch = True
            touched = True
        workspaces = getattr(sub, "_fp8_workspaces", None)
        if isinstance(workspaces, dict) and workspaces:
            workspaces.clear()
            touched = True
        reset += touched
    return reset
