"""Expert placement and replication (EPLB-style), pure and Megatron-free.

:mod:`.planner` decides which experts share an EP rank (and which hot
experts get replicas) from recorded expert loads; :mod:`.plan_file` reads and
writes the versioned plan ``capaware-plan`` produces; :mod:`.replicas` maps
the router's logical experts to a plan's physical slots at routing time
(:class:`~.replicas.SlotTable`, the replica choice). Moving the expert weights
into a plan's layout inside Megatron-Core is
:mod:`megatron_capaware.adapters.placement` (``capaware-eval --placement``,
``--capaware-placement``; docs/placement.md).
"""

from megatron_capaware.placement.moves import PlacementMemoryError
from megatron_capaware.placement.plan_file import PLAN_FORMAT, PlacementPlan, load_plan
from megatron_capaware.placement.planner import (
    LayerPlacement,
    PlacementError,
    best_placement_exhaustive,
    contiguous_slots,
    plan,
    plan_layer,
    rank_loads,
    rank_peak,
    replicate,
)

__all__ = [
    "LayerPlacement",
    "PLAN_FORMAT",
    "PlacementError",
    "PlacementMemoryError",
    "PlacementPlan",
    "best_placement_exhaustive",
    "contiguous_slots",
    "load_plan",
    "plan",
    "plan_layer",
    "rank_loads",
    "rank_peak",
    "replicate",
]
