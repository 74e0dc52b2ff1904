"""Evaluation records: table, JSON, CSV and plots.

A record is one router setting: ``router``, ``gamma`` (None where none),
``ppl``, ``accuracy``, ``i_agg``, ``rank_imbalance``, ``dropped_frac``,
``rerouted_frac`` and more (``label``, deltas against top-k, per-layer
figures, mean expert loads per layer). ``capaware-eval --json`` writes a
list of them; ``docs/results/reference_eval.json`` is one.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from megatron_capaware import metrics

TABLE_COLUMNS = (
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
    baseline = next((r for r in records if r["router"] == "topk" and not r.get("placement")), None)
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


DECODE_COLUMNS = (
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
DECODE_CSV_FIELDS = tuple(key for key, _, _ in DECODE_COLUMNS[1:]) + (
    "decode_active_total", "decode_batch", "decode_prompt_len", "decode_steps", "decode_rounds", "decode_tokens")


def format_decode_table(records: Sequence[Dict[str, Any]]) -> str:
    """The ``--decode`` figures: per router, activated experts per EP rank per decode step (max and mean
    over ranks, averaged over steps and layers) beside the token loads and the decoded positions' quality."""
    rows = [r for r in records if r.get("decode_ppl") is not None]
    if not rows:
        return ""
    first = rows[0]
    head = (f"decode: {first['decode_batch']} sequences x {first['decode_steps']} single-token steps x "
            f"{first['decode_rounds']} rounds after a {first['decode_prompt_len']}-token top-k prefill "
            f"(KV cache; {first['decode_tokens']} decoded positions, teacher-forced)")
    return head + "\n" + format_table(rows, DECODE_COLUMNS)


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


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def format_table(records: Sequence[Dict[str, Any]], columns: Sequence[tuple] = TABLE_COLUMNS) -> str:
    """A fixed-width text table of the records."""
    rows = [[header for _, header, _ in columns]]
    for record in records:
        rows.append([_cell(record.get(key), fmt) for key, _, fmt in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(records: Sequence[Dict[str, Any]], columns: Sequence[tuple] = TABLE_COLUMNS) -> str:
    """The same table in Markdown (for the README)."""
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
    md = markdown_table(records) + "\n"
    if any(r.get("decode_ppl") is not None for r in records):
        md += "\nDecode (single-token steps):\n\n" + markdown_table(
            [r for r in records if r.get("decode_ppl") is not None], DECODE_COLUMNS) + "\n"
    (out_dir / "results.md").write_text(md)
    written.append(out_dir / "results.md")
    if plots:
        written += plot_load_heatmaps(records, out_dir / "expert_load_heatmaps.png")
        written += plot_quality_vs_balance(records, out_dir / "quality_vs_balance.png")
        written += plot_frontier(records, out_dir / "frontier.png", text_kind=text_kind)
        written += plot_decode_frontier(records, out_dir / "decode_frontier.png")
    return written


def plot_load_heatmaps(records: Sequence[Dict[str, Any]], path: Path) -> List[Path]:
    """One heatmap per router: rows = MoE layers, columns = experts, colour = load / mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    usable = [r for r in records if r.get("expert_loads")]
    if not usable:
        return []
    cols = min(4, len(usable))
    rows = math.ceil(len(usable) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 0.5 + 0.45 * rows * max(
        len(usable[0]["expert_loads"]), 2)), squeeze=False)
    vmax = 1.0
    grids = []
    for record in usable:
        layers = sorted(record["expert_loads"], key=int)
        grid = np.array([record["expert_loads"][l] for l in layers], dtype=float)
        grid = grid / np.maximum(grid.mean(axis=1, keepdims=True), 1e-9)
        grids.append((record, layers, grid))
        vmax = max(vmax, float(grid.max()))
    image = None
    for ax, (record, layers, grid) in zip(axes.flat, grids):
        image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0.0, vmax=vmax)
        ax.set_title(f"{record['label']}\nI_agg={record['i_agg']:.2f}", fontsize=8)
        ax.set_yticks(range(len(layers)), [f"L{l}" for l in layers], fontsize=7)
        ax.set_xticks(range(grid.shape[1]), [str(e) for e in range(grid.shape[1])], fontsize=6)
        ax.set_xlabel("expert", fontsize=7)
    for ax in list(axes.flat)[len(grids):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="load / mean load")
    fig.suptitle("Per-layer expert load (mean over forward calls)", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [path]


def _family(record: Dict[str, Any]) -> str:
    """Router type, plus a non-default drop policy (its own curve)."""
    policy = (record.get("config") or {}).get("drop_policy", "score")
    if record["router"] in ("capacity-drop", "capacity-reroute") and policy != "score":
        return f"{record['router']} (drop={policy})"
    return record["router"]


def plot_quality_vs_balance(records: Sequence[Dict[str, Any]], path: Path) -> List[Path]:
    """Perplexity against I_agg: one line per router family across its settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    families: Dict[str, List[Dict[str, Any]]] = {}
    for record in records:
        families.setdefault(_family(record), []).append(record)
    markers = {"topk": "*", "capacity-drop": "o", "capacity-reroute": "s", "expanded-drop": "^", "laser": "D"}
    for family, items in families.items():
        items = sorted(items, key=lambda r: r["i_agg"] or 0)
        xs = [r["i_agg"] for r in items]
        ys = [r["ppl"] for r in items]
        ax.plot(xs, ys, marker=markers.get(items[0]["router"], "o"), label=family,
                linestyle=("--" if family != items[0]["router"] else "-") if len(items) > 1 else "")
        for r in items:
            if r.get("gamma") is not None:
                ax.annotate(f"{r['gamma']:g}", (r["i_agg"], r["ppl"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            elif family == "laser":
                ax.annotate("cal" if "calibrated" in r["label"] else "default", (r["i_agg"], r["ppl"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
    return _finish(fig, ax, path, "I_agg = mean over layers of max/mean expert load (lower is better)",
                   "held-out perplexity (lower is better)", "Quality against balance (labels: capacity factor gamma)", 8)


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


def plot_frontier(records: Sequence[Dict[str, Any]], path: Path, text_kind: str = "held-out") -> List[Path]:
    """Perplexity change against predicted speedup, the Pareto frontier drawn through."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [r for r in records if r.get("predicted_speedup") is not None and r.get("delta_ppl_pct") is not None]
    if not usable:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = {"topk": "*", "capacity-drop": "o", "capacity-reroute": "s", "expanded-drop": "^", "laser": "D"}
    families: Dict[str, List[Dict[str, Any]]] = {}
    for record in usable:
        families.setdefault(_family(record), []).append(record)
    for family, items in families.items():
        ax.scatter([r["predicted_speedup"] for r in items], [r["delta_ppl_pct"] for r in items],
                   marker=markers.get(items[0]["router"], "o"), label=family, alpha=0.85)
    front = sorted((r for r in usable if r["frontier"] == "yes"), key=lambda r: r["predicted_speedup"])
    ax.plot([r["predicted_speedup"] for r in front], [r["delta_ppl_pct"] for r in front], color="black",
            linewidth=1, linestyle="--", label="frontier")
    for r in front:
        short = r["label"].replace("capacity-", "").replace(",rounds=1", "").replace("gamma=", "g=")
        ax.annotate(short, (r["predicted_speedup"], r["delta_ppl_pct"]), fontsize=6, xytext=(3, -8),
                    textcoords="offset points", rotation=20)
    # Keep the frontier readable: settings far above it are listed, not plotted to scale.
    top = max(2.0, 2.0 * max(r["delta_ppl_pct"] for r in front))
    off = [r for r in usable if r["delta_ppl_pct"] > top]
    if off:
        ax.set_ylim(top=top)
        ax.text(0.02, 0.97, "off the chart: " + ", ".join(f"{r['label']} {r['delta_ppl_pct']:+.1f}%" for r in off),
                transform=ax.transAxes, fontsize=6, va="top")
    return _finish(fig, ax, path, "predicted speedup = peak_rank(topk) / peak_rank(setting)  (higher is faster)",
                   f"{text_kind} perplexity change vs topk, % (lower is better)",
                   "Speed against quality (settings off the dashed line are dominated)", 7)


def format_placement(records: Sequence[Dict[str, Any]]) -> str:
    """The placed settings against top-k on the contiguous layout: measured perplexity and busiest rank."""
    base = next((r for r in records if r["router"] == "topk" and not r.get("placement")), None)
    lines = []
    for record in records:
        p = record.get("placement")
        if not p or base is None:
            continue
        extra = f", replicas {p['replica_bytes_bf16'] / 1e6:.2f} MB bf16" if p.get("replica_bytes_bf16") else ""
        if p.get("move_seconds") is not None:
            extra += f", experts moved in {p['move_seconds']:.3f} s"
        lines.append(
            f"{record['label']}: EP {p['ep']}, R={p['redundant']} ({p['replica_policy']}), planned on "
            f"{Path(p['plan_text'] or '?').name}{' (in-sample)' if p['in_sample'] else ''}{extra}: busiest rank "
            f"{base['rank_peak_load']:.3f} -> {record['rank_peak_load']:.3f} (measured), speedup "
            f"{record['predicted_speedup']:.3f}x, perplexity {record['ppl']:.4f} vs {base['ppl']:.4f} "
            f"({record['delta_ppl_pct']:+.5f}%)"
        )
    return "\n".join(lines)


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
    markers = {"topk": "*", "capacity-drop": "o", "capacity-reroute": "s", "expanded-drop": "^", "laser": "D",
               "decode-pack": "P", "decode-pack (oea)": "X"}
    families: Dict[str, List[Dict[str, Any]]] = {}
    for record in usable:
        family = _family(record)
        if record["router"] == "decode-pack" and not (record.get("config") or {}).get("decode_rank_aware", True):
            family = "decode-pack (oea)"
        families.setdefault(family, []).append(record)
    for family, items in families.items():
        items = sorted(items, key=lambda r: r["decode_active_speedup"])
        ax.plot([r["decode_active_speedup"] for r in items], [r["decode_delta_ppl_pct"] for r in items],
                marker=markers.get(family, markers.get(items[0]["router"], "o")), label=family, alpha=0.85,
                linestyle="-" if family.startswith("decode-pack") and len(items) > 1 else "")
        if family.startswith("decode-pack"):
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
