"""Soak run: many forwards through the capaware routers, with each rank's RSS sampled.

Two modes, both on ``--ep`` local gloo ranks (CPU) or under torchrun:

* ``forward`` (default): a tiny GPT MoE with random weights; ``--forwards``
  forwards of varying shapes (decode-sized T=1 per sequence up to prefill-
  sized batches), the router setting changing every ``--switch-every``
  forwards (``install_capaware_routers`` again, as an evaluation sweep does),
  the routers' stats reset every ``--reset-every`` forwards (0: never, to
  see what the recorded stats cost).
* ``eval``: ``--rounds`` calls of :func:`megatron_capaware.tools.evaluate.run_evaluation`
  on ``--checkpoint`` / ``--text`` (model load, process-group set-up and
  teardown each round), every router of ``--routers`` each round.

A thread samples the process's RSS (psutil) every ``--sample-s`` seconds and
at start, after the warm-up and at the end; the report gives, per rank,
RSS at start / after warm-up / at the end, the growth after warm-up and the
fitted growth per 1000 forwards. Exit status 1 if any rank grew more than
``--max-growth-mb`` after warm-up.

    python scripts/soak_eval.py --ep 2 --forwards 5000 --json soak.json
    python scripts/soak_eval.py --mode eval --ep 2 --checkpoint CKPT --text heldout.txt --rounds 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

DEFAULT_ROUTERS = [
    "topk", "capacity-drop:gamma=1.0", "capacity-reroute:gamma=1.0,rounds=2", "expanded-drop:gamma=1.25",
    "laser:eps_high=0.9,t_fix=0.2,pool=4",
]


class RssSampler:
    """Samples this process's RSS in a thread: ``(seconds, rss_bytes, forwards)``."""

    def __init__(self, every_s: float) -> None:
        import psutil

        self.process = psutil.Process(os.getpid())
        self.every_s = every_s
        self.forwards = 0
        self.samples: List[List[float]] = []
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        rss = self.process.memory_info().rss
        self.samples.append([time.monotonic() - self.start, rss, self.forwards])
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> "RssSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _count_forwards(sampler: RssSampler):
    """A global forward hook counting top-level GPT forwards."""
    import torch

    def hook(module, inputs, output):
        if type(module).__name__ == "GPTModel":
            sampler.forwards += 1

    return torch.nn.modules.module.register_module_forward_hook(hook)


def _summary(sampler: RssSampler, warmup_forwards: int, warm_rss: Optional[int]) -> Dict[str, Any]:
    samples = sampler.samples
    mb = 1 / (1 << 20)
    start, end = samples[0][1], samples[-1][1]
    warm = warm_rss if warm_rss is not None else start
    after = [s for s in samples if s[2] >= warmup_forwards]
    slope = None
    if len(after) >= 3 and after[-1][2] > after[0][2]:
        xs = [s[2] for s in after]
        ys = [s[1] for s in after]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        if var > 0:
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var  # bytes per forward
    return {
        "forwards": sampler.forwards,
        "seconds": samples[-1][0],
        "rss_start_mb": start * mb,
        "rss_after_warmup_mb": warm * mb,
        "rss_end_mb": end * mb,
        "rss_peak_mb": max(s[1] for s in samples) * mb,
        "growth_after_warmup_mb": (end - warm) * mb,
        "growth_per_1000_forwards_mb": slope * 1000 * mb if slope is not None else None,
        "samples": [[round(t, 2), round(r * mb, 2), f] for t, r, f in samples],
    }


