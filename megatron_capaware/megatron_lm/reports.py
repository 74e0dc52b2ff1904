"""Routers from Megatron-LM's parsed flags, and the per-layer load report (table and JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from megatron_capaware.megatron_lm.compat import is_rank0, print_rank0
from megatron_capaware.registry import TOPK

STATS_FORMAT = "capaware-load-stats/1"


def install_from_args(model: Any, args: Any = None) -> Optional[Dict[int, Any]]:
    """Swap the routers the parsed flags ask for into a built (and loaded) model.

    For Megatron-LM scripts (see ``patches/``): call after ``get_model`` /
    ``load_checkpoint``. ``model`` is a module or Megatron's list of model
    chunks. With ``--moe-router-type topk`` and no ``--capaware-stats-output``
    nothing is changed.

    Returns:
        ``{layer_number: LayerRoutingStats}``, or None when nothing was installed.
    """
    from megatron_capaware.adapters import install_capaware_routers
    from megatron_capaware.megatron_lm.arguments import config_from_args, placement_from_args, stats_requested

    if args is None:
        from megatron.training import get_args

        args = get_args()
    capaware = config_from_args(args)
    placement = placement_from_args(args)
    if capaware.router_type == TOPK and not stats_requested(args) and not placement:
        return None
    chunks = model if isinstance(model, (list, tuple)) else [model]
    stats: Dict[int, Any] = {}
    for chunk in chunks:
        stats.update(install_capaware_routers(chunk, capaware, placement=placement,
                                              replica_policy=args.capaware_replica_policy))
    where = f", experts placed by {placement}" if placement else ""
    print_rank0(f"megatron-capaware: routing with {capaware.describe()} in {len(stats)} MoE layers{where}")
    return stats


def report_from_args(stats: Optional[Dict[int, Any]], args: Any = None) -> Optional[Dict[str, Any]]:
    """Print (rank 0) and write ``--capaware-stats-output``; every rank calls it. No-op for None."""
    from megatron_capaware.megatron_lm.arguments import config_from_args, stats_requested

    if not stats:
        return None
    if args is None:
        from megatron.training import get_args

        args = get_args()
    output = args.capaware_stats_output if stats_requested(args) else None
    return report_stats(stats, config_from_args(args), output)


def summarize(all_stats: Dict[int, Any]) -> Dict[str, Any]:
    """Per-layer and aggregate load figures over every recorded call (all ranks call this)."""
    from megatron_capaware import metrics
    from megatron_capaware.adapters import reduce_summaries

    per_layer = reduce_summaries(all_stats)
    return {"layers": per_layer, "aggregate": metrics.aggregate_layers(per_layer)}


def format_stats(summary: Dict[str, Any], title: str) -> str:
    """A per-layer table of :func:`summarize`'s result."""
    lines = [title]
    lines.append(
        f"{'layer':>5} {'calls':>6} {'I(max/mean)':>11} {'I_rank':>7} {'max load':>9} "
        f"{'dropped':>8} {'rerouted':>9} {'flexible':>9}"
    )
    for layer, s in sorted(summary["layers"].items()):
        lines.append(
            f"{layer:>5} {int(s.get('calls', 0)):>6} {s.get('imbalance', 0.0):>11.3f} "
            f"{s.get('rank_imbalance', 0.0):>7.3f} {s.get('max_load', 0.0):>9.1f} "
            f"{s.get('dropped_frac', 0.0):>8.2%} {s.get('rerouted_frac', 0.0):>9.2%} "
            f"{s.get('flexible_frac', 0.0):>9.2%}"
        )
    agg = summary["aggregate"]
    if agg:
        lines.append(
            f"  I_agg {agg['i_agg']:.3f}  rank I_agg {agg['rank_imbalance']:.3f}  "
            f"dropped {agg['dropped_frac']:.2%}  rerouted {agg['rerouted_frac']:.2%}"
        )
    return "\n".join(lines)


def report_stats(
    all_stats: Dict[int, Any],
    capaware: Any,
    output: Optional[str] = None,
    *,
    extra: Optional[Dict[str, Any]] = None,
    print_table: bool = True,
) -> Dict[str, Any]:
    """Reduce the per-layer stats over the ranks, print a table and write JSON on rank 0.

    Every rank must call this (one all-reduce per layer).

    Returns:
        The JSON-ready record.
    """
    summary = summarize(all_stats)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    ep = next(iter(all_stats.values())).ep_size if all_stats else 1
    record: Dict[str, Any] = {
        "format": STATS_FORMAT,
        "router": capaware.describe(),
        "config": capaware.to_dict(),
        "world_size": world,
        "expert_parallel": ep,
        "layers": {str(k): v for k, v in sorted(summary["layers"].items())},
        "aggregate": summary["aggregate"],
    }
    record.update(extra or {})
    if is_rank0():
        if print_table:
            title = (
                f"megatron-capaware load stats: router {capaware.describe()}, EP={ep}, "
                f"{len(all_stats)} MoE layers"
            )
            print(format_stats(summary, title), flush=True)
        if output:
            path = Path(output)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            print(f"megatron-capaware: load stats written to {path}", flush=True)
    return record
