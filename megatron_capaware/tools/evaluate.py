"""capaware-eval: held-out quality against expert-load balance, per router setting.

Loads a Megatron MoE checkpoint once, then for every router setting runs the
same held-out token windows through it (batches of several thousand tokens
per forward: the inference-prefill regime) and reports held-out perplexity,
next-token accuracy, ``I_agg``, rank imbalance, MaxVio, dropped and rerouted
fractions, and per-layer figures; writes JSON, CSV and PNG plots.

Runs at any EP / TP: under ``torchrun``, or pass ``--ep N`` (and ``--tp``) and
it launches itself through torchrun with the right number of processes::

    capaware-eval --ep 2                       # bundled model, full router sweep
    capaware-eval --checkpoint CKPT --text held_out.txt --ep 2 \\
        --routers topk capacity-drop:gamma=1.25 laser:calibration=cal.json --json out.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from megatron_capaware._compat.cli import add_cli_flags, progress_enabled, run_cli, run_torchrun
from megatron_capaware.config import CapawareConfig
from megatron_capaware.tools import preflight
from megatron_capaware.policies.collectives import all_reduce

PROG = "capaware-eval"

DEFAULT_ROUTER_SPECS = [
    "topk",
    "capacity-drop:gamma=1.0|1.25|1.5|2.0",
    "capacity-reroute:gamma=1.0|1.25|1.5|2.0",
    "expanded-drop:gamma=1.0|1.25|1.5|2.0",
    "laser",
    # Beyond the paper: drop by share of the token's top-k mass.
    "capacity-drop:gamma=1.0|1.25|1.5|2.0,drop_policy=weight",
    "capacity-reroute:gamma=1.0|1.25,drop_policy=weight",
    "capacity-drop:gamma=1.0|1.05|1.1,unit=rank",
    "capacity-drop:gamma=0.9|1.0|1.05|1.1,unit=rank,drop_policy=weight",
]
CALIBRATION_FILE = "laser_calibration.json"
# Plans shipped beside a checkpoint (capaware-plan on its calibration text): placement-ep{EP}-r{R}.json.
PLACEMENT_GLOB = "placement-ep{ep}-r*.json"
# What runs on a placed model by default: top-k (placement alone), and with R = 0 the rank-unit drop.
DEFAULT_PLACED_ROUTER_SPECS = ["topk", "capacity-drop:gamma=1.0,unit=rank,drop_policy=weight"]


@dataclass
class EvalPlacement:
    """A placement plan the evaluation moves the experts into."""

    label: str  # the plan file's name
    path: Path
    plan: "object"  # PlacementPlan
    replica_policy: str = "least-loaded"
    in_sample: bool = False
    move_seconds: Optional[float] = None  # measured: moving the experts into this layout

    def describe(self) -> str:
        return f"placed:{self.label}" + ("" if self.replica_policy == "least-loaded" else f",{self.replica_policy}")


@dataclass
class EvalOptions:
    """What to evaluate and how (the CLI flags map onto these)."""

    checkpoint: Path
    text: Path
    tokenizer: Optional[Path] = None
    seq_len: int = 256
    sequences_per_rank: int = 16
    max_tokens: Optional[int] = None
    tensor_parallel: int = 1
    expert_parallel: int = 1
    expert_tensor_parallel: int = 1
    dispatcher: str = "alltoall"
    dtype: str = "auto"
    progress: bool = True

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]


@dataclass
class RouterResult:
    """One router setting's raw figures over the whole evaluation."""

    config: CapawareConfig
    nll: float
    tokens: int
    correct: int
    per_layer: Dict[int, Dict[str, float]]
    expert_loads: Dict[int, List[float]]
    seconds: float
    placement: Optional[EvalPlacement] = None

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else float("nan")


def default_routers(checkpoint: Path) -> List[CapawareConfig]:
    """The main comparison: top-k, the capacity routers at gamma 1.0-2.0, LASER
    (defaults, and calibrated when the checkpoint ships a calibration file)."""
    from megatron_capaware.tools.router_specs import parse_router_specs

    specs = list(DEFAULT_ROUTER_SPECS)
    calibration = Path(checkpoint) / CALIBRATION_FILE
    if calibration.exists():
        specs.append(f"laser:calibration={calibration}")
    return parse_router_specs(specs)


def _loss_and_correct(logits: torch.Tensor, labels: torch.Tensor) -> "tuple[float, int]":
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, labels.unsqueeze(-1)).sum()
    correct = (logits.argmax(dim=-1) == labels).sum()
    return float(nll), int(correct)


def placed_settings(placements: List[EvalPlacement], routers: List[CapawareConfig]
                    ) -> List["tuple[CapawareConfig, EvalPlacement]"]:
    """Every router on every placement it can run on (with replicas: topk and capacity-drop, for now)."""
    from megatron_capaware.adapters.placement import SLOT_ROUTERS

    return [(cfg, p) for p in placements for cfg in routers
            if cfg.router_type in SLOT_ROUTERS or not p.plan.redundant]


