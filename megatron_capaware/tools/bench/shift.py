"""Shift benchmark: plans and re-planning when the served traffic changes genre (issue 25).

Plan on the calibration text (drama), then serve a stream that changes::

    drama (held-out, part 1) -> verse -> drama (part 2) -> prose -> drama (part 3)

and measure, per report window of forward calls, the busiest EP rank (per
call, ``sum max / sum mean`` over the window, averaged over MoE layers), the
activated experts and the perplexity, for: Megatron's contiguous layout; the
static plans ``capaware-plan`` writes from the calibration text (with the
validation guard, and without it as before); ``OnlineReplanner`` at several
``(window, every)`` settings; and the oracle (a plan made on the report
window itself). Regret = busiest rank / the oracle's (same replica count);
recovery = calls from a switch until the first window within 5% of the oracle.
Each re-planning's cost is the expert weights that cross ranks.

Exact and cheap: top-k expert loads depend on neither the EP size nor the
layout, and a layout does not change a top-k model's output, so each text is
run once through the model (one process, EP 1, batches of
``--record-sequences``; the per-call loads and losses are cached in
``--records``) and every layout at every EP size is then evaluated on those
recorded loads (:mod:`megatron_capaware.placement.shift`). A call at EP ``W``
is ``--call-sequences`` sequences (all ranks together).

    python scripts/shift_texts.py --out-dir runs/shift/texts        # verse.txt, prose.txt
    capaware-bench-shift --model shakespeare-moe-8x2 --ep 2 4 --json docs/results/shift/shift_8x2.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_capaware._compat.cli import UserInputError, add_cli_flags, run_cli

PROG = "capaware-bench-shift"
DEFAULT_REPLAN = ["1:1", "2:2", "4:4", "8:8", "4:8", "16:16", "4:4:per-call", "8:8:per-call", "16:16:per-call"]
THRESHOLD = 1.05


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="bundled reference model (shakespeare-moe-8x2, shakespeare-moe-fine-64x8)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint root instead of --model")
    parser.add_argument("--ep", type=int, nargs="+", default=[2, 4], help="EP sizes to evaluate")
    parser.add_argument("--plan-text", type=Path, default=None, help="text the plans are made on (default: the "
                        "bundled calibration text)")
    parser.add_argument("--drama", type=Path, default=None, help="same-genre served text, cut in three "
                        "(default: the bundled held-out text)")
    parser.add_argument("--other", nargs="+", default=["verse=runs/shift/texts/verse.txt",
                                                       "prose=runs/shift/texts/prose.txt"],
                        metavar="NAME=PATH", help="other-genre texts served between the drama parts "
                        "(scripts/shift_texts.py writes the defaults)")
    parser.add_argument("--replan", nargs="+", default=DEFAULT_REPLAN, metavar="WINDOW:EVERY",
                        help="OnlineReplanner settings (window calls : re-plan every calls [: per-call objective])")
    parser.add_argument("--redundant", type=int, nargs="+", default=None, metavar="R",
                        help="replica slots to evaluate (default: 0 and EP)")
    parser.add_argument("--call-sequences", type=int, default=8, help="sequences per forward call, all ranks")
    parser.add_argument("--record-sequences", type=int, default=2, help="sequences per recorded batch")
    parser.add_argument("--report-window", type=int, default=2, help="calls per report window")
    parser.add_argument("--validation-fraction", type=float, default=0.25, help="as capaware-plan")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--records", type=Path, default=Path("runs/shift/records"), help="recording cache")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG",
                        help="busiest rank per window of a few policies, one panel per EP size")
    return add_cli_flags(parser)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def recorded(checkpoint: Path, text: Path, args: argparse.Namespace) -> "Any":
    """The text's per-batch loads and losses, from the cache or recorded now (and cached)."""
    from megatron_capaware.tools.call_loads import CallRecord, record_calls
    from megatron_capaware.tools.evaluate import EvalOptions

    key = f"{checkpoint.name}-{text.stem}-{_sha(text)}-s{args.seq_len}-b{args.record_sequences}.json"
    path = args.records / key
    if path.is_file():
        return CallRecord.from_dict(json.loads(path.read_text()))
    print(f"recording {text} on {checkpoint.name} -> {path}", file=sys.stderr, flush=True)
    record = record_calls(EvalOptions(checkpoint=checkpoint, text=text, seq_len=args.seq_len,
                                      sequences_per_rank=args.record_sequences, progress=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record.to_dict()))
    return record


