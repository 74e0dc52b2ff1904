"""Routing-overhead benchmark: router forward against Megatron's TopKRouter, and as a share of the layer.

Runs at EP=2 (two gloo processes) so the capaware routers' extra collectives
are real. For each shape (tokens per rank T, experts E, top-k k) it times the
router's forward (gate GEMM + routing + collectives) of Megatron's own
``TopKRouter`` and of every capaware router on the same input, interleaved in
every repeat, and the whole MoE layer (router, dispatch, experts, combine).
Experts are sized iso-compute (``k * ffn`` constant, as model families keep
active parameters fixed while E and k grow), so the layer share compares like
with like across shapes.

    capaware-bench-overhead --json docs/results/bench_overhead.json
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

from megatron_capaware.tools.bench.common import skewed_scores, summarize_times, timed

from megatron_capaware._compat.cli import add_cli_flags, run_cli
from megatron_capaware.registry import LASER, TOPK

PROG = "capaware-bench-overhead"

DEFAULT_ROUTERS = [
    "capacity-drop:gamma=1.25",
    "capacity-reroute:gamma=1.25",
    "expanded-drop:gamma=1.25",
    LASER,
]
GOALS = {"capacity": (1.5, 0.03), LASER: (2.0, 0.05)}


def overhead_worker(options: Dict[str, Any]) -> List[Dict[str, Any]]:
    from megatron_capaware import parallel
    from megatron_capaware.adapters import install_capaware_routers
    from megatron_capaware.tools.bench.common import inject_scores
    from megatron_capaware.models.builder import MoEModelArgs, build_moe_layer, build_transformer_config
    from megatron_capaware.tools.router_specs import parse_router_specs

    ep = options["ep"]
    parallel.init_model_parallel(parallel.ParallelSizes(expert_parallel=ep))
    parallel.set_seed(0)
    import torch.distributed as dist

    rank = dist.get_rank()
    records: List[Dict[str, Any]] = []
    hidden_size = options["hidden"]
    for shape in options["shapes"]:
        tokens, experts, k = shape["tokens"], shape["experts"], shape["topk"]
        ffn = max(8, options["active_ffn"] // k)
        args = MoEModelArgs(
            num_layers=1, hidden_size=hidden_size, num_attention_heads=8, num_moe_experts=experts,
            moe_router_topk=k, moe_ffn_hidden_size=ffn, vocab_size=8, max_sequence_length=8,
        )
        config = build_transformer_config(args, expert_parallel=ep, dispatcher="alltoall")
        layer = build_moe_layer(config).eval()
        device = next(layer.parameters()).device
        g = torch.Generator().manual_seed(rank)
        hidden = torch.randn(tokens, 1, hidden_size, generator=g).to(device, config.params_dtype)
        # Realistic (skewed) gate: keep the real GEMM, steer its output scores.
        with torch.no_grad():
            scores = skewed_scores(tokens, experts, 1.0, seed=rank).to(device)
            set_scores = inject_scores(layer.router, experts)
        routers = parse_router_specs(options["routers"], record_stats=False)
        labels = ["TopKRouter (Megatron)"] + [r.describe() for r in routers]
        samples: Dict[str, List[float]] = {label: [] for label in labels}
        layer_samples: List[float] = []
        original_class = type(layer.router)

        def router_call() -> None:
            logits = layer.router.__class__.gating(layer.router, hidden)  # the real gate GEMM
            set_scores(scores)
            layer.router(hidden)
            set_scores(None)
            del logits

        with torch.no_grad():
            for repeat in range(options["warmup"] + options["repeats"]):
                # Megatron's own router first (the instance's original class), then each capaware one.
                for label, cfg in zip(labels, [None] + routers):
                    if cfg is None:
                        layer.router.__class__ = original_class
                    else:
                        install_capaware_routers(layer, cfg)
                    seconds = timed(router_call)
                    if repeat >= options["warmup"]:
                        samples[label].append(seconds)
            measure_layer = tokens in options["layer_tokens"]
            if measure_layer:
                install_capaware_routers(layer, parse_router_specs([TOPK], record_stats=False)[0])
                for repeat in range(options["layer_warmup"] + options["layer_repeats"]):
                    set_scores(scores)
                    seconds = timed(lambda: layer(hidden))
                    if repeat >= options["layer_warmup"]:
                        layer_samples.append(seconds)
                set_scores(None)
        base = summarize_times(samples[labels[0]])["median_s"]
        layer_time = summarize_times(layer_samples)["median_s"] if layer_samples else None
        for label, cfg in zip(labels, [None] + routers):
            t = summarize_times(samples[label])
            router_type = "megatron-topk" if cfg is None else cfg.router_type
            family = LASER if router_type == LASER else "capacity"
            ratio_goal, share_goal = GOALS[family] if cfg is not None else (None, None)
            extra = t["median_s"] - base
            record = {
                "router": router_type, "label": label, "tokens": tokens, "experts": experts, "topk": k,
                "hidden": hidden_size, "ffn": ffn, "ep": ep,
                "router_ms": 1e3 * t["median_s"], "router_ms_min": 1e3 * t["min_s"],
                "router_ms_max": 1e3 * t["max_s"], "ratio_vs_topk_router": t["median_s"] / base,
                "layer_ms": None if layer_time is None else 1e3 * layer_time,
                # Share of the layer: this router's time over the layer's time with it
                # (the layer was timed with Megatron's router; swap the difference in).
                "share_of_layer": None if layer_time is None else t["median_s"] / (layer_time + extra),
                "ratio_goal": ratio_goal, "share_goal": share_goal,
            }
            if cfg is not None:
                record["meets_ratio_goal"] = record["ratio_vs_topk_router"] <= ratio_goal
                record["meets_share_goal"] = (
                    None if record["share_of_layer"] is None else record["share_of_layer"] <= share_goal
                )
            records.append(record)
        layer = None  # free it before the next shape (not del: the closures above name it)
    parallel.destroy()
    return records


def default_shapes(tokens: List[int], experts: List[int], topks: List[int]) -> List[Dict[str, int]]:
    return [{"tokens": t, "experts": e, "topk": k} for t in tokens for e in experts for k in topks if k <= e]


def format_table(records: List[Dict[str, Any]]) -> str:
    head = f"{'T':>6} {'E':>4} {'k':>2} {'router':40} {'router ms':>10} {'x TopK':>7} {'layer ms':>9} {'share':>7}"
    lines = [head, "-" * len(head)]
    for r in records:
        share = "-" if r["share_of_layer"] is None else f"{100 * r['share_of_layer']:.2f}%"
        layer_ms = "-" if r["layer_ms"] is None else f"{r['layer_ms']:.1f}"
        lines.append(f"{r['tokens']:6d} {r['experts']:4d} {r['topk']:2d} {r['label']:40} {r['router_ms']:10.2f} "
                     f"{r['ratio_vs_topk_router']:7.2f} {layer_ms:>9} {share:>7}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="capaware-bench-overhead", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536], help="tokens per rank")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64, 128])
    p.add_argument("--topk", type=int, nargs="+", default=[2, 6, 8])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--active-ffn", type=int, default=4096,
                   help="k * expert FFN size (iso-compute experts; SwiGLU)")
    p.add_argument("--routers", nargs="+", default=DEFAULT_ROUTERS, metavar="SPEC")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layer-tokens", type=int, nargs="*", default=[4096, 16384],
                   help="token counts at which the whole layer is timed too (CPU time budget)")
    p.add_argument("--layer-repeats", type=int, default=3)
    p.add_argument("--layer-warmup", type=int, default=1)
    p.add_argument("--threads-per-rank", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    return add_cli_flags(p)


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, _main, argv)


def _main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    from megatron_capaware._compat.launcher import run_distributed

    threads = args.threads_per_rank or max(1, (os.cpu_count() or 1) // args.ep)
    options = dict(ep=args.ep, shapes=default_shapes(args.tokens, args.experts, args.topk), hidden=args.hidden,
                   active_ffn=args.active_ffn, routers=args.routers, repeats=args.repeats, warmup=args.warmup,
                   layer_tokens=args.layer_tokens, layer_repeats=args.layer_repeats,
                   layer_warmup=args.layer_warmup)
    records = run_distributed(overhead_worker, args.ep, options, timeout_s=4 * 3600, threads_per_rank=threads)[0]
    print(format_table(records))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": "capaware-bench-overhead " + " ".join(argv if argv is not None else sys.argv[1:]),
                "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "threads_per_rank": threads, "torch": torch.__version__,
                "device": "cuda" if torch.cuda.is_available() else "cpu"}
        args.json.write_text(json.dumps([dict(r, **meta) for r in records], indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