def run_evaluation(
    options: EvalOptions,
    routers: List[CapawareConfig],
    *,
    on_result: Optional[Callable[[RouterResult], None]] = None,
    placed: Optional[List["tuple[CapawareConfig, EvalPlacement]"]] = None,
) -> List[RouterResult]:
    """Evaluate every router setting on every rank (call under torch.distributed).

    ``placed``: ``(router, placement)`` settings run after ``routers``, with
    the experts moved into each placement's layout (once per placement).
    Returns the same results on every rank.
    """
    import torch.distributed as dist

    from megatron_capaware import parallel
    from megatron_capaware.adapters import collect_stats, install_capaware_routers, reduce_summaries, remove_placement
    from megatron_capaware.models.checkpoint import load_model
    from megatron_capaware.tools.text_data import check_tokenizer, load_tokenizer, rank_batches, token_windows

    parallel.init_model_parallel(
        parallel.ParallelSizes(
            options.tensor_parallel, options.expert_parallel, options.expert_tensor_parallel
        )
    )
    parallel.set_seed(0)
    from megatron.core import parallel_state as ps

    model, args = load_model(
        options.checkpoint,
        tensor_parallel=options.tensor_parallel,
        expert_parallel=options.expert_parallel,
        expert_tensor_parallel=options.expert_tensor_parallel,
        dispatcher=options.dispatcher,
        params_dtype=options.torch_dtype(),
    )
    tokenizer = load_tokenizer(options.tokenizer or options.checkpoint)
    check_tokenizer(tokenizer, args.vocab_size, options.checkpoint, options.tokenizer)
    text = Path(options.text).read_text(encoding="utf-8")
    windows = token_windows(tokenizer.encode(text), options.seq_len, options.max_tokens)
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batches = list(rank_batches(windows, options.sequences_per_rank, dp_size, dp_rank))
    if not batches:
        raise ValueError(
            f"{options.text} gives {windows.shape[0]} windows of {options.seq_len} tokens: too few for "
            f"one batch of {options.sequences_per_rank} sequences on each of {dp_size} data-parallel "
            "ranks; lower --sequences-per-rank or --seq-len, or give more text"
        )
    device = next(model.parameters()).device
    counts_once = 1.0 if ps.get_tensor_model_parallel_rank() == 0 else 0.0
    rank0 = dist.get_rank() == 0
    bar = None
    if options.progress and rank0:
        from tqdm import tqdm

        bar = tqdm(total=(len(routers) + len(placed or [])) * len(batches), desc="capaware-eval", unit="batch",
                   file=sys.stderr)
    results: List[RouterResult] = []
    settings = [(cfg, None) for cfg in routers] + list(placed or [])
    current: Optional[EvalPlacement] = None
    for config, placement in settings:
        if placement is not current:  # move the experts (every rank, same order)
            if current is not None:
                remove_placement(model)
            moving = time.perf_counter()
            install_capaware_routers(model, config, placement=placement.plan if placement else None,
                                     replica_policy=placement.replica_policy if placement else "least-loaded")
            if placement is not None:  # the cost of one rearrangement (all layers), slowest rank
                placement.move_seconds = float(all_reduce(
                    torch.tensor([time.perf_counter() - moving], dtype=torch.float64), op="max")[0])
            current = placement
        else:
            install_capaware_routers(model, config)
        for stats in collect_stats(model).values():
            stats.reset()
        nll, correct, start = 0.0, 0, time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(device)
                ids, labels = batch[:, :-1], batch[:, 1:]
                position = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
                logits = model(ids, position, attention_mask=None)
                batch_nll, batch_correct = _loss_and_correct(logits, labels)
                nll += batch_nll
                correct += batch_correct
                if bar is not None:
                    bar.set_postfix_str(config.describe() + (f" {placement.describe()}" if placement else ""))
                    bar.update(1)
        totals = torch.tensor(
            [nll * counts_once, correct * counts_once, labels.numel() * len(batches) * counts_once],
            dtype=torch.float64,
        )
        totals = all_reduce(totals)
        all_stats = collect_stats(model)
        per_layer = reduce_summaries(all_stats)
        loads = {
            layer: s.mean_loads().tolist() if s.calls else []
            for layer, s in all_stats.items()
        }
        result = RouterResult(
            config=config, nll=float(totals[0]), correct=int(totals[1]), tokens=int(totals[2]),
            per_layer=per_layer, expert_loads=loads, seconds=time.perf_counter() - start, placement=placement,
        )
        results.append(result)
        if on_result is not None and rank0:
            on_result(result)
    if bar is not None:
        bar.close()
    parallel.destroy()
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Held-out perplexity and accuracy against expert-load balance for MoE routers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="Megatron checkpoint root (default: the bundled reference model)")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="a bundled reference model by name instead of --checkpoint "
                             "(shakespeare-moe-8x2, the default; shakespeare-moe-fine-64x8)")
    parser.add_argument("--text", type=Path, default=None,
                        help="held-out text file (default: the bundled held-out works)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer file or folder (default: the checkpoint's tokenizer/)")
    parser.add_argument("--routers", nargs="+", default=None, metavar="SPEC",
                        help="router settings, e.g. topk capacity-drop:gamma=1|1.25 "
                             "capacity-reroute:gamma=1.25,rounds=2 laser:calibration=FILE "
                             "(default: top-k, the three capacity routers at gamma 1.0/1.25/1.5/2.0, "
                             "LASER default and calibrated)")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--etp", type=int, default=1, help="expert tensor parallel size")
    parser.add_argument("--dispatcher", choices=("alltoall", "allgather"), default="alltoall")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--sequences-per-rank", type=int, default=16,
                        help="sequences per forward on each data-parallel rank")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="evaluate at most this many held-out tokens per setting")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="compute dtype (auto: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--out", type=Path, default=Path("capaware-eval-results"),
                        help="folder for results.json, results.csv and plots")
    parser.add_argument("--json", type=Path, default=None, help="also write the records here")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table here")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--placement", type=Path, nargs="+", default=None, metavar="PLAN",
                        help="capaware-plan files: after the router sweep, move the experts into each plan's "
                             "layout and evaluate --placed-routers there (default: the plans shipped beside "
                             "the checkpoint for this EP size, placement-ep{EP}-r*.json)")
    parser.add_argument("--no-placement", action="store_true",
                        help="skip the placed settings (also the shipped plans)")
    parser.add_argument("--placed-routers", nargs="+", default=None, metavar="SPEC",
                        help="router settings to run on each placement (default: "
                             + " ".join(DEFAULT_PLACED_ROUTER_SPECS) + "; with replicas only topk and "
                             "capacity-drop run)")
    parser.add_argument("--replica-policy", choices=("least-loaded", "round-robin"), default="least-loaded",
                        help="which replica computes a chosen expert under a plan with redundant experts")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it draws only on a terminal anyway)")
    return add_cli_flags(parser)


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, _main, argv)


