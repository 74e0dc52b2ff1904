"""The CPU stand-in for ``triton`` (megatron-core 0.19 imports it; it only exists with CUDA), and the CUDA test.

Split from :mod:`megatron_capaware._compat.cpu_shims` so that the dynamic-engine
stand-ins (:mod:`megatron_capaware._compat.dynamic_engine_cpu`) can use it
without an import circle. Nothing happens on import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any
import torch


def cuda_available() -> bool:
    """True when torch sees a CUDA device (then no shim is ever applied)."""
    return torch.cuda.is_available()


class _TritonKernelStandIn:
    """What ``@triton.jit`` (or ``autotune``/``heuristics``) returns: raises when launched."""

    def __init__(self, fn: Any, decorator: str) -> None:
        self.fn = fn
        self.decorator = decorator
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = getattr(fn, "__doc__", None)

    def _fail(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"Triton kernel {self.__name__} (@triton.{self.decorator}) cannot run: this CPU "
            "machine has no triton and no GPU (megatron_capaware's CPU stand-in for triton)"
        )

    __call__ = _fail
    run = _fail

    def __getitem__(self, grid: Any) -> Any:
        return self._fail


class _TritonCallableStandIn:
    """Any lowercase ``triton.X`` / ``tl.X``: a decorator (factory) or an inert value."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], _TritonCallableStandIn):
            return _TritonKernelStandIn(args[0], self._name)
        return _TritonCallableStandIn(self._name)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _TritonCallableStandIn(f"{self._name}.{name}")

    def __repr__(self) -> str:
        return f"<triton stand-in {self._name}>"


class _TritonClassStandIn:
    """Any capitalised ``triton.X`` (``Config``, ``Autotuner``, ``FileCacheManager``): a class
    that takes any arguments (so it can be instantiated and subclassed)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class _TritonConstexpr:
    """``tl.constexpr``: an annotation, or ``tl.constexpr(v)`` keeping ``v``."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def __bool__(self) -> bool:
        return bool(self.value)

    def __repr__(self) -> str:
        return f"constexpr({self.value!r})"


# Lowercase triton names that torch uses as types (torch._dynamo: ``triton.language.dtype``
# among its constant types, when triton imports).
_TRITON_TYPE_NAMES = frozenset({"dtype"})
# ``triton.X`` that are packages in triton (attribute access gives the stand-in submodule).
_TRITON_SUBMODULES = frozenset({"language", "runtime", "backends", "compiler", "testing", "tools"})


class _TritonStandIn(types.ModuleType):
    """A ``triton`` (sub)module of the CPU stand-in; attributes are made on demand."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if self.__name__ == "triton" and name in _TRITON_SUBMODULES:  # triton.language, ...: the submodule
            value: Any = importlib.import_module(f"triton.{name}")
        elif name == "constexpr":
            value = _TritonConstexpr
        elif name[:1].isupper() or name in _TRITON_TYPE_NAMES:
            value = type(name, (_TritonClassStandIn,), {"__module__": self.__name__})
        else:
            value = _TritonCallableStandIn(f"{self.__name__[len('triton.'):] or 'triton'}.{name}".lstrip("."))
        setattr(self, name, value)
        return value


class _TritonStandInFinder:
    """Meta-path finder serving ``triton`` and every ``triton.*`` submodule as stand-ins."""

    @classmethod
    def find_spec(cls, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "triton" and not fullname.startswith("triton."):
            return None
        return importlib.util.spec_from_loader(fullname, cls, is_package=True)

    @staticmethod
    def create_module(spec: Any) -> types.ModuleType:
        module = _TritonStandIn(spec.name)
        module.__doc__ = "megatron_capaware CPU stand-in for triton (no triton, no GPU here)."
        module.__path__ = []  # a package: submodules import too
        if spec.name == "triton":
            module.__version__ = "0.0.0"
            module.capaware_cpu_stand_in = True
        if spec.name == "triton.backends":
            # No backend: torch.compile (inductor) then knows triton cannot run here and uses its C++ path.
            module.backends = {}
        return module

    @staticmethod
    def exec_module(module: types.ModuleType) -> None:
        parent, _, child = module.__name__.rpartition(".")
        if parent and parent in sys.modules:
            setattr(sys.modules[parent], child, module)


def _stub_triton_if_missing() -> None:
    if importlib.util.find_spec("triton") is not None or "triton" in sys.modules:
        return
    if not any(f is _TritonStandInFinder for f in sys.meta_path):
        sys.meta_path.append(_TritonStandInFinder)


def stub_missing_triton_on_cpu() -> bool:
    """Install shim 8 alone (needed before megatron.core is first imported).

    Returns:
        True when the stand-in is in place; False with CUDA or with triton installed.
    """
    if cuda_available():
        return False
    _stub_triton_if_missing()
    return any(f is _TritonStandInFinder for f in sys.meta_path)
