"""``torch.compile`` of policy segments between collectives (the device path).

A :class:`Region` wraps a pure function (tensors and static Python values in,
tensors out, no collective, no host read) and runs it either eagerly or as
one ``torch.compile(fullgraph=True)`` graph. ``fullgraph`` makes a graph
break (a host read such as ``.item()``, a data-dependent shape) an error
instead of a silent split. Graphs are shape-generic (``dynamic=True``): one
graph serves every token count (a server sees a new count at almost every
step; a graph per count is a compile, seconds, stalling every EP rank):
measured 5 graphs for 100 counts, all at the first count
(docs/benchmarks.md, ``capaware-bench-compile``). ``CAPAWARE_COMPILE_DYNAMIC=0``
compiles one static graph per shape instead (the previous behaviour).
A known torch 2.13 failure under dynamic shapes (two inputs aliasing one
storage, see :func:`_unaliased`) is avoided by LASER's segments and copied
away for any other.

Which way (:func:`backend_for`):

* ``CAPAWARE_COMPILE`` unset: compiled (inductor) for CUDA tensors, eager
  otherwise. Eager stays the CPU default and the reference.
* ``CAPAWARE_COMPILE=0``: eager everywhere.
* ``CAPAWARE_COMPILE=1`` (inductor) or a backend name (``inductor``,
  ``aot_eager``, ``eager``): compiled on any device, CPU included (tests).

Dynamo disabled (``TORCHDYNAMO_DISABLE=1``, which the CPU tools set) means
eager. Each distinct call signature (tensor ranks and dtypes, which
arguments are None, the static values: in practice one per segment variant)
gets its own copy of the function's code object, so its own dynamo cache. At
most :data:`MAX_SIGNATURES` signatures per region are compiled; beyond, new
signatures run eagerly. Any exception while compiling or running a compiled
graph falls back to eager (warned once, see :class:`Region`); the first call
of a signature is agreed over the ranks of :func:`agreement_group`. Eager
gives the same decisions, only more launches. :data:`STATS` counts compiled calls and fallbacks
(``capaware-gpu-check`` reports them).

Op counting (:mod:`megatron_capaware.tools.bench.launch_count`): a counter
installs :data:`region_hook`; each compiled call then runs with the counting
modes off and counts as ONE op (issue 12's rule: "compiled regions count as
one op each"). What it hides: an inductor graph may launch several kernels
on CUDA (its fused loops plus extern kernels such as ``topk``), so launches
per layer are higher than that op count. Eager calls are counted op by op.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import types
import warnings
from typing import Any, Callable, ContextManager, Dict, Hashable, Iterator, Optional, Tuple

import torch

from megatron_capaware.policies.common import RoutingInputError

COMPILE_ENV = "CAPAWARE_COMPILE"
BACKENDS = ("inductor", "aot_eager", "eager")
MAX_SIGNATURES = 64  # compiled graphs per region (token counts x variants); more run eagerly

# Compiled calls made and eager fallbacks taken, over the process (read by capaware-gpu-check).
STATS: Dict[str, int] = {"compiled_calls": 0, "fallbacks": 0}

# Set by an op counter: a context manager factory taking the region's name, entered around each compiled call.
region_hook: Optional[Callable[[str], ContextManager[Any]]] = None


def _dynamo_disabled() -> bool:
    if os.environ.get("TORCHDYNAMO_DISABLE", "") in ("1", "true", "True"):
        return True
    try:
        import torch._dynamo.config as dynamo_config
    except ImportError:  # pragma: no cover - torch without dynamo
        return True
    return bool(getattr(dynamo_config, "disable", False))


def backend_for(tensor: torch.Tensor) -> Optional[str]:
    """The ``torch.compile`` backend the device path uses for ``tensor``'s work, or None (eager)."""
    value = os.environ.get(COMPILE_ENV, "")
    if value == "0":
        return None
    if value == "":
        backend = "inductor" if tensor.is_cuda else None
    elif value == "1":
        backend = "inductor"
    elif value in BACKENDS:
        backend = value
    else:
        raise RoutingInputError(f"{COMPILE_ENV}={value!r} must be 0, 1 or a backend: {', '.join(BACKENDS)}")
    if backend is not None and _dynamo_disabled():
        return None
    return backend


DYNAMIC_ENV = "CAPAWARE_COMPILE_DYNAMIC"  # "1" (default): one shape-generic graph; "0": a graph per shape

# The group whose ranks must agree on a region's first compiled call (set by the policy around its
# regions, :func:`agreement_group`); None: this rank alone.
# A context variable: per thread (simulated ranks run as threads) and per task.
_AGREEMENT_GROUP: "contextvars.ContextVar[Any]" = contextvars.ContextVar("capaware_agreement_group", default=None)


@contextlib.contextmanager
def agreement_group(group: Any) -> Iterator[None]:
    """Inside the block, a region's first call of a signature agrees over ``group`` (every rank enters it)."""
    token = _AGREEMENT_GROUP.set(group)
    try:
        yield
    finally:
        _AGREEMENT_GROUP.reset(token)


def _dynamic() -> bool:
    """Shape-generic graphs (the default); ``CAPAWARE_COMPILE_DYNAMIC=0``: one graph per shape."""
    value = os.environ.get(DYNAMIC_ENV, "1")
    if value not in ("0", "1"):
        raise RoutingInputError(f"{DYNAMIC_ENV}={value!r} must be 1 (one shape-generic graph, the default) "
                                "or 0 (one graph per shape)")
    return value == "1"


