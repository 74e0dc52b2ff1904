"""How many graphs compiled LASER compiles over a server-like run of distinct token counts (issue 22, item 9).

Runs LASER's device path (``CAPAWARE_DEVICE_PATH=1``) with its wave segments
compiled (``CAPAWARE_COMPILE``, default ``aot_eager``: the graph count does
not depend on the backend, and ``aot_eager`` compiles in a fraction of
inductor's time on a CPU) on ``--counts`` distinct token counts, and writes,
after every count (progress survives an interrupted run), the number of
graphs dynamo compiled so far, the calls that ran eagerly, and the seconds.
``--static`` measures the old behaviour (``CAPAWARE_COMPILE_DYNAMIC=0``: one
graph per token count).

Example::

    python -m megatron_capaware.tools.bench.compile_count --counts 100 --json dynamic.json
    python -m megatron_capaware.tools.bench.compile_count --counts 100 --static --json static.json
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
    result = {"mode": "static (one graph per shape)" if args.static else "dynamic (shape-generic)",
              "backend": args.backend, "experts": args.experts, "topk": args.topk, "counts": [],
              "graphs": [], "eager_calls": [], "seconds": []}
    start = time.perf_counter()
    for tokens in counts:
        scores = torch.softmax(torch.randn(tokens, args.experts, generator=gen), dim=-1)
        policies.laser(scores, args.topk, 0.9, 0.3, 2 * args.topk, waves=8, rounds=1)
        result["counts"].append(tokens)
        result["graphs"].append(int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
        result["eager_calls"].append(int(compiled.STATS["fallbacks"]))
        result["seconds"].append(round(time.perf_counter() - start, 2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        print(f"{len(result['counts']):3d} counts (T={tokens:5d}): {result['graphs'][-1]} graphs, "
              f"{result['eager_calls'][-1]} eager calls, {result['seconds'][-1]:.1f} s", flush=True)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry point (``capaware-bench-compile``)."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
