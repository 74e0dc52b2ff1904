"""``torch.compile`` of policy segments between collectives (the device path).

A :class:`Region` wraps a pure function (tensors and static Python values in,
tensors out, no collective, no host read) and runs it either eagerly or as
one ``torch.compile(fullgraph=True, dynamic=False)`` graph. ``fullgraph``
makes a graph break (a host read such as ``.item()``, a data-dependent shape)
an error instead of a silent split; ``dynamic=False`` because the device path
has static shapes (a new token count compiles once more).

Which way (:func:`backend_for`):

* ``CAPAWARE_COMPILE`` unset: compiled (inductor) for CUDA tensors, eager
  otherwise. Eager stays the CPU default and the reference.
* ``CAPAWARE_COMPILE=0``: eager everywhere.
* ``CAPAWARE_COMPILE=1`` (inductor) or a backend name (``inductor``,
  ``aot_eager``, ``eager``): compiled on any device, CPU included (tests).

Dynamo disabled (``TORCHDYNAMO_DISABLE=1``, which the CPU tools set) means
eager. Each distinct call signature (tensor shapes and dtypes, which
arguments are None, the static values: in practice one per token count and
segment variant) gets its own copy of the function's code object, so its
own dynamo cache holding one graph: dynamo's per-function recompile limit (8,
which ``fullgraph=True`` turns into an error) never mixes shapes. At most
:data:`MAX_SIGNATURES` signatures per region are compiled; beyond (a server
seeing very many token counts: each one compiles once, seconds on a GPU) the
new signatures run eagerly. If compiling fails in the backend, the region
warns once and runs eagerly from then on. Eager gives the same decisions,
only more launches. :data:`STATS` counts compiled calls and fallbacks
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
import os
import types
import warnings
from typing import Any, Callable, ContextManager, Dict, Hashable, Optional, Tuple

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


def _fallback_errors() -> tuple:
    from torch._dynamo import exc

    return tuple(getattr(exc, name) for name in ("BackendCompilerFailed", "FailOnRecompileLimitHit")
                 if hasattr(exc, name))


def _signature(args: Tuple[Any, ...]) -> Hashable:
    """What a graph compiled with ``dynamic=False`` is specialised on (dynamo's guards still check it)."""
    return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)


def _copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its own code object: dynamo keeps its cache on the code object."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return copy


class Region:
    """A pure segment run eagerly or compiled: ``region(backend, *args)`` (``backend=None``: eager).

    Positional arguments only: tensors, None, and static Python values (ints, bools).
    """

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.name = fn.__name__
        self._compiled: Dict[Hashable, Callable[..., Any]] = {}
        self._broken: Optional[str] = None
        self._full_warned = False

    def _compiled_for(self, backend: Any, args: Tuple[Any, ...]) -> Optional[Callable[..., Any]]:
        key = (backend, _signature(args))
        compiled = self._compiled.get(key)
        if compiled is None:
            if len(self._compiled) >= MAX_SIGNATURES:
                if not self._full_warned:
                    self._full_warned = True
                    warnings.warn(f"capaware: {self.name} has {MAX_SIGNATURES} compiled signatures (token counts); "
                                  "new ones run eagerly (same decisions, more launches)", RuntimeWarning,
                                  stacklevel=3)
                return None
            compiled = torch.compile(_copy(self.fn), fullgraph=True, dynamic=False, backend=backend)
            self._compiled[key] = compiled
        return compiled

    def __call__(self, backend: Optional[str], *args: Any) -> Any:
        compiled = None
        if backend is not None and self._broken is None:
            compiled = self._compiled_for(backend, args)
        if compiled is None:
            if backend is not None:
                STATS["fallbacks"] += 1
            return self.fn(*args)
        region = region_hook(self.name) if region_hook is not None else contextlib.nullcontext()
        try:
            with region:
                out = compiled(*args)
        except _fallback_errors() as err:
            self._broken = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(f"capaware: compiling {self.name} failed ({self._broken}); running it eagerly from now on "
                          "(same decisions, more launches)", RuntimeWarning, stacklevel=2)
            STATS["fallbacks"] += 1
            return self.fn(*args)
        STATS["compiled_calls"] += 1
        return out
