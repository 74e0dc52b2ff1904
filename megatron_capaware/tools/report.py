"""Evaluation records: table, JSON, CSV and plots.

A record is one router setting: ``router``, ``gamma`` (None where none),
``ppl``, ``accuracy``, ``i_agg``, ``rank_imbalance``, ``dropped_frac``,
``rerouted_frac`` and more (``label``, deltas against top-k, per-layer
figures, mean expert loads per layer, mean physical slot loads per layer).
``capaware-eval --json`` writes a list of them; ``docs/results/reference_eval.json``
is one. The tables and pictures again from saved records::

    python -m megatron_capaware.tools.report docs/results/reference_eval.json --out OUT
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from megatron_capaware import metrics
from megatron_capaware.registry import CAPACITY_DROP, CAPACITY_REROUTE, DECODE_PACK, LASER, ROUTER_TYPES, TOPK

#: The marker of each router type's points (the registry's).
MARKERS: Dict[str, str] = {name: entry.marker for name, entry in ROUTER_TYPES.items()}

# A column: (record key, header, format string or function of the value). TABLE_COLUMNS: every figure,
# with the full labels (results.md, the README). TERMINAL_COLUMNS: what the tools print, short labels,
# at most TERMINAL_WIDTH columns wide (format_table).
Column = Tuple[str, str, Union[str, Callable[[Any], str]]]
TABLE_COLUMNS: Tuple[Column, ...] = (
    ("label", "router", "{}"),
    ("ppl", "ppl", "{:.3f}"),
    ("delta_ppl_pct", "dppl%", "{:+.2f}"),
    ("accuracy", "acc", "{:.4f}"),
    ("i_agg", "I_agg", "{:.3f}"),
    ("i_agg_reduction", "I_topk/I", "{:.2f}x"),
    ("rank_imbalance", "I_rank", "{:.3f}"),
    ("rank_peak_load", "peak_rank", "{:.3f}"),
    ("predicted_speedup", "speedup", "{:.3f}x"),
    ("balancedness", "balanced", "{:.3f}"),
    ("frontier", "frontier", "{}"),
    ("max_vio", "MaxVio", "{:.3f}"),
    ("dropped_frac", "dropped%", "{:.2%}"),
    ("rerouted_frac", "rerouted%", "{:.2%}"),
)
TERMINAL_WIDTH = 120
TERMINAL_COLUMNS: Tuple[Column, ...] = (
    ("short_label", "setting (* frontier)", "{}"),
    ("ppl", "ppl", "{:.3f}"),
    ("delta_ppl_pct", "dppl%", "{:+.2f}"),
    ("accuracy", "acc", "{:.4f}"),
    ("i_agg", "I_agg", "{:.3f}"),
    ("rank_imbalance", "I_rank", "{:.3f}"),
    ("rank_peak_load", "peak_rank", "{:.3f}"),
    ("predicted_speedup", "speedup", "{:.3f}x"),
    ("balancedness", "balanced", "{:.3f}"),
    ("dropped_frac", "dropped%", "{:.2%}"),
    ("rerouted_frac", "rerouted%", "{:.2%}"),
)
# What the short labels abbreviate (printed under the terminal table; results.md has the full labels).
LABEL_KEY = ("drop / reroute / xdrop / pack = capacity-drop / capacity-reroute / expanded-drop / decode-pack "
             "(f = floor); g = gamma; "
             "w = drop_policy=weight; rank = unit=rank; rN = rounds=N (1 not shown); e, t, p = LASER eps, "
             "t_fix, pool; cal = calibrated; @ep2-r2 = placed by placement-ep2-r2.json. "
             "Full labels and every column: results.md.")

_SHORT_KEYS = {"gamma": "g", "eps": "e", "t_fix": "t", "pool": "p", "rounds": "r", "floor": "f"}
_SHORT_FLAGS = {"drop=weight": "w", "unit=rank": "rank", "calibrated": "cal", "rounds=1": ""}


def short_label(label: str) -> str:
    """A setting's label shortened for the terminal table and the pictures (:data:`LABEL_KEY`).

    ``capacity-drop(gamma=1,drop=weight,unit=rank) @placed:placement-ep2-r2.json`` ->
    ``drop(g1,w,rank)@ep2-r2``; ``laser(eps=0.6,t_fix=0.5,pool=2k)`` -> ``laser(e0.6,t0.5,p2k)``.
    Parts it does not know stay as they are.
    """
    base, _, placed = label.partition(" @")
    match = re.fullmatch(r"([\w-]+)\((.*)\)", base)
    if match:
        name, args = match.groups()
        parts = []
        for arg in args.split(","):
            key, eq, value = arg.partition("=")
            if arg in _SHORT_FLAGS:
                parts.append(_SHORT_FLAGS[arg])
            elif eq and key in _SHORT_KEYS:
                parts.append(_SHORT_KEYS[key] + value)
            else:
                parts.append(arg)
        base = f"{name}({','.join(p for p in parts if p)})"
    base = base.replace("capacity-", "").replace("expanded-", "x").replace(DECODE_PACK, "pack")
    if placed:
        placed = placed.replace("placed:", "").replace("placement-", "").replace(".json", "")
        placed = placed.replace(",round-robin", ",rr")
        base += "@" + placed
    return base


CSV_FIELDS = (
    "label", "router", "gamma", "ppl", "delta_ppl_pct", "accuracy", "delta_accuracy", "i_agg",
    "i_agg_reduction", "rank_imbalance", "rank_peak_load", "predicted_speedup", "balancedness", "frontier",
    "peak_load", "max_vio", "cv", "zero_load_frac", "dropped_frac",
    "rerouted_frac", "flexible_frac", "tokens", "ep", "tp", "seconds",
)


def make_records(results: Sequence[Any], options: Any) -> List[Dict[str, Any]]:
    """Records from :class:`~megatron_capaware.tools.evaluate.RouterResult` s (deltas vs the first top-k)."""
    records: List[Dict[str, Any]] = []
    for result in results:
        cfg = result.config
        agg = metrics.aggregate_layers(result.per_layer)
        flexible = [l.get("flexible_frac", 0.0) for l in result.per_layer.values()]
        placement = getattr(result, "placement", None)
        records.append({
            "label": cfg.describe() + (f" @{placement.describe()}" if placement else ""),
            "router": cfg.router_type,
            "gamma": cfg.gamma if cfg.uses_capacity else None,
            "ppl": result.ppl,
            "accuracy": result.accuracy,
            "i_agg": agg.get("i_agg"),
            "rank_imbalance": agg.get("rank_imbalance"),
            # busiest expert / EP rank over top-k's mean: comparable across routers
            "peak_load": agg.get("peak_load"),
            "rank_peak_load": agg.get("rank_peak_load"),
            "max_vio": agg.get("max_vio"),
            "cv": agg.get("cv"),
            "zero_load_frac": agg.get("zero_load_frac"),
            "dropped_frac": agg.get("dropped_frac"),
            "rerouted_frac": agg.get("rerouted_frac"),
            "flexible_frac": sum(flexible) / len(flexible) if flexible else 0.0,
            "tokens": result.tokens,
            "ep": options.expert_parallel,
            "tp": options.tensor_parallel,
            "seconds": result.seconds,
            "config": cfg.to_dict(),
            "per_layer": {str(k): v for k, v in sorted(result.per_layer.items())},
            "expert_loads": {str(k): v for k, v in sorted(result.expert_loads.items())},
            # What each EP rank computed: per layer the mean load of each physical slot and the logical
            # expert in it (rank r holds slots r*S/EP .. (r+1)*S/EP - 1); the experts themselves on
            # Megatron's contiguous layout.
            "slot_loads": {str(k): v for k, v in sorted((getattr(result, "slot_loads", None) or {}).items())},
            "slot_experts": {str(n): list(p.slots) for n, p in sorted(placement.plan.layers.items())}
            if placement is not None else None,
            "placement": None if placement is None else {
                "plan": placement.label, "redundant": placement.plan.redundant, "ep": placement.plan.ep,
                "replica_policy": placement.replica_policy, "in_sample": placement.in_sample,
                "plan_text": placement.plan.provenance.get("text"),
                "replica_bytes_bf16": placement.plan.provenance.get("replica_bytes_bf16"),
                "move_seconds": placement.move_seconds,
            },
            **(getattr(result, "decode", None) or {}),
        })
    # The baseline: top-k on Megatron's contiguous layout.
    baseline = next((r for r in records if r["router"] == TOPK and not r.get("placement")), None)
    for record in records:
        ranks = [1.0 / l["rank_imbalance"] for l in record["per_layer"].values() if l.get("rank_imbalance")]
        record["balancedness"] = sum(ranks) / len(ranks) if ranks else None
        if baseline is None:
            record.update(delta_ppl_pct=None, delta_accuracy=None, i_agg_reduction=None, predicted_speedup=None)
            continue
        record["delta_ppl_pct"] = 100.0 * (record["ppl"] / baseline["ppl"] - 1.0)
        record["delta_accuracy"] = record["accuracy"] - baseline["accuracy"]
        record["i_agg_reduction"] = baseline["i_agg"] / record["i_agg"] if record["i_agg"] else None
        record["predicted_speedup"] = predicted_speedup(baseline, record)
        if record.get("decode_ppl") is not None and baseline.get("decode_ppl"):
            record["decode_delta_ppl_pct"] = 100.0 * (record["decode_ppl"] / baseline["decode_ppl"] - 1.0)
            record["decode_active_speedup"] = (
                baseline["decode_active_max"] / record["decode_active_max"] if record["decode_active_max"] else None)
    mark_frontier(records)
    if any(r.get("decode_active_speedup") is not None for r in records):
        mark_frontier(records, speed="decode_active_speedup", quality="decode_delta_ppl_pct", key="decode_frontier")
    return records


DECODE_COLUMNS: Tuple[Column, ...] = (
    ("label", "router", "{}"),
    ("decode_ppl", "ppl", "{:.3f}"),
    ("decode_delta_ppl_pct", "dppl%", "{:+.2f}"),
    ("decode_accuracy", "acc", "{:.4f}"),
    ("decode_active_max", "active_max", "{:.3f}"),
    ("decode_active_mean", "active_mean", "{:.3f}"),
    ("decode_active_speedup", "active_topk/active", "{:.3f}x"),
    ("decode_frontier", "frontier", "{}"),
    ("decode_rank_peak_load", "peak_rank", "{:.3f}"),
    ("decode_i_agg", "I_agg", "{:.3f}"),
    ("decode_dropped_frac", "dropped%", "{:.2%}"),
    ("decode_rerouted_frac", "rerouted%", "{:.2%}"),
)
# The terminal's decode table: short labels, "speedup" is active_topk/active (results.md has the full names).
DECODE_TERMINAL_COLUMNS: Tuple[Column, ...] = (
    ("short_label", "setting (* frontier)", "{}"),
    # the frontier is the label's star here
    *((k, "speedup" if k == "decode_active_speedup" else h, f) for k, h, f in DECODE_COLUMNS[1:]
      if k != "decode_frontier"),
)
DECODE_CSV_FIELDS = tuple(key for key, _, _ in DECODE_COLUMNS[1:]) + (
    "decode_active_total", "decode_batch", "decode_prompt_len", "decode_steps", "decode_rounds", "decode_tokens")


def format_decode_table(records: Sequence[Dict[str, Any]], width: Optional[int] = TERMINAL_WIDTH) -> str:
    """The ``--decode`` figures: per router, activated experts per EP rank per decode step (max and mean
    over ranks, averaged over steps and layers) beside the token loads and the decoded positions' quality
    (lines at most ``width`` wide; ``speedup`` is ``active_topk/active``)."""
    # The star marks the decode frontier here.
    rows = [dict(r, frontier=r.get("decode_frontier")) for r in records if r.get("decode_ppl") is not None]
    if not rows:
        return ""
    first = rows[0]
    head = (f"decode: {first['decode_batch']} sequences x {first['decode_steps']} single-token steps x "
            f"{first['decode_rounds']} rounds after a {first['decode_prompt_len']}-token top-k prefill "
            f"(KV cache; {first['decode_tokens']} decoded positions, teacher-forced); "
            "speedup = active_max(topk) / active_max")
    return "\n".join(textwrap.wrap(head, width=width or TERMINAL_WIDTH)) + "\n" + format_table(
        rows, DECODE_TERMINAL_COLUMNS, width=width)


def predicted_speedup(baseline: Dict[str, Any], record: Dict[str, Any]) -> Optional[float]:
    """``peak_rank(topk) / peak_rank(setting)``: the expert time the busiest EP rank sets, relative.

    Prefill expert time follows the busiest rank's load (``rank_peak_load``:
    its load over top-k's mean rank load), so this is the layer speedup the
    setting would give where the experts dominate; measured layer time is
    the ground truth (``capaware-bench-straggler``).
    """
    base, mine = baseline.get("rank_peak_load"), record.get("rank_peak_load")
    if not base or not mine:
        return None
    return base / mine


def mark_frontier(records: Sequence[Dict[str, Any]], speed: str = "predicted_speedup", quality: str = "ppl",
                  key: str = "frontier") -> None:
    """Set ``key`` to ``yes`` or ``dominated`` (another setting is at least as fast
    and as good, and better in one) on records with a ``speed`` and a ``quality`` (lower is better);
    the decode frontier passes ``decode_active_speedup`` / ``decode_delta_ppl_pct``."""
    usable = [r for r in records if r.get(speed) is not None and r.get(quality) is not None]
    for r in records:
        r[key] = None
    for r in usable:
        dominated = any(
            o is not r and o[speed] >= r[speed] and o[quality] <= r[quality]
            and (o[speed] > r[speed] or o[quality] < r[quality])
            for o in usable
        )
        r[key] = "dominated" if dominated else "yes"


def _cell(value: Any, fmt: Union[str, Callable[[Any], str]]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt(value) if callable(fmt) else fmt.format(value)


def _with_short_labels(records: Sequence[Dict[str, Any]], star: bool = True) -> List[Dict[str, Any]]:
    """The records with ``short_label`` set (``star``: ``*`` marks a frontier setting)."""
    return [dict(r, short_label=short_label(str(r.get("label", "?")))
                 + ("*" if star and r.get("frontier") == "yes" else "")) for r in records]


def format_table(records: Sequence[Dict[str, Any]], columns: Sequence[Column] = TERMINAL_COLUMNS, *,
                 width: Optional[int] = TERMINAL_WIDTH, key: bool = True) -> str:
    """A fixed-width text table of the records, at most ``width`` characters a line.

    The default columns are the terminal's: short labels (``key`` adds the
    abbreviations, wrapped), the figures a reader compares. If a line would
    still be wider than ``width`` the first column is cut (ending in ``~``).
    ``width=None``: no limit.
    """
    if any(k == "short_label" for k, _, _ in columns):
        records = _with_short_labels(records)
    rows = [[header for _, header, _ in columns]]
    for record in records:
        rows.append([_cell(record.get(k), fmt) for k, _, fmt in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    if width is not None:
        over = sum(widths) + 2 * (len(widths) - 1) - width
        if over > 0:
            widths[0] = max(4, widths[0] - over)
            for row in rows:
                if len(row[0]) > widths[0]:
                    row[0] = row[0][:widths[0] - 1] + "~"
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    if key and any(k == "short_label" for k, _, _ in columns):
        lines += textwrap.wrap(LABEL_KEY, width=width or TERMINAL_WIDTH)
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(records: Sequence[Dict[str, Any]], columns: Sequence[Column] = TABLE_COLUMNS) -> str:
    """Every column in Markdown, full labels (results.md, the README); a ``short_label`` column gives
    the terminal's label beside them."""
    if any(k == "short_label" for k, _, _ in columns):
        records = _with_short_labels(records, star=False)
    header = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = [
        "| " + " | ".join(_cell(r.get(k), f) for k, _, f in columns) + " |" for r in records
    ]
    return "\n".join([header, sep, *body])