def _agree(ok: bool) -> bool:
    """Whether every rank of the agreement group compiled (one all-reduce of one int; True alone)."""
    group = _AGREEMENT_GROUP.get()
    from megatron_capaware.policies.collectives import all_reduce, group_device, group_size

    if group is None or group_size(group) == 1:
        return ok
    failed = torch.tensor([0 if ok else 1], dtype=torch.int32, device=group_device(group))
    return not bool(all_reduce(failed, group, op="sum").item())  # one host read, first call of a signature only


def _signature(args: Tuple[Any, ...]) -> Hashable:
    """What a region's compiled graph is keyed on.

    Shape-generic (the default): each tensor's rank, dtype and device (not its
    sizes: the graph is compiled with ``dynamic=True``, one graph for every token
    count; dynamo may add a specialised one for sizes 0 and 1), and the static
    values. With ``CAPAWARE_COMPILE_DYNAMIC=0``: the full shapes (one graph each).
    """
    dynamic = _dynamic()
    return (dynamic,) + tuple(
        ((a.dim() if dynamic else tuple(a.shape)), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
        for a in args)


def _unaliased(args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """``args`` with every tensor view that shares storage with another tensor argument copied.

    Under ``dynamic=True`` on torch 2.13, a graph given two inputs where one is
    a view of the other, both outputs of an earlier compiled graph (AOTAutograd
    regenerates an output view from its base), fails dynamo's guard creation
    ("sources must not be empty for symbol"): AOTAutograd gives the view's base
    size symbols that no input source names. Whether it fails depends on set
    order (``PYTHONHASHSEED``). A copy breaks the aliasing (one copy kernel per
    such argument; the package's segments pass none: LASER's single-rank round
    reads its total from ``running`` itself). Host metadata only, no sync.
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not any(t._is_view() for t in tensors):
        return args
    storages: Dict[int, int] = {}
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        storages[key] = storages.get(key, 0) + 1
    return tuple(a.clone() if isinstance(a, torch.Tensor) and a._is_view()
                 and storages[a.untyped_storage().data_ptr()] > 1 else a for a in args)


def _describe(err: BaseException) -> str:
    """``Type: first line``, and the cause's when dynamo wraps it (``BackendCompilerFailed``)."""
    text = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    inner = getattr(err, "inner_exception", None) or err.__cause__
    if inner is not None and inner is not err:
        text += f" {type(inner).__name__}: {str(inner).splitlines()[0] if str(inner) else ''}"
    return text


def _copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its own code object: dynamo keeps its cache on the code object."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return copy


class Region:
    """A pure segment run eagerly or compiled: ``region(backend, *args)`` (``backend=None``: eager).

    Positional arguments only: tensors, None, and static Python values (ints, bools).

    Failures never end a rank: the first call of a signature runs the compiled
    graph inside ``try``; on any exception (compiler, backend, dynamo) the
    region warns once and runs that signature eagerly from then on. The ranks
    of :func:`agreement_group` agree on that first call (one all-reduce):
    if any rank failed, every rank discards its compiled result and takes the
    eager path for the signature, so the group runs one implementation. A later
    failure of a signature that compiled (a re-specialisation for 0 or 1 rows
    on one rank) falls back on that rank for that call only: eager and compiled
    decide alike (tests/test_device_path.py), and no collective is involved.
    """

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.name = fn.__name__
        self._compiled: Dict[Hashable, Callable[..., Any]] = {}
        self._agreed: Dict[Hashable, bool] = {}  # signature -> every rank compiled its first call
        self._warned = False
        self._full_warned = False

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"capaware: {self.name}: {message}; running it eagerly (same decisions, more launches)",
                          RuntimeWarning, stacklevel=3)

    def _compiled_for(self, key: Hashable, backend: Any) -> Optional[Callable[..., Any]]:
        compiled = self._compiled.get(key)
        if compiled is None:
            if len(self._compiled) >= MAX_SIGNATURES:
                if not self._full_warned:
                    self._full_warned = True
                    warnings.warn(f"capaware: {self.name} has {MAX_SIGNATURES} compiled signatures; "
                                  "new ones run eagerly (same decisions, more launches)", RuntimeWarning,
                                  stacklevel=3)
                return None
            compiled = torch.compile(_copy(self.fn), fullgraph=True, dynamic=_dynamic(), backend=backend)
            self._compiled[key] = compiled
        return compiled

    def _run(self, compiled: Callable[..., Any], args: Tuple[Any, ...]) -> Tuple[Any, Optional[BaseException]]:
        region = region_hook(self.name) if region_hook is not None else contextlib.nullcontext()
        try:
            with region:
                return compiled(*args), None
        except Exception as err:  # noqa: BLE001 - any compile/backend failure must not end the rank
            return None, err

    def __call__(self, backend: Optional[str], *args: Any) -> Any:
        if backend is None:
            return self.fn(*args)
        key = (backend, _signature(args))
        agreed = self._agreed.get(key)
        compiled = self._compiled_for(key, backend) if agreed is not False else None
        if compiled is None:
            STATS["fallbacks"] += 1
            return self.fn(*args)
        out, err = self._run(compiled, _unaliased(args) if _dynamic() else args)
        if agreed is None:  # first call of this signature: every rank of the group decides together
            agreed = _agree(err is None)
            self._agreed[key] = agreed
            if not agreed:
                self._compiled.pop(key, None)
                why = _describe(err) if err is not None else "it failed on another rank of the group"
                self._warn(f"compiling failed ({why})")
                STATS["fallbacks"] += 1
                return self.fn(*args)
        if err is not None:
            self._warn(f"a compiled call failed ({_describe(err)})")
            STATS["fallbacks"] += 1
            return self.fn(*args)
        STATS["compiled_calls"] += 1
        return out
