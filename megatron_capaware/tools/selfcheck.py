"""Check the capaware routers on this launch layout (run under torchrun or srun).

Builds one Megatron MoE layer at the launched TP / EP sizes, routes a batch of
random tokens through it under every router, and checks, from what the
experts actually received after dispatch, that no expert exceeds the
capacity ``C`` and that the loads equal what the router decided. Prints a
table on rank 0; exits 1 if any check fails. A quick way to validate a new
cluster or Megatron version before a long job::

    torchrun --nproc_per_node 2 -m megatron_capaware.tools.selfcheck --ep 2
"""

from __future__ import annotations

import argparse
import sys
from typing import List

import torch

from megatron_capaware._compat.cli import add_cli_flags, run_cli
from megatron_capaware.policies.collectives import all_reduce
from megatron_capaware.registry import CAPACITY_DROP, CAPACITY_REROUTE, EXPANDED_DROP, LASER, TOPK

PROG = "python -m megatron_capaware.tools.selfcheck"


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_capaware.tools.selfcheck", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (default 1)")
    parser.add_argument("--ep", type=int, default=None, help="expert parallel size (default: world size / TP)")
    parser.add_argument("--etp", type=int, default=1, help="expert tensor parallel size (default 1)")
    parser.add_argument("--experts", type=int, default=8, help="experts E (default 8)")
    parser.add_argument("--topk", type=int, default=2, help="experts per token k (default 2)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank (default 512)")
    parser.add_argument("--gamma", type=float, default=1.0, help="capacity factor (default 1.0)")
    parser.add_argument("--dispatcher", choices=("alltoall", "allgather"), default="alltoall")
    parser.add_argument("--seed", type=int, default=0)
    return add_cli_flags(parser).parse_args(argv)


def main(argv: List[str] | None = None) -> int:
    return run_cli(PROG, _main, argv)


def _main(argv: List[str]) -> int:
    args = parse_args(argv)
    from megatron_capaware import parallel

    parallel.init_distributed()
    world = torch.distributed.get_world_size()
    ep = args.ep or max(world // args.tp, 1)
    parallel.init_model_parallel(parallel.ParallelSizes(args.tp, ep, args.etp))
    parallel.set_seed(args.seed)

    from megatron.core import parallel_state as ps

    from megatron_capaware.adapters import collect_stats, install_capaware_routers, reduce_summaries
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.models.builder import MoEModelArgs, build_moe_layer, build_transformer_config

    model_args = MoEModelArgs(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=max(args.tp, 1) * 2,
        num_moe_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.hidden,
        vocab_size=8, max_sequence_length=8,
    )
    config = build_transformer_config(
        model_args, tensor_parallel=args.tp, expert_parallel=ep, expert_tensor_parallel=args.etp,
        dispatcher=args.dispatcher,
    )
    layer = build_moe_layer(config).eval()
    device = next(layer.parameters()).device
    # Same tokens on the TP ranks of a data-parallel slice, different slices elsewhere.
    g = torch.Generator().manual_seed(args.seed + 1000 * ps.get_data_parallel_rank())
    skew = torch.linspace(1.5, 0.0, args.hidden)  # makes the gate prefer some experts
    hidden = (torch.randn(args.tokens, 1, args.hidden, generator=g) + skew).to(device, config.params_dtype)

    routers = [
        CapawareConfig(TOPK),
        CapawareConfig(CAPACITY_DROP, gamma=args.gamma),
        CapawareConfig(CAPACITY_REROUTE, gamma=args.gamma, reroute_rounds=2),
        CapawareConfig(LASER, laser_eps_high=0.9, laser_t_fix=0.3, laser_pool=2 * args.topk),
    ]
    if args.tp == 1:
        routers.insert(3, CapawareConfig(EXPANDED_DROP, gamma=args.gamma))
    failures: List[str] = []
    rows = []
    for cfg in routers:
        install_capaware_routers(layer, cfg)
        with torch.no_grad():
            layer(hidden)
        stats = collect_stats(layer)[1]
        received = stats.received[-1] // stats.duplication
        decided = stats.global_loads[-1][stats.local_experts]
        if not torch.equal(received, decided):
            failures.append(f"{cfg.describe()}: experts received {received.tolist()}, router decided {decided.tolist()}")
        cap = stats.capacity[-1]
        if cfg.uses_capacity and cap is not None and received.numel() and int(received.max()) > cap:
            failures.append(f"{cfg.describe()}: an expert received {int(received.max())} > C={cap}")
        summary = reduce_summaries({1: stats})[1]
        rows.append((cfg.describe(), summary, cap))
        stats.reset()
    flags = torch.tensor([len(failures)], dtype=torch.int64, device=device)
    flags = all_reduce(flags)
    if torch.distributed.get_rank() == 0:
        print(f"megatron-capaware selfcheck: world={world} TP={args.tp} EP={ep} ETP={args.etp} "
              f"E={args.experts} k={args.topk} tokens/rank={args.tokens} dispatcher={args.dispatcher}")
        print(f"{'router':42} {'I':>6} {'I_rank':>7} {'dropped':>8} {'rerouted':>9} {'C':>6}")
        for name, s, cap in rows:
            print(f"{name:42} {s['imbalance']:6.3f} {s['rank_imbalance']:7.3f} {s['dropped_frac']:8.2%} "
                  f"{s['rerouted_frac']:9.2%} {cap if cap is not None else '-':>6}")
    for failure in failures:
        print(f"rank {torch.distributed.get_rank()}: FAIL {failure}", file=sys.stderr)
    ok = int(flags) == 0
    if torch.distributed.get_rank() == 0:
        print("selfcheck: OK" if ok else f"selfcheck: FAILED on {int(flags)} check(s)")
    parallel.destroy()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
