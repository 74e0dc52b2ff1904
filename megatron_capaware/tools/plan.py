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
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import torch

from megatron_capaware._compat.cli import UserInputError, add_cli_flags, run_cli

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
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sequences-per-rank", type=int, default=16)
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
    from megatron_capaware.placement import plan as plan_placements
    from megatron_capaware.placement.plan_file import plan_from_placements
    from megatron_capaware.placement.planner import check_layout
    from megatron_capaware.tools import preflight
    from megatron_capaware.tools.evaluate import EvalOptions, run_evaluation

    checkpoint, text = reference_models.checkpoint_and_text(args.checkpoint, args.text,
                                                            reference_models.CALIBRATION_TEXT, model=args.model)
    topk = CapawareConfig("topk")
    preflight.check_run(checkpoint, text, args.tokenizer, [topk], ep=1, tp=1, etp=1, seq_len=args.seq_len,
                        sequences_per_rank=args.sequences_per_rank)
    model_args = load_model_args(checkpoint)
    if args.ep < 1 or model_args.num_moe_experts % args.ep:
        raise UserInputError(f"--ep {args.ep} does not divide the model's {model_args.num_moe_experts} experts")
    check_layout(model_args.num_moe_experts, args.ep, args.redundant_experts)  # before the recording run
    options = EvalOptions(checkpoint=checkpoint, text=text, tokenizer=args.tokenizer, seq_len=args.seq_len,
                          sequences_per_rank=args.sequences_per_rank, max_tokens=args.max_tokens, progress=False)
    result = run_evaluation(options, [topk])[0]
    layers = sorted(result.expert_loads)
    loads = torch.tensor([result.expert_loads[n] for n in layers], dtype=torch.float64)
    placements = plan_placements(loads, args.ep, args.redundant_experts, args.nodes)
    in_sample = Path(text).resolve() == reference_models.HELDOUT_TEXT.resolve()
    provenance = {
        "checkpoint": str(checkpoint), "text": str(text), "text_sha256": _sha256(Path(text)),
        "tokens": result.tokens, "in_sample": in_sample,
        "command": " ".join(shlex.quote(x) for x in [PROG, *argv]),
        "replica_bytes_bf16": args.redundant_experts * len(layers) * expert_bytes(model_args),
    }
    model = {"moe_layer_numbers": layers, "num_moe_experts": model_args.num_moe_experts,
             "moe_router_topk": model_args.moe_router_topk, "num_layers": model_args.num_layers}
    plan = plan_from_placements(placements, layers, model, args.ep, args.redundant_experts, args.nodes, provenance)
    plan.save(args.out)
    print(f"{'layer':>5} {'contiguous':>10} {'planned':>8} {'speedup':>8}  slots (per rank)")
    for n, p in sorted(plan.layers.items()):
        ranks = " | ".join(" ".join(str(e) for e in p.rank_slots(r)) for r in range(args.ep))
        print(f"{n:>5} {p.contiguous_rank_peak:>10.3f} {p.predicted_rank_peak:>8.3f} "
              f"{p.contiguous_rank_peak / p.predicted_rank_peak:>7.3f}x  {ranks}")
    mean_c = sum(p.contiguous_rank_peak for p in placements) / len(placements)
    mean_p = sum(p.predicted_rank_peak for p in placements) / len(placements)
    print(f"mean rank peak: contiguous {mean_c:.3f}, planned {mean_p:.3f} (predicted speedup "
          f"{mean_c / mean_p:.3f}x) on {result.tokens} tokens of {Path(text).name}"
          f"{' (in-sample)' if in_sample else ''}; replicas: {provenance['replica_bytes_bf16'] / 1e6:.2f} MB bf16")
    print(f"wrote {args.out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