def _parts(record: Any, parts: int) -> List[Any]:
    from megatron_capaware.tools.call_loads import CallRecord

    size = record.loads.shape[0] // parts
    return [CallRecord(record.layers, record.loads[i * size:(i + 1) * size], record.nll[i * size:(i + 1) * size],
                       record.tokens[i * size:(i + 1) * size], record.sequences) for i in range(parts)]


def analyse(calib: Any, segments: List[Tuple[str, Any]], ep: int, redundants: Sequence[int],
            replan: Sequence[Tuple[int, int, str]], report_window: int, validation_fraction: float,
            expert_bytes: int, guard_texts: Dict[str, Any]) -> Dict[str, Any]:
    """Every policy's figures on the stream at one EP size (records already grouped into calls)."""
    from megatron_capaware.placement import shift as S
    from megatron_capaware.placement.planner import plan_layer
    from megatron_capaware.placement.validate import per_call_peak, plan_validated

    stream = torch.cat([r.loads for _, r in segments]).double()  # [C, L, E]
    nll = torch.cat([r.nll for _, r in segments])
    tokens = torch.cat([r.tokens for _, r in segments])
    num_calls, num_layers, num_experts = stream.shape
    windows = S.report_windows([(name, r.loads.shape[0]) for name, r in segments], report_window)
    cal = calib.loads.double()
    policies: Dict[str, Dict[str, Any]] = {}
    guard: Dict[str, Any] = {}

    def add(name: str, redundant: int, layouts: List[List[List[int]]], moves: Optional[list] = None) -> None:
        busiest, mean = S.call_rank_figures(stream, layouts, ep)
        policies[name] = {"redundant": redundant, "peaks": S.window_peaks(busiest, mean, windows),
                          "stream_peak": float((busiest.sum(0) / mean.sum(0)).mean())}
        if moves is not None:
            policies[name]["moves"] = [{"call": m.call, "transfers": m.transfers, "layers": m.layers_changed}
                                       for m in moves]

    contiguous = [list(range(num_experts))] * num_layers
    add("contiguous", 0, S.static_layouts(contiguous, num_calls))
    free_check = plan_validated(cal, ep, 0, validation_fraction=validation_fraction)
    free = [p.slots for p in free_check.placements]  # the replica-free plan capaware-plan writes
    per_call = plan_validated(cal, ep, 0, validation_fraction=validation_fraction, objective="per-call")
    add("plan-r0-per-call", 0, S.static_layouts([p.slots for p in per_call.placements], num_calls))
    guard["r0-per-call"] = {label: {"layers": num_layers, "written_le_contiguous": sum(
        int(per_call_peak(r.loads[:, i].double(), per_call.placements[i].slots, ep)
            <= per_call_peak(r.loads[:, i].double(), contiguous[i], ep) + 1e-12) for i in range(num_layers)),
        "per_call_le_mean_plan": sum(
        int(per_call_peak(r.loads[:, i].double(), per_call.placements[i].slots, ep)
            <= per_call_peak(r.loads[:, i].double(), free[i], ep) + 1e-12) for i in range(num_layers)),
        "calibration_summary": per_call.summary} for label, r in guard_texts.items()}
    for r in redundants:
        checked = free_check if r == 0 else plan_validated(cal, ep, r, validation_fraction=validation_fraction)
        written = [p.slots for p in checked.placements]
        add(f"plan-r{r}", checked.redundant, S.static_layouts(written, num_calls))
        unguarded = [plan_layer(cal[:, i].sum(0), ep, r).slots for i in range(num_layers)]
        add(f"plan-r{r}-unguarded", r, S.static_layouts(unguarded, num_calls))
        # How the guard's promises held on each whole served text, layer by layer.
        for label, record in guard_texts.items():
            loads = record.loads.double()
            g = guard.setdefault(f"r{r}", {}).setdefault(label, {"layers": num_layers, "written_le_contiguous": 0,
                                                                  "unguarded_le_contiguous": 0,
                                                                  "replicated_le_replica_free": 0,
                                                                  "unguarded_le_replica_free": 0})
            for i in range(num_layers):
                w = per_call_peak(loads[:, i], written[i], ep)
                c = per_call_peak(loads[:, i], contiguous[i], ep)
                f = per_call_peak(loads[:, i], free[i], ep)
                u = per_call_peak(loads[:, i], unguarded[i], ep)
                g["written_le_contiguous"] += int(w <= c + 1e-12)
                g["unguarded_le_contiguous"] += int(u <= c + 1e-12)
                if r:
                    g["replicated_le_replica_free"] += int(w <= f + 1e-12)
                    g["unguarded_le_replica_free"] += int(u <= f + 1e-12)
            g["written_redundant"] = checked.redundant
            g["calibration_summary"] = checked.summary
            g["warnings"] = checked.warnings
    for r in redundants:
        for window, every, objective in replan:
            layouts, moves = S.replanner_layouts(stream, ep, every, window, r, initial=free, objective=objective)
            add(f"replan-r{r}-w{window}-e{every}" + ("-pc" if objective == "per-call" else ""), r, layouts, moves)
        add(f"oracle-r{r}", r, S.oracle_layouts(stream, ep, [(a, b) for a, b, _ in windows], r))
    for p in policies.values():
        key = f"oracle-r{p['redundant']}"
        oracle = policies[key if key in policies else "oracle-r0"]
        p["regret"] = [a / b for a, b in zip(p["peaks"], oracle["peaks"])]
        p["mean_regret"] = sum(p["regret"]) / len(p["regret"])
        p["recovery"] = S.recovery_calls(p["regret"], windows, THRESHOLD)
        if "moves" in p:
            total = sum(m["transfers"] for m in p["moves"])
            p["move_summary"] = {"moves": len(p["moves"]), "transfers": total,
                                 "transfers_per_move": total / len(p["moves"]) if p["moves"] else 0.0,
                                 "bytes_per_move_bf16": (total / len(p["moves"]) if p["moves"] else 0.0) * expert_bytes}
    win_info = []
    for a, b, name in windows:
        total = stream[a:b].sum(0)  # [L, E]
        win_info.append({"start": a, "stop": b, "segment": name,
                         "ppl": math.exp(float(nll[a:b].sum() / tokens[a:b].sum())),
                         "active_experts": float((total > 0).sum(1).double().mean()),
                         "active_experts_per_call": float((stream[a:b] > 0).sum(2).double().mean())})
    return {"ep": ep, "calls": num_calls, "windows": win_info, "policies": policies, "guard": guard}


