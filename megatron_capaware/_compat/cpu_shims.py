"""Shims that let Megatron-Core run on a machine without CUDA (tests, CPU runs).

Megatron-Core calls a handful of CUDA-only APIs even when every tensor lives on
the CPU. :func:`apply_cpu_shims` replaces exactly those calls with CPU
equivalents. It does nothing when CUDA is available, so on a GPU machine no
Megatron or torch behaviour is altered: a real device bug is never hidden.

Each shim below says what it replaces, why, and which megatron-core versions
need it (checked against 0.16.1 and 0.19.2).

1. ``torch.cuda.current_device`` -> ``torch.device("cpu")``.
   Used as ``device=`` for buffers in the router gate, tensor-parallel
   mappings, MoE buffers (0.16.1, 0.19.2).
2. ``torch.cuda.Stream`` / ``Event`` / ``current_stream`` / ``stream`` /
   ``synchronize`` -> no-op stand-ins. The alltoall dispatcher keeps a
   device-to-host side stream; checkpointing synchronises (0.16.1, 0.19.2).
3. ``torch.cuda.nvtx`` range functions -> no-ops; CPU builds raise on them
   (0.16.1, 0.19.2), also in the ``torch.cuda.nvtx`` module itself, which the
   dynamic inference engine imports from.
4. Megatron's ``CudaRNGStatesTracker`` keeps CUDA generator states; on CPU it
   must keep CPU generator states (``add`` and ``fork``) (0.16.1, 0.19.2).
5. ``moe_utils.maybe_move_tensor_to_cpu`` only converts CUDA tensors, so on CPU
   the alltoall dispatcher hands a split-size *tensor* to
   ``all_to_all_single``, which raises ``TypeError``; the shim converts CPU
   tensors too when numpy output is asked for (0.16.1, 0.19.2).
6. gloo's list ``all_gather`` needs equal sizes, but
   ``_gather_along_first_dim(output_split_sizes=...)`` (alltoall dispatcher
   with expert-TP > 1) passes uneven ones; the shim pads to the largest split,
   gathers, and trims (0.16.1, 0.19.2).
7. ``moe_utils.te_general_gemm`` is referenced without Transformer Engine by
   ``router_gating_linear``; set to ``None`` when missing (0.16.1).
8. ``import megatron.core`` imports ``triton`` through
   ``transformer/moe/ops/paged_stash.py`` (0.19.2), and Megatron-LM
   main (d98e8a64dd) imports ``triton`` unguarded in many more modules on the
   way to ``megatron.training`` (``ssm/ops/common/causal_conv1d_varlen.py``
   through ``training/models/hybrid.py``, the inference MoE kernels, ...), so
   when triton is absent a stand-in ``triton`` package is installed (:class:`_TritonStandIn`):
   every ``triton.*`` / ``triton.language.*`` submodule imports, decorators
   (``@triton.jit``, ``@triton.autotune(...)``, ``@triton.heuristics``) return
   a kernel that raises ``RuntimeError`` when launched, ``tl.constexpr(v)``
   keeps ``v``'s truth, and ``triton.__version__`` is ``"0.0.0"`` so version
   gates (``>= 2.0.0``, ``>= 3.4.0``) turn the Triton paths off. Code that only
   tries ``import triton`` sees it importable; no Triton kernel can run on a
   CPU anyway, so any such path fails loudly at its first launch.
9. ``transformer.utils.get_default_causal_mask`` and
   ``get_sliding_window_causal_mask`` build their masks with
   ``device="cuda"`` (used when no attention mask is passed); the shim builds
   the same masks on the CPU, also under the names ``fused_softmax`` imported
   (0.16.1, 0.19.2).

:func:`redirect_cuda_tensors_to_cpu` is separate and opt-in: Megatron's static
inference engine calls ``.cuda()`` / ``device="cuda"`` on the host side; the
inference entry point enables it on CPU only.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import types
from typing import Any, List, Optional

import torch

from megatron_capaware._compat.triton_stand_in import (  # noqa: F401  (re-exported)
    _stub_triton_if_missing,
    _TritonStandInFinder,
    cuda_available,
    stub_missing_triton_on_cpu,
)
from megatron_capaware._compat.dynamic_engine_cpu import (
    apply_dynamic_engine_shims,
    drop_pin_memory,
    nccl_dispatcher_buffers_on_cpu,
)

_APPLIED = False
_CUDA_REDIRECTED = False


class _NoOpStream:
    """Stand-in for ``torch.cuda.Stream`` on CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_event(self, event: Optional["_NoOpEvent"] = None) -> "_NoOpEvent":
        return event if event is not None else _NoOpEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NoOpEvent:
    """Stand-in for ``torch.cuda.Event`` on CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: "_NoOpEvent") -> float:
        return 0.0


_CPU_STREAM = _NoOpStream()


def _shim_torch_cuda() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.Stream = _NoOpStream  # type: ignore[assignment,misc]
    torch.cuda.Event = _NoOpEvent  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda *a, **k: _CPU_STREAM  # type: ignore[assignment]
    torch.cuda.default_stream = lambda *a, **k: _CPU_STREAM  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    nvtx = types.SimpleNamespace(
        range_push=lambda *a, **k: None,
        range_pop=lambda *a, **k: None,
        range=lambda *a, **k: contextlib.nullcontext(),
        mark=lambda *a, **k: None,
    )
    # ``from torch.cuda.nvtx import range_push`` (Megatron's inference controller and
    # dynamic engine) reads the module, not the attribute: stub the module's functions too.
    real_nvtx = importlib.import_module("torch.cuda.nvtx")
    for name in ("range_push", "range_pop", "range", "mark", "range_start", "range_end"):
        if hasattr(real_nvtx, name):
            setattr(real_nvtx, name, getattr(nvtx, name, lambda *a, **k: None))
    torch.cuda.nvtx = nvtx  # type: ignore[assignment]


def _shim_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def add(self: Any, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self: Any, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

    mrandom.CudaRNGStatesTracker.add = add
    mrandom.CudaRNGStatesTracker.fork = fork
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _shim_moe_utils() -> None:
    from megatron.core.transformer.moe import moe_utils

    def maybe_move_tensor_to_cpu(
        tensor: Any, as_numpy: bool = False, record_stream: bool = False
    ) -> Any:
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    if not hasattr(moe_utils, "te_general_gemm") or not _have_te():
        moe_utils.te_general_gemm = None


def _have_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def _shim_uneven_gather() -> None:
    from megatron.core.tensor_parallel import mappings

    original = mappings._gather_along_first_dim

    def gather_along_first_dim(
        input_: torch.Tensor,
        group: Any,
        output_split_sizes: Optional[List[int]] = None,
        use_global_buffer: bool = False,
    ) -> torch.Tensor:
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        # gloo's all_gather wants equal sizes: pad every rank's part to the largest.
        from megatron_capaware.policies.collectives import all_gather_padded

        return all_gather_padded(input_, list(output_split_sizes), group)

    mappings._gather_along_first_dim = gather_along_first_dim


def _shim_causal_masks() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    def get_sliding_window_causal_mask(sq: int, skv: int, window_size: Any) -> torch.Tensor:
        m = torch.ones(sq, skv, dtype=torch.bool)
        upper = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(upper, diagonal=skv - sq + window_size[1])

    for module in (tutils, fused_softmax):
        module.get_default_causal_mask = get_default_causal_mask
        module.get_sliding_window_causal_mask = get_sliding_window_causal_mask


def apply_cpu_shims() -> bool:
    """Apply every shim above once, only when CUDA is absent.

    Returns:
        True if the shims are in place (now or from an earlier call), False on
        a CUDA machine, where nothing is changed.
    """
    global _APPLIED
    if cuda_available():
        return False
    if _APPLIED:
        return True
    _shim_torch_cuda()
    _stub_triton_if_missing()
    _shim_rng_tracker()
    _shim_moe_utils()
    _shim_uneven_gather()
    _shim_causal_masks()
    apply_dynamic_engine_shims()
    _APPLIED = True
    return True


def redirect_cuda_tensors_to_cpu() -> bool:
    """Make ``Tensor.cuda()`` and ``device="cuda"`` allocations stay on the CPU.

    Megatron's static inference engine moves host tensors with ``.cuda()``; on
    a CPU machine this turns those moves into no-ops. Opt-in, CPU only.

    Returns:
        True when the redirection is active, False on a CUDA machine.
    """
    global _CUDA_REDIRECTED
    if cuda_available():
        return False
    if _CUDA_REDIRECTED:
        return True
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]
    torch.nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[assignment]
    _CUDA_REDIRECTED = True
    return True


def enable_dynamic_engine_on_cpu() -> bool:
    """Let Megatron's dynamic inference engine (``MegatronLLM``, ``DynamicInferenceEngine``) run here.

    The CPU shims and the pinned-memory stand-in (opt-in: with it on, Megatron's
    static engine no longer falls back to its legacy path on CPU). No-op with CUDA.

    Returns:
        True when active, False on a CUDA machine.
    """
    if cuda_available():
        return False
    apply_cpu_shims()
    drop_pin_memory()
    nccl_dispatcher_buffers_on_cpu()
    return True
