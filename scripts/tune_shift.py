#!/usr/bin/env python
"""capaware-tune's choices served on other-genre text: does the budget hold when the traffic changes?

    python scripts/tune_shift.py TUNE_DIR/tune.json --text verse=runs/shift/texts/verse.txt \\
        prose=runs/shift/texts/prose.txt --out docs/results/shift/tune_8x2_ep2.json

For each text, runs ``capaware-eval`` (same model and EP as the tuning) on
top-k and every chosen setting (placed choices on their plan), then prints
per budget: the calibration (search) change, the validation change (what
``capaware-tune`` calls the expected serving cost), and the change on each
other-genre text, and whether it is within the budget. Each text's records
are kept beside ``--out`` (``<out>.<name>.records.json``), so a rerun skips
what is done.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List


def eval_records(tune: Dict[str, Any], name: str, text: Path, out: Path, max_tokens: int) -> List[Dict[str, Any]]:
    path = out.with_name(f"{out.stem}.{name}.records.json")
    if path.is_file():
        return json.loads(path.read_text())
    plain = sorted({c["spec"] for c in tune["choices"] if not c["placement"] and c["spec"] != "topk"})
    placed: Dict[str, List[str]] = {}
    for c in tune["choices"]:
        if c["placement"]:
            placed.setdefault(c["placement"], []).append(c["spec"])
    cmd = [sys.executable, "-m", "megatron_capaware.tools.evaluate", "--checkpoint", tune["checkpoint"],
           "--ep", str(tune["ep"]), "--text", str(text), "--routers", "topk", *plain, "--no-plots", "--no-progress",
           "--out", f"runs/shift/eval/{path.stem}", "--json", str(path), "--max-tokens", str(max_tokens)]
    if placed:
        cmd += ["--placement", *placed, "--placed-routers", *sorted({s for v in placed.values() for s in v})]
    else:
        cmd += ["--no-placement"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(path.read_text())


def label_of(choice: Dict[str, Any]) -> str:
    label = choice["label"]
    if label.startswith("laser(L"):
        label = "laser(calibrated)"
    return label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tune", type=Path)
    parser.add_argument("--text", nargs="+", required=True, metavar="NAME=PATH")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=32768)
    args = parser.parse_args()
    tune = json.loads(args.tune.read_text())
    texts = {}
    for item in args.text:
        name, _, path = item.partition("=")
        texts[name] = eval_records(tune, name, Path(path), args.out, args.max_tokens)
    rows = []
    for c in tune["choices"]:
        row = {"budget_pct": c["budget_pct"], "setting": c["label"], "spec": c["spec"], "placement": c["placement"],
               "calib_delta_ppl_pct": c["calib_delta_ppl_pct"], "validation_delta_ppl_pct": c.get("validation_delta_ppl_pct"),
               "predicted_speedup": c["predicted_speedup"], "texts": {}}
        for name, records in texts.items():
            by_label = {r["label"]: r for r in records}
            r = by_label.get(label_of(c))
            row["texts"][name] = None if r is None else {
                "delta_ppl_pct": r["delta_ppl_pct"], "predicted_speedup": r["predicted_speedup"],
                "within_budget": r["delta_ppl_pct"] <= c["budget_pct"], "tokens": r["tokens"]}
        rows.append(row)
    result = {"tune": str(args.tune), "checkpoint": tune["checkpoint"], "ep": tune["ep"], "split": tune.get("split"),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    names = list(texts)
    print("| budget | chosen setting | calib dppl | validation dppl | "
          + " | ".join(f"{n} dppl | {n} speedup" for n in names) + " |")
    print("|---|---|---|---|" + "---|---|" * len(names))
    for row in rows:
        v = row["validation_delta_ppl_pct"]
        cells = []
        for n in names:
            t = row["texts"][n]
            cells.append("- | -" if t is None else
                         f"{t['delta_ppl_pct']:+.2f}%{'' if t['within_budget'] else ' (over)'} | {t['predicted_speedup']:.3f}x")
        print(f"| {row['budget_pct']:g}% | `{row['setting']}` | {row['calib_delta_ppl_pct']:+.2f}% | "
              + ("-" if v is None else f"{v:+.2f}%") + " | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
