"""How close the fast LASER (waves, rounds) comes to the exact sequential greedy.

Prints, per score distribution and shape, the imbalance I = max/mean expert
load of top-k, of the exact greedy (docs/routers.md's rule, one token at a time) and
of the fast path at several (waves, rounds), plus the fraction of flexible
tokens whose expert set differs from the greedy's. Writes JSON with --json.

    python scripts/laser_closeness.py [--tokens 4096] [--json out.json]
    python scripts/laser_closeness.py --trace scores.pt   # real scores (capaware-calibrate --save-scores)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from megatron_capaware import policies as P
from megatron_capaware.policies import reference as R
from megatron_capaware.tools.bench.common import synthetic_scores as make_scores


def imbalance(routing_map: torch.Tensor) -> float:
    loads = routing_map.sum(0).double()
    return float(loads.max() / loads.mean())


def eps_for_flexible_fraction(scores: torch.Tensor, k: int, fraction: float) -> float:
    mass = scores.topk(k, dim=1).values.sum(1)
    return float(torch.quantile(mass.double(), fraction))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--flexible", type=float, default=0.5, help="fraction of flexible tokens")
    parser.add_argument("--trace", default=None,
                        help="also the real router scores of each layer of a score trace "
                             "(capaware-calibrate --save-scores), with the model's own k")
    parser.add_argument("--k", type=int, default=2, help="top-k of the traced model")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    settings = [(1, 0), (8, 0), (1, 1), (2, 1), (4, 1), (8, 1), (4, 2), (16, 1)]
    records = []
    print(f"{'scores':8} {'E':>3} {'k':>2} {'pool':>4} | {'I topk':>7} {'I greedy':>8} | " + " ".join(f"w{w}r{r}".rjust(7) for w, r in settings))
    cases = []
    for mode in ("random", "skewed", "peaked"):
        for E, k in ((8, 2), (64, 6)):
            cases.append((mode, k, make_scores(args.tokens, E, mode, torch.Generator().manual_seed(0))))
    if args.trace:
        from megatron_capaware.tools.bench.common import load_score_trace

        for layer, calls in sorted(load_score_trace(args.trace)["layers"].items()):
            cases.append((f"layer{layer}", args.k, torch.cat(calls)[: args.tokens].float()))
    for mode, k, scores in cases:
        E = scores.shape[1]
        pool = min(2 * k, E)
        eps = eps_for_flexible_fraction(scores, k, args.flexible)
        t_fix = 0.2
        _, top_map = P.topk(scores, k)
        _, greedy_map = R.laser_greedy(scores, k, eps, t_fix, pool)
        row = {"scores": mode, "experts": E, "topk": k, "pool": pool, "tokens": args.tokens,
               "flexible_fraction": args.flexible, "i_topk": imbalance(top_map),
               "i_greedy": imbalance(greedy_map), "fast": []}
        cells = []
        for w, r in settings:
            start = time.perf_counter()
            _, fast_map = P.laser(scores, k, eps, t_fix, pool, waves=w, rounds=r)
            elapsed = time.perf_counter() - start
            differ = float((fast_map != greedy_map).any(1).double().mean())
            row["fast"].append({"waves": w, "rounds": r, "i": imbalance(fast_map),
                                "tokens_differing_from_greedy": differ, "seconds": elapsed})
            cells.append(f"{imbalance(fast_map):7.3f}")
        records.append(row)
        print(f"{mode:8} {E:3d} {k:2d} {pool:4d} | {row['i_topk']:7.3f} {row['i_greedy']:8.3f} | " + " ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