def _round_diagnostics(sampler: RssSampler, malloc_trim: bool) -> Dict[str, Any]:
    """After a round: live Python objects and tensors (after gc), RSS, and RSS after
    ``malloc_trim`` (what the allocator holds but does not use is not a leak)."""
    import gc

    import torch

    gc.collect()
    objects = gc.get_objects()
    tensors = sum(1 for o in objects if isinstance(o, torch.Tensor))
    import torch.distributed as dist

    groups = len(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else 0
    out = {"forwards": sampler.forwards, "objects": len(objects), "tensors": tensors,
           "process_groups": groups, "rss_mb": sampler.sample() / (1 << 20)}
    if malloc_trim:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        out["rss_after_trim_mb"] = sampler.sample() / (1 << 20)
    return out


def forward_worker(opts: Dict[str, Any]) -> Dict[str, Any]:
    """Mode ``forward`` on one rank (call on every rank)."""
    import torch

    from megatron_capaware import parallel
    from megatron_capaware.adapters import collect_stats, install_capaware_routers
    from megatron_capaware.models.builder import MoEModelArgs, build_gpt_model, build_transformer_config
    from megatron_capaware.tools.router_specs import parse_router_specs

    parallel.init_model_parallel(parallel.ParallelSizes(expert_parallel=opts["ep"]))
    parallel.set_seed(0)
    rank = torch.distributed.get_rank()
    args = MoEModelArgs(num_layers=opts["layers"], hidden_size=opts["hidden"], num_attention_heads=4,
                        num_moe_experts=opts["experts"], moe_router_topk=opts["topk"],
                        moe_ffn_hidden_size=opts["hidden"], vocab_size=256, max_sequence_length=256)
    model = build_gpt_model(args, build_transformer_config(args, expert_parallel=opts["ep"]))
    with torch.no_grad():  # a skewed gate, as trained ones are: the routers have work to do
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.mul_(8.0)
    routers = parse_router_specs(opts["routers"])
    # Decode-like (1 token per sequence, many sequences) to prefill-like shapes.
    shapes = [(16, 1), (64, 1), (1, 1), (4, 16), (8, 32), (2, 128)]
    g = torch.Generator().manual_seed(1000 + rank)
    warm_rss = None
    with RssSampler(opts["sample_s"]) as sampler:
        for i in range(opts["forwards"]):
            if i % opts["switch_every"] == 0:
                install_capaware_routers(model, routers[(i // opts["switch_every"]) % len(routers)])
            if opts["reset_every"] and i % opts["reset_every"] == 0:
                for stats in collect_stats(model).values():
                    stats.reset()
            batch, seq = shapes[i % len(shapes)]
            ids = torch.randint(0, args.vocab_size, (batch, seq), generator=g)
            pos = torch.arange(seq).unsqueeze(0).expand(batch, seq)
            with torch.no_grad():
                model(ids, pos, attention_mask=None)
            sampler.forwards += 1
            if sampler.forwards == opts["warmup"]:
                warm_rss = sampler.sample()
    parallel.destroy()
    out = _summary(sampler, opts["warmup"], warm_rss)
    out.update(rank=rank, mode="forward")
    return out


def eval_worker(opts: Dict[str, Any]) -> Dict[str, Any]:
    """Mode ``eval`` on one rank: ``rounds`` x :func:`run_evaluation`."""
    import torch.distributed as dist

    from megatron_capaware.tools.evaluate import EvalOptions, run_evaluation
    from megatron_capaware.tools.router_specs import parse_router_specs

    from megatron_capaware import parallel

    # run_evaluation tears down the default process group at its end, and gloo
    # cannot build it again in the same processes (connectFullMesh fails on the
    # second round): keep it, tear down Megatron's groups only.
    parallel.destroy = parallel.destroy_model_parallel
    options = EvalOptions(checkpoint=Path(opts["checkpoint"]), text=Path(opts["text"]), seq_len=opts["seq_len"],
                          sequences_per_rank=opts["sequences_per_rank"], max_tokens=opts["max_tokens"],
                          expert_parallel=opts["ep"], progress=False)
    routers = parse_router_specs(opts["routers"])
    warm_rss, warm_forwards, rank = None, 0, int(os.environ.get("RANK", "0"))
    with RssSampler(opts["sample_s"]) as sampler:
        hook = _count_forwards(sampler)
        per_round = []
        for round_index in range(opts["rounds"]):
            run_evaluation(options, routers)
            per_round.append(_round_diagnostics(sampler, opts["malloc_trim"]))
            if round_index + 1 == opts["warmup_rounds"]:
                warm_rss = sampler.sample()
                warm_forwards = sampler.forwards
        hook.remove()
    out = _summary(sampler, warm_forwards if opts["warmup_rounds"] else 0, warm_rss)
    out.update(rank=rank, mode="eval", rounds=opts["rounds"], per_round=per_round)
    if dist.is_initialized():
        dist.destroy_process_group()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("forward", "eval"), default="forward")
    p.add_argument("--ep", type=int, default=2, help="expert-parallel ranks (default 2)")
    p.add_argument("--routers", nargs="+", default=DEFAULT_ROUTERS, metavar="SPEC")
    p.add_argument("--sample-s", type=float, default=1.0, help="RSS sampling period (s)")
    p.add_argument("--max-growth-mb", type=float, default=50.0, help="fail above this growth after warm-up")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    f = p.add_argument_group("forward mode")
    f.add_argument("--forwards", type=int, default=2000)
    f.add_argument("--warmup", type=int, default=100, help="forwards before the growth is measured")
    f.add_argument("--switch-every", type=int, default=50, help="reinstall the next router every N forwards")
    f.add_argument("--reset-every", type=int, default=200, help="reset the routers' stats every N forwards (0: never)")
    f.add_argument("--layers", type=int, default=2)
    f.add_argument("--hidden", type=int, default=64)
    f.add_argument("--experts", type=int, default=8)
    f.add_argument("--topk", type=int, default=2)
    e = p.add_argument_group("eval mode")
    e.add_argument("--checkpoint", type=Path)
    e.add_argument("--text", type=Path)
    e.add_argument("--rounds", type=int, default=10)
    e.add_argument("--warmup-rounds", type=int, default=2)
    e.add_argument("--seq-len", type=int, default=64)
    e.add_argument("--sequences-per-rank", type=int, default=8)
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--malloc-trim", action="store_true",
                   help="after each round, return freed heap to the OS (glibc) and sample RSS again")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.mode == "eval" and not (args.checkpoint and args.text):
        print("--mode eval needs --checkpoint and --text", file=sys.stderr)
        return 2
    worker = forward_worker if args.mode == "forward" else eval_worker
    started = time.monotonic()
    if "RANK" in os.environ:  # under torchrun: this process is one rank
        results = [worker(opts)]
    else:
        from megatron_capaware._compat.launcher import run_distributed

        results = run_distributed(worker, args.ep, opts, timeout_s=24 * 3600.0, collective_timeout_s=300.0)
    report = {"options": opts, "wall_s": time.monotonic() - started, "ranks": results}
    worst = max(r["growth_after_warmup_mb"] for r in results)
    for r in results:
        slope = r["growth_per_1000_forwards_mb"]
        print(f"rank {r['rank']}: {r['forwards']} forwards in {r['seconds']:.0f} s; RSS start "
              f"{r['rss_start_mb']:.1f} MB, after warm-up {r['rss_after_warmup_mb']:.1f} MB, end "
              f"{r['rss_end_mb']:.1f} MB (peak {r['rss_peak_mb']:.1f}); growth after warm-up "
              f"{r['growth_after_warmup_mb']:+.2f} MB"
              + (f", fitted {slope:+.3f} MB per 1000 forwards" if slope is not None else ""))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if worst <= args.max_growth_mb else 1


if __name__ == "__main__":
    sys.exit(main())
