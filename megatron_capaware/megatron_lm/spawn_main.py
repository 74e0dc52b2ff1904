"""The main module of processes a launched script spawns, on a machine without CUDA.

Megatron's dynamic engine spawns processes (``multiprocessing`` "spawn": the
``DataParallelInferenceCoordinator`` of ``--use-coordinator`` / the server, the
HTTP frontends of ``launch_inference_server.py``). A spawned child first
re-imports the parent's ``__main__``: under ``python -m megatron_capaware.launch
SCRIPT.py`` that is the Megatron-LM script itself, whose first imports reach
``import triton`` (``megatron.core`` -> ``paged_stash``), which fails on a CPU
machine before anything of this package runs in the child.

:func:`spawn_children_through_this_module` (the launcher calls it, only where
the package's triton stand-in is in use, i.e. CPU without triton) makes the
child's main this module instead. Imported as ``__mp_main__``, it installs the
launcher's Python compatibility and the CPU shims (the triton stand-in first), then runs the script (or module) the
parent ran, as ``__mp_main__`` the way ``multiprocessing`` would have, and
takes its names, so a process target defined in the script still unpickles.
Imported any other way it does nothing.
"""

from __future__ import annotations

import os
import runpy
from typing import Any, Dict

#: Environment variable naming the parent's main: ``path:SCRIPT.py`` or ``name:MODULE``.
MAIN_ENV = "CAPAWARE_SPAWN_PARENT_MAIN"
MODULE = __name__ if __name__ not in ("__main__", "__mp_main__") else "megatron_capaware.megatron_lm.spawn_main"


def spawn_children_through_this_module() -> bool:
    """Spawned children of this process start with this module as their main (idempotent).

    Wraps ``multiprocessing.spawn.get_preparation_data``: the parent's main
    (script path or module name) is passed to the child in :data:`MAIN_ENV`
    and the child is told to initialise its main from this module.

    Returns:
        True once the wrapper is in place.
    """
    import multiprocessing.spawn as spawn

    original = spawn.get_preparation_data
    if getattr(original, "capaware_spawn_main", False):
        return True

    def get_preparation_data(name: str) -> Dict[str, Any]:
        data = original(name)
        if "init_main_from_name" in data and data["init_main_from_name"] != MODULE:
            os.environ[MAIN_ENV] = "name:" + data.pop("init_main_from_name")
        elif "init_main_from_path" in data:
            os.environ[MAIN_ENV] = "path:" + data.pop("init_main_from_path")
        else:
            return data
        data["init_main_from_name"] = MODULE
        return data

    get_preparation_data.capaware_spawn_main = True  # type: ignore[attr-defined]
    spawn.get_preparation_data = get_preparation_data
    return True


def _run_parent_main() -> Dict[str, Any]:
    """In a spawned child: the CPU shims, then the parent's main as ``__mp_main__``; returns its names."""
    from megatron_capaware._compat.cpu_shims import apply_cpu_shims
    from megatron_capaware.megatron_lm.compat import ensure_python_compat

    ensure_python_compat()  # typing.override for megatron-core 0.19 on Python 3.11
    apply_cpu_shims()
    kind, _, target = os.environ.get(MAIN_ENV, "").partition(":")
    if kind == "path":
        return runpy.run_path(target, run_name="__mp_main__")
    if kind == "name":
        return runpy.run_module(target, run_name="__mp_main__", alter_sys=False)
    return {}


if __name__ == "__mp_main__":
    globals().update({k: v for k, v in _run_parent_main().items() if not k.startswith("__")})
