"""What ``megatron.training`` needs on a machine without CUDA (every function a no-op with CUDA).

The package's CPU shims, ``.cuda()`` and ``device="cuda"`` kept on the CPU (a
process-lifetime ``TorchFunctionMode``), ``initialize_megatron`` allowed without
CUDA, Megatron's model-parallel groups and RNG tracker set up (Megatron skips
both when it sees no GPU), CUDA memory statistics that read zero (Megatron-LM's
inference scripts print ``torch.cuda.memory_stats()["allocated_bytes.all.peak"]``
at the end), and CPU-safe defaults for Megatron flags.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from megatron_capaware._compat.cpu_shims import apply_cpu_shims, cuda_available, redirect_cuda_tensors_to_cpu
from megatron_capaware.megatron_lm.compat import import_megatron_training, replace_function


#: Megatron flag defaults on a machine without CUDA: gloo, Megatron's local
#: (non-Transformer-Engine) layers, and no fused CUDA kernels. Flags given on
#: the command line still win.
CPU_MEGATRON_DEFAULTS: Dict[str, Any] = {
    "distributed_backend": "gloo",
    "transformer_impl": "local",
    "bias_dropout_fusion": False,
    "bias_gelu_fusion": False,
    "bias_swiglu_fusion": False,
    "masked_softmax_fusion": False,
    "apply_rope_fusion": False,
    "gradient_accumulation_fusion": False,
    "no_persist_layer_norm": True,
}

_CPU_SUPPORT = False


def enable_cpu_support() -> bool:
    """Let ``megatron.training`` run on a machine without CUDA (no-op with CUDA).

    Returns:
        True when active (now or earlier), False on a CUDA machine.
    """
    global _CPU_SUPPORT
    if cuda_available():
        return False
    if _CPU_SUPPORT:
        return True
    import_megatron_training()
    apply_cpu_shims()
    redirect_cuda_tensors_to_cpu()
    _redirect_cuda_device_arguments()
    _zero_cuda_memory_statistics()
    _cpu_tensors_pass_inference_broadcast_checks()
    _legacy_cuda_tensor_types_on_cpu()
    import megatron.training.initialize as initialize

    original_init = initialize.initialize_megatron

    def initialize_megatron(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_no_cuda"] = True
        return original_init(*args, **kwargs)

    replace_function(initialize, "initialize_megatron", initialize_megatron)

    original_distributed = initialize._initialize_distributed

    def _initialize_distributed(*args: Any, **kwargs: Any) -> Any:
        _default_rendezvous_env()
        result = original_distributed(*args, **kwargs)
        if not kwargs.get("skip_model_parallel_init", False):
            _init_model_parallel_from_args()
        return result

    initialize._initialize_distributed = _initialize_distributed

    original_seed = initialize._set_random_seed

    def _set_random_seed(seed_: int, data_parallel_random_init: bool = False, *args: Any, **kwargs: Any) -> Any:
        result = original_seed(seed_, data_parallel_random_init, *args, **kwargs)
        # Megatron seeds its model-parallel RNG tracker only when it sees a GPU.
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        if parallel_state.model_parallel_is_initialized():
            seed = seed_ + 100 * parallel_state.get_pipeline_model_parallel_rank()
            if data_parallel_random_init:
                seed += 10 * parallel_state.get_data_parallel_rank()
            model_parallel_cuda_manual_seed(seed)
        return result

    initialize._set_random_seed = _set_random_seed
    _CPU_SUPPORT = True
    return True


def enable_dynamic_engine() -> bool:
    """What Megatron's dynamic inference engine needs on this machine (a no-op with CUDA).

    For Megatron-LM's dynamic-path scripts (``offline_inference.py``,
    ``launch_inference_server.py``, ``gpt_dynamic_inference.py``): on a machine
    without CUDA, :func:`enable_cpu_support` plus the dynamic engine's stand-ins
    (:func:`megatron_capaware._compat.cpu_shims.enable_dynamic_engine_on_cpu`:
    unpinned host buffers, the NCCL dispatcher's buffers instead of NVLS, flash
    attention in torch). The launcher calls it; a patched script calls it
    before building the engine. Call it only in a script that uses the dynamic
    engine: with it on, Megatron's ``StaticInferenceEngine`` built outside the
    launcher no longer falls back to the legacy engine on CPU.

    Returns:
        True when active (now or earlier), False on a CUDA machine.
    """
    from megatron_capaware._compat.cpu_shims import enable_dynamic_engine_on_cpu

    if not enable_cpu_support():
        return False
    return enable_dynamic_engine_on_cpu()


class ZeroCudaMemoryStats(dict):
    """``torch.cuda.memory_stats()`` on a machine without CUDA: every statistic is 0.

    A CPU build of torch returns an empty dict, so Megatron-LM's scripts die
    at the end on ``stats["allocated_bytes.all.peak"]`` (after generating,
    before the capaware load report). No CUDA memory is allocated on a CPU
    run, so 0 is the true value of every ``*_bytes.*`` / ``num_*`` counter
    torch defines; a key that is not a string is still a ``KeyError``.
    """

    def __missing__(self, key: Any) -> int:
        if not isinstance(key, str):
            raise KeyError(key)
        return 0


def _zero_cuda_memory_statistics() -> None:
    """CUDA memory statistics that read zero (CPU only; see :class:`ZeroCudaMemoryStats`)."""
    if cuda_available():
        return
    torch.cuda.memory_stats = lambda *a, **k: ZeroCudaMemoryStats()  # type: ignore[assignment]
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.max_memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    torch.cuda.max_memory_reserved = lambda *a, **k: 0  # type: ignore[assignment]
    torch.cuda.memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    torch.cuda.memory_reserved = lambda *a, **k: 0  # type: ignore[assignment]


_LEGACY_TENSOR_TYPES = ("FloatTensor", "DoubleTensor", "HalfTensor", "BFloat16Tensor", "LongTensor", "IntTensor",
                        "ShortTensor", "CharTensor", "ByteTensor", "BoolTensor")


def _legacy_cuda_tensor_types_on_cpu() -> None:
    """``torch.cuda.LongTensor([...])`` and the other legacy CUDA tensor types build CPU tensors.

    Megatron-LM's ``examples/inference/utils.py:get_curr_time`` (behind
    ``gpt_dynamic_inference.py`` at world size > 1) broadcasts the time in a
    ``torch.cuda.LongTensor``; a CPU build of torch raises on the type. Each
    ``torch.cuda.<T>Tensor`` becomes ``torch.<T>Tensor``. CPU only.
    """
    if cuda_available():
        return
    for name in _LEGACY_TENSOR_TYPES:
        cpu_type = getattr(torch, name, None)
        if cpu_type is not None:
            setattr(torch.cuda, name, cpu_type)


def _cpu_tensors_pass_inference_broadcast_checks() -> None:
    """Megatron's inference broadcasts assert ``tensor.is_cuda``; on CPU they check the rest.

    ``megatron.core.inference.communication_utils._is_cuda`` (behind
    ``broadcast_tensor`` / ``broadcast_float_list``, which the text generation
    server's ``run_mcore_engine`` calls for every request, at any world size)
    asserts the tensor is on CUDA. Without CUDA the tensors are CPU tensors by
    construction, so only the ``not None`` half of the check is kept
    (``_is_cuda_contiguous`` still checks contiguity). CPU only.
    """
    if cuda_available():
        return
    try:
        from megatron.core.inference import communication_utils
    except ImportError:  # an older megatron-core without it
        return

    def _is_cuda(tensor: Any) -> None:
        assert tensor is not None

    communication_utils._is_cuda = _is_cuda


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaDeviceToCpu(torch.overrides.TorchFunctionMode):
    """Turns ``device="cuda"`` (and ``tensor.to("cuda")``) into the CPU.

    ``megatron.training`` (checkpoint metadata, the inference controller)
    allocates with ``device="cuda"``; on a machine without CUDA those calls
    would raise. Active only where :func:`enable_cpu_support` is.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and any(_is_cuda_device(a) for a in args[1:]):
            args = tuple("cpu" if i and _is_cuda_device(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


_DEVICE_MODE: Optional[_CudaDeviceToCpu] = None


def _redirect_cuda_device_arguments() -> None:
    """Push :class:`_CudaDeviceToCpu` for the process: this thread and every later one.

    Torch-function modes are per thread, so a mode pushed here does not reach
    threads started later (the text generation server answers each request
    in a werkzeug thread, which then allocates with ``device="cuda"``).
    ``threading.Thread.run`` is wrapped to push the same mode in each new
    thread, for that thread's life. CPU only, like the rest of this module.
    """
    global _DEVICE_MODE
    if _DEVICE_MODE is None:
        _DEVICE_MODE = _CudaDeviceToCpu()
        _DEVICE_MODE.__enter__()  # stays pushed for the life of the process
        _redirect_in_new_threads()


def _redirect_in_new_threads() -> None:
    import threading

    original_run = threading.Thread.run
    if getattr(original_run, "capaware_cpu_redirect", False):
        return

    def run(self: threading.Thread) -> None:
        with _CudaDeviceToCpu():
            original_run(self)

    run.capaware_cpu_redirect = True  # type: ignore[attr-defined]
    threading.Thread.run = run  # type: ignore[method-assign]


def _default_rendezvous_env() -> None:
    """A single process started without torchrun gets a one-rank rendezvous."""
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return
    from megatron_capaware._compat.launcher import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")


def _init_model_parallel_from_args() -> None:
    """Megatron's model-parallel groups, as ``_initialize_distributed`` makes them with a GPU."""
    from megatron.core import parallel_state
    from megatron.training import get_args

    if parallel_state.model_parallel_is_initialized():
        return
    args = get_args()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
        order="tp-cp-ep-dp-pp" if not getattr(args, "use_tp_pp_dp_mapping", False) else "tp-cp-ep-pp-dp",
    )
