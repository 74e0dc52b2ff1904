#!/usr/bin/env python
"""Per-phase quality cost and predicted speedup: the policy on every step against the default phases.

Megatron's dynamic engine runs prefill (and mixed) steps and decode-only
steps. ``--capaware-phases`` chooses where a router's policy applies; the
default is the policy on prefill / mixed steps and top-k (or, with
``--capaware-decode-router decode-pack``, decode-pack) on decode-only steps.
This script measures each phase with ``capaware-eval`` on held-out text
(``docs/decode.md`` defines the figures) and composes, per policy:

* prefill: ``dppl%`` of a teacher-forced full forward over held-out windows
  against top-k, and the predicted speedup ``peak_rank(topk) / peak_rank``
  (the busiest EP rank's tokens);
* decode: ``dppl%`` on the decoded positions (windows prefilled under top-k
  into a KV cache, then one token per sequence and step under the router,
  teacher-forced) against top-k, and the predicted speedup
  ``active_max(topk) / active_max`` (activated experts, i.e. expert weight
  reads, on the busiest EP rank);

for three deployments: ``phases=all`` (the policy on every step), the default
phases with top-k on decode, and the default phases with the decode router.

Each ``capaware-eval`` run's records are kept under ``--work`` (progress: a
batch whose ``results.json`` is there is not run again). Prints a markdown
table and writes ``--out`` (JSON: commands, measured rows, the table).

Usage::

    python scripts/phase_split.py --ep 2 --decode 4 16 \\
        --out docs/results/phases/phase_split_ep2.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List


def _eval(args: argparse.Namespace, batch: int) -> Dict[str, Any]:
    """The records of one ``capaware-eval`` run (run only when its results are not under ``--work``)."""
    out = Path(args.work) / f"eval_ep{args.ep}_b{batch}"
    routers = ["topk", *args.policies, args.decode_router]
    command = ["capaware-eval", "--ep", str(args.ep), "--routers", *routers, "--max-tokens", str(args.max_tokens),
               "--decode", str(batch), "--no-placement", "--no-plots", "--no-progress", "--out", str(out)]
    results = out / "results.json"
    if not results.exists():
        print("running:", shlex.join(command), file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
    records = {r["label"]: r for r in json.loads(results.read_text())}
    return {"command": shlex.join(command), "records": records}


def _pick(records: Dict[str, Dict[str, Any]], spec: str) -> Dict[str, Any]:
    """The record of a router spec (by its label, from the package's own spec parser)."""
    from megatron_capaware.tools.router_specs import parse_router_spec

    label = parse_router_spec(spec)[0].describe()
    if label not in records:
        raise SystemExit(f"no record {label!r} in the evaluation (have: {', '.join(records)})")
    return records[label]


def compose(records: Dict[str, Dict[str, Any]], policies: List[str], decode_router: str) -> List[Dict[str, Any]]:
    """Rows ``{policy, deployment, prefill_dppl, prefill_speedup, decode_router, decode_dppl, decode_speedup}``.

    Prefill figures are the policy's full-forward record; decode figures the record of the router
    that routes decode-only steps in that deployment.
    """
    topk = records["topk"]
    pack = _pick(records, decode_router)
    rows = [dict(policy="topk", deployment="-", prefill_router="topk", decode_router="topk")]
    for spec in policies:
        policy = _pick(records, spec)
        for deployment, decode in (("phases=all (policy on every step)", policy),
                                   ("default phases (decode: topk)", topk),
                                   ("default phases + --capaware-decode-router", pack)):
            rows.append(dict(policy=policy["label"], deployment=deployment, prefill_router=policy["label"],
                             decode_router=decode["label"]))
    for row in rows:
        pre, dec = records_by_label(records, row["prefill_router"]), records_by_label(records, row["decode_router"])
        row.update(
            prefill_dppl=100.0 * (pre["ppl"] / topk["ppl"] - 1.0),
            prefill_speedup=float(pre["predicted_speedup"]),
            prefill_dropped=float(pre["dropped_frac"]),
            decode_dppl=100.0 * (dec["decode_ppl"] / topk["decode_ppl"] - 1.0),
            decode_speedup=float(dec["decode_active_speedup"]),
            decode_token_speedup=float(topk["decode_rank_peak_load"] / dec["decode_rank_peak_load"]),
            decode_dropped=float(dec["decode_dropped_frac"]),
        )
    return rows


def records_by_label(records: Dict[str, Dict[str, Any]], label: str) -> Dict[str, Any]:
    return records[label]


def table(rows: List[Dict[str, Any]], batch: int) -> str:
    head = (f"| policy | deployment | prefill dppl% | prefill speedup (busiest rank's tokens) | decode router (batch "
            f"{batch}) | decode dppl% | decode speedup (active experts, busiest rank) | decode dropped% |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['deployment']} | {r['prefill_dppl']:+.2f} | {r['prefill_speedup']:.3f}x | "
                     f"{r['decode_router']} | {r['decode_dppl']:+.2f} | {r['decode_speedup']:.3f}x | "
                     f"{100 * r['decode_dropped']:.2f}% |")
    return "\n".join(lines)


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ep", type=int, default=2, help="expert-parallel size")
    parser.add_argument("--decode", type=int, nargs="+", default=[16], metavar="BATCH", help="decode batch sizes")
    parser.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens of the prefill evaluation")
    parser.add_argument("--policies", nargs="+", default=["capacity-drop:gamma=1", "laser"],
                        help="router specs of the policies (prefill / mixed steps)")
    parser.add_argument("--decode-router", default="decode-pack:floor=1", help="the decode router's spec")
    parser.add_argument("--work", default="phase-split-work", help="folder of the capaware-eval runs (progress)")
    parser.add_argument("--out", default=None, help="write the rows and commands as JSON here")
    args = parser.parse_args(argv)
    report: Dict[str, Any] = {"ep": args.ep, "policies": args.policies, "decode_router": args.decode_router,
                              "batches": {}}
    for batch in args.decode:
        run = _eval(args, batch)
        rows = compose(run["records"], args.policies, args.decode_router)
        text = table(rows, batch)
        print(f"\nEP {args.ep}, decode batch {batch} ({run['command']}):\n\n{text}\n", flush=True)
        report["batches"][str(batch)] = {"command": run["command"], "rows": rows, "table": text,
                                         "decode_tokens": run["records"]["topk"]["decode_tokens"],
                                         "prefill_tokens": run["records"]["topk"]["tokens"]}
        if args.out:  # progress: each batch as it is done
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
