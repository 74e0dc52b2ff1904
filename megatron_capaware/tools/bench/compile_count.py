"""How many graphs compiled LASER compiles over a server-like run of distinct token counts (issue 22, item 9).

Runs LASER's device path (``CAPAWARE_DEVICE_PATH=1``) with its wave segments
compiled (``CAPAWARE_COMPILE``, default ``aot_eager``: the graph count does
not depend on the backend, and ``aot_eager`` compiles in a fraction of
inductor's time on a CPU) on ``--counts`` distinct token counts, and writes,
after every count (progress survives an interrupted run), the number of
graphs dynamo compiled so far, the calls that ran eagerly (fallbacks), the
seconds dynamo spent compiling at that count (``_compile.compile_inner``,
tracing and the backend) and the call's wall seconds. The default is the
package's default, shape-generic graphs; ``--static`` measures one graph per
token count (``CAPAWARE_COMPILE_DYNAMIC=0``).

Example::

    capaware-bench-compile --counts 100 --max-tokens 1024 --json dynamic.json
    capaware-bench-compile --counts 5 --max-tokens 1024 --static --json static.json
    capaware-bench-compile --counts 10 --max-tokens 1024 --backend inductor --warm --json inductor.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--counts", type=int, default=100, help="distinct token counts, in a shuffled order")
    parser.add_argument("--min-tokens", type=int, default=2, help="smallest token count")
    parser.add_argument("--max-tokens", type=int, default=4096, help="largest token count")
    parser.add_argument("--experts", type=int, default=64, help="E")
    parser.add_argument("--topk", type=int, default=8, help="k")
    parser.add_argument("--backend", default="aot_eager", help="CAPAWARE_COMPILE backend")
    parser.add_argument("--static", action="store_true", help="one graph per shape (CAPAWARE_COMPILE_DYNAMIC=0)")
    parser.add_argument("--warm", action="store_true", help="call twice per count and time the second call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the figures here (after every count)")
    return parser.parse_args(argv)


def run(argv: Optional[List[str]] = None) -> dict:
    """Measure; returns the figures (also written to ``--json``)."""
    args = parse_args(argv)
    os.environ["CAPAWARE_DEVICE_PATH"] = "1"
    os.environ["CAPAWARE_COMPILE"] = args.backend
    os.environ["CAPAWARE_COMPILE_DYNAMIC"] = "0" if args.static else "1"
    os.environ.pop("TORCHDYNAMO_DISABLE", None)
    import torch
    import torch._dynamo

    from megatron_capaware import policies
    from megatron_capaware.policies import compiled

    torch._dynamo.config.disable = False
    torch._dynamo.reset()
    rng = random.Random(args.seed)
    counts = rng.sample(range(args.min_tokens, args.max_tokens + 1), args.counts)
    gen = torch.Generator().manual_seed(args.seed)
    result: dict = {"mode": "static (one graph per shape)" if args.static else "dynamic (shape-generic)",
                    "backend": args.backend, "experts": args.experts, "topk": args.topk, "waves": 8, "rounds": 1,
                    "torch": torch.__version__, "counts": [], "graphs": [], "eager_calls": [], "seconds": [],
                    "compile_seconds": [], "call_seconds": [], "warm_call_seconds": []}
    metrics = torch._dynamo.utils.compilation_time_metrics

    def compile_total() -> float:
        return float(sum(metrics.get("_compile.compile_inner", [])))

    start = time.perf_counter()
    fallbacks0 = compiled.STATS["fallbacks"]
    for tokens in counts:
        scores = torch.softmax(torch.randn(tokens, args.experts, generator=gen), dim=-1)
        before, t0 = compile_total(), time.perf_counter()
        policies.laser(scores, args.topk, 0.9, 0.3, 2 * args.topk, waves=8, rounds=1)
        result["call_seconds"].append(round(time.perf_counter() - t0, 3))
        if args.warm:
            t1 = time.perf_counter()
            policies.laser(scores, args.topk, 0.9, 0.3, 2 * args.topk, waves=8, rounds=1)
            result["warm_call_seconds"].append(round(time.perf_counter() - t1, 4))
        result["compile_seconds"].append(round(compile_total() - before, 3))
        result["counts"].append(tokens)
        result["graphs"].append(int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
        result["eager_calls"].append(int(compiled.STATS["fallbacks"] - fallbacks0))
        result["seconds"].append(round(time.perf_counter() - start, 2))
        result["summary"] = summary(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        print(f"{len(result['counts']):3d} counts (T={tokens:5d}): {result['graphs'][-1]} graphs, "
              f"{result['eager_calls'][-1]} eager calls, compiled {result['compile_seconds'][-1]:.2f} s, "
              f"call {result['call_seconds'][-1]:.2f} s, {result['seconds'][-1]:.1f} s in all", flush=True)
    print(json.dumps(result["summary"]))
    return result


def summary(result: dict) -> dict:
    """Totals of a run: graphs, eager calls, the first count's compile seconds, the later counts' compiles."""
    later = result["compile_seconds"][1:]
    compiling = [s for s, g0, g1 in zip(later, result["graphs"], result["graphs"][1:]) if g1 > g0]
    return {"counts": len(result["counts"]), "graphs": result["graphs"][-1],
            "eager_calls": result["eager_calls"][-1],
            "first_count_compile_s": result["compile_seconds"][0],
            "first_count_call_s": result["call_seconds"][0],
            "later_counts_that_compiled": len(compiling),
            "compile_s_per_compiling_count": round(sum(compiling) / len(compiling), 3) if compiling else 0.0,
            "later_counts_compile_s_total": round(sum(later), 3),
            "later_counts_median_call_s": sorted(result["call_seconds"][1:])[len(later) // 2] if later else None,
            "median_warm_call_s": (sorted(result["warm_call_seconds"])[len(result["warm_call_seconds"]) // 2]
                                   if result.get("warm_call_seconds") else None),
            "wall_s": result["seconds"][-1]}


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry point (``capaware-bench-compile``)."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
