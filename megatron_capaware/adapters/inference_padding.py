"""The padding rows of Megatron's dynamic inference engine, for the capaware routers.

``DynamicInferenceContext`` (``DynamicInferenceEngine``, and
``StaticInferenceEngine(legacy=False)`` on top of it) flattens each step's
requests into one token dimension and pads it from the step's real token count
to a CUDA-graph size (``padded_active_token_count``). An expert-parallel rank
with no request runs a *dummy* step, whose rows are all padding, so that it
still joins the step's collectives. Megatron hands the MoE layers **no**
``padding_mask`` for these rows: with the default router and dispatchers they
are routed and computed like real tokens (only Megatron-LM's NVLS inference
dispatcher masks them, reading ``context.gpu_view.real_token_count``, the
real count of the step, 0 on a dummy or CUDA-graph-capture step; checked at
Megatron-LM core_v0.19.0 and main d98e8a64dd).

A capacity router must not let those rows take capacity or an expert, so
:func:`install_dynamic_padding_hook` wraps ``TransformerLayer._forward_mlp``
and ``MoETransformerLayer._forward_mlp`` (which receive the step's
``inference_context``): during a dynamic step's MLP,
:func:`step_padding_mask` tells the router which of its rows are padding
(rows at or past ``real_token_count``, compared on the device without a host
sync, so a captured CUDA graph would read the count of each replay; capture
of the routers as a whole is not checked here). Under sequence parallelism a rank
holds rows ``[tp_rank * rows, (tp_rank + 1) * rows)`` of the step, as in
Megatron's own mask. A layer seeing a number of rows that is neither the
step's padded count nor its sequence-parallel share (``--mlp-chunks-for-prefill
> 1`` splits the MLP's input) cannot tell padding apart: the router raises
instead of guessing.

Static batching (``StaticInferenceContext``, the legacy engine) has no padding
rows: nothing is set, and an explicit ``padding_mask`` always wins.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator, Optional, Union

import torch
from megatron.core import parallel_state

from megatron_capaware.policies.phases import StepComposition


@dataclasses.dataclass(frozen=True)
class StepPadding:
    """One dynamic step: its real token count (``[1]`` tensor or int), padded count,
    composition (:class:`megatron_capaware.adapters.phases.StepComposition`, or None) and the
    inference context it was read from (the phases' per-step agreement is cached on it)."""

    real_count: Union[torch.Tensor, int]
    padded_count: int
    composition: Any = None
    context: Any = dataclasses.field(default=None, compare=False, repr=False)


_STEP: contextvars.ContextVar[Optional[StepPadding]] = contextvars.ContextVar("capaware_dynamic_step", default=None)


def step_padding(context: Any) -> Optional[StepPadding]:
    """The padding of a dynamic inference step, or None (no context, static batching)."""
    if context is None or not hasattr(context, "is_static_batching") or context.is_static_batching():
        return None
    padded = int(getattr(context, "padded_active_token_count", 0) or 0)
    real = getattr(getattr(context, "gpu_view", None), "real_token_count", None)
    if real is None:  # a context without the device-side count: the host one
        real = int(getattr(context, "active_token_count", 0) or 0)
    return StepPadding(real_count=real, padded_count=padded, composition=step_composition(context), context=context)


def step_composition(context: Any) -> Optional[StepComposition]:
    """The composition of a dynamic context's current step; None for static batching / no context."""
    if context is None or not hasattr(context, "is_static_batching") or context.is_static_batching():
        return None
    graph = getattr(context, "using_cuda_graph_this_step", None)
    captured = bool(graph() if callable(graph) else graph)
    if getattr(context, "_bookkeeping_no_real_work", False):
        # A dummy EP step or a CUDA-graph capture: dummy requests, real_token_count = 0 (0.19.2).
        return StepComposition(prefill_tokens=0, decode_tokens=0, captured=captured)
    active = int(getattr(context, "active_token_count", 0) or 0)
    decode_requests = getattr(context, "num_decode_requests", 0)
    decode_requests = int(decode_requests() if callable(decode_requests) else decode_requests or 0)
    per_request = 1 + int(getattr(context, "num_speculative_tokens", 0) or 0)
    decode = min(active, decode_requests * per_request)
    return StepComposition(prefill_tokens=active - decode, decode_tokens=decode, captured=captured)


def current_step() -> Optional[StepPadding]:
    """The dynamic step published for the MoE layer now running, or None."""
    return _STEP.get()


@contextlib.contextmanager
def dynamic_step(padding: Optional[StepPadding]) -> Iterator[None]:
    """Within: routers treat rows at or past ``padding.real_count`` as padding."""
    token = _STEP.set(padding)
    try:
        yield
    finally:
        _STEP.reset(token)


def megatron_pads_experts(config: Any) -> bool:
    """Whether Megatron has switched this layer to drop-and-pad for the current forward.

    With ``--moe-pad-experts-for-cuda-graph-inference`` Megatron's text-generation
    controller calls ``megatron.core.inference.utils.set_decode_expert_padding``
    before each step: on a step that runs as a CUDA graph (and, in the legacy
    static engine, on its decode steps) it sets ``moe_pad_expert_input_to_capacity``
    and ``moe_expert_capacity_factor = E / k`` on the model's config (capacity ``T``
    per expert: nothing dropped, every expert's input padded to it: static shapes);
    on every other step it sets them back to ``False`` / ``None``. The static
    ``--moe-expert-capacity-factor`` / ``--moe-pad-expert-input-to-capacity`` are
    refused for the capaware routers at parse and install (``refusals.py``), so at
    run time these fields set mean Megatron's toggle. A plain read of two config
    attributes (no sync).
    """
    return bool(getattr(config, "moe_pad_expert_input_to_capacity", False)) and \
        getattr(config, "moe_expert_capacity_factor", None) is not None


def _tp(config: Any) -> tuple:
    if not getattr(config, "sequence_parallel", False):
        return 0, 1
    try:
        return (parallel_state.get_tensor_model_parallel_rank(),
                parallel_state.get_tensor_model_parallel_world_size())
    except (AssertionError, ImportError, RuntimeError):
        return 0, 1


def step_padding_mask(rows: int, device: torch.device, config: Any = None,
                      layer_number: Optional[int] = None) -> Optional[torch.Tensor]:
    """``[rows]`` bool, True for the padding rows of the current dynamic step; None outside one.

    Raises:
        RuntimeError: the layer's rows are not the step's (padded) token dimension.
    """
    step = _STEP.get()
    if step is None:
        return None
    if rows == step.padded_count:
        offset = 0
    else:
        tp_rank, tp_size = _tp(config)
        if tp_size > 1 and rows * tp_size == step.padded_count:
            offset = tp_rank * rows
        else:
            raise RuntimeError(
                f"MoE layer {layer_number}: the router got {rows} token rows in a dynamic inference "
                f"step of {step.padded_count} (padded) tokens, so it cannot tell the padding rows "
                "apart (is --mlp-chunks-for-prefill > 1? it splits the MLP input; use 1 with "
                "capaware routers)"
            )
    index = torch.arange(offset, offset + rows, device=device)
    real = step.real_count
    if torch.is_tensor(real):
        return index >= real.reshape(()).to(device=device, dtype=index.dtype)
    return index >= int(real)


_HOOKED = "capaware_dynamic_padding"


def _wrap_forward_mlp(cls: Any) -> None:
    original = cls.__dict__.get("_forward_mlp")
    if original is None or getattr(original, _HOOKED, False):
        return

    def _forward_mlp(self: Any, hidden_states: Any, inference_context: Any = None, *args: Any, **kwargs: Any) -> Any:
        padding = step_padding(inference_context)
        if padding is None:  # no dynamic step here (or an outer wrapper already published it)
            return original(self, hidden_states, inference_context, *args, **kwargs)
        with dynamic_step(padding):
            return original(self, hidden_states, inference_context, *args, **kwargs)

    setattr(_forward_mlp, _HOOKED, True)
    _forward_mlp.__wrapped__ = original  # type: ignore[attr-defined]
    _forward_mlp.__doc__ = original.__doc__
    setattr(cls, "_forward_mlp", _forward_mlp)


def _wrap_dummy_forward(cls: Any) -> None:
    """Make ``cls.dummy_forward`` (megatron-core < 0.19) a step whose rows are all padding.

    Before 0.19 an idle EP rank runs ``AbstractModelInferenceWrapper.dummy_forward``:
    ``tp_size`` zero tokens through the model with no inference context and no
    ``padding_mask``, routed as real tokens. Inside the wrapper the routers see
    a step of ``tp_size`` rows, none real (issue 22, item 5).
    """
    original = cls.__dict__.get("dummy_forward")
    if original is None or getattr(original, _HOOKED, False):
        return

    def dummy_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        rows = int(getattr(self, "tp_size", 1) or 1)
        with dynamic_step(StepPadding(real_count=0, padded_count=rows)):
            return original(self, *args, **kwargs)

    setattr(dummy_forward, _HOOKED, True)
    dummy_forward.__wrapped__ = original  # type: ignore[attr-defined]
    dummy_forward.__doc__ = original.__doc__
    setattr(cls, "dummy_forward", dummy_forward)


def install_dummy_step_hook() -> bool:
    """Wrap the pre-0.19 idle-rank ``dummy_forward`` (idempotent); False where it does not exist (0.19+).

    megatron-core >= 0.19 runs idle ranks' dummy steps in the dynamic context
    (``real_token_count`` 0), which :func:`install_dynamic_padding_hook` reads.
    """
    try:  # absent in some megatron-core releases: then there is nothing to wrap
        from megatron.core.inference.model_inference_wrappers import abstract_model_inference_wrapper as wrappers
    except ImportError:
        return False
    cls = getattr(wrappers, "AbstractModelInferenceWrapper", None)
    if not isinstance(cls, type) or "dummy_forward" not in cls.__dict__:
        return False
    _wrap_dummy_forward(cls)
    return True


def install_dynamic_padding_hook() -> bool:
    """Wrap ``_forward_mlp`` of ``TransformerLayer`` (and ``MoETransformerLayer``) so routers
    see the dynamic step's padding (idempotent).

    ``MoETransformerLayer._forward_mlp`` (hybrid models' MoE layers) calls
    ``super()._forward_mlp`` without the ``inference_context``, so it is wrapped
    itself.

    Returns:
        True when the hook is in place; False when this Megatron-Core has no
        ``TransformerLayer._forward_mlp`` (then nothing is changed).
    """
    try:  # a megatron-core without it has no dynamic engine to hook
        from megatron.core.transformer import transformer_layer
    except ImportError:
        return False
    base = getattr(transformer_layer, "TransformerLayer", None)
    if base is None or "_forward_mlp" not in base.__dict__:
        return False
    for name in ("TransformerLayer", "MoETransformerLayer"):
        cls = getattr(transformer_layer, name, None)
        if isinstance(cls, type):
            _wrap_forward_mlp(cls)
    install_dummy_step_hook()
    return True
