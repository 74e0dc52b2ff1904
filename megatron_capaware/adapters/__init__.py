"""Thin Megatron-Core adapters over the pure policies.

Importing this package imports Megatron-Core and changes nothing global. On a
machine without CUDA call :func:`megatron_capaware.enable_cpu_support` first
(megatron-core 0.19 imports triton, which only exists with CUDA).
"""

from megatron_capaware.errors import CapawareError

try:
    import megatron.core  # noqa: F401
except ModuleNotFoundError as _err:  # pragma: no cover - depends on the machine
    if _err.name != "triton":
        raise
    raise CapawareError(
        "megatron-core imports triton, which this machine lacks (no CUDA): call "
        "megatron_capaware.enable_cpu_support() before importing megatron_capaware.adapters or megatron.core"
    ) from None

from megatron_capaware.adapters.dispatcher import (
    CapawareAllGatherTokenDispatcher,
    CapawareAlltoAllTokenDispatcher,
)
from megatron_capaware.adapters.placement import apply_placement, layer_layouts, remove_placement
from megatron_capaware.adapters.router import CapawareRouter, check_supported
from megatron_capaware.adapters.spec import CapawareMoELayer, capaware_spec
from megatron_capaware.adapters.stats import LayerRoutingStats, reduce_summaries
from megatron_capaware.adapters.install import (
    collect_stats,
    install_capaware_routers,
    install_layers,
    layer_states,
    moe_layers,
    reset_stats,
)

from megatron_capaware.adapters.state import LayerRoutingState

__all__ = [
    "LayerRoutingState",
    "install_layers",
    "layer_states",
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
