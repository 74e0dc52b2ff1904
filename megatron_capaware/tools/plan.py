"""``capaware-plan``: an expert placement (and replication) plan from a calibration text.

Records the top-k expert loads of every MoE layer on the text (prefill
batches, one process: top-k loads do not depend on the EP size), plans a
placement per layer for ``--ep`` ranks with ``--redundant-experts`` extra
slots (:mod:`megatron_capaware.placement.planner`) and writes a versioned
plan with its provenance::

    capaware-plan --ep 2 --out placement-ep2.json                  # bundled model, calibration text
    capaware-plan --checkpoint CKPT --text FILE --ep 8 --redundant-experts 8 --nodes 2 --out plan.json

It prints, per layer, the busiest rank's load over the mean under Megatron's
contiguous placement and under the plan, and the predicted speedup.
``capaware-eval --placement plan.json`` reports the same figures on the
evaluation text (a plan made from that text itself is marked in-sample).

Validation (``--validation-fraction``, default 0.25): each recorded batch is
one forward call; the plan is fitted on the first calls and checked on the
last ones (:mod:`megatron_capaware.placement.validate`) by the per-call
busiest rank. A layer whose plan loses to the contiguous layout there keeps
the contiguous layout; a replicated plan that loses to the replica-free one
is not written (the replica-free plan is, with a warning) unless
``--keep-replicas``. The plan file records the fit and validation figures.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import List, Optional


from megatron_capaware._compat.cli import UserInputError, add_cli_flags, run_cli
from megatron_capaware.registry import TOPK

PROG = "capaware-plan"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint root (default: the bundled model)")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="a bundled reference model by name instead of --checkpoint "
                             "(shakespeare-moe-8x2, the default; shakespeare-moe-fine-64x8)")
    parser.add_argument("--text", type=Path, default=None, help="calibration text (default: the bundled one)")
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--ep", type=int, required=True, help="expert-parallel size the plan is for")
    parser.add_argument("--redundant-experts", type=int, default=0, help="extra expert slots R (replicas)")
    parser.add_argument("--nodes", type=int, default=None, help="plan node first, then GPU (hierarchical)")
    parser.add_argument("--out", type=Path, required=True, help="plan file to write (JSON)")
    parser.add_argument("--validation-fraction", type=float, default=0.25,
                        help="share of the recorded calls (the last ones) the plan is checked on, not fitted on; "
                             "0: fit on all (no check)")
    parser.add_argument("--objective", choices=("mean", "per-call"), default="per-call",
                        help="fit the mean loads (EPLB), or then swap experts to lower the fit calls' summed "
                             "busiest rank (the default: docs/placement.md, 'When your traffic changes')")
    parser.add_argument("--keep-replicas", action="store_true",
                        help="write the replicated plan even when it loses to the replica-free one on validation")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sequences-per-rank", type=int, default=8,
                        help="sequences per recorded batch; each batch is one call of the validation figures")
    parser.add_argument("--max-tokens", type=int, default=None, help="record at most this many tokens")
    return add_cli_flags(parser)


def expert_bytes(model_args, bytes_per_param: int = 2) -> int:
    """Weight bytes of one routed expert (bf16 by default)."""
    matrices = 3 if model_args.gated_linear_unit else 2
    return matrices * model_args.hidden_size * model_args.moe_ffn_hidden_size * bytes_per_param


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.models import reference_models
    from megatron_capaware.models.checkpoint import load_model_args
    from megatron_capaware.placement.plan_file import plan_from_placements
    from megatron_capaware.placement.planner import PlacementError, check_layout
    from megatron_capaware.placement.validate import fit_layer, plan_validated
    from megatron_capaware.tools import preflight
    from megatron_capaware.tools.call_loads import record_calls
    from megatron_capaware.tools.evaluate import EvalOptions

    checkpoint, text = reference_models.checkpoint_and_text(args.checkpoint, args.text,
                                                            reference_models.CALIBRATION_TEXT, model=args.model)
    topk = CapawareConfig(TOPK)
    preflight.check_run(checkpoint, text, args.tokenizer, [topk], ep=1, tp=1, etp=1, seq_len=args.seq_len,
                        sequences_per_rank=args.sequences_per_rank)
    model_args = load_model_args(checkpoint)
    if args.ep < 1 or model_args.num_moe_experts % args.ep:
        raise UserInputError(f"--ep {args.ep} does not divide the model's {model_args.num_moe_experts} experts")
    check_layout(model_args.num_moe_experts, args.ep, args.redundant_experts)  # before the recording run
    if not 0.0 <= args.validation_fraction < 1.0:
        raise UserInputError(f"--validation-fraction {args.validation_fraction}: use a value in [0, 1), e.g. 0.25")
    options = EvalOptions(checkpoint=checkpoint, text=text, tokenizer=args.tokenizer, seq_len=args.seq_len,
                          sequences_per_rank=args.sequences_per_rank, max_tokens=args.max_tokens, progress=False)
    record = record_calls(options)
    layers = record.layers
    tokens = int(record.tokens.sum())
    call_loads = record.loads.double()  # [C, L, E]
    validated = None
    redundant = args.redundant_experts
    if args.validation_fraction > 0:
        try:
            validated = plan_validated(call_loads, args.ep, redundant, args.nodes, args.validation_fraction,
                                       args.objective, args.keep_replicas)
        except PlacementError as err:
            raise UserInputError(f"{err} (or --validation-fraction 0 to fit on all of it without a check)") from err
        placements = [replace(p, figures=f) for p, f in zip(validated.placements, validated.figures)]
        redundant = validated.redundant
    else:
        placements = [fit_layer(call_loads[:, i], args.ep, redundant, args.nodes, args.objective)
                      for i in range(len(layers))]
    in_sample = Path(text).resolve() == reference_models.HELDOUT_TEXT.resolve()
    provenance = {
        "checkpoint": str(checkpoint), "text": str(text), "text_sha256": _sha256(Path(text)),
        "tokens": tokens, "in_sample": in_sample,
        "command": " ".join(shlex.quote(x) for x in [PROG, *argv]),
        "replica_bytes_bf16": redundant * len(layers) * expert_bytes(model_args),
        "calls": int(call_loads.shape[0]), "sequences_per_call": args.sequences_per_rank,
        "objective": args.objective,
    }
    if validated is not None:
        provenance["validation"] = {**validated.summary, "warnings": validated.warnings}
    model = {"moe_layer_numbers": layers, "num_moe_experts": model_args.num_moe_experts,
             "moe_router_topk": model_args.moe_router_topk, "num_layers": model_args.num_layers}
    plan = plan_from_placements(placements, layers, model, args.ep, redundant, args.nodes, provenance)
    plan.save(args.out)
    print(f"{'layer':>5} {'contiguous':>10} {'planned':>8} {'speedup':>8}  slots (per rank)")
    for n, p in sorted(plan.layers.items()):
        ranks = " | ".join(" ".join(str(e) for e in p.rank_slots(r)) for r in range(args.ep))
        print(f"{n:>5} {p.contiguous_rank_peak:>10.3f} {p.predicted_rank_peak:>8.3f} "
              f"{p.contiguous_rank_peak / p.predicted_rank_peak:>7.3f}x  {ranks}")
    mean_c = sum(p.contiguous_rank_peak for p in placements) / len(placements)
    mean_p = sum(p.predicted_rank_peak for p in placements) / len(placements)
    print(f"mean rank peak (in-sample, mean loads): contiguous {mean_c:.3f}, planned {mean_p:.3f} (predicted "
          f"speedup {mean_c / mean_p:.3f}x) on {tokens} tokens of {Path(text).name}"
          f"{' (in-sample)' if in_sample else ''}; replicas: {provenance['replica_bytes_bf16'] / 1e6:.2f} MB bf16")
    if validated is not None:
        v = validated.summary
        line = (f"per-call busiest rank, fit {v['fit_calls']} calls / validation {v['validation_calls']} calls: "
                f"contiguous {v['contiguous_fit']:.3f} / {v['contiguous_validation']:.3f}, "
                f"replica-free {v['kept_free_fit']:.3f} / {v['kept_free_validation']:.3f}")
        if args.redundant_experts:
            line += f", R={args.redundant_experts} {v['replicated_fit']:.3f} / {v['replicated_validation']:.3f}"
        print(line + f"; written (R={redundant}) {v['written_fit']:.3f} / {v['written_validation']:.3f}")
        for warning in validated.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
