"""ATen ops per MoE layer of each routing policy on the device path (docs/benchmarks.md).

The policy call alone; ``scripts/count_router_ops.py`` counts the whole router (Megatron's top-k,
weights, stats, score check) at EP 1, 2 and 8.

T = 2,048 tokens per rank, E = 64, k = 8, the policy call as the router makes
it (``tests/test_device_path.py``, whose budget test counts the same way), on
CPU tensors with ``CAPAWARE_DEVICE_PATH=1``: alone (EP = 1) and on 2 simulated
EP ranks (``megatron_capaware/tools/bench/sim_dist.py``), where each collective counts as one op and
the simulation's own tensor work is not counted. It imports whichever
``megatron_capaware`` comes first on ``sys.path``, so the same script counts
an older checkout:

    python scripts/count_policy_ops.py                                  # this checkout
    cd /tmp && PYTHONPATH=/path/to/old/checkout python /path/to/this/scripts/count_policy_ops.py

The counts are eager (the CPU default). ``CAPAWARE_COMPILE=aot_eager`` (or
``1`` for inductor) runs the compiled segments as CUDA does
(``policies/compiled.py``): LASER's wave segments then count one op per
compiled call; the script compiles them once before counting. A checkout
without compiled segments ignores the variable.
"""
import os
import sys

os.environ["CAPAWARE_DEVICE_PATH"] = "1"
sys.path.insert(1, os.getcwd())

import torch  # noqa: E402
from torch.utils._python_dispatch import _disable_current_modes  # noqa: E402

from megatron_capaware import policies as P
from megatron_capaware.tools.bench.launch_count import count_call, count_device_work
from megatron_capaware.tools.bench import sim_dist
from megatron_capaware.tools.bench.sim_dist import run_ranks
T, E, K = 2048, 64, 8


def scores_of(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(T, E, generator=gen) * 2 + torch.linspace(2, 0, E), -1)


def calls(scores, group):
    indices = torch.topk(scores, K, dim=1).indices
    local = P.local_experts_tensor(list(range(8)), E, scores.device)
    ranks = P.expert_rank_map(E, 8, scores.device)  # decode-pack: EP 8's layout (the router builds it once)
    c = dict(normalize=True, check_values=False, topk_indices=indices, weights=False, return_decision=True, group=group)
    return {"topk": lambda: P.topk(scores, K, normalize=True, check_values=False, topk_indices=indices, return_decision=True, group=group),
            "capacity-drop": lambda: P.capacity_drop(scores, K, 1.25, **c),
            "capacity-reroute": lambda: P.capacity_reroute(scores, K, 1.25, rounds=1, **c),
            "expanded-drop": lambda: P.expanded_drop(scores, K, 1.25, local, **c),
            "laser": lambda: P.laser(scores, K, 0.9, 0.3, 16, waves=8, rounds=1, **c),
            "decode-pack": lambda: P.decode_pack(scores, K, 2, expert_ranks=ranks, num_ranks=8, **c),
            "decode-pack-pool16": lambda: P.decode_pack(scores, K, 2, t_fix=0.2, pool=16, expert_ranks=ranks,
                                                        num_ranks=8, **c)}
for f in calls(scores_of(0), None).values():  # compile (when asked) outside the count
    f()
alone = {n: count_call(f).ops for n, f in calls(scores_of(0), None).items()}
run_ranks(lambda rank, group: [f() for f in calls(scores_of(rank), group).values()], 2, timeout_s=300)
works = {}
real = {n: getattr(sim_dist._SimDist, n) for n in ("all_reduce", "all_gather")}


def counted(n):
    def coll(*a, **kw):
        with _disable_current_modes():
            real[n](*a, **kw)
        works[sim_dist._local.rank].ops += 1
    return staticmethod(coll)
for n in real:
    setattr(sim_dist._SimDist, n, counted(n))


def rank_fn(rank, group):
    out = {}
    for n, f in calls(scores_of(rank), group).items():
        with count_device_work() as w:
            works[rank] = w
            f()
        out[n] = w.ops
    return out
ep = run_ranks(rank_fn, 2)
print(f"CAPAWARE_COMPILE={os.environ.get('CAPAWARE_COMPILE', '')!r}")
for n in alone:
    print(f"{n:18s} EP=1 {alone[n]:4d}  EP=2 {max(r[n] for r in ep):4d}")
