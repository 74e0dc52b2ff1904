"""capaware-calibrate: per-layer LASER thresholds from prefill statistics.

The rule. Run a calibration text (never the evaluation text) through the
model under top-k routing, in the same batches as inference prefill, and
record every MoE layer's router scores ``s [T, E]`` per forward call. Then,
for each layer separately:

1. ``M_k`` = each token's top-k score mass. For a flexible fraction ``q``,
   ``eps_high(q)`` is the ``q``-quantile of the layer's ``M_k``: a fraction
   ``q`` of its tokens (the least confident) become flexible.
2. LASER is replayed offline, with the very policy the router runs
   (:func:`megatron_capaware.policies.laser`), on the recorded score
   matrices, call by call, for ``q`` on a grid (0, 0.05, ..., ``q_max``).
3. The layer's ``eps_high`` is that of the **smallest** ``q`` whose imbalance
   ``I = max/mean expert load`` reaches ``I_topk / target_reduction`` (but
   not below 1); if no ``q`` reaches it, the ``q`` with the least imbalance.
   Balanced layers get ``q = 0`` (exactly top-k: no quality cost); each
   layer gets only as much flexibility as its own imbalance needs, since
   every flexible token may leave its top-k experts.

``t_fix`` and the pool size are the same for every layer (flags). The file
records the model it was made for (MoE layers, experts, top-k): loading it
into another model is an error. ``--flexible-fraction q`` instead sets
``eps_high`` to the ``q``-quantile in every layer (the plain quantile rule).

    capaware-calibrate --checkpoint CKPT --text calibration.txt --out CKPT/laser_calibration.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from megatron_capaware._compat.cli import UserInputError, add_cli_flags, run_cli
from megatron_capaware.config import Calibration, CapawareConfig, LaserParams
from megatron_capaware.policies.collectives import all_gather_objects
from megatron_capaware.registry import TOPK

PROG = "capaware-calibrate"

DEFAULT_T_FIX = 0.3
DEFAULT_TARGET_REDUCTION = 1.6
DEFAULT_Q_MAX = 0.9


def record_scores(
    checkpoint: Path,
    text: Path,
    *,
    tokenizer: Optional[Path] = None,
    seq_len: int = 256,
    sequences_per_rank: int = 16,
    max_tokens: Optional[int] = None,
    expert_parallel: int = 1,
    dtype: Optional[torch.dtype] = None,
) -> Dict[str, Any]:
    """Router scores of every MoE layer, per forward call, under top-k routing.

    Call under torch.distributed (every rank). Scores of all ranks are
    concatenated in rank order per call (the global batch of that call).

    Returns (on every rank):
        ``{"layers": {layer: [scores [T_glob, E] per call]}, "model": {...}, "tokens": N}``.
    """
    import torch.distributed as dist

    from megatron_capaware import parallel
    from megatron_capaware.adapters import install_capaware_routers, moe_layers
    from megatron_capaware.models.checkpoint import load_model
    from megatron_capaware.tools.text_data import check_tokenizer, load_tokenizer, rank_batches, token_windows

    parallel.init_model_parallel(parallel.ParallelSizes(expert_parallel=expert_parallel))
    parallel.set_seed(0)
    from megatron.core import parallel_state as ps

    model, args = load_model(
        checkpoint, expert_parallel=expert_parallel,
        params_dtype=dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32),
    )
    install_capaware_routers(model, CapawareConfig(TOPK, record_stats=False))
    recorded: Dict[int, List[torch.Tensor]] = {}
    for layer in moe_layers(model):
        number = int(layer.router.layer_number or layer.layer_number)
        recorded[number] = []
        layer.router.capaware_score_hook = (lambda store: lambda s: store.append(s.detach().cpu()))(recorded[number])
    tok = load_tokenizer(tokenizer or checkpoint)
    check_tokenizer(tok, args.vocab_size, checkpoint, tokenizer)
    windows = token_windows(tok.encode(Path(text).read_text(encoding="utf-8")), seq_len, max_tokens)
    batches = list(rank_batches(windows, sequences_per_rank, ps.get_data_parallel_world_size(),
                                ps.get_data_parallel_rank()))
    if not batches:
        raise ValueError(f"{text} is too short for one calibration batch; give more text")
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in batches:
            ids = batch[:, :-1].to(device)
            pos = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
            model(ids, pos, attention_mask=None)
    gathered: Dict[int, List[torch.Tensor]] = {}
    world = dist.get_world_size()
    for number, calls in sorted(recorded.items()):
        gathered[number] = []
        for scores in calls:
            gathered[number].append(torch.cat(all_gather_objects(scores)))
    model_info = {
        "moe_layer_numbers": sorted(gathered),
        "num_layers": args.num_layers,
        "num_moe_experts": args.num_moe_experts,
        "moe_router_topk": args.moe_router_topk,
        "checkpoint": Path(checkpoint).name,
    }
    parallel.destroy()
    return {"layers": gathered, "model": model_info, "tokens": int(windows[: len(batches) * sequences_per_rank * world, :-1].numel())}


def _mean_imbalance(maps: List[torch.Tensor]) -> float:
    """Mean over forward calls of max/mean expert load."""
    from megatron_capaware.metrics import imbalance

    return sum(imbalance(m.sum(0)) for m in maps) / max(len(maps), 1)


def calibrate_layer(
    calls: List[torch.Tensor],
    k: int,
    *,
    t_fix: float,
    pool: int,
    target_reduction: float,
    q_max: float = DEFAULT_Q_MAX,
    flexible_fraction: Optional[float] = None,
    waves: int = 8,
    rounds: int = 1,
) -> Dict[str, Any]:
    """Choose one layer's ``eps_high`` by the rule in the module docstring.

    Args:
        calls: the layer's score matrices ``[T, E]``, one per forward call.

    Returns:
        ``{"eps_high", "q", "i_topk", "i_laser", "moved_frac", "grid": [...]}``.
    """
    from megatron_capaware import policies

    from megatron_capaware.policies.laser import topk_mass

    mass = torch.cat([topk_mass(c.topk(k, dim=1).values) for c in calls])  # M_k as the router computes it
    top_maps = [policies.topk(c, k)[1] for c in calls]
    i_topk = _mean_imbalance(top_maps)
    target = max(1.0, i_topk / target_reduction)
    grid_q = [flexible_fraction] if flexible_fraction is not None else [
        round(0.05 * i, 2) for i in range(int(round(q_max / 0.05)) + 1)
    ]
    grid = []
    for q in grid_q:
        eps = float(torch.quantile(mass, q)) if q > 0 else 0.0
        maps = [policies.laser(c, k, eps, t_fix, pool, waves=waves, rounds=rounds)[1] for c in calls]
        moved = sum(int((m & ~t).sum()) for m, t in zip(maps, top_maps)) / max(sum(int(t.sum()) for t in top_maps), 1)
        grid.append({"q": q, "eps_high": eps, "i": _mean_imbalance(maps), "moved_frac": moved})
    meeting = [g for g in grid if g["i"] <= target]
    chosen = meeting[0] if meeting else min(grid, key=lambda g: (round(g["i"], 9), g["q"]))
    return {
        "eps_high": chosen["eps_high"], "q": chosen["q"], "i_topk": i_topk, "i_laser": chosen["i"],
        "target_i": target, "moved_frac": chosen["moved_frac"], "grid": grid,
        "mk_quantiles": {str(p): float(torch.quantile(mass, p)) for p in (0.1, 0.25, 0.5, 0.75, 0.9)},
    }


def build_calibration(
    recorded: Dict[str, Any],
    *,
    t_fix: float = DEFAULT_T_FIX,
    pool: Optional[int] = None,
    target_reduction: float = DEFAULT_TARGET_REDUCTION,
    q_max: float = DEFAULT_Q_MAX,
    flexible_fraction: Optional[float] = None,
    source: str = "",
) -> Calibration:
    """A :class:`Calibration` from :func:`record_scores`' output."""
    k = int(recorded["model"]["moe_router_topk"])
    pool = pool or 2 * k
    layer_params: Dict[int, LaserParams] = {}
    stats: Dict[str, Any] = {}
    for number, calls in sorted(recorded["layers"].items()):
        result = calibrate_layer(calls, k, t_fix=t_fix, pool=pool, target_reduction=target_reduction,
                                 q_max=q_max, flexible_fraction=flexible_fraction)
        layer_params[int(number)] = LaserParams(eps_high=result["eps_high"], t_fix=t_fix, pool=pool)
        stats[str(number)] = result
    rule = {
        "name": "quantile" if flexible_fraction is not None else "smallest-q-meeting-target",
        "target_reduction": target_reduction, "q_max": q_max, "flexible_fraction": flexible_fraction,
        "t_fix": t_fix, "pool": pool, "text": source, "tokens": recorded["tokens"],
    }
    return Calibration(layer_params=layer_params, model=recorded["model"], rule=rule, statistics=stats)


