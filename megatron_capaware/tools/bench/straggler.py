"""Straggler benchmark: measured MoE-layer speedup of each router under real expert parallelism.

Real multi-process EP on gloo (one process per EP rank), a full Megatron MoE
layer (router, all-to-all dispatch, SwiGLU experts, combine) sized so that
expert compute dominates, fed with real router scores (recorded from the
bundled reference model on held-out text: one case per MoE layer) and with
synthetic skewed scores at controlled imbalance. The layer's gate is
replaced by the recorded scores, everything after it runs for real.

For each router and score case: the layer's wall time (slowest rank, median
of repeats, warm-up excluded, routers interleaved in every repeat so machine
drift cancels), speedup over top-k, the ideal speedup ``I_rank(topk) /
I_rank(router)`` (rank imbalance from the loads the experts received), their
ratio (efficiency), and the drop / reroute fractions. A second ideal,
``max rank load(topk) / max rank load(router)``, is also reported: it is what
the layer time follows when drops also lower the mean load.

    capaware-bench-straggler --ep 2 --json docs/results/bench_straggler.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from megatron_capaware.tools.bench.common import bench_moe_layer, geometric_mean, skewed_scores, summarize_times, timed

from megatron_capaware._compat.cli import add_cli_flags, run_cli
from megatron_capaware.registry import LASER, TOPK

PROG = "capaware-bench-straggler"

DEFAULT_ROUTERS = [
    TOPK,
    "capacity-drop:gamma=1.25",
    "capacity-reroute:gamma=1.25",
    "expanded-drop:gamma=1.25",
    LASER,
    # The best rank-unit setting of the main job (frontier at EP 2 and 4).
    "capacity-drop:gamma=1.0,unit=rank,drop_policy=weight",
]
PLACED_ROUTERS = [TOPK, "capacity-drop:gamma=1.0,unit=rank,drop_policy=weight"]


def _cases(options: Dict[str, Any], tokens_per_rank: int, ep: int, rank: int) -> List[Dict[str, Any]]:
    """Score cases: ``{"name", "scores": this rank's [T, E]}``, same order on every rank."""
    cases = []
    trace = options.get("trace")
    if trace:
        from megatron_capaware.tools.bench.common import load_score_trace

        data = load_score_trace(Path(trace))
        for layer, calls in sorted(data["layers"].items()):
            allscores = torch.cat(calls)
            need = tokens_per_rank * ep
            if allscores.shape[0] < need:
                raise ValueError(f"trace layer {layer} has {allscores.shape[0]} tokens, need {need}")
            cases.append({"name": f"trace-layer{layer}", "layer": int(layer),
                          "scores": allscores[rank * tokens_per_rank:(rank + 1) * tokens_per_rank]})
    for skew in options["skews"]:
        glob = skewed_scores(tokens_per_rank * ep, options["experts"], skew, seed=17)
        cases.append({"name": f"synthetic-skew{skew:g}",
                      "scores": glob[rank * tokens_per_rank:(rank + 1) * tokens_per_rank]})
    return cases


class _Layout:
    """The benchmark layer's expert layout: Megatron's contiguous one, or a plan's slots for one layer."""

    def __init__(self, layer: Any, ep: int) -> None:
        self.layer, self.ep, self.slots = layer, ep, None

    def set(self, slots: Optional[List[int]]) -> None:
        if slots == self.slots:
            return
        from megatron_capaware.adapters.placement import place_layers
        from megatron_capaware.placement.plan_file import PlacementPlan
        from megatron_capaware.placement.planner import LayerPlacement

        config = self.layer.config
        plan = None
        if slots is not None:
            number = int(self.layer.layer_number)
            plan = PlacementPlan(model={"num_moe_experts": config.num_moe_experts}, ep=self.ep,
                                 redundant=len(slots) - config.num_moe_experts,
                                 layers={number: LayerPlacement(list(slots), self.ep, 0.0, 0.0)})
        place_layers([self.layer], plan)
        self.slots = slots


def straggler_worker(options: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Run on every EP rank; returns the records (identical on every rank)."""
    from megatron_capaware import metrics, parallel
    from megatron_capaware.adapters import collect_stats, install_capaware_routers, reduce_summaries
    from megatron_capaware.adapters.placement import SLOT_ROUTERS
    from megatron_capaware.placement import load_plan
    from megatron_capaware.tools.router_specs import parse_router_specs

    ep = options["ep"]
    parallel.init_model_parallel(parallel.ParallelSizes(expert_parallel=ep))
    parallel.set_seed(0)
    import torch.distributed as dist

    rank = dist.get_rank()
    config, layer, device, set_scores = bench_moe_layer(options, ep, options["dispatcher"],
                                                        options.get("grouped_gemm", False))
    tokens = options["tokens_per_rank"]
    g = torch.Generator().manual_seed(rank)
    hidden = torch.randn(tokens, 1, options["hidden"], generator=g).to(device, config.params_dtype)
    routers = parse_router_specs(options["routers"], record_stats=False)
    plans = [(Path(p).name, load_plan(p)) for p in options.get("placements") or []]
    records: List[Dict[str, Any]] = []
    for case in _cases(options, tokens, ep, rank):
        # Settings: (label, router, placement slots or None, Megatron's forced balance).
        settings = [(r.describe(), r, None, False) for r in routers]
        trace_layer = case.get("layer")
        for name, plan in plans:
            if trace_layer is not None and trace_layer in plan.layers:
                for r in parse_router_specs(options.get("placed_routers") or [TOPK], record_stats=False):
                    if r.router_type in SLOT_ROUTERS or not plan.redundant:
                        settings.append((f"{r.describe()} @placed:{name}", r, plan.layers[trace_layer].slots, False))
        if options.get("force_balance"):
            settings.append(("topk (force_load_balancing)", routers[0].replace(router_type=TOPK), None, True))
        labels = [s[0] for s in settings]
        set_scores(case["scores"].to(device))
        loads: Dict[str, Dict[str, float]] = {}
        layout = _Layout(layer, ep)
        for label, cfg, slots, force in settings:
            install_capaware_routers(layer, cfg.replace(record_stats=True))
            layout.set(slots)
            layer.config.moe_router_force_load_balancing = force
            with torch.no_grad():
                layer(hidden)
            stats = collect_stats(layer)[1]
            summary = reduce_summaries({1: stats})[1]
            slot_loads = stats.slot_loads()
            per_slot = slot_loads[-1] if slot_loads else stats.global_loads[-1]
            rank_loads = metrics.rank_loads(per_slot.double(), ep)
            loads[label] = dict(summary, max_rank_load=float(rank_loads.max()))
        samples: Dict[str, List[float]] = {label: [] for label in labels}
        for repeat in range(options["warmup"] + options["repeats"]):
            for label, cfg, slots, force in settings:
                install_capaware_routers(layer, cfg)
                layout.set(slots)  # moves weights only when the layout changes (untimed)
                layer.config.moe_router_force_load_balancing = force
                with torch.no_grad():
                    seconds = timed(lambda: layer(hidden))
                if repeat >= options["warmup"]:
                    samples[label].append(seconds)
        layout.set(None)
        layer.config.moe_router_force_load_balancing = False
        base = labels[0]
        base_time = summarize_times(samples[base])["median_s"]
        for label, cfg, slots, force in settings:
            t = summarize_times(samples[label])
            ideal = loads[base]["rank_imbalance"] / loads[label]["rank_imbalance"]
            ideal_max = loads[base]["max_rank_load"] / loads[label]["max_rank_load"]
            speedup = base_time / t["median_s"]
            records.append({
                "router": "megatron-force-balance" if force else cfg.router_type, "label": label, "gamma": cfg.gamma if cfg.uses_capacity else None,
                "placement": slots, "force_load_balancing": force,
                "case": case["name"], "ep": ep, "oversubscribed": ep > (os.cpu_count() or 1),
                "tokens_per_rank": tokens, "hidden": options["hidden"], "ffn": options["ffn"],
                "experts": options["experts"], "topk": options["topk"],
                "layer_ms": 1e3 * t["median_s"], "layer_ms_min": 1e3 * t["min_s"], "layer_ms_max": 1e3 * t["max_s"],
                "repeats": options["repeats"], "speedup": speedup,
                "i_rank": loads[label]["rank_imbalance"], "i_rank_topk": loads[base]["rank_imbalance"],
                "i_expert": loads[label]["imbalance"],
                "ideal_speedup": ideal, "efficiency": speedup / ideal,
                "ideal_speedup_maxload": ideal_max, "efficiency_maxload": speedup / ideal_max,
                "dropped_frac": loads[label]["dropped_frac"], "rerouted_frac": loads[label]["rerouted_frac"],
            })
        set_scores(None)
    parallel.destroy()
    return records


def summarize(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per router: geometric means over cases whose top-k was imbalanced (I_rank > 1.05)."""
    out = []
    for label in dict.fromkeys(r["label"] for r in records):
        rows = [r for r in records if r["label"] == label and r["i_rank_topk"] > 1.05]
        if not rows:
            continue
        out.append({
            "label": label, "cases": len(rows),
            "speedup": geometric_mean([r["speedup"] for r in rows]),
            "ideal_speedup": geometric_mean([r["ideal_speedup"] for r in rows]),
            "efficiency": geometric_mean([r["efficiency"] for r in rows]),
            "efficiency_maxload": geometric_mean([r["efficiency_maxload"] for r in rows]),
            "dropped_frac": sum(r["dropped_frac"] for r in rows) / len(rows),
        })
    return out


def format_table(records: List[Dict[str, Any]]) -> str:
    head = f"{'case':22} {'router':48} {'ms':>8} {'speedup':>8} {'I_rank':>7} {'ideal':>6} {'eff':>5} {'ideal*':>6} {'eff*':>5} {'drop%':>6}"
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(
            f"{r['case']:22} {r['label']:48} {r['layer_ms']:8.1f} {r['speedup']:8.3f} {r['i_rank']:7.3f} "
            f"{r['ideal_speedup']:6.3f} {r['efficiency']:5.2f} {r['ideal_speedup_maxload']:6.3f} "
            f"{r['efficiency_maxload']:5.2f} {100 * r['dropped_frac']:6.2f}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="capaware-bench-straggler", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ep", type=int, default=2, help="expert parallel size (= processes)")
    p.add_argument("--tokens-per-rank", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1536, help="expert FFN size (SwiGLU)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--dispatcher", choices=("alltoall", "allgather"), default="alltoall")
    p.add_argument("--routers", nargs="+", default=DEFAULT_ROUTERS, metavar="SPEC")
    p.add_argument("--trace", type=Path, default=None,
                   help="score trace (capaware-calibrate --save-scores); 'none' to skip; default: "
                        "record one from the bundled model on its held-out text")
    p.add_argument("--skews", type=float, nargs="*", default=[0.0, 0.5, 1.0, 1.5],
                   help="synthetic Zipf skews (0 = balanced)")
    p.add_argument("--placement", type=Path, nargs="*", default=None, metavar="PLAN",
                   help="capaware-plan files of the bundled model: each trace case (one MoE layer) also runs "
                        "with its layer's placement; default: the plans shipped beside the bundled model for "
                        "--ep (placement-ep{EP}-r*.json); none given: no placed rows")
    p.add_argument("--placed-routers", nargs="+", default=PLACED_ROUTERS, metavar="SPEC",
                   help="router settings run on each placement (with replicas: all but LASER)")
    p.add_argument("--no-force-balance", action="store_true",
                   help="skip the row of Megatron's moe_router_force_load_balancing (random, balanced "
                        "routing: the balanced ideal, not a usable setting)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads-per-rank", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    return add_cli_flags(p)


def default_trace(path: Path) -> Path:
    """Record a score trace of the bundled model on its held-out text (once)."""
    if path.exists():
        return path
    from megatron_capaware.models import reference_models
    from megatron_capaware.tools.calibrate import _calibrate_worker
    from megatron_capaware._compat.launcher import run_distributed

    recorded = run_distributed(_calibrate_worker, 1, dict(
        checkpoint=str(reference_models.reference_model_dir()), text=str(reference_models.HELDOUT_TEXT),
        seq_len=256, sequences_per_rank=16, max_tokens=16 * 256 * 4, ep=1), timeout_s=1800,
        threads_per_rank=os.cpu_count() or 1)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"layers": recorded["layers"], "model": recorded["model"], "source": "heldout.txt"}, path)
    return path


def default_placements(args: argparse.Namespace) -> List[Path]:
    """``--placement``, else the bundled model's plans for this EP size (trace cases only)."""
    if args.placement is not None:
        return list(args.placement)
    if str(args.trace) == "none" or args.trace is not None:
        return []
    from megatron_capaware.models import reference_models

    return sorted(reference_models.reference_model_dir().glob(f"placement-ep{args.ep}-r*.json"))


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, _main, argv)


