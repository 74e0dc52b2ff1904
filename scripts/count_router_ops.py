"""ATen ops per MoE layer of the WHOLE router forward, every router, at EP 1, 2 and 8 (docs/benchmarks.md).

What is counted: one ``router(hidden)`` call of an installed MoE layer (Megatron's
gate GEMM, Megatron's own top-k through ``adapters/megatron_topk.py``, the
policy, the weights, the statistics recording) plus the layer's deferred score
check (``DeferredScoreCheck.maybe_check``, which the layer's forward hook runs
after the experts: one all-gather per model forward, counted here for a model
with one MoE layer, the worst case per layer), beside Megatron's own
``TopKRouter`` on the same layer. T = 2,048 tokens per rank, E = 64, k = 8,
on CPU tensors with ``CAPAWARE_DEVICE_PATH=1`` (the CUDA code path).

EP > 1 is simulated (``megatron_capaware/tools/bench/sim_dist.py``): one
thread per EP rank, each with its own copy of the router whose state is
that rank's (load group, local experts, expert ranks, stats); each collective
counts as ONE op (one NCCL launch), the simulation's own tensor work not at
all; the printed figure is the largest rank's count. Megatron's router issues
no collective at inference, so its count is the same at every EP.

It imports whichever ``megatron_capaware`` comes first on ``sys.path``, so the
same script counts an older checkout:

    python scripts/count_router_ops.py                                  # this checkout
    cd /tmp && PYTHONPATH=/path/to/old/checkout python /path/to/this/scripts/count_router_ops.py

``CAPAWARE_COMPILE=aot_eager`` runs LASER's wave segments compiled as on CUDA
(one op per compiled call; compiled once before counting). ``--scope local``
counts ``--capaware-scope local`` (the policy on this rank's tokens alone);
``--no-stats`` / ``--no-score-check`` turn those parts off. ``--json`` writes
the table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Any, Dict, List

os.environ["CAPAWARE_DEVICE_PATH"] = "1"
sys.path.insert(1, os.getcwd())

import torch  # noqa: E402
from torch.utils._python_dispatch import _disable_current_modes  # noqa: E402

T, E, K, HIDDEN = 2048, 64, 8, 64
ROUTERS: Dict[str, Dict[str, Any]] = {
    "topk": dict(router_type="topk"),
    "capacity-drop": dict(router_type="capacity-drop", gamma=1.25),
    "capacity-reroute": dict(router_type="capacity-reroute", gamma=1.25, reroute_rounds=1),
    "expanded-drop": dict(router_type="expanded-drop", gamma=1.25),
    "laser": dict(router_type="laser", laser_eps_high=0.9, laser_t_fix=0.3, laser_pool=16, laser_waves=8,
                  laser_rounds=1),
    "decode-pack": dict(router_type="decode-pack"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 8], help="simulated EP sizes")
    parser.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=list(ROUTERS))
    parser.add_argument("--scope", choices=["global", "local"], default="global")
    parser.add_argument("--no-stats", action="store_true", help="record_stats=False")
    parser.add_argument("--no-score-check", action="store_true", help="check_scores=False")
    parser.add_argument("--json", default=None, help="write the counts to this file")
    parser.add_argument("--names", action="store_true", help="print each router's ATen ops by name (EP 1)")
    return parser


def _layer():
    from megatron_capaware.models.builder import MoEModelArgs, build_moe_layer, build_transformer_config

    args = MoEModelArgs(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=E,
                        moe_router_topk=K, moe_ffn_hidden_size=8, vocab_size=8, max_sequence_length=8)
    return build_moe_layer(build_transformer_config(args), use_te=False).eval()


def _hidden(rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rank)
    return torch.randn(T, 1, HIDDEN, generator=gen) * 4


def _rank_router(router: Any, rank: int, world: int, group: Any) -> Any:
    """A copy of the installed ``router`` whose routing state is simulated EP rank ``rank`` of ``world``."""
    from megatron_capaware.adapters.stats import LayerRoutingStats
    from megatron_capaware.adapters.guards import DeferredScoreCheck

    state = router.capaware_state
    mine = copy.copy(router)  # shares the parameters; its own config and state below
    mine.config = copy.copy(router.config)
    mine.config.expert_model_parallel_size = world
    new = copy.copy(state)
    new.ep_size = world
    new.load_group = group if world > 1 else None
    per = E // world
    new.local_experts = list(range(rank * per, (rank + 1) * per))
    if state.stats is not None:
        new.stats = LayerRoutingStats(layer_number=state.stats.layer_number, num_experts=E, ep_size=world,
                                      local_experts=new.local_experts, load_group=new.load_group)
        if hasattr(state.stats, "reduce_group") and state.config.scope == "local":  # as the installer sets it
            new.stats.reduce_group = new.load_group
    if state.score_check is not None:
        new.score_check = DeferredScoreCheck(new.load_group, 1)
    for name in ("phase_stats",):
        if hasattr(new, name):
            setattr(new, name, {})
    new.build_tensors(state.device)
    mine.capaware_state = new
    return mine


def _call(router: Any, hidden: torch.Tensor) -> None:
    router(hidden)
    state = getattr(router, "capaware_state", None)
    check = getattr(state, "score_check", None)
    if check is not None:
        check.maybe_check()  # the layer's forward hook (adapters/install.py)


def count(parsed: argparse.Namespace, collectives: Any = None) -> Dict[str, Dict[str, int]]:
    """``{router: {"EP=w": ops}}`` (the largest rank's); ``collectives``: a dict filled the same way with
    the collectives per call (needs an initialised default process group of one rank, or makes one)."""
    import megatron_capaware

    if hasattr(megatron_capaware, "enable_cpu_support"):  # megatron-core 0.19 imports triton (an older
        megatron_capaware.enable_cpu_support()  # checkout without it runs on 0.16 only)
    from megatron_capaware import parallel
    from megatron_capaware.adapters import install_capaware_routers
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.tools.bench import sim_dist
    from megatron_capaware.tools.bench.launch_count import count_call, count_device_work
    from megatron_capaware.tools.bench.sim_dist import run_ranks

    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        parallel.init_model_parallel(parallel.ParallelSizes(), timeout_s=120)
    parallel.set_seed(0)
    layer = _layer()
    out: Dict[str, Dict[str, int]] = {}
    with torch.no_grad():
        hidden = _hidden(0)
        layer.router(hidden)
        megatron = count_call(lambda: layer.router(hidden))
        out["TopKRouter (Megatron)"] = {f"EP={w}": megatron.ops for w in parsed.ep}
        if parsed.names:
            print("TopKRouter:", " ".join(megatron.op_names))
        routers = {}
        for name in parsed.routers:
            cfg = CapawareConfig(**ROUTERS[name], scope=parsed.scope, record_stats=not parsed.no_stats,
                                 check_scores=not parsed.no_score_check)
            fresh = _layer()
            fresh.load_state_dict(layer.state_dict())
            install_capaware_routers(fresh, cfg)
            routers[name] = fresh.router
    works: Dict[int, Any] = {}
    real = {n: getattr(sim_dist._SimDist, n) for n in ("all_reduce", "all_gather")}

    def counted(n: str):
        def coll(*a: Any, **kw: Any) -> None:
            with _disable_current_modes():
                real[n](*a, **kw)
            work = works.get(sim_dist._local.rank)
            if work is not None:
                work.ops += 1
                work.op_names.append(f"collective:{n}")
        return staticmethod(coll)

    for n in real:
        setattr(sim_dist._SimDist, n, counted(n))
    for world in parsed.ep:
        copies: List[Dict[str, Any]] = [{} for _ in range(world)]

        def rank_fn(rank: int, group: Any) -> Dict[str, Any]:
            result: Dict[str, Any] = {}
            hidden = _hidden(rank)
            with torch.no_grad():
                for name, router in routers.items():
                    mine = copies[rank].setdefault(name, _rank_router(router, rank, world, group))
                    works.pop(rank, None)
                    _call(mine, hidden)  # warm: compile (when asked), caches
                    with count_device_work() as work:
                        works[rank] = work
                        _call(mine, hidden)
                    works.pop(rank, None)
                    result[name] = (work.ops, sum(n.startswith("collective:") for n in work.op_names))
                    if parsed.names and rank == 0 and world == parsed.ep[0]:
                        print(f"{name}:", " ".join(work.op_names))
            return result

        per_rank = run_ranks(rank_fn, world, timeout_s=600)
        for name in routers:
            out.setdefault(name, {})[f"EP={world}"] = max(r[name][0] for r in per_rank)
            if collectives is not None:
                collectives.setdefault(name, {})[f"EP={world}"] = max(r[name][1] for r in per_rank)
    for n in real:
        setattr(sim_dist._SimDist, n, staticmethod(real[n]))
    if owned:
        parallel.destroy()
    return out


def main(argv: Any = None) -> int:
    parsed = build_parser().parse_args(argv)
    calls: Dict[str, Dict[str, int]] = {}
    table = count(parsed, calls)
    compile_mode = os.environ.get("CAPAWARE_COMPILE", "")
    print(f"ATen ops per MoE layer, whole router forward, T={T} E={E} k={K}, scope={parsed.scope}, "
          f"stats={'off' if parsed.no_stats else 'on'}, score check={'off' if parsed.no_score_check else 'on'}, "
          f"CAPAWARE_COMPILE={compile_mode!r}")
    heads = [f"EP={w}" for w in parsed.ep]
    print(f"| router | {' | '.join(heads)} | collectives per call at {' / '.join(heads)} |")
    print("|---|" + "---|" * (len(heads) + 1))
    for name, row in table.items():
        coll = " / ".join(str(calls.get(name, {}).get(h, 0)) for h in heads)
        print(f"| {name} | {' | '.join(str(row[h]) for h in heads)} | {coll} |")
    if parsed.json:
        with open(parsed.json, "w") as f:
            json.dump({"T": T, "E": E, "k": K, "scope": parsed.scope, "stats": not parsed.no_stats,
                       "score_check": not parsed.no_score_check, "compile": compile_mode, "ops": table,
                       "collectives": calls}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
