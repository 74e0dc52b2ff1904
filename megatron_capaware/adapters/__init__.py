"""Thin Megatron-Core adapters over the pure policies.

Importing this package imports Megatron-Core; on a machine without CUDA it
first applies :mod:`megatron_capaware._compat.cpu_shims` (a no-op when CUDA exists).
"""

from megatron_capaware._compat.cpu_shims import apply_cpu_shims as _apply_cpu_shims

_apply_cpu_shims()

from megatron_capaware.adapters.dispatcher import (  # noqa: E402
    CapawareAllGatherTokenDispatcher,
    CapawareAlltoAllTokenDispatcher,
)
from megatron_capaware.adapters.placement import apply_placement, layer_layouts, remove_placement  # noqa: E402
from megatron_capaware.adapters.router import CapawareRouter, check_supported  # noqa: E402
from megatron_capaware.adapters.spec import CapawareMoELayer, capaware_spec  # noqa: E402
from megatron_capaware.adapters.stats import LayerRoutingStats, reduce_summaries  # noqa: E402
from megatron_capaware.adapters.swap import (  # noqa: E402
    collect_stats,
    install_capaware_routers,
    moe_layers,
    reset_stats,
)

__all__ = [
    "CapawareAllGatherTokenDispatcher",
    "CapawareAlltoAllTokenDispatcher",
    "CapawareMoELayer",
    "CapawareRouter",
    "LayerRoutingStats",
    "apply_placement",
    "capaware_spec",
    "check_supported",
    "collect_stats",
    "install_capaware_routers",
    "layer_layouts",
    "moe_layers",
    "reduce_summaries",
    "remove_placement",
    "reset_stats",
]