def _main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    from megatron_capaware._compat.launcher import run_distributed

    trace = None
    if args.trace is None:
        trace = default_trace(Path("runs/bench/score_trace.pt"))
    elif str(args.trace) != "none":
        trace = args.trace
    threads = args.threads_per_rank or max(1, (os.cpu_count() or 1) // args.ep)
    options = dict(ep=args.ep, tokens_per_rank=args.tokens_per_rank, hidden=args.hidden, ffn=args.ffn,
                   experts=args.experts, topk=args.topk, dispatcher=args.dispatcher, routers=args.routers,
                   trace=str(trace) if trace else None, skews=args.skews, repeats=args.repeats,
                   warmup=args.warmup, placements=[str(p) for p in default_placements(args)],
                   placed_routers=args.placed_routers, force_balance=not args.no_force_balance)
    records = run_distributed(straggler_worker, args.ep, options, timeout_s=7200, threads_per_rank=threads)[0]
    print(format_table(records))
    print("\nsummary over cases with an imbalanced top-k (geometric means):")
    for s in summarize(records):
        print(f"  {s['label']:48} speedup {s['speedup']:.3f}  ideal {s['ideal_speedup']:.3f}  "
              f"efficiency {s['efficiency']:.2f} (vs max-load ideal {s['efficiency_maxload']:.2f})  "
              f"dropped {100 * s['dropped_frac']:.2f}%")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": "capaware-bench-straggler " + " ".join(argv if argv is not None else sys.argv[1:]),
                "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "threads_per_rank": threads, "torch": torch.__version__}
        args.json.write_text(json.dumps([dict(r, **meta) for r in records], indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