def write_outputs(
    records: Sequence[Dict[str, Any]],
    out_dir: Path,
    *,
    json_path: Optional[Path] = None,
    csv_path: Optional[Path] = None,
    plots: bool = True,
    text_kind: str = "held-out",
) -> List[Path]:
    """Write results.json, results.csv, results.md (and plots) to ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    for path in filter(None, (out_dir / "results.json", json_path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(list(records), indent=2) + "\n")
        written.append(Path(path))
    for path in filter(None, (out_dir / "results.csv", csv_path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        decode = any(r.get("decode_ppl") is not None for r in records)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS + (DECODE_CSV_FIELDS if decode else ()),
                                    extrasaction="ignore")
            writer.writeheader()
            writer.writerows(records)
        written.append(Path(path))
    short = (("short_label", "short", "{}"),)
    md = markdown_table(records, TABLE_COLUMNS[:1] + short + TABLE_COLUMNS[1:]) + "\n"
    if any(r.get("decode_ppl") is not None for r in records):
        md += "\nDecode (single-token steps):\n\n" + markdown_table(
            [r for r in records if r.get("decode_ppl") is not None], DECODE_COLUMNS[:1] + short + DECODE_COLUMNS[1:]
        ) + "\n"
    md += "\nShort labels: " + LABEL_KEY.replace(" Full labels and every column: results.md.", "") + "\n"
    (out_dir / "results.md").write_text(md)
    written.append(out_dir / "results.md")
    if plots:
        written += plot_load_heatmaps(records, out_dir / "expert_load_heatmaps.png")
        written += plot_quality_vs_balance(records, out_dir / "quality_vs_balance.png")
        written += plot_frontier(records, out_dir / "frontier.png", text_kind=text_kind)
        written += plot_decode_frontier(records, out_dir / "decode_frontier.png")
    return written


HEATMAPS_PER_PAGE = 12  # settings per heatmap figure (more: expert_load_heatmaps_2.png, ...)
HEATMAP_CMAP = "RdBu_r"  # diverging at 1.0 = a fair share: red above, blue below


def slot_view(record: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """What each EP rank computed in one record, as arrays for the heatmaps (None without loads).

    Returns a dict: ``layers`` (layer names), ``loads [L, S]`` mean load per
    physical slot, ``experts [L, S]`` the logical expert in each slot,
    ``ranks`` (EP size the slots are grouped by; rank ``r`` holds slots
    ``r*S/EP .. (r+1)*S/EP - 1``), ``rank_loads [L, EP]`` and ``physical``
    (False: a placed record from before slot loads were recorded, shown as
    logical experts, not grouped by rank).
    """
    import numpy as np

    expert_loads = {k: v for k, v in (record.get("expert_loads") or {}).items() if v}
    if not expert_loads:
        return None
    layers = sorted(expert_loads, key=int)
    slot_loads = record.get("slot_loads") or {}
    if all(slot_loads.get(l) for l in layers):
        loads = np.array([slot_loads[l] for l in layers], dtype=float)
        table = record.get("slot_experts") or {}
        experts = np.array([table.get(l) or list(range(loads.shape[1])) for l in layers], dtype=int)
        physical = True
    else:
        loads = np.array([expert_loads[l] for l in layers], dtype=float)
        experts = np.tile(np.arange(loads.shape[1]), (len(layers), 1))
        physical = not record.get("placement")
    ranks = int(record.get("ep") or 1) if physical else 1
    if ranks < 1 or loads.shape[1] % ranks:
        ranks = 1
    rank_loads = loads.reshape(len(layers), ranks, -1).sum(axis=2)
    return {"layers": layers, "loads": loads, "experts": experts, "ranks": ranks, "physical": physical,
            "rank_loads": rank_loads}


def heatmap_figures(records: Sequence[Dict[str, Any]], per_page: int = HEATMAPS_PER_PAGE) -> List[Any]:
    """The expert-load heatmaps as matplotlib figures, ``per_page`` settings each (fewer where the
    panels are large: a page stays about 16 inches tall).

    One panel per setting: left, rows = MoE layers, columns = physical slots
    grouped by EP rank (tick: the logical expert in the slot; a replicated
    expert appears once per replica), colour = slot load / mean slot load of
    the layer (white: a fair share, red above, blue below); right, each
    rank's load / mean rank load (the number in the cell; the busiest rank
    sets the layer's latency). Every panel has a fixed
    size and the layout engine spaces them, so titles never overlap at any
    number of settings; one colour scale for all pages.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    views = [(r, v) for r in records if (v := slot_view(r)) is not None]
    if not views:
        return []
    norm_slots = [v["loads"] / np.maximum(v["loads"].mean(axis=1, keepdims=True), 1e-9) for _, v in views]
    norm_ranks = [v["rank_loads"] / np.maximum(v["rank_loads"].mean(axis=1, keepdims=True), 1e-9) for _, v in views]
    vmax = max(1.0, max(float(g.max()) for g in norm_slots), max(float(g.max()) for g in norm_ranks))
    num_slots = max(v["loads"].shape[1] for _, v in views)
    num_ranks = max(v["ranks"] for _, v in views)
    num_layers = max(len(v["layers"]) for _, v in views)
    slot_w = min(6.0, max(2.6, 0.32 * num_slots))
    rank_w = max(0.9, 0.42 * num_ranks)
    panel_w, panel_h = slot_w + rank_w + 1.0, 1.3 + 0.32 * max(num_layers, 3)
    cols = max(1, min(3, int(16.0 // panel_w), per_page, len(views)))
    per_page = max(1, min(per_page, cols * int(16.0 // panel_h)))  # pages about 16 in tall at most
    figures = []
    for first in range(0, len(views), per_page):
        page = list(range(first, min(first + per_page, len(views))))
        rows = math.ceil(len(page) / cols)
        fig = plt.figure(figsize=(cols * panel_w, rows * panel_h + 1.1), layout="constrained")
        grid_fig, bar_fig = fig.subfigures(2, 1, height_ratios=[rows * panel_h, 1.1])
        panels = np.atleast_1d(grid_fig.subfigures(rows, cols, squeeze=False)).reshape(rows, cols)
        image = None
        for slot, sub in enumerate(panels.flat):
            if slot >= len(page):
                continue
            i = page[slot]
            record, view = views[i]
            image = _heatmap_panel(sub, record, view, norm_slots[i], norm_ranks[i], vmax, slot_w, rank_w)
        if image is not None:
            cax = bar_fig.add_axes((0.3, 0.55, 0.4, 0.15))
            bar_fig.colorbar(image, cax=cax, orientation="horizontal",
                             label="load / mean load of the layer's slots (left) or ranks (right)")
        pages = math.ceil(len(views) / per_page)
        title = ("Per-layer load of each physical expert slot, grouped by EP rank, and each rank's load "
                 f"(mean over forward calls){'' if pages == 1 else f'; page {first // per_page + 1} of {pages}'}")
        fig.suptitle("\n".join(textwrap.wrap(title, width=int(cols * panel_w * 12))), fontsize=10)
        figures.append(fig)
    return figures


def _heatmap_panel(sub: Any, record: Dict[str, Any], view: Dict[str, Any], slots: Any, ranks: Any, vmax: float,
                   slot_w: float, rank_w: float) -> Any:
    """One setting's panel in subfigure ``sub``: slot heatmap ``slots [L, S]`` and rank column ``ranks [L, EP]``."""
    layers, experts, ep = view["layers"], view["experts"], view["ranks"]
    num_slots = slots.shape[1]
    ax, rax = sub.subplots(1, 2, width_ratios=[slot_w, max(rank_w, 0.5)], sharey=True)
    from matplotlib.colors import TwoSlopeNorm

    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    ink = lambda v: "white" if abs(v - 1.0) > 0.55 * max(1.0, vmax - 1.0) else "black"  # noqa: E731
    image = ax.imshow(slots, aspect="auto", cmap=HEATMAP_CMAP, norm=norm, interpolation="nearest")
    per = num_slots // ep
    for r in range(1, ep):
        ax.axvline(r * per - 0.5, color="black", linewidth=2.0)
    ax.set_yticks(range(len(layers)), [f"L{l}" for l in layers], fontsize=7)
    same = same_experts(experts)
    if num_slots <= 32:  # name the expert in each slot: under the column, or in each cell where layers differ
        ax.set_xticks(range(num_slots), [str(e) for e in experts[0]] if same else [""] * num_slots, fontsize=6)
        if not same:
            for (y, x), e in _cells(experts):
                ax.text(x, y, str(e), ha="center", va="center", fontsize=6, color=ink(slots[y, x]))
        what = "slot (the expert it holds)" if same else "slot (expert in the cell)"
    else:
        ax.set_xticks([])
        what = f"{num_slots} slots"
    if view["physical"] and ep > 1:
        top = ax.secondary_xaxis("top")
        top.set_xticks([r * per + (per - 1) / 2 for r in range(ep)], [f"rank {r}" for r in range(ep)], fontsize=7)
        top.tick_params(length=0)
        ax.set_xlabel(what, fontsize=7)
    else:
        ax.set_xlabel("expert" if view["physical"] else "logical expert (slot loads not recorded)", fontsize=7)
    if view["physical"]:
        rax.imshow(ranks, aspect="auto", cmap=HEATMAP_CMAP, norm=norm, interpolation="nearest")
        for (y, x), value in _cells(ranks):
            rax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=7, color=ink(value))
        rax.set_xticks(range(ranks.shape[1]), [f"r{r}" for r in range(ranks.shape[1])], fontsize=7)
        rax.set_xlabel("rank load", fontsize=7)
        rax.tick_params(axis="y", left=False, labelleft=False)
    else:
        rax.axis("off")
        rax.text(0.5, 0.5, "rank loads\nnot\nrecorded", ha="center", va="center", fontsize=7,
                 transform=rax.transAxes)
    peak = record.get("rank_peak_load")
    sub.suptitle(f"{short_label(str(record.get('label', '?')))}\n"
                 f"I_agg {record.get('i_agg') or float('nan'):.2f}   peak_rank "
                 f"{float('nan') if peak is None else peak:.3f}", fontsize=8)
    return image


def same_experts(experts: Any) -> bool:
    """Whether every layer's slots hold the same experts (``experts [L, S]``)."""
    return all((experts[0] == row).all() for row in experts)


def _cells(grid: Any) -> List[Tuple[Tuple[int, int], Any]]:
    return [((y, x), grid[y, x]) for y in range(grid.shape[0]) for x in range(grid.shape[1])]


def plot_load_heatmaps(records: Sequence[Dict[str, Any]], path: Path,
                       per_page: int = HEATMAPS_PER_PAGE) -> List[Path]:
    """The per-layer slot and rank load heatmaps (:func:`heatmap_figures`): ``path`` for the first
    ``per_page`` settings, ``<stem>_2.png``, ... for the next; returns the paths written."""
    import matplotlib.pyplot as plt

    written = []
    for n, fig in enumerate(heatmap_figures(records, per_page), start=1):
        out = Path(path) if n == 1 else Path(path).with_name(f"{Path(path).stem}_{n}{Path(path).suffix}")
        fig.savefig(out, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(out)
    return written


def _family(record: Dict[str, Any]) -> str:
    """Router type, plus a non-default drop policy, the rank capacity unit and a placement (each its own curve)."""
    config = record.get("config") or {}
    family = record["router"]
    extra = []
    if record["router"] in (CAPACITY_DROP, CAPACITY_REROUTE) and config.get("drop_policy", "score") != "score":
        extra.append(f"drop={config['drop_policy']}")
    if config.get("capacity_unit") == "rank":
        extra.append("unit=rank")
    if extra:
        family += f" ({','.join(extra)})"
    if record.get("placement"):
        family += " @placed"
    return family


def quality_balance_figure(records: Sequence[Dict[str, Any]]) -> Any:
    """Perplexity against I_agg as a matplotlib figure: one line per router family across its settings.

    Points are labelled with their gamma (LASER: default / cal) where the
    label has room; a label that would overlap one already drawn, or the
    legend (right of the plot), is left out (the table has every figure).
    Settings far above the rest are listed in the legend instead of plotted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    usable = [r for r in records if r.get("i_agg") is not None and r.get("ppl") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if not usable:
        return fig
    best = min(r["ppl"] for r in usable)
    spread = sorted(r["ppl"] for r in usable)[len(usable) // 2] - best
    limit = best + max(10 * spread, 0.1 * best)
    off = [r for r in usable if r["ppl"] > limit]
    families: Dict[str, List[Dict[str, Any]]] = {}
    for record in usable:
        if record["ppl"] <= limit:
            families.setdefault(_family(record), []).append(record)
    markers = MARKERS
    notes = []
    for family, items in families.items():
        items = sorted(items, key=lambda r: r["i_agg"])
        ax.plot([r["i_agg"] for r in items], [r["ppl"] for r in items], marker=markers.get(items[0]["router"], "o"),
                label=family, linestyle=("--" if family != items[0]["router"] else "-") if len(items) > 1 else "")
        for r in items:
            text = f"{r['gamma']:g}" if r.get("gamma") is not None else (
                ("cal" if "calibrated" in r["label"] else "default") if r["router"] == LASER else None)
            if text:
                notes.append(ax.annotate(text, (r["i_agg"], r["ppl"]), fontsize=7, xytext=(3, 3),
                                         textcoords="offset points"))
    ax.set_xlabel("I_agg = mean over layers of max/mean expert load (lower is better)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("Quality against balance (labels: capacity factor gamma)", fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    for r in off:
        handles.append(Line2D([], [], linestyle="", marker=markers.get(r["router"], "o"), color="0.5"))
        labels.append(f"above: {short_label(r['label'])} I_agg {r['i_agg']:.2f} ppl {r['ppl']:.1f}")
    legend = ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    kept = [legend.get_window_extent(renderer)]
    for note in notes:  # left to right as plotted: drop a label that would cover another
        box = note.get_window_extent(renderer)
        if any(box.overlaps(other) for other in kept) or not ax.bbox.contains(box.x0, box.y0):
            note.remove()
        else:
            kept.append(box)
    return fig


def plot_quality_vs_balance(records: Sequence[Dict[str, Any]], path: Path) -> List[Path]:
    """Perplexity against I_agg (:func:`quality_balance_figure`); returns ``[path]``."""
    import matplotlib.pyplot as plt

    fig = quality_balance_figure(records)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [path]


def spread_labels(wanted: Sequence[float], gap: float, low: float = 0.0, high: float = 1.0) -> List[float]:
    """Label positions on one axis as close to ``wanted`` as possible, at least ``gap`` apart, in ``[low, high]``.

    Keeps the order of ``wanted`` (so leader lines to sorted points do not
    cross). Needs ``(len(wanted) - 1) * gap <= high - low``.

    Raises:
        ValueError: the labels do not fit.
    """
    n = len(wanted)
    if n and (n - 1) * gap > high - low + 1e-9:
        raise ValueError(f"{n} labels {gap} apart do not fit in [{low}, {high}]")
    order = sorted(range(n), key=lambda i: wanted[i])
    pos = [min(max(wanted[i], low), high) for i in order]
    for j in range(1, n):  # push up
        pos[j] = max(pos[j], pos[j - 1] + gap)
    if n and pos[-1] > high:  # then down from the top
        pos[-1] = high
        for j in range(n - 2, -1, -1):
            pos[j] = min(pos[j], pos[j + 1] - gap)
    out = [0.0] * n
    for j, i in enumerate(order):
        out[i] = pos[j]
    return out


FRONTIER_LABEL_PT = 7.5  # the frontier callouts' font size; one callout line takes 1.5x that


def frontier_figure(records: Sequence[Dict[str, Any]], text_kind: str = "held-out") -> Any:
    """The speed-quality picture as a matplotlib figure (None if no record has a speedup).

    Every setting is a point (marker: router family, in the legend); only
    the frontier settings are labelled, by callouts in a column right of the
    plot spaced so they cannot overlap (short label, speedup, dppl%), joined
    to their points by leader lines. Settings above the plotted range are
    listed under the legend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    usable = [r for r in records if r.get("predicted_speedup") is not None and r.get("delta_ppl_pct") is not None]
    if not usable:
        return None
    front = sorted((r for r in usable if r["frontier"] == "yes"), key=lambda r: r["delta_ppl_pct"])
    # Keep the frontier readable: settings far above it are listed, not plotted to scale.
    top = max(2.0, 2.0 * max((r["delta_ppl_pct"] for r in front), default=1.0))
    off = sorted((r for r in usable if r["delta_ppl_pct"] > top), key=lambda r: r["delta_ppl_pct"])
    shown = [r for r in usable if r["delta_ppl_pct"] <= top]
    # Fixed geometry in inches: the axes get at least enough height for the callouts.
    line_in = 1.5 * FRONTIER_LABEL_PT / 72
    axes_w, axes_h = 5.6, max(3.6, line_in * (len(front) + 1))
    left, right, bottom, top_margin = 0.9, 3.0, 0.6, 0.5
    fig_w, fig_h = left + axes_w + right, bottom + axes_h + top_margin
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((left / fig_w, bottom / fig_h, axes_w / fig_w, axes_h / fig_h))
    markers = MARKERS
    families: Dict[str, List[Dict[str, Any]]] = {}
    for record in shown:
        families.setdefault(_family(record), []).append(record)
    for family, items in families.items():
        ax.scatter([r["predicted_speedup"] for r in items], [r["delta_ppl_pct"] for r in items],
                   marker=markers.get(items[0]["router"], "o"), label=family, alpha=0.85, zorder=3)
    by_speed = sorted(front, key=lambda r: r["predicted_speedup"])
    ax.plot([r["predicted_speedup"] for r in by_speed], [r["delta_ppl_pct"] for r in by_speed], color="black",
            linewidth=1, linestyle="--", label="frontier", zorder=2)
    ys = [r["delta_ppl_pct"] for r in shown]
    pad = 0.06 * ((max(ys) - min(ys)) or 1.0)
    ax.set_ylim(min(ys) - pad, (top if off else max(ys)) + pad)
    xs = [r["predicted_speedup"] for r in shown]
    xpad = 0.05 * ((max(xs) - min(xs)) or 1.0)
    ax.set_xlim(min(xs) - xpad, max(xs) + xpad)
    # Callouts: in axes fraction, each as close to its point's height as the spacing allows.
    to_axes = ax.transData + ax.transAxes.inverted()
    wanted = [float(to_axes.transform((r["predicted_speedup"], r["delta_ppl_pct"]))[1]) for r in front]
    placed = spread_labels(wanted, line_in / axes_h, 0.5 * line_in / axes_h, 1 - 0.5 * line_in / axes_h)
    for r, y in zip(front, placed):
        ax.annotate(f"{short_label(r['label'])}  {r['predicted_speedup']:.3f}x  {r['delta_ppl_pct']:+.2f}%",
                    xy=(r["predicted_speedup"], r["delta_ppl_pct"]), xycoords="data",
                    xytext=(1.03, y), textcoords="axes fraction", fontsize=FRONTIER_LABEL_PT, va="center",
                    annotation_clip=False,
                    arrowprops=dict(arrowstyle="-", color="0.6", linewidth=0.6, linestyle=":", shrinkA=2,
                                    shrinkB=3))
    ax.set_xlabel("predicted speedup = peak_rank(topk) / peak_rank(setting)   (higher is faster)")
    ax.set_ylabel(f"{text_kind} perplexity change vs topk, %\n(lower is better)")
    ax.set_title("Speed against quality (labelled: the frontier; others are dominated)", fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    for r in off:
        handles.append(Line2D([], [], linestyle="", marker=markers.get(r["router"], "o"), color="0.5"))
        labels.append(f"above the chart: {short_label(r['label'])} {r['predicted_speedup']:.3f}x "
                      f"{r['delta_ppl_pct']:+.1f}%")
    # Under the x label (0.6 in below the axes leaves room for the tick labels and the x label).
    ax.legend(handles, labels, fontsize=7, loc="upper left", ncol=2, frameon=False,
              bbox_to_anchor=(0.0, -0.62 / axes_h), borderaxespad=0.0)
    return fig


def plot_frontier(records: Sequence[Dict[str, Any]], path: Path, text_kind: str = "held-out") -> List[Path]:
    """Perplexity change against predicted speedup, the Pareto frontier drawn through and labelled
    (:func:`frontier_figure`); returns ``[path]`` (``[]`` if no record has a speedup)."""
    import matplotlib.pyplot as plt

    fig = frontier_figure(records, text_kind)
    if fig is None:
        return []
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return [path]


def format_placement(records: Sequence[Dict[str, Any]], width: Optional[int] = TERMINAL_WIDTH) -> str:
    """The placed settings against top-k on the contiguous layout: measured perplexity and busiest rank
    (short labels; each setting's lines at most ``width`` wide)."""
    base = next((r for r in records if r["router"] == TOPK and not r.get("placement")), None)
    lines = []
    for record in records:
        p = record.get("placement")
        if not p or base is None:
            continue
        extra = f", replicas {p['replica_bytes_bf16'] / 1e6:.2f} MB bf16" if p.get("replica_bytes_bf16") else ""
        if p.get("move_seconds") is not None:
            extra += f", experts moved in {p['move_seconds']:.3f} s"
        text = (
            f"{short_label(record['label'])}: EP {p['ep']}, R={p['redundant']} ({p['replica_policy']}), planned on "
            f"{Path(p['plan_text'] or '?').name}{' (in-sample)' if p['in_sample'] else ''}{extra}: busiest rank "
            f"{base['rank_peak_load']:.3f} -> {record['rank_peak_load']:.3f} (measured), speedup "
            f"{record['predicted_speedup']:.3f}x, perplexity {record['ppl']:.4f} vs {base['ppl']:.4f} "
            f"({record['delta_ppl_pct']:+.5f}%)"
        )
        lines += textwrap.wrap(text, width=width, subsequent_indent="    ") if width else [text]
    return "\n".join(lines)


def _finish(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str, legend_size: int) -> List[Path]:
    """Labels, grid and legend of a results plot; saves it and returns ``[path]``."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [path]


def plot_decode_frontier(records: Sequence[Dict[str, Any]], path: Path) -> List[Path]:
    """Decode perplexity change against ``active_max(topk) / active_max(setting)`` (``--decode``), frontier drawn.

    The x axis is the busiest EP rank's activated experts per decode step under top-k over the setting's:
    the decode speedup if a step's expert time is its weight reads.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [r for r in records if r.get("decode_active_speedup") is not None
              and r.get("decode_delta_ppl_pct") is not None]
    if not usable:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = dict(MARKERS, **{f"{DECODE_PACK} (oea)": "X"})
    families: Dict[str, List[Dict[str, Any]]] = {}
    for record in usable:
        family = _family(record)
        if record["router"] == DECODE_PACK and not (record.get("config") or {}).get("decode_rank_aware", True):
            family = "decode-pack (oea)"
        families.setdefault(family, []).append(record)
    for family, items in families.items():
        items = sorted(items, key=lambda r: r["decode_active_speedup"])
        ax.plot([r["decode_active_speedup"] for r in items], [r["decode_delta_ppl_pct"] for r in items],
                marker=markers.get(family, markers.get(items[0]["router"], "o")), label=family, alpha=0.85,
                linestyle="-" if family.startswith(DECODE_PACK) and len(items) > 1 else "")
        if family.startswith(DECODE_PACK):
            for r in items:
                short = r["label"].replace("decode-pack(", "").rstrip(")").replace("oea,", "")
                ax.annotate(short, (r["decode_active_speedup"], r["decode_delta_ppl_pct"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
    front = sorted((r for r in usable if r.get("decode_frontier") == "yes"), key=lambda r: r["decode_active_speedup"])
    ax.plot([r["decode_active_speedup"] for r in front], [r["decode_delta_ppl_pct"] for r in front], color="black",
            linewidth=1, linestyle="--", label="frontier")
    top = max(2.0, 2.0 * max(r["decode_delta_ppl_pct"] for r in front))
    off = [r for r in usable if r["decode_delta_ppl_pct"] > top]
    if off:
        ax.set_ylim(top=top)
        ax.text(0.02, 0.97, "off the chart: " + ", ".join(
            f"{r['label']} {r['decode_delta_ppl_pct']:+.1f}%" for r in off), transform=ax.transAxes, fontsize=6,
            va="top", wrap=True)
    first = usable[0]
    return _finish(fig, ax, path, "active_max(topk) / active_max(setting): busiest rank's activated experts "
                   "(higher is fewer)", "decode perplexity change vs topk, %",
                   f"Decode: batch {first.get('decode_batch')}, EP {first.get('ep')}", 7)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the terminal tables of saved records and (``--out``) write results.md, results.csv and the PNGs."""
    parser = argparse.ArgumentParser(
        prog="python -m megatron_capaware.tools.report",
        description="The evaluation's tables and pictures again, from records capaware-eval saved "
                    "(results.json or --json; e.g. docs/results/reference_eval.json).")
    parser.add_argument("records", type=Path, help="a records JSON file capaware-eval wrote")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for results.json, results.csv, results.md and the PNGs (default: print only)")
    parser.add_argument("--no-plots", action="store_true", help="with --out: skip the PNGs")
    parser.add_argument("--text-kind", choices=("held-out", "calibration"), default="held-out",
                        help="which text the perplexities are on (the frontier's axis label)")
    args = parser.parse_args(argv)
    try:
        records = json.loads(args.records.read_text(encoding="utf-8"))
    except OSError as err:
        parser.error(f"cannot read {args.records}: {err.strerror or err}")
    except ValueError as err:
        parser.error(f"{args.records} is not JSON ({err}): give a records file capaware-eval wrote (results.json)")
    if not isinstance(records, list) or not records or not all(
            isinstance(r, dict) and "label" in r and "router" in r for r in records):
        parser.error(f"{args.records} is not a list of evaluation records (each with a label and a router): "
                     "give the results.json or --json file capaware-eval wrote")
    print(format_table(records))
    if any(r.get("decode_ppl") is not None for r in records):
        print()
        print(format_decode_table(records))
    placed = format_placement(records)
    if placed:
        print(placed)
    if args.out is not None:
        for path in write_outputs(records, args.out, plots=not args.no_plots, text_kind=args.text_kind):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
