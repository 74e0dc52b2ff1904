"""Checks a tool runs in the launching process, before any rank is spawned.

Everything that can be known from the command line, the checkpoint's model
description and the text is checked here, so a mistake is one line in the
parent instead of a traceback per rank (:mod:`megatron_capaware._compat.cli`).
No Megatron import, no process group.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from megatron_capaware._compat.cli import UserInputError
from megatron_capaware.config import CapawareConfig, load_calibration
from megatron_capaware.registry import LASER


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_parallel_sizes(model_args, *, ep: int, tp: int, etp: int) -> None:
    """EP, TP and expert-TP sizes against the model: each must divide what it splits.

    Raises:
        UserInputError: naming the size, what it must divide, and the sizes that would.
    """
    for name, value in (("--ep", ep), ("--tp", tp), ("--etp", etp)):
        if value < 1:
            raise UserInputError(f"{name} {value} is invalid: parallel sizes are integers >= 1")
    experts = model_args.num_moe_experts
    if experts % ep:
        raise UserInputError(
            f"--ep {ep} does not divide the model's {experts} experts: expert parallelism puts "
            f"{experts}/EP experts on each rank; use --ep {_divisors(experts)}"
        )
    heads = model_args.num_attention_heads
    if heads % tp:
        raise UserInputError(
            f"--tp {tp} does not divide the model's {heads} attention heads; use --tp {_divisors(heads)}"
        )
    groups = model_args.num_query_groups or heads
    if groups % tp:
        raise UserInputError(
            f"--tp {tp} does not divide the model's {groups} query groups; use --tp {_divisors(groups)}"
        )
    ffn = model_args.moe_ffn_hidden_size
    if ffn % etp:
        raise UserInputError(
            f"--etp {etp} does not divide the experts' FFN size {ffn}; use --etp {_divisors(ffn)}"
        )


def check_text(text: Path, tokenizer_source: Path, *, seq_len: int, sequences_per_rank: int, dp_size: int) -> int:
    """The text exists and holds at least one full batch; returns its token count.

    Raises:
        UserInputError: missing / empty file, or fewer tokens than one batch needs.
    """
    from megatron_capaware.tools.text_data import load_tokenizer

    if seq_len < 1 or sequences_per_rank < 1:
        raise UserInputError(
            f"--seq-len {seq_len} and --sequences-per-rank {sequences_per_rank} must both be >= 1"
        )
    if not text.is_file():
        raise UserInputError(f"the text {text} does not exist or is not a file; pass --text with a UTF-8 text file")
    tokens = len(load_tokenizer(tokenizer_source).encode(text.read_text(encoding="utf-8", errors="replace")))
    needed = seq_len * sequences_per_rank * dp_size + 1
    if tokens < needed:
        raise UserInputError(
            f"the text {text} has {tokens} tokens but one batch needs {needed} "
            f"({sequences_per_rank} sequences of {seq_len} tokens on each of {dp_size} data-parallel "
            "ranks, + 1): give a longer --text, or a smaller --seq-len / --sequences-per-rank"
        )
    return tokens


def check_routers(routers: Sequence[CapawareConfig], model_args) -> None:
    """Every router setting against the model: top-k, pool sizes, calibration files.

    Raises:
        CapawareConfigError: as the router would at install, naming the setting.
    """
    layers: List[int] = list(model_args.moe_layer_numbers)
    for cfg in routers:
        cfg.validate(num_experts=model_args.num_moe_experts, topk=model_args.moe_router_topk,
                     score_function=model_args.moe_router_score_function)
        if cfg.router_type == LASER and cfg.laser_calibration:
            load_calibration(cfg.laser_calibration).check_model(
                layers, model_args.num_moe_experts, model_args.moe_router_topk
            )


def check_run(
    checkpoint: Path,
    text: Path,
    tokenizer: Optional[Path],
    routers: Sequence[CapawareConfig],
    *,
    ep: int,
    tp: int,
    etp: int,
    seq_len: int,
    sequences_per_rank: int,
) -> None:
    """All of the above for an evaluation or calibration run (data-parallel size from the sizes)."""
    from megatron_capaware.models.checkpoint import load_model_args

    if not Path(checkpoint).is_dir():
        raise UserInputError(
            f"the checkpoint {checkpoint} does not exist or is not a folder; pass --checkpoint a "
            "megatron-capaware checkpoint root (holding capaware_model.json), or omit it for the bundled model"
        )
    model_args = load_model_args(checkpoint)
    check_parallel_sizes(model_args, ep=ep, tp=tp, etp=etp)
    check_routers(routers, model_args)
    world = tp * ep if etp == 1 else max(tp, etp) * ep
    check_text(Path(text), Path(tokenizer) if tokenizer else Path(checkpoint),
               seq_len=seq_len, sequences_per_rank=sequences_per_rank, dp_size=max(1, world // tp))
