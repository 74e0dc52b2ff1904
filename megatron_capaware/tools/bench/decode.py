"""Decode benchmark: measured MoE-layer time of decode steps, where a rank's time is its activated experts' weight reads.

Real multi-process EP on gloo (one process per EP rank), a full Megatron
``MoELayer`` (router, all-to-all dispatch, SwiGLU ``SequentialMLP`` experts,
combine) whose experts are large enough that a step with a few tokens is
bound by reading the weights of the experts it activates (default: the
expert shape of Qwen3-30B-A3B, hidden 2048, expert FFN 768, with the bundled
fine-grained model's 64 experts and top-8, so its recorded scores drive it).
An expert that receives no token costs nothing (Megatron's ``SequentialMLP``
runs a 0-row GEMM), as on a GPU.

A decode step is ``BATCH`` tokens over the group (``BATCH / EP`` per rank),
one per sequence. Score cases: ``trace``, the bundled fine-grained model's
router scores on its held-out text (``capaware-calibrate --save-scores``;
consecutive rows of a recorded call are different sequences at the same
position, so a step takes ``BATCH`` consecutive rows: a decode step's token
mix, recorded at prefill), and ``synthetic`` (softmax of Gaussian logits
with a per-expert popularity skew). Per step and router: the slowest rank's
layer time (routers interleaved in every repeat, so drift cancels; warm-up
excluded; per step the median over repeats, then the median over steps), the busiest rank's activated
experts and the bytes of expert weights the busiest rank reads. Ratios are
against ``topk`` on the same steps.

    capaware-bench-decode --ep 4 --batches 1 4 16 64 --json docs/results/decode/bench_decode_ep4.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from megatron_capaware._compat.cli import add_cli_flags, run_cli
from megatron_capaware.tools.bench.common import bench_moe_layer, timed
from megatron_capaware.registry import TOPK

PROG = "capaware-bench-decode"
DEFAULT_ROUTERS = [
    TOPK,
    "decode-pack:floor=2,rank=0",
    "decode-pack:floor=2",
    "decode-pack:floor=4",
]


def step_scores(options: Dict[str, Any], batch: int, steps: int) -> List[torch.Tensor]:
    """The global ``[BATCH, E]`` scores of each decode step (identical on every rank)."""
    experts = options["experts"]
    if options["case"] == "trace":
        from megatron_capaware.tools.bench.common import load_score_trace

        layers = load_score_trace(Path(options["trace"]))["layers"]
        layer = options.get("trace_layer") or sorted(layers)[len(layers) // 2]
        rows = torch.cat(layers[layer]).float()
        if rows.shape[1] != experts:
            raise ValueError(f"the trace has {rows.shape[1]} experts, --experts is {experts}: record the trace "
                             "from a model with that many experts, or use --case synthetic")
        if rows.shape[0] < batch * steps:
            raise ValueError(f"the trace's layer {layer} has {rows.shape[0]} tokens; {steps} steps of {batch} "
                             "need more: lower --steps")
        return [rows[s * batch:(s + 1) * batch] for s in range(steps)]
    gen = torch.Generator().manual_seed(23)
    popularity = torch.randn(experts, generator=gen) * options["skew"]
    return [torch.softmax(torch.randn(batch, experts, generator=gen) * 2.0 + popularity, dim=-1)
            for _ in range(steps)]


def decode_worker(options: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Run on every EP rank; returns the per-(batch, router) records (identical on every rank)."""
    from megatron_capaware import parallel
    from megatron_capaware.adapters import collect_stats, install_capaware_routers
    from megatron_capaware.tools.router_specs import parse_router_specs
    import torch.distributed as dist

    ep = options["ep"]
    parallel.init_model_parallel(parallel.ParallelSizes(expert_parallel=ep))
    parallel.set_seed(0)
    rank = dist.get_rank()
    config, layer, device, set_scores = bench_moe_layer(options, ep)
    per_expert = sum(p.numel() * p.element_size() for p in layer.experts.parameters()) // max(
        1, options["experts"] // ep)  # bytes of one expert's weights
    routers = parse_router_specs(options["routers"], record_stats=False)
    labels = [r.describe() for r in routers]
    records: List[Dict[str, Any]] = []
    for batch in options["batches"]:
        local = batch // ep
        steps = step_scores(options, batch, options["steps"])
        g = torch.Generator().manual_seed(rank)
        hidden = torch.randn(local, 1, options["hidden"], generator=g).to(device, config.params_dtype)
        # Counts first (untimed): the activated experts of each rank per step.
        active: Dict[str, List[List[int]]] = {label: [] for label in labels}
        for cfg, label in zip(routers, labels):
            install_capaware_routers(layer, cfg.replace(record_stats=True))
            for scores in steps:
                set_scores(scores[rank * local:(rank + 1) * local].to(device))
                with torch.no_grad():
                    layer(hidden)
            for loads in collect_stats(layer)[1].global_loads[-len(steps):]:
                active[label].append((loads.view(ep, -1) > 0).sum(dim=1).tolist())
        samples: Dict[str, List[List[float]]] = {label: [[] for _ in steps] for label in labels}
        # Interleaved at the finest grain: every step runs under every router back to back, so
        # machine drift (other jobs on a shared host) hits the routers alike.
        for repeat in range(options["warmup"] + options["repeats"]):
            for s, scores in enumerate(steps):
                set_scores(scores[rank * local:(rank + 1) * local].to(device))
                for cfg, label in zip(routers, labels):
                    install_capaware_routers(layer, cfg)
                    with torch.no_grad():
                        seconds = timed(lambda: layer(hidden))
                    if repeat >= options["warmup"]:
                        samples[label][s].append(seconds)
        base = labels[0]
        base_step = [statistics.median(x) for x in samples[base]]
        for label, cfg in zip(labels, routers):
            per_step = [statistics.median(x) for x in samples[label]]  # [steps]
            busiest = [max(a) for a in active[label]]
            ratios = [b / t for b, t in zip(base_step, per_step)]
            records.append({
                "label": label, "router": cfg.router_type, "batch": batch, "ep": ep, "case": options["case"],
                "steps": len(steps), "repeats": options["repeats"], "hidden": options["hidden"],
                "ffn": options["ffn"], "experts": options["experts"], "topk": options["topk"],
                "layer_ms": 1e3 * statistics.median(per_step),
                "time_ratio_topk": statistics.median(ratios),  # median over steps of topk's time / this
                "time_ratio_total": sum(base_step) / sum(per_step),
                "active_max": statistics.mean(busiest),
                "active_mean": statistics.mean(sum(a) / ep for a in active[label]),
                "bytes_read_max_mb": statistics.mean(busiest) * per_expert / 1e6,
                "per_step_ms": [1e3 * t for t in per_step], "per_step_active_max": busiest,
            })
        top = next(r for r in records if r["batch"] == batch and r["label"] == base)
        # Pooled over every (router, step) of this batch: does the step time follow the busiest
        # rank's activated experts?
        pooled = _corr([t for r in records if r["batch"] == batch for t in r["per_step_ms"]],
                       [a for r in records if r["batch"] == batch for a in r["per_step_active_max"]])
        for r in records:
            if r["batch"] == batch:
                r["active_ratio_topk"] = top["active_max"] / r["active_max"] if r["active_max"] else None
                # How closely the step time follows the busiest rank's activated experts, over this
                # setting's steps (Pearson correlation; None when either does not vary).
                r["time_active_corr"] = _corr(r["per_step_ms"], r["per_step_active_max"])
                r["time_active_corr_pooled"] = pooled
        set_scores(None)
    parallel.destroy()
    return records


