"""megatron-capaware: capacity-aware and load-aware MoE routing for Megatron-Core inference.

The routing policies (:mod:`megatron_capaware.policies`) and the placement
planner (:mod:`megatron_capaware.placement`) are pure torch and import no
Megatron; the Megatron-Core adapters live in :mod:`megatron_capaware.adapters`.

Importing the package changes nothing global. On a machine without CUDA,
call :func:`enable_cpu_support` once before importing Megatron-Core (the
console scripts, the launcher and the tests do): it installs the CPU
stand-ins Megatron-Core needs there, and does nothing when CUDA is present.

The names a user needs are exported here and imported on first use (so
``import megatron_capaware`` imports neither Megatron nor triton)::

    from megatron_capaware import CapawareConfig, install_capaware_routers, collect_stats
    install_capaware_routers(model, CapawareConfig("capacity-drop", gamma=1.25, capacity_unit="rank"))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it (imported on first access: PEP 562).
_EXPORTS = {
    "CapawareConfig": "megatron_capaware.config",
    "load_calibration": "megatron_capaware.config",
    "CapawareError": "megatron_capaware.errors",
    "CapawareConfigError": "megatron_capaware.errors",
    "ROUTER_TYPES": "megatron_capaware.registry",
    "install_capaware_routers": "megatron_capaware.adapters",
    "capaware_spec": "megatron_capaware.adapters",
    "collect_stats": "megatron_capaware.adapters",
    "reset_stats": "megatron_capaware.adapters",
    "reduce_summaries": "megatron_capaware.adapters",
    "LayerRoutingStats": "megatron_capaware.adapters",
    "remove_placement": "megatron_capaware.adapters",
    "load_model": "megatron_capaware.models.checkpoint",
    "save_checkpoint": "megatron_capaware.models.checkpoint",
    "PlacementPlan": "megatron_capaware.placement",
    "plan": "megatron_capaware.placement",
    "load_plan": "megatron_capaware.placement",
}

__all__ = [
    "CapawareConfig", "CapawareConfigError", "CapawareError", "LayerRoutingStats", "PlacementPlan", "ROUTER_TYPES",
    "capaware_spec", "collect_stats", "enable_cpu_support", "install_capaware_routers", "load_calibration",
    "load_model", "load_plan", "plan", "reduce_summaries", "remove_placement", "reset_stats", "save_checkpoint",
]


def enable_cpu_support() -> bool:
    """Install the CPU stand-ins Megatron-Core needs on a machine without CUDA (no-op with CUDA).

    Call it before importing Megatron-Core. Returns True when the stand-ins
    are in place, False on a CUDA machine (where nothing is changed).
    """
    from megatron_capaware._compat.cpu_shims import apply_cpu_shims

    return apply_cpu_shims()


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'megatron_capaware' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list:
    return sorted(list(globals()) + list(_EXPORTS))