def summary_table(result: Dict[str, Any]) -> str:
    lines = [f"EP {result['ep']}: {result['calls']} calls",
             f"{'policy':<26} {'R':>2} {'stream peak':>11} {'mean regret':>11} {'worst':>6}  "
             f"{'recovery (calls after each switch)':<36} moves  transfers/move"]
    for name, p in result["policies"].items():
        rec = " ".join("-" if x["calls_to_within"] is None else str(x["calls_to_within"]) for x in p["recovery"])
        ms = p.get("move_summary")
        moves = f"{ms['moves']:>5}  {ms['transfers_per_move']:>8.1f}" if ms else ""
        lines.append(f"{name:<26} {p['redundant']:>2} {p['stream_peak']:>11.3f} {p['mean_regret']:>11.3f} "
                     f"{max(p['regret']):>6.3f}  {rec:<36} {moves}")
    return "\n".join(lines)


PLOTTED = ["contiguous", "plan-r0", "plan-r0-per-call", "replan-r0-w1-e1", "replan-r0-w4-e4", "replan-r0-w16-e16",
           "oracle-r0"]


def plot(out: Dict[str, Any], path: Path) -> None:
    """One panel per EP size: busiest rank per report window, segments shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = out["results"]
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 3.2 * len(results)), squeeze=False)
    colors = {"drama": "#ffffff", "verse": "#e8eefc", "prose": "#fcefe3"}
    for ax, result in zip(axes[:, 0], results):
        windows = result["windows"]
        x = [(w["start"] + w["stop"]) / 2 for w in windows]
        for w in windows:
            ax.axvspan(w["start"], w["stop"], color=colors.get(w["segment"], "#f0f0f0"), lw=0)
        for name in PLOTTED:
            if name in result["policies"]:
                style = "--" if name.startswith("oracle") else ("-." if name == "contiguous" else "-")
                ax.plot(x, result["policies"][name]["peaks"], style, label=name, lw=1.4)
        ax.set_title(f"{Path(out['checkpoint']).name}, EP {result['ep']}: busiest rank per window of "
                     f"{out['report_window']} calls (shaded: verse, prose)")
        ax.set_xlabel("forward call")
        ax.set_ylabel("busiest / mean rank load")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    from megatron_capaware.models import reference_models
    from megatron_capaware.models.checkpoint import load_model_args
    from megatron_capaware.tools.plan import expert_bytes

    checkpoint, plan_text = reference_models.checkpoint_and_text(args.checkpoint, args.plan_text,
                                                                 reference_models.CALIBRATION_TEXT, model=args.model)
    drama = args.drama or reference_models.HELDOUT_TEXT
    others: List[Tuple[str, Path]] = []
    for item in args.other:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserInputError(f"--other {item!r}: give NAME=PATH, e.g. verse=runs/shift/texts/verse.txt")
        if not Path(path).is_file():
            raise UserInputError(f"--other {name}: {path} does not exist; make the default texts with "
                                 "python scripts/shift_texts.py --out-dir runs/shift/texts")
        others.append((name, Path(path)))
    if args.call_sequences % args.record_sequences:
        raise UserInputError(f"--call-sequences {args.call_sequences} must be a multiple of --record-sequences "
                             f"{args.record_sequences}")
    replan = []
    for item in args.replan:
        parts = item.split(":")
        try:
            window, every = int(parts[0]), int(parts[1])
            if len(parts) > 3 or (len(parts) == 3 and parts[2] != "per-call"):
                raise ValueError
        except (ValueError, IndexError):
            raise UserInputError(f"--replan {item!r}: give WINDOW:EVERY or WINDOW:EVERY:per-call, e.g. 4:4") from None
        if window < 1 or every < 1:
            raise UserInputError(f"--replan {item!r}: window and every must be >= 1")
        replan.append((window, every, parts[2] if len(parts) == 3 else "mean"))
    model_args = load_model_args(checkpoint)
    for ep in args.ep:
        if ep < 2 or model_args.num_moe_experts % ep:
            raise UserInputError(f"--ep {ep}: use EP sizes >= 2 that divide the {model_args.num_moe_experts} experts")
    group = args.call_sequences // args.record_sequences
    calib = recorded(checkpoint, plan_text, args).grouped(group)
    drama_parts = _parts(recorded(checkpoint, drama, args).grouped(group), len(others) + 1)
    other_records = {name: recorded(checkpoint, path, args).grouped(group) for name, path in others}
    segments: List[Tuple[str, Any]] = [("drama", drama_parts[0])]
    for (name, _), part in zip(others, drama_parts[1:]):
        segments += [(name, other_records[name]), ("drama", part)]
    guard_texts = {"drama (held-out)": recorded(checkpoint, drama, args).grouped(group), **other_records}
    out: Dict[str, Any] = {"checkpoint": str(checkpoint), "plan_text": str(plan_text), "drama": str(drama),
                           "others": {n: str(p) for n, p in others}, "call_sequences": args.call_sequences,
                           "seq_len": args.seq_len, "report_window": args.report_window,
                           "threshold": THRESHOLD, "segments": [(n, int(r.loads.shape[0])) for n, r in segments],
                           "expert_bytes_bf16": expert_bytes(model_args), "results": []}
    for ep in args.ep:
        redundants = args.redundant if args.redundant is not None else [0, ep]
        result = analyse(calib, segments, ep, redundants, replan, args.report_window, args.validation_fraction,
                         expert_bytes(model_args), guard_texts)
        out["results"].append(result)
        print(summary_table(result))
        for r, texts in result["guard"].items():
            if r == "r0-per-call":
                continue
            for label, g in texts.items():
                line = (f"  guard {r} on {label}: written <= contiguous in {g['written_le_contiguous']}/{g['layers']} "
                        f"layers")
                if r != "r0":
                    line += (f"; written (R={g['written_redundant']}) <= replica-free in "
                             f"{g['replicated_le_replica_free']}/{g['layers']}, unguarded replicas in "
                             f"{g['unguarded_le_replica_free']}/{g['layers']}")
                print(line)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1) + "\n")
    if args.json:
        print(f"wrote {args.json}")
    if args.plot:
        plot(out, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
