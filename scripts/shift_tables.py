#!/usr/bin/env python
"""Markdown tables from ``capaware-bench-shift --json`` files (docs/placement.md, "When your traffic changes").

    python scripts/shift_tables.py docs/results/shift/shift_8x2.json docs/results/shift/shift_fine_64x8.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

SHOWN = ["contiguous", "plan-r0-unguarded", "plan-r0", "plan-r0-per-call", "plan-rW-unguarded", "plan-rW",
         "replan-r0-w1-e1", "replan-r0-w2-e2", "replan-r0-w4-e4", "replan-r0-w8-e8", "replan-r0-w4-e8",
         "replan-r0-w16-e16", "replan-r0-w4-e4-pc", "replan-r0-w8-e8-pc", "replan-r0-w16-e16-pc",
         "replan-rW-w1-e1", "replan-rW-w2-e2", "replan-rW-w4-e4", "replan-rW-w8-e8-pc", "oracle-r0", "oracle-rW"]


BRIEF = ["contiguous", "plan-r0-unguarded", "plan-r0-per-call", "plan-rW-unguarded", "plan-rW", "replan-r0-w1-e1",
         "replan-r0-w2-e2", "replan-r0-w8-e8", "replan-r0-w16-e16", "replan-r0-w8-e8-pc", "replan-rW-w2-e2",
         "oracle-r0", "oracle-rW"]


def segment_means(result: Dict[str, Any], peaks: List[float]) -> Dict[str, float]:
    sums: Dict[str, List[float]] = {}
    for w, p in zip(result["windows"], peaks):
        sums.setdefault(w["segment"], []).append(p)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def policy_table(data: Dict[str, Any], result: Dict[str, Any], shown: List[str] = SHOWN) -> str:
    ep = result["ep"]
    segs = list(dict.fromkeys(w["segment"] for w in result["windows"]))
    lines = ["| policy | R | " + " | ".join(f"busiest, {s}" for s in segs)
             + " | stream | mean regret | worst window | calls to within 5% after each switch | moves | "
               "experts moved / move | MB / move (bf16) |",
             "|---|---|" + "---|" * len(segs) + "---|---|---|---|---|---|---|"]
    for item in shown:
        name = item.replace("rW", f"r{ep}")
        p = result["policies"].get(name)
        if p is None:
            continue
        seg = segment_means(result, p["peaks"])
        rec = ", ".join("-" if x["calls_to_within"] is None else str(x["calls_to_within"]) for x in p["recovery"])
        ms = p.get("move_summary")
        moves = (f"{ms['moves']} | {ms['transfers_per_move']:.1f} | {ms['bytes_per_move_bf16'] / 1e6:.2f}"
                 if ms else "0 | - | -")
        lines.append(f"| {name} | {p['redundant']} | " + " | ".join(f"{seg[s]:.3f}" for s in segs)
                     + f" | {p['stream_peak']:.3f} | {p['mean_regret']:.3f} | {max(p['regret']):.3f} | {rec} | {moves} |")
    return "\n".join(lines)


def window_table(result: Dict[str, Any]) -> str:
    segs: Dict[str, List[Dict[str, Any]]] = {}
    for w in result["windows"]:
        segs.setdefault(w["segment"], []).append(w)
    lines = ["| segment | windows | perplexity (top-k) | experts active per call (mean over layers) |", "|---|---|---|---|"]
    for name, ws in segs.items():
        ppl = sum(w["ppl"] for w in ws) / len(ws)
        act = sum(w["active_experts_per_call"] for w in ws) / len(ws)
        lines.append(f"| {name} | {len(ws)} | {ppl:.1f} | {act:.2f} |")
    return "\n".join(lines)


def guard_table(data: Dict[str, Any]) -> str:
    lines = ["| model | EP | asked R | written R | text | written plan <= contiguous (layers) | "
             "unguarded plan <= contiguous | written <= replica-free | unguarded replicas <= replica-free |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in data.values():
        for result in d["results"]:
            for r, texts in result["guard"].items():
                if r == "r0-per-call":
                    continue
                for label, g in texts.items():
                    n = g["layers"]
                    rep = (f"{g['replicated_le_replica_free']}/{n} | {g['unguarded_le_replica_free']}/{n}"
                           if r != "r0" else "- | -")
                    lines.append(f"| {Path(d['checkpoint']).name} | {result['ep']} | {r[1:]} | {g['written_redundant']} "
                                 f"| {label} | {g['written_le_contiguous']}/{n} | {g['unguarded_le_contiguous']}/{n} | "
                                 f"{rep} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--brief", action="store_true", help="the policies docs/placement.md shows")
    args = parser.parse_args()
    data = {str(f): json.loads(f.read_text()) for f in args.files}
    for d in data.values():
        for result in d["results"]:
            print(f"\n#### {Path(d['checkpoint']).name}, EP {result['ep']} ({result['calls']} calls of "
                  f"{d['call_sequences']} x {d['seq_len']} tokens; segments {d['segments']})\n")
            print(policy_table(d, result, BRIEF if args.brief else SHOWN))
        print(f"\n{Path(d['checkpoint']).name}: per segment\n")
        print(window_table(d["results"][0]))
    print("\n#### The plan guards on the served texts\n")
    print(guard_table(data))


if __name__ == "__main__":
    main()