def _main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    world = args.tp * args.ep if args.etp == 1 else max(args.tp, args.etp) * args.ep

    from megatron_capaware.models import reference_models
    from megatron_capaware.tools import report
    from megatron_capaware.tools.router_specs import parse_router_specs

    checkpoint, text = reference_models.checkpoint_and_text(args.checkpoint, args.text, reference_models.HELDOUT_TEXT, model=args.model)
    routers = parse_router_specs(args.routers) if args.routers else default_routers(checkpoint)
    placements = eval_placements(args, checkpoint, text)
    placed = placed_settings(placements, parse_router_specs(args.placed_routers or DEFAULT_PLACED_ROUTER_SPECS))
    launching = "RANK" not in os.environ
    if launching:  # every mistake that can be seen before a rank starts
        preflight.check_run(checkpoint, text, args.tokenizer, routers, ep=args.ep, tp=args.tp, etp=args.etp,
                            seq_len=args.seq_len, sequences_per_rank=args.sequences_per_rank)
    if launching and world > 1:
        env = dict(os.environ)
        if not torch.cuda.is_available():
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
        return run_torchrun(PROG, world, "megatron_capaware.tools.evaluate", argv, env)
    options = EvalOptions(
        checkpoint=checkpoint, text=text, tokenizer=args.tokenizer, seq_len=args.seq_len,
        sequences_per_rank=args.sequences_per_rank, max_tokens=args.max_tokens,
        tensor_parallel=args.tp, expert_parallel=args.ep, expert_tensor_parallel=args.etp,
        dispatcher=args.dispatcher, dtype=args.dtype, progress=progress_enabled(not args.no_progress),
    )
    results = run_evaluation(options, routers, placed=placed)
    # run_evaluation has destroyed the process group by now: the launcher's RANK decides.
    if int(os.environ.get("RANK", "0")) == 0:
        records = report.make_records(results, options)
        print(report.format_table(records))
        if placed:
            print(report.format_placement(records))
        paths = report.write_outputs(records, args.out, json_path=args.json, csv_path=args.csv,
                                     plots=not args.no_plots)
        for path in paths:
            print(f"wrote {path}")
    return 0


def eval_placements(args: argparse.Namespace, checkpoint: Path, text: Path) -> List[EvalPlacement]:
    """The plans to evaluate: ``--placement``, else those shipped beside the checkpoint for ``--ep``.

    Raises:
        PlacementError: a plan for another model, expert count, layer count or EP size.
    """
    from megatron_capaware.models.checkpoint import load_model_args
    from megatron_capaware.placement import load_plan

    if args.no_placement:
        return []
    paths = list(args.placement or [])
    if not paths and args.ep > 1:
        paths = sorted(Path(checkpoint).glob(PLACEMENT_GLOB.format(ep=args.ep)),
                       key=lambda p: int(p.stem.rsplit("-r", 1)[1]) if p.stem.rsplit("-r", 1)[1].isdigit() else 0)
    model_args = load_model_args(checkpoint)
    out = []
    for path in paths:
        plan = load_plan(path)
        plan.check_model(model_args.moe_layer_numbers, model_args.num_moe_experts, args.ep)
        planned_on = plan.provenance.get("text_sha256")
        in_sample = bool(plan.provenance.get("in_sample")) or (
            planned_on is not None and planned_on == _sha256(Path(text)))
        out.append(EvalPlacement(Path(path).name, Path(path), plan, args.replica_policy, in_sample))
    return out


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
