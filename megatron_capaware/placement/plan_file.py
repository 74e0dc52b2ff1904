"""The placement plan file ``capaware-plan`` writes: versioned, with provenance, validated on load."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from megatron_capaware.placement.planner import LayerPlacement, PlacementError

PLAN_FORMAT = "capaware-placement/1"


@dataclass
class PlacementPlan:
    """Per-layer placements for one model at one EP size.

    Attributes:
        model: ``moe_layer_numbers``, ``num_moe_experts``, ``moe_router_topk``
            of the model the plan was made for.
        ep: EP size; redundant: ``R``; nodes: hierarchical node count or None.
        layers: ``{layer_number: LayerPlacement}``.
        provenance: checkpoint, text, tokens, whether it is in-sample, command.
    """

    model: Dict[str, Any]
    ep: int
    redundant: int
    layers: Dict[int, LayerPlacement]
    nodes: Optional[int] = None
    provenance: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": PLAN_FORMAT, "model": self.model, "ep": self.ep, "redundant": self.redundant,
            "nodes": self.nodes, "provenance": self.provenance,
            "layers": {str(n): {"slots": p.slots, "replicas": p.replicas,
                                "predicted_rank_peak": p.predicted_rank_peak,
                                "contiguous_rank_peak": p.contiguous_rank_peak,
                                **({"figures": p.figures} if p.figures is not None else {})}
                       for n, p in sorted(self.layers.items())},
        }

    def save(self, path: Union[str, Path]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replica_bytes(self, bytes_per_expert: int) -> int:
        """Extra expert weights the replicas hold over the whole model (all ranks)."""
        return self.redundant * len(self.layers) * bytes_per_expert

    def check_model(self, moe_layer_numbers: Sequence[int], num_experts: int, ep: int) -> None:
        """Raise if this plan was made for another model, expert count or EP size."""
        if sorted(int(x) for x in moe_layer_numbers) != sorted(self.layers):
            raise PlacementError(
                f"the placement plan covers MoE layers {sorted(self.layers)} but the model's are "
                f"{sorted(int(x) for x in moe_layer_numbers)}: it was made for another model; run capaware-plan "
                "on this checkpoint"
            )
        if int(self.model.get("num_moe_experts", num_experts)) != num_experts:
            raise PlacementError(
                f"the placement plan is for {self.model['num_moe_experts']} experts, the model has {num_experts}: "
                "run capaware-plan on this checkpoint"
            )
        if self.ep != ep:
            raise PlacementError(
                f"the placement plan is for EP {self.ep}, this run uses EP {ep}: run capaware-plan --ep {ep}"
            )


def _layer_from_dict(number: str, data: Dict[str, Any], ep: int, num_experts: int, redundant: int) -> LayerPlacement:
    where = f"placement plan, layer {number}"
    slots = data.get("slots")
    if not isinstance(slots, list) or not all(isinstance(s, int) for s in slots):
        raise PlacementError(f"{where}: 'slots' must be a list of expert ids")
    if len(slots) != num_experts + redundant:
        raise PlacementError(f"{where}: {len(slots)} slots, expected E + R = {num_experts + redundant}")
    if len(slots) % ep:
        raise PlacementError(f"{where}: {len(slots)} slots do not split evenly over EP {ep}")
    if sorted(set(slots)) != list(range(num_experts)):
        missing = sorted(set(range(num_experts)) - set(slots))
        raise PlacementError(f"{where}: every expert needs a slot (missing {missing}) and ids lie in [0, {num_experts})")
    per = len(slots) // ep
    for rank in range(ep):
        mine = slots[rank * per:(rank + 1) * per]
        if len(set(mine)) != len(mine):
            twice = sorted({e for e in mine if mine.count(e) > 1})
            raise PlacementError(
                f"{where}: rank {rank} holds two replicas of expert(s) {twice}; a rank holds each expert at most once"
            )
    figures = data.get("figures")
    if figures is not None and not isinstance(figures, dict):
        raise PlacementError(f"{where}: 'figures' must be an object (per-call busiest-rank figures)")
    return LayerPlacement(slots=slots, num_ranks=ep, predicted_rank_peak=float(data.get("predicted_rank_peak", "nan")),
                          contiguous_rank_peak=float(data.get("contiguous_rank_peak", "nan")), figures=figures)


def load_plan(path: Union[str, Path]) -> PlacementPlan:
    """Read and validate a plan written by ``capaware-plan``.

    Raises:
        PlacementError: missing file, not JSON, another format, or an invalid layer.
    """
    path = Path(path)
    if not path.is_file():
        raise PlacementError(f"placement plan {path} does not exist; make one with capaware-plan")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PlacementError(f"placement plan {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise PlacementError(f"{path} is not a placement plan (expected format {PLAN_FORMAT!r}); make one with capaware-plan")
    try:
        ep, redundant = int(data["ep"]), int(data["redundant"])
        num_experts = int(data["model"]["num_moe_experts"])
        raw: Dict[str, Any] = data["layers"]
    except (KeyError, TypeError, ValueError) as err:
        raise PlacementError(f"placement plan {path} lacks {err}: make it again with capaware-plan") from err
    if not raw:
        raise PlacementError(f"placement plan {path} holds no layers")
    layers: Dict[int, LayerPlacement] = {}
    for number, entry in raw.items():
        layers[int(number)] = _layer_from_dict(number, entry, ep, num_experts, redundant)
    return PlacementPlan(model=data["model"], ep=ep, redundant=redundant, layers=layers,
                         nodes=data.get("nodes"), provenance=data.get("provenance", {}))


def plan_from_placements(
    placements: List[LayerPlacement], moe_layer_numbers: Sequence[int], model: Dict[str, Any],
    ep: int, redundant: int, nodes: Optional[int], provenance: Dict[str, Any],
) -> PlacementPlan:
    return PlacementPlan(model=model, ep=ep, redundant=redundant, nodes=nodes, provenance=provenance,
                         layers={int(n): p for n, p in zip(moe_layer_numbers, placements)})
