"""The capaware-tune choices against their held-out evaluation: does the choice transfer?

    PYTHONPATH=. python scripts/tune_transfer.py TUNE_DIR/tune.json HELDOUT_DIR/results.json [--json OUT]

``tune.json`` from ``capaware-tune``; ``results.json`` from ``capaware-eval --routers topk <the chosen
specs>`` on the held-out text. Prints a Markdown table: budget, chosen setting, calibration perplexity
change and predicted speedup, held-out perplexity change and predicted speedup, within budget on held-out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(tune: dict, heldout: list) -> list:
    by_label = {r["label"]: r for r in heldout}
    out = []
    for choice in tune["choices"]:
        label = choice["label"]
        if label.startswith("laser(L"):  # per-layer LASER: capaware-eval labels a calibration file so
            label = "laser(calibrated)"
        h = by_label.get(label)
        out.append({
            "budget_pct": choice["budget_pct"], "setting": choice["label"], "spec": choice["spec"],
            "calib_delta_ppl_pct": choice["calib_delta_ppl_pct"], "calib_speedup": choice["predicted_speedup"],
            "heldout_delta_ppl_pct": h["delta_ppl_pct"] if h else None,
            "heldout_speedup": h["predicted_speedup"] if h else None,
            "heldout_within_budget": (h["delta_ppl_pct"] <= choice["budget_pct"]) if h else None,
        })
    return out


def markdown(table: list) -> str:
    lines = ["| budget | chosen setting | calib dppl | calib speedup | held-out dppl | held-out speedup | within budget on held-out |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        h = r["heldout_delta_ppl_pct"]
        lines.append(
            f"| {r['budget_pct']:g}% | `{r['setting']}` | {r['calib_delta_ppl_pct']:+.2f}% | {r['calib_speedup']:.3f}x | "
            + (f"{h:+.2f}% | {r['heldout_speedup']:.3f}x | {'yes' if r['heldout_within_budget'] else 'no'} |"
               if h is not None else "- | - | - |"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tune", type=Path)
    parser.add_argument("heldout", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    table = rows(json.loads(args.tune.read_text()), json.loads(args.heldout.read_text()))
    print(markdown(table))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