def _calibrate_worker(options: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    recorded = record_scores(
        Path(options["checkpoint"]), Path(options["text"]), tokenizer=options.get("tokenizer"),
        seq_len=options["seq_len"], sequences_per_rank=options["sequences_per_rank"],
        max_tokens=options.get("max_tokens"), expert_parallel=options.get("ep", 1),
    )
    return recorded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Per-layer LASER thresholds from a calibration text (see the module docstring for the rule).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint root (default: bundled model)")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="a bundled reference model by name instead of --checkpoint "
                             "(shakespeare-moe-8x2, the default; shakespeare-moe-fine-64x8)")
    parser.add_argument("--text", type=Path, default=None, help="calibration text (default: the bundled one)")
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None,
                        help="calibration file to write (default: CHECKPOINT/laser_calibration.json)")
    parser.add_argument("--t-fix", type=float, default=DEFAULT_T_FIX, help="LASER t_fix for every layer")
    parser.add_argument("--pool", type=int, default=None, help="LASER pool size (default 2k)")
    parser.add_argument("--target-reduction", type=float, default=DEFAULT_TARGET_REDUCTION,
                        help="aim each layer's imbalance at I_topk / this")
    parser.add_argument("--q-max", type=float, default=DEFAULT_Q_MAX, help="largest flexible fraction tried")
    parser.add_argument("--flexible-fraction", type=float, default=None,
                        help="plain quantile rule: this fraction of tokens flexible in every layer")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sequences-per-rank", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size (recording only)")
    parser.add_argument("--save-scores", type=Path, default=None,
                        help="also save the recorded score traces (torch file) for benchmarks")
    return add_cli_flags(parser)


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, _main, argv)


