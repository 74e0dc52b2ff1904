"""Measure the routing collectives' count and payload per MoE layer call, against the formulas.

Runs the pure policies with a real process group (gloo, EP ranks as
processes) on skewed scores and records every collective they issue
(``policies.collectives.record_collectives``), for both selection code paths:
the CUDA one (fixed rounds, no host sync) and the CPU one (early stops).
Prints a table and the all-to-all payload of the hidden states for scale,
and writes JSON (docs/results/collective_payload.json). See docs/scaling.md.

    python scripts/collective_payload.py --ep 2 4 8 --json docs/results/collective_payload.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List


ROUTERS = ("capacity-drop", "capacity-reroute", "expanded-drop", "laser")


def predicted(router: str, num_experts: int, world: int, rounds: int = 1, waves: int = 8, laser_rounds: int = 1) -> Dict[str, int]:
    """Fixed-round (CUDA path) collective count and bytes sent per rank."""
    hist = 4 * 256 * num_experts  # int32 counts; the first round adds the token count (4 bytes)
    select_calls, select_bytes = 5, 4 * hist + 4 + 4 * num_experts
    if router in ("capacity-drop", "expanded-drop"):
        return {"calls": select_calls, "bytes_sent": select_bytes}
    if router == "capacity-reroute":
        return {"calls": select_calls * (1 + rounds), "bytes_sent": select_bytes * (1 + rounds)}
    calls = 3 + waves * (laser_rounds + 1)
    sent = 8 * (num_experts + 1) + 8 + 8 * waves * (num_experts + 1) + waves * (laser_rounds * 8 * num_experts + 8 * num_experts)
    return {"calls": calls, "bytes_sent": sent}


def payload_worker(options: Dict[str, Any]) -> List[Dict[str, Any]]:
    import torch.distributed as dist

    from megatron_capaware import parallel, policies
    from megatron_capaware.tools.bench.common import skewed_scores
    from megatron_capaware.policies.common import DEVICE_PATH_ENV
    from megatron_capaware.policies.collectives import record_collectives

    parallel.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    out = []
    for num_experts in options["experts"]:
        for k in options["topk"]:
            for tokens in options["tokens"]:
                scores = skewed_scores(tokens * world, num_experts, 1.0, seed=1)[rank * tokens:(rank + 1) * tokens]
                local = list(range(rank * num_experts // world, (rank + 1) * num_experts // world))
                calls = {
                    "capacity-drop": lambda: policies.capacity_drop(scores, k, 1.25, group=group),
                    "capacity-reroute": lambda: policies.capacity_reroute(scores, k, 1.25, group=group),
                    "expanded-drop": lambda: policies.expanded_drop(scores, k, 1.25, local, group=group),
                    "laser": lambda: policies.laser(scores, k, 0.6, 0.5, 2 * k, group=group),
                }
                for path, force in (("cuda-path", "1"), ("cpu-path", "0")):
                    os.environ[DEVICE_PATH_ENV] = force
                    for router in ROUTERS:
                        with record_collectives() as log:
                            calls[router]()
                        out.append({
                            "router": router, "path": path, "ep": world, "experts": num_experts, "topk": k,
                            "tokens_per_rank": tokens, "calls": log.count, "bytes_sent": log.bytes_sent(),
                            "bytes_received": log.bytes_received(),
                            "predicted": predicted(router, num_experts, world) if path == "cuda-path" else None,
                            "hidden_a2a_bytes_per_rank_bf16_h4096": tokens * k * 4096 * 2,
                        })
                    os.environ.pop(DEVICE_PATH_ENV, None)
    parallel.destroy()
    return out


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 128])
    parser.add_argument("--topk", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="tokens per rank")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from megatron_capaware._compat.launcher import run_distributed

    records: List[Dict[str, Any]] = []
    for ep in args.ep:
        options = dict(experts=args.experts, topk=args.topk, tokens=args.tokens)
        records += run_distributed(payload_worker, ep, options, timeout_s=3600)[0]
    print(f"{'router':17} {'path':9} {'EP':>3} {'E':>4} {'k':>2} {'T/rank':>6} {'calls':>5} {'sent KB':>8} "
          f"{'recv KB':>8} {'pred':>10} {'vs a2a(H=4096)':>14}")
    mismatches = 0
    for r in records:
        pred = r["predicted"]
        match = "-" if pred is None else ("ok" if (pred["calls"], pred["bytes_sent"]) == (r["calls"], r["bytes_sent"]) else "MISMATCH")
        mismatches += match == "MISMATCH"
        share = r["bytes_received"] / r["hidden_a2a_bytes_per_rank_bf16_h4096"]
        print(f"{r['router']:17} {r['path']:9} {r['ep']:3d} {r['experts']:4d} {r['topk']:2d} {r['tokens_per_rank']:6d} "
              f"{r['calls']:5d} {r['bytes_sent'] / 1024:8.1f} {r['bytes_received'] / 1024:8.1f} {match:>10} {share:14.3%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
