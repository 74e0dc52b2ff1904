"""Stand-ins that let Megatron-Core's dynamic inference engine run on a machine without CUDA.

Items 2-5 are applied by :func:`megatron_capaware._compat.cpu_shims.apply_cpu_shims`
(so only without CUDA; on a GPU machine nothing here is ever installed): they
are inert until a ``DynamicInferenceContext`` exists. Item 1, the one that lets
the context be built at all, is opt-in: :func:`megatron_capaware._compat.cpu_shims.enable_dynamic_engine_on_cpu`.
Without it Megatron's ``StaticInferenceEngine()`` keeps falling back to the
legacy static engine on CPU (it tries the dynamic context first, with
Megatron-LM's default 40 GB ``--inference-dynamic-batching-buffer-size-gb``),
which is what the static scripts through the launcher are tested with. Checked against
megatron-core 0.19.2 (``DynamicInferenceContext``, ``DynamicInferenceEngine``,
``TextGenerationController``, ``MegatronLLM``); every function is a no-op on a
megatron-core without the dynamic engine.

1. Pinned host memory. ``DynamicInferenceContext`` and the controller allocate
   their host mirrors with ``pin_memory=True`` / ``.pin_memory()``; a CPU build
   of torch has no pinned allocator and raises. Pinning only speeds up
   host<->device copies, which do not exist without a device, so the request
   is dropped (the tensor is an ordinary CPU tensor), except inside
   :func:`pinning_as_torch_does` (where the launcher builds the static engine).
2. flash-attn. Dynamic batching asserts flash-attn >= 2.7.3 and calls its
   ``flash_attn_varlen_func`` / ``flash_attn_with_kvcache`` on the paged KV
   cache (``Attention.flash_decode_and_prefill``); flash-attn has no CPU build.
   When it is not installed, ``megatron.core.transformer.attention`` gets the
   plain-torch versions of :mod:`megatron_capaware._compat.paged_attention`
   (tested against dense attention) and its version check passes for them.
3. The KV-cache append. ``DynamicInferenceContext.append_key_value_cache`` uses
   a Triton kernel when ``fused_kv_append_kernel`` imports, which it does under
   the package's triton stand-in (cpu_shims, shim 8); with the stand-in active
   the name is set to None, so Megatron takes its own torch indexing path.
4. einops. The dynamic attention path reshapes its output with
   ``einops.rearrange(out, 's b h d -> s b (h d)')``; megatron-core does not
   declare einops, and without it the name is None. Where it is None, that one
   pattern is given as a reshape (any other pattern raises, naming einops).
5. NVTX names bound at import. ``text_generation_controller`` does
   ``from torch.cuda.nvtx import range_push, range_pop``; when it was imported
   before the NVTX shim (cpu_shims, shim 3) its names still raise on a CPU
   build, so they are rebound to the shimmed functions.
6. The coordinator process. ``MegatronLLM``'s coordinator mode (required at
   EP > 1) spawns Megatron's ``DataParallelInferenceCoordinator`` in a fresh
   process, which imports ``megatron.core`` while unpickling its arguments:
   without triton that import fails (``paged_stash``) unless the package's
   triton stand-in is installed first, which only happens when the parent's
   ``__main__`` imported megatron_capaware (not under pytest). The spawn target
   becomes :func:`coordinator_entrypoint`, which lives in this package (so
   unpickling it installs the stand-in) and calls Megatron's entrypoint.
7. NVLS dispatcher buffers (opt-in with item 1): at EP > 1 the context
   allocates the NVLS dispatcher's symmetric memory (the config's default
   ``inference_moe_token_dispatcher_type``), which needs CUDA; on CPU the
   context is built for the NCCL all-gather dispatcher instead
   (:func:`nccl_dispatcher_buffers_on_cpu`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from typing import Any, Callable, Iterator

import torch

_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "empty_like", "zeros_like",
              "ones_like", "full_like", "as_tensor", "empty_strided", "randn", "rand")
_APPLIED = False
#: Depth of :func:`pinning_as_torch_does` scopes: inside one, pinning requests reach torch unchanged.
_PIN_AS_TORCH = 0
_ORIGINAL_PIN_MEMORY = torch.Tensor.pin_memory


def _without_pin_memory(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def factory(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("pin_memory") and not _PIN_AS_TORCH:
            kwargs = dict(kwargs, pin_memory=False)
        return fn(*args, **kwargs)

    factory.capaware_unpinned = True  # type: ignore[attr-defined]
    return factory


def _tensor_pin_memory(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if _PIN_AS_TORCH:
        return _ORIGINAL_PIN_MEMORY(self, *args, **kwargs)
    return self


def drop_pin_memory() -> None:
    """``pin_memory=True`` and ``Tensor.pin_memory()`` give ordinary CPU tensors (CPU only)."""
    for name in _FACTORIES:
        fn = getattr(torch, name, None)
        if fn is not None and not getattr(fn, "capaware_unpinned", False):
            setattr(torch, name, _without_pin_memory(fn))
    torch.Tensor.pin_memory = _tensor_pin_memory  # type: ignore[method-assign]


@contextlib.contextmanager
def pinning_as_torch_does() -> Iterator[None]:
    """Inside this scope a pinning request reaches torch unchanged (a CPU build raises, as without the stand-in).

    The launcher builds Megatron's ``StaticInferenceEngine`` inside it, so the
    deprecated static scripts keep the legacy static engine on CPU (Megatron
    tries the dynamic context first, fails on ``pin_memory``, falls back),
    while the dynamic-path scripts in the same launcher get unpinned tensors.
    """
    global _PIN_AS_TORCH
    _PIN_AS_TORCH += 1
    try:
        yield
    finally:
        _PIN_AS_TORCH -= 1


def nccl_dispatcher_buffers_on_cpu() -> bool:
    """``DynamicInferenceContext`` on CPU prepares the NCCL all-gather EP dispatcher, not NVLS.

    ``TransformerConfig.inference_moe_token_dispatcher_type`` defaults to
    ``'nvls'`` and Megatron-LM has no flag for it; at EP > 1 the context then
    allocates symmetric-memory buffers (Hopper + NVLink), which raises without
    CUDA. NVLS cannot exist on a CPU, so the context built here takes ``'nccl'``
    (plain tensors; what Megatron's error message says to use on non-NVLS
    systems). The model config is changed once, when the context is built.
    CPU only (the caller checks); no-op on a megatron-core without the context.

    Returns:
        True when the context is wrapped.
    """
    try:
        from megatron.core.inference.contexts import dynamic_context
    except ImportError:
        return False
    cls = getattr(dynamic_context, "DynamicInferenceContext", None)
    if cls is None or getattr(cls.__init__, "capaware_nccl_on_cpu", False):
        return cls is not None
    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self: Any, model_config: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(model_config, "inference_moe_token_dispatcher_type", None) == "nvls":
            model_config.inference_moe_token_dispatcher_type = "nccl"
        original_init(self, model_config, *args, **kwargs)

    __init__.capaware_nccl_on_cpu = True  # type: ignore[attr-defined]
    cls.__init__ = __init__
    return True


def flash_attention_in_torch() -> bool:
    """Give Megatron's attention module the torch paged-attention kernels when flash-attn is absent.

    Returns:
        True when the stand-ins are in place; False when flash-attn is installed
        or this megatron-core has no dynamic-batching attention.
    """
    if importlib.util.find_spec("flash_attn") is not None:
        return False
    try:
        from megatron.core.transformer import attention
    except ImportError:
        return False
    if not hasattr(attention, "flash_attn_varlen_func"):
        return False
    from megatron_capaware._compat import paged_attention

    attention.flash_attn_varlen_func = paged_attention.flash_attn_varlen_func
    attention.flash_attn_with_kvcache = paged_attention.flash_attn_with_kvcache
    original = attention.is_fa_min_version
    if not getattr(original, "capaware_torch_attention", False):
        def is_fa_min_version(version: str, check_equality: bool = True) -> bool:
            return True  # the stand-ins implement flash-attn 2.7's interface

        is_fa_min_version.capaware_torch_attention = True  # type: ignore[attr-defined]
        attention.is_fa_min_version = is_fa_min_version
    return True


def torch_kv_append_without_triton() -> bool:
    """Megatron's torch KV-cache append where only the triton stand-in is importable.

    Returns:
        True when Megatron's torch path is selected; False with a real triton.
    """
    import sys

    if not getattr(sys.modules.get("triton"), "capaware_cpu_stand_in", False):
        return False
    try:
        from megatron.core.inference.contexts import dynamic_context
    except ImportError:
        return False
    dynamic_context.triton_append_key_value_cache = None
    return True


def _merge_last_two(tensor: torch.Tensor, pattern: str) -> torch.Tensor:
    if " ".join(pattern.split()) != "s b h d -> s b (h d)":
        raise NotImplementedError(f"einops is not installed (pip install einops); pattern {pattern!r}")
    return tensor.reshape(*tensor.shape[:-2], -1)


def rearrange_without_einops() -> bool:
    """``attention.rearrange`` for the dynamic path's one pattern when einops is absent."""
    try:
        from megatron.core.transformer import attention
    except ImportError:
        return False
    if getattr(attention, "rearrange", True) is not None:
        return False
    attention.rearrange = _merge_last_two
    return True