def _corr(xs: List[float], ys: List[float]) -> Optional[float]:
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return None
    return float(statistics.correlation(xs, ys))


def format_table(records: List[Dict[str, Any]]) -> str:
    head = (f"{'batch':>5} {'router':34} {'ms':>7} {'t_topk/t':>8} {'active_max':>10} {'act_topk/act':>12} "
            f"{'MB read':>8} {'corr':>5}")
    lines = [head, "-" * len(head)]
    for r in records:
        corr = "-" if r["time_active_corr"] is None else f"{r['time_active_corr']:.2f}"
        lines.append(f"{r['batch']:>5} {r['label']:34} {r['layer_ms']:7.2f} {r['time_ratio_topk']:7.3f}x "
                     f"{r['active_max']:10.2f} {r['active_ratio_topk']:11.3f}x {r['bytes_read_max_mb']:8.1f} "
                     f"{corr:>5}")
    for batch in dict.fromkeys(r["batch"] for r in records):
        pooled = next(r["time_active_corr_pooled"] for r in records if r["batch"] == batch)
        lines.append(f"batch {batch}: correlation of step time with the busiest rank's activated experts over "
                     f"every (router, step): {'-' if pooled is None else f'{pooled:.2f}'}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ep", type=int, default=4, help="expert parallel size (= processes)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64],
                   help="decode batch sizes (global sequences per step, split evenly over the EP ranks: "
                        "multiples of --ep)")
    p.add_argument("--steps", type=int, default=16, help="decode steps per batch size")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=768, help="expert FFN size (SwiGLU)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--routers", nargs="+", default=DEFAULT_ROUTERS, metavar="SPEC",
                   help="router settings; the first is the baseline the ratios divide by")
    p.add_argument("--case", choices=("trace", "synthetic"), default="trace")
    p.add_argument("--trace", type=Path, default=None,
                   help="score trace (capaware-calibrate --save-scores) of a model with --experts experts; "
                        "default: record one from the bundled fine-grained model on its held-out text")
    p.add_argument("--skew", type=float, default=1.0, help="synthetic case: per-expert popularity spread")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads-per-rank", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    return add_cli_flags(p)