def _main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    from megatron_capaware._compat.launcher import run_distributed
    from megatron_capaware.tools import preflight

    from megatron_capaware.models import reference_models

    checkpoint, text = reference_models.checkpoint_and_text(args.checkpoint, args.text, reference_models.CALIBRATION_TEXT, model=args.model)
    if not 0 < args.target_reduction:
        raise UserInputError(f"--target-reduction {args.target_reduction} is invalid: it must be > 0")
    preflight.check_run(checkpoint, text, args.tokenizer, [], ep=args.ep, tp=1, etp=1,
                        seq_len=args.seq_len, sequences_per_rank=args.sequences_per_rank)
    options = dict(checkpoint=str(checkpoint), text=str(text), tokenizer=args.tokenizer, seq_len=args.seq_len,
                   sequences_per_rank=args.sequences_per_rank, max_tokens=args.max_tokens, ep=args.ep)
    threads = max(1, (os.cpu_count() or 1) // args.ep)
    recorded = run_distributed(_calibrate_worker, args.ep, options, timeout_s=3600,
                               threads_per_rank=threads)[0]
    calibration = build_calibration(
        recorded, t_fix=args.t_fix, pool=args.pool, target_reduction=args.target_reduction,
        q_max=args.q_max, flexible_fraction=args.flexible_fraction, source=Path(text).name,
    )
    out = args.out or Path(checkpoint) / "laser_calibration.json"
    calibration.save(out)
    print(f"{'layer':>5} {'I_topk':>7} {'q':>5} {'eps_high':>9} {'I_laser':>8} {'moved':>7}")
    for layer, stat in calibration.statistics.items():
        print(f"{layer:>5} {stat['i_topk']:7.3f} {stat['q']:5.2f} {stat['eps_high']:9.4f} "
              f"{stat['i_laser']:8.3f} {stat['moved_frac']:7.2%}")
    print(f"wrote {out}")
    if args.save_scores:
        torch.save({"layers": recorded["layers"], "model": recorded["model"], "source": str(text)},
                   args.save_scores)
        print(f"wrote {args.save_scores}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