def rebind_controller_nvtx() -> bool:
    """Rebind the controller's ``range_push`` / ``range_pop`` to the (shimmed) ``torch.cuda.nvtx`` ones."""
    import sys

    controller = sys.modules.get(
        "megatron.core.inference.text_generation_controllers.text_generation_controller")
    if controller is None:
        try:
            from megatron.core.inference.text_generation_controllers import text_generation_controller as controller
        except ImportError:
            return False
    import torch.cuda.nvtx as nvtx

    controller.range_push = nvtx.range_push
    controller.range_pop = nvtx.range_pop
    return True


class CoordinatorOnCpu:
    """Stands for ``DataParallelInferenceCoordinator`` in ``dynamic_engine`` (which only reads ``.entrypoint``)."""

    @staticmethod
    def entrypoint(*args: Any, **kwargs: Any) -> Any:
        """Megatron's coordinator entrypoint, after the CPU shims (the triton stand-in) are in place."""
        from megatron_capaware._compat.triton_stand_in import stub_missing_triton_on_cpu

        stub_missing_triton_on_cpu()
        from megatron.core.inference.data_parallel_inference_coordinator import DataParallelInferenceCoordinator

        return DataParallelInferenceCoordinator.entrypoint(*args, **kwargs)


def coordinator_imports_cpu_support() -> bool:
    """Spawn the coordinator through :class:`CoordinatorOnCpu` (only when the triton stand-in is in use)."""
    import sys

    if not getattr(sys.modules.get("triton"), "capaware_cpu_stand_in", False):
        return False
    try:
        from megatron.core.inference.engines import dynamic_engine
    except ImportError:
        return False
    if not hasattr(dynamic_engine, "DataParallelInferenceCoordinator"):
        return False
    dynamic_engine.DataParallelInferenceCoordinator = CoordinatorOnCpu
    return True


def apply_dynamic_engine_shims() -> bool:
    """Install stand-ins 2-5 once (the caller checks that CUDA is absent).

    Returns:
        True once installed.
    """
    global _APPLIED
    if _APPLIED:
        return True
    flash_attention_in_torch()
    torch_kv_append_without_triton()
    rearrange_without_einops()
    rebind_controller_nvtx()
    coordinator_imports_cpu_support()
    _APPLIED = True
    return True