def default_trace(path: Path) -> Path:
    """Record a score trace of the bundled fine-grained model on its held-out text (once)."""
    if path.exists():
        return path
    from megatron_capaware._compat.launcher import run_distributed
    from megatron_capaware.models import reference_models
    from megatron_capaware.tools.calibrate import _calibrate_worker

    name = "shakespeare-moe-fine-64x8"
    recorded = run_distributed(_calibrate_worker, 1, dict(
        checkpoint=str(reference_models.reference_model_dir(name)), text=str(reference_models.HELDOUT_TEXT),
        seq_len=256, sequences_per_rank=16, max_tokens=16 * 256 * 2, ep=1), timeout_s=1800,
        threads_per_rank=os.cpu_count() or 1)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"layers": recorded["layers"], "model": recorded["model"], "source": "heldout.txt"}, path)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, _main, argv)


def _main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    from megatron_capaware._compat.launcher import run_distributed
    from megatron_capaware._compat.cli import UserInputError

    if args.ep < 1 or args.experts % args.ep:
        raise UserInputError(f"--experts {args.experts} must be a multiple of --ep {args.ep}")
    bad = [b for b in args.batches if b < 1 or b % args.ep]
    if bad:
        raise UserInputError(f"--batches {bad}: each decode batch is split evenly over the {args.ep} EP ranks; "
                             f"use multiples of {args.ep}")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        raise UserInputError("--steps and --repeats must be >= 1, --warmup >= 0")
    trace = None
    if args.case == "trace":
        trace = args.trace or default_trace(Path("runs/bench/score_trace_fine_64x8.pt"))
    threads = args.threads_per_rank or max(1, (os.cpu_count() or 1) // args.ep)
    options = dict(ep=args.ep, batches=args.batches, steps=args.steps, hidden=args.hidden, ffn=args.ffn,
                   experts=args.experts, topk=args.topk, routers=args.routers, case=args.case,
                   trace=str(trace) if trace else None, skew=args.skew, repeats=args.repeats, warmup=args.warmup)
    records = run_distributed(decode_worker, args.ep, options, timeout_s=7200, threads_per_rank=threads)[0]
    print(format_table(records))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": f"{PROG} " + " ".join(argv if argv is not None else sys.argv[1:]),
                "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "threads_per_rank": threads, "torch": torch.__version__}
        args.json.write_text(json.dumps([dict(r, **meta) for r in records], indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
