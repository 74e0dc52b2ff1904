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
    capaware-eval --ep 2 --routers topk capacity-drop:gamma=1,unit=rank --decode 16

``--decode BATCH`` adds single-token decode steps of BATCH sequences through
Megatron's KV cache (:func:`decode_config`): activated experts per EP rank,
token loads and teacher-forced quality per router (``decode_*`` columns,
docs/decode.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from megatron_capaware._compat.cli import add_cli_flags, progress_enabled, run_cli, run_torchrun
from megatron_capaware.config import CapawareConfig
from megatron_capaware.tools import preflight
from megatron_capaware.policies.collectives import all_reduce
from megatron_capaware.registry import LASER, TOPK

PROG = "capaware-eval"

DEFAULT_ROUTER_SPECS = [
    TOPK,
    "capacity-drop:gamma=1.0|1.25|1.5|2.0",
    "capacity-reroute:gamma=1.0|1.25|1.5|2.0",
    "expanded-drop:gamma=1.0|1.25|1.5|2.0",
    LASER,
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
DEFAULT_PLACED_ROUTER_SPECS = [TOPK, "capacity-drop:gamma=1.0,unit=rank,drop_policy=weight"]


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
    # --decode BATCH: also single-token decode steps of BATCH sequences (decode_config)
    decode_batch: Optional[int] = None
    decode_prompt_len: int = 128
    decode_steps: int = 32
    decode_rounds: int = 4

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
    # Per layer, the mean global load of each physical slot [S] (the experts themselves on Megatron's
    # contiguous layout): what each EP rank computed, for the heatmaps.
    slot_loads: Optional[Dict[int, List[float]]] = None
    placement: Optional[EvalPlacement] = None
    decode: Optional[Dict[str, Any]] = None

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
    """Every router on every placement it can run on (with replicas: all but LASER, for now)."""
    from megatron_capaware.adapters.placement import SLOT_ROUTERS

    return [(cfg, p) for p in placements for cfg in routers
            if cfg.router_type in SLOT_ROUTERS or not p.plan.redundant]


@dataclass
class EvalSession:
    """A loaded model and this rank's batches, evaluated setting after setting (see :func:`open_session`)."""

    options: EvalOptions
    model: torch.nn.Module
    model_args: Any
    batches: List[torch.Tensor]
    device: torch.device
    counts_once: float
    rank0: bool
    windows: torch.Tensor
    dp_size: int
    dp_rank: int


def open_session(options: EvalOptions) -> EvalSession:
    """Initialise the model-parallel groups, load the model once and cut the text into this rank's batches
    (call under torch.distributed, every rank; :func:`close_session` when done)."""
    from megatron_capaware import parallel
    from megatron_capaware.models.checkpoint import load_model
    from megatron_capaware.tools.text_data import check_tokenizer, load_tokenizer, rank_batches, token_windows

    import torch.distributed as dist

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
    token_ids = tokenizer.encode(text)
    windows = token_windows(token_ids, options.seq_len, options.max_tokens)
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batches = list(rank_batches(windows, options.sequences_per_rank, dp_size, dp_rank))
    if not batches:
        raise ValueError(
            f"{options.text} gives {windows.shape[0]} windows of {options.seq_len} tokens: too few for "
            f"one batch of {options.sequences_per_rank} sequences on each of {dp_size} data-parallel "
            "ranks; lower --sequences-per-rank or --seq-len, or give more text"
        )
    decode_windows = windows
    if options.decode_batch:
        decode_windows = token_windows(token_ids, options.decode_prompt_len + options.decode_steps)
    return EvalSession(
        options=options, model=model, model_args=args, batches=batches,
        device=next(model.parameters()).device,
        counts_once=1.0 if ps.get_tensor_model_parallel_rank() == 0 else 0.0,
        rank0=dist.get_rank() == 0, windows=decode_windows, dp_size=dp_size, dp_rank=dp_rank,
    )


def close_session(session: EvalSession) -> None:
    from megatron_capaware import parallel

    parallel.destroy()


def evaluate_config(
    session: EvalSession, config: CapawareConfig, *, batches: Optional[List[torch.Tensor]] = None,
    bar: Any = None,
) -> RouterResult:
    """One router setting over the session's batches (or ``batches``): the same figures on every rank."""
    from megatron_capaware.adapters import collect_stats, install_capaware_routers, reduce_summaries

    model, device = session.model, session.device
    batches = session.batches if batches is None else batches
    install_capaware_routers(model, config)
    for stats in collect_stats(model).values():
        stats.reset()
    nll, correct, predicted, start = 0.0, 0, 0, time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            batch = batch.to(device)
            ids, labels = batch[:, :-1], batch[:, 1:]
            position = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
            logits = model(ids, position, attention_mask=None)
            batch_nll, batch_correct = _loss_and_correct(logits, labels)
            nll += batch_nll
            correct += batch_correct
            predicted += labels.numel()
            if bar is not None:
                bar.set_postfix_str(config.describe())
                bar.update(1)
    c = session.counts_once
    totals = all_reduce(torch.tensor([nll * c, correct * c, predicted * c], dtype=torch.float64))
    all_stats = collect_stats(model)
    per_layer = reduce_summaries(all_stats)
    loads = {layer: s.mean_loads().tolist() if s.calls else [] for layer, s in all_stats.items()}
    slot_loads = {layer: torch.stack(s.slot_loads()).double().mean(0).tolist() if s.slot_loads() else []
                  for layer, s in all_stats.items()}  # (the calls kept: the last max_records)
    result = RouterResult(
        config=config, nll=float(totals[0]), correct=int(totals[1]), tokens=int(totals[2]),
        per_layer=per_layer, expert_loads=loads, seconds=time.perf_counter() - start, slot_loads=slot_loads,
    )
    if session.options.decode_batch:
        result.decode = decode_config(session, config)
    return result


def decode_config(session: EvalSession, config: CapawareConfig) -> Dict[str, Any]:
    """Single-token decode steps of ``decode_batch`` sequences under ``config`` (teacher-forced).

    Each round takes ``decode_batch`` held-out windows (split over the
    data-parallel ranks), prefills their first ``decode_prompt_len`` tokens
    under **top-k** routing into Megatron's KV cache (``StaticInferenceContext``;
    the same cache for every router), then runs ``decode_steps`` forward calls
    of one token per sequence under ``config``, feeding the true next token
    (teacher forcing) and scoring the prediction of the one after. So every
    MoE call the figures cover holds exactly one token per sequence. Per call
    and layer, the activated experts of each EP rank are the experts with
    load > 0 among its ``E/EP``; reported as the max and the mean over ranks,
    averaged over calls and layers.
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_capaware.adapters import collect_stats, install_capaware_routers

    opts, model, device = session.options, session.model, session.device
    per_rank = opts.decode_batch // session.dp_size
    prompt, steps = opts.decode_prompt_len, opts.decode_steps
    rounds = min(opts.decode_rounds, session.windows.shape[0] // opts.decode_batch)
    if rounds < 1:
        raise ValueError(
            f"{opts.text} gives {session.windows.shape[0]} windows of {prompt + steps + 1} tokens: fewer than "
            f"--decode {opts.decode_batch} sequences; lower --decode, --decode-prompt-len or --decode-steps"
        )
    nll, correct, scored = 0.0, 0, 0
    topk = CapawareConfig(TOPK, record_stats=False)
    # Per layer, over every decode call of every round: global loads [E], requested, local drops / reroutes.
    calls: Dict[int, Dict[str, list]] = {}
    start = time.perf_counter()
    with torch.no_grad():
        for r in range(rounds):
            first = r * opts.decode_batch + session.dp_rank * per_rank
            window = session.windows[first:first + per_rank].to(device)  # [b, prompt + steps + 1]
            position = torch.arange(window.shape[1] - 1, device=device).unsqueeze(0).expand(per_rank, -1)
            context = StaticInferenceContext(per_rank, prompt + steps)
            install_capaware_routers(model, topk)
            model(window[:, :prompt], position[:, :prompt], attention_mask=None, inference_context=context,
                  runtime_gather_output=True)
            context.increment_sequence_len_offset(prompt)
            context.enable_decode_mode()
            installed = install_capaware_routers(model, config)  # fresh stats: decode calls only
            for stats in installed.values():
                stats.max_records = max(stats.max_records, steps + 1)
            step_logits = []
            for j in range(prompt, prompt + steps):
                step_logits.append(model(window[:, j:j + 1], position[:, j:j + 1], attention_mask=None,
                                         inference_context=context, runtime_gather_output=True))
                context.increment_sequence_len_offset(1)
            logits = torch.cat(step_logits, dim=1)  # [b, steps, V]
            step_nll, step_correct = _loss_and_correct(logits, window[:, prompt + 1:prompt + steps + 1])
            nll, correct, scored = nll + step_nll, correct + step_correct, scored + per_rank * steps
            for layer, stats in collect_stats(model).items():
                entry = calls.setdefault(layer, {"loads": [], "requested": [], "dropped": [], "rerouted": [],
                                                 "group": stats.load_group})
                for key in ("requested", "dropped", "rerouted"):
                    entry[key].extend(getattr(stats, key))
                entry["loads"].extend(stats.global_loads)
                entry.setdefault("slot_loads", []).extend(stats.slot_loads())  # the physical layout's
    c = session.counts_once
    totals = all_reduce(torch.tensor([nll * c, correct * c, scored * c], dtype=torch.float64))
    from megatron_capaware import metrics
    from megatron_capaware.policies.collectives import all_reduce_sum

    ep = opts.expert_parallel
    per_layer: Dict[str, Dict[str, float]] = {}
    summaries: Dict[int, Dict[str, float]] = {}
    for layer, entry in sorted(calls.items()):
        slots = torch.stack(entry["slot_loads"])  # [calls, S]: one token per sequence per call
        active = (slots.view(slots.shape[0], ep, -1) > 0).sum(dim=2).double()  # [calls, EP]: slots in use
        counts = all_reduce_sum(torch.tensor([sum(entry["dropped"]), sum(entry["rerouted"])], dtype=torch.int64),
                                entry["group"])
        summary = metrics.summarize_calls(entry["loads"], entry["requested"], [int(counts[0])],
                                          [int(counts[1])], ep, entry["slot_loads"])
        summaries[layer] = summary
        per_layer[str(layer)] = {"active_max": float(active.max(dim=1).values.mean()),
                                 "active_mean": float(active.mean()),
                                 "active_total": float(active.sum(dim=1).mean()),
                                 "rank_peak_load": summary.get("rank_peak_load"),
                                 "dropped_frac": summary["dropped_frac"]}
    agg = metrics.aggregate_layers(summaries)
    mean = lambda key: sum(v[key] for v in per_layer.values()) / len(per_layer)  # noqa: E731
    tokens = float(totals[2])
    return {
        "decode_batch": opts.decode_batch, "decode_prompt_len": prompt, "decode_steps": steps,
        "decode_rounds": rounds, "decode_tokens": int(tokens),
        "decode_ppl": math.exp(float(totals[0]) / tokens) if tokens else float("nan"),
        "decode_accuracy": float(totals[1]) / tokens if tokens else float("nan"),
        "decode_active_max": mean("active_max"), "decode_active_mean": mean("active_mean"),
        "decode_active_total": mean("active_total"),
        "decode_rank_peak_load": agg.get("rank_peak_load"), "decode_i_agg": agg.get("i_agg"),
        "decode_dropped_frac": agg.get("dropped_frac"), "decode_rerouted_frac": agg.get("rerouted_frac"),
        "decode_per_layer": per_layer, "decode_seconds": time.perf_counter() - start,
    }


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
    from megatron_capaware.adapters import install_capaware_routers, remove_placement

    session = open_session(options)
    bar = None
    if options.progress and session.rank0:
        from tqdm import tqdm

        bar = tqdm(total=(len(routers) + len(placed or [])) * len(session.batches), desc="capaware-eval",
                   unit="batch", file=sys.stderr)
    results: List[RouterResult] = []
    settings = [(cfg, None) for cfg in routers] + list(placed or [])
    current: Optional[EvalPlacement] = None
    for config, placement in settings:
        if placement is not current:  # move the experts (every rank, same order); evaluate_config keeps them
            if current is not None:
                remove_placement(session.model)
            if placement is not None:
                moving = time.perf_counter()
                install_capaware_routers(session.model, config, placement=placement.plan,
                                         replica_policy=placement.replica_policy)
                # The cost of one rearrangement (all layers), on the slowest rank.
                placement.move_seconds = float(all_reduce(
                    torch.tensor([time.perf_counter() - moving], dtype=torch.float64), op="max")[0])
            current = placement
        result = evaluate_config(session, config, bar=bar)
        result.placement = placement
        results.append(result)
        if on_result is not None and session.rank0:
            on_result(result)
    if bar is not None:
        bar.close()
    close_session(session)
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
                             + " ".join(DEFAULT_PLACED_ROUTER_SPECS) + "; with replicas every router but LASER "
                             "runs)")
    parser.add_argument("--replica-policy", choices=("least-loaded", "round-robin"), default="least-loaded",
                        help="which replica computes a chosen expert under a plan with redundant experts")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it draws only on a terminal anyway)")
    parser.add_argument("--decode", type=int, default=None, metavar="BATCH",
                        help="also evaluate single-token decode steps of BATCH sequences (global batch; "
                             "prompts from the text, prefilled under top-k into a KV cache): activated "
                             "experts per EP rank, token loads and teacher-forced quality per router")
    parser.add_argument("--decode-prompt-len", type=int, default=128, help="prompt tokens per decoded sequence")
    parser.add_argument("--decode-steps", type=int, default=32, help="single-token decode steps per round")
    parser.add_argument("--decode-rounds", type=int, default=4,
                        help="rounds of BATCH fresh prompts (fewer if the text runs out)")
    return add_cli_flags(parser)


def check_decode(args: argparse.Namespace, checkpoint: Path, text: Path, dp_size: int) -> None:
    """``--decode`` and its sizes against the model and the text (before any rank starts).

    Raises:
        UserInputError: naming the flag and the fix.
    """
    from megatron_capaware._compat.cli import UserInputError
    from megatron_capaware.models.checkpoint import load_model_args
    from megatron_capaware.tools.text_data import load_tokenizer

    batch = args.decode
    if batch < 1 or batch % dp_size:
        raise UserInputError(
            f"--decode {batch} is invalid: the decode batch is split over the {dp_size} data-parallel ranks, "
            f"so it must be a positive multiple of {dp_size}"
        )
    for name, value in (("--decode-prompt-len", args.decode_prompt_len), ("--decode-steps", args.decode_steps),
                        ("--decode-rounds", args.decode_rounds)):
        if value < 1:
            raise UserInputError(f"{name} {value} is invalid: it must be an integer >= 1")
    limit = load_model_args(checkpoint).max_sequence_length
    if args.decode_prompt_len + args.decode_steps > limit:
        raise UserInputError(
            f"--decode-prompt-len {args.decode_prompt_len} + --decode-steps {args.decode_steps} exceeds the "
            f"model's {limit} positions; lower one of them"
        )
    tokens = len(load_tokenizer(Path(args.tokenizer) if args.tokenizer else checkpoint).encode(
        Path(text).read_text(encoding="utf-8", errors="replace")))
    need = batch * (args.decode_prompt_len + args.decode_steps) + 1
    if tokens < need:
        raise UserInputError(
            f"--decode {batch} needs {need} tokens of text ({batch} windows of {args.decode_prompt_len} prompt + "
            f"{args.decode_steps} decoded tokens) but {text} has {tokens}; lower --decode or the lengths"
        )


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
    launching = "RANK" not in os.environ
    if launching:  # every mistake that can be seen before a rank starts
        preflight.check_run(checkpoint, text, args.tokenizer, routers, ep=args.ep, tp=args.tp, etp=args.etp,
                            seq_len=args.seq_len, sequences_per_rank=args.sequences_per_rank)
        if args.decode is not None:
            check_decode(args, checkpoint, text, max(1, world // args.tp))
    placements = eval_placements(args, checkpoint, text)  # plans checked against the model before any rank
    placed = placed_settings(placements, parse_router_specs(args.placed_routers or DEFAULT_PLACED_ROUTER_SPECS))
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
        decode_batch=args.decode, decode_prompt_len=args.decode_prompt_len, decode_steps=args.decode_steps,
        decode_rounds=args.decode_rounds,
    )
    results = run_evaluation(options, routers, placed=placed)
    # run_evaluation has destroyed the process group by now: the launcher's RANK decides.
    if int(os.environ.get("RANK", "0")) == 0:
        records = report.make_records(results, options)
        print(report.format_table(records))
        if options.decode_batch:
            print()
            print(report.format_decode_table(records))
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
    if not paths:
        return []
    model_args = load_model_args(checkpoint)  # (the preflight names a bad checkpoint; plans need it readable)
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
