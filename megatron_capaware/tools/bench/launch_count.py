"""Count what a piece of routing code would cost on a GPU, without one.

Run the code on CPU tensors with ``CAPAWARE_DEVICE_PATH=1`` (the device code
path) inside :func:`count_device_work`; it counts

* ``ops``: ATen operators dispatched (each is at least one kernel launch on
  CUDA); a compiled region (:class:`megatron_capaware.policies.compiled.Region`
  run through ``torch.compile``) counts as ONE op, issue 12's rule: the
  region runs with the counting modes off and adds 1 (``op_names`` shows it
  as ``compiled:<segment>``). On CUDA an inductor graph may launch more than
  one kernel, so this is a count of host-side dispatches, not of launches;
* ``syncs``: operations that make the host wait for the device on CUDA:
  reading a value (``item``, ``int()``, ``bool()``, ``tolist``), ops whose
  output shape depends on data (``nonzero``, ``masked_select``, ``unique``,
  ``bincount`` without ``minlength``...), copies to the host, and tensors
  built from Python values (``torch.tensor(n, device=...)``: a blocking
  host-to-device copy).

``CountedWork.sync_sites`` names where each sync came from (op and the
innermost frame of this package), so a failing test says what to fix.
On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` is the ground truth;
this counter is the CPU stand-in (tests/test_device_path.py).
"""

from __future__ import annotations

import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops whose output shape depends on the data, or that read a value to the host.
_SYNC_ATEN = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",  # without output_size it reads the repeats
    "aten.bincount",
    "aten.histc",
    "aten.equal",
    "aten.is_nonzero",
}
# Python-level calls that read a tensor to the host or build one from host values.
_SYNC_FUNCTIONS = {
    "tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu",
}
_HOST_TO_DEVICE = {"tensor", "as_tensor", "scalar_tensor"}
_IGNORED_ATEN = {"aten.detach", "aten.alias", "aten.view", "aten._unsafe_view", "aten.lift_fresh",
                 "aten.lift_fresh_copy", "aten.t", "aten.expand", "aten.unsqueeze", "aten.squeeze",
                 "aten.reshape", "aten.select", "aten.slice", "aten.permute", "aten.transpose",
                 "aten.as_strided", "aten.split", "aten.unbind", "aten.split_with_sizes",
                 "aten.sym_size", "aten.sym_stride", "aten.sym_numel", "aten.sym_storage_offset"}


@dataclass
class CountedWork:
    """What :func:`count_device_work` saw."""

    ops: int = 0
    syncs: int = 0
    sync_sites: List[str] = field(default_factory=list)
    op_names: List[str] = field(default_factory=list)
    # Host reads the function counter saw, whose aten._local_scalar_dense is still to come.
    pending_reads: int = 0


def _site(what: str) -> str:
    """``WHAT at PLACE``: the package file and line that issued it (``adapters/router.py:12``), or, when
    the innermost caller outside torch is another library (Megatron), its absolute path and the package
    frame it was reached from."""
    stack = [f for f in traceback.extract_stack() if "launch_count" not in f.filename]
    ours = [f for f in stack if "megatron_capaware" in f.filename]
    callers = [f for f in stack if "/torch/" not in f.filename]
    frame = ours[-1] if ours else (stack[-1] if stack else None)
    where = f"{frame.filename.split('megatron_capaware/')[-1]}:{frame.lineno}" if frame else "?"
    innermost = callers[-1] if callers else None
    if innermost is not None and frame is not None and innermost is not frame and ours and "megatron_capaware" \
            not in innermost.filename:
        where = f"{innermost.filename}:{innermost.lineno} (from {where})"
    return f"{what} at {where}"


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, work: CountedWork):
        super().__init__()
        self.work = work

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        kwargs = kwargs or {}
        if name in _SYNC_FUNCTIONS and args and isinstance(args[0], torch.Tensor):
            self.work.syncs += 1
            self.work.sync_sites.append(_site(f"Tensor.{name}"))
            self.work.pending_reads += 1
        elif name in _HOST_TO_DEVICE and func in (torch.tensor, torch.as_tensor, torch.scalar_tensor):
            data = args[0] if args else None
            if not isinstance(data, torch.Tensor):
                self.work.syncs += 1
                self.work.sync_sites.append(_site(f"torch.{name}(host data)"))
        elif name == "to" and args and isinstance(args[0], torch.Tensor):
            # Only an explicit host target: on the CPU stand-in the tensors' own device is "cpu" too.
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(target, str) and target == "cpu":
                self.work.syncs += 1
                self.work.sync_sites.append(_site("Tensor.to('cpu')"))
        return func(*args, **kwargs)


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, work: CountedWork):
        super().__init__()
        self.work = work

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)
        if name not in _IGNORED_ATEN:
            self.work.ops += 1
            self.work.op_names.append(name)
        if name in _SYNC_ATEN and not (name == "aten.bincount" and kwargs and kwargs.get("minlength")):
            # _local_scalar_dense usually follows an item()/int() the function counter already saw;
            # alone it is a read from C++ (indexing with a 0-d tensor, a tensor as a size).
            if name == "aten._local_scalar_dense" and self.work.pending_reads:
                self.work.pending_reads -= 1
            else:
                self.work.syncs += 1
                self.work.sync_sites.append(_site(name))
        return func(*args, **(kwargs or {}))


_active = threading.local()  # this thread's open counters, innermost last


@contextmanager
def _counting_modes_off() -> Iterator[None]:
    """Run with no torch-function mode and no dispatch mode (a compiled region must not trace the counters)."""
    from torch.utils._python_dispatch import _disable_current_modes

    popped = []
    while torch._C._len_torch_function_stack() > 0:
        popped.append(torch._C._pop_torch_function_stack())
    try:
        with _disable_current_modes():
            yield
    finally:
        for mode in reversed(popped):
            torch._C._push_on_torch_function_stack(mode)


@contextmanager
def _compiled_region(name: str) -> Iterator[None]:
    """:data:`megatron_capaware.policies.compiled.region_hook`: one op for the region, its inside uncounted."""
    works = getattr(_active, "works", None)
    if not works:
        yield
        return
    with _counting_modes_off():
        yield
    works[-1].ops += 1
    works[-1].op_names.append(f"compiled:{name}")


@contextmanager
def count_device_work() -> Iterator[CountedWork]:
    """Count ATen ops and would-be host syncs of the code run inside (see the module docstring)."""
    from megatron_capaware.policies import compiled

    compiled.region_hook = _compiled_region
    work = CountedWork()
    works = _active.__dict__.setdefault("works", [])
    works.append(work)
    try:
        with _FunctionCounter(work), _DispatchCounter(work):
            yield work
    finally:
        works.remove(work)


def count_call(fn: Callable[[], Any]) -> CountedWork:
    """:func:`count_device_work` around one call."""
    with count_device_work() as work:
        fn()
    return work
