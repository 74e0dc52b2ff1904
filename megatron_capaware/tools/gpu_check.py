"""The one-GPU check: the CUDA paths of megatron-capaware, in a few minutes, offline.

Run by ``scripts/gpu_check.sh`` on a machine with one GPU and PyTorch (see
``docs/gpu.md``). Steps (each recorded in one JSON, a table printed at the end):

1. ``nccl``: an NCCL process group of world size 1, Megatron's model-parallel
   groups on it, and the package's collectives and report paths through it
   (a CPU tensor reaching an NCCL collective fails here, not on a cluster).
2. ``routers``: every router on a real Megatron ``MoELayer`` on the GPU, in
   bf16: ``topk`` equals vanilla Megatron's routing bit for bit, the capacity
   invariant holds on what the experts received, and the router's forward runs
   under ``torch.cuda.set_sync_debug_mode("error")`` (no host sync) with the
   score check off; with it on, the syncs are counted. ``compiled_regions``:
   how many ``torch.compile`` regions the checked call ran (LASER's wave
   segments, compiled on CUDA: 17 with 8 waves and 1 round; 0 means it fell
   back to eager), ``first_call_s`` the compiling call's time.
3. ``experts``: which expert implementation ran (``TEGroupedMLP`` when
   Transformer Engine imports, else ``SequentialMLP``).
4. ``router_time``: router time against Megatron's ``TopKRouter`` with CUDA
   events at T = 4k/16k, E = 8/64/128, k = 2/8, and its share of the layer.
5. ``main_job``: the bundled model's held-out perplexity at EP = 1 in bf16 for
   a few routers, next to the committed CPU fp32 figures.
6. ``dynamic_engine``: Megatron's dynamic engine (``MegatronLLM``, EP 1, direct
   mode) on the bundled model with CUDA graphs on, Megatron's router then each
   router installed (``tools/bench/dynamic_engine.py``, in a process of its own
   with its own time bound, run last): ``topk``'s text equals Megatron's, every
   router generates, graph replays counted (> 0), host syncs against
   Megatron's, a closing ``torch.cuda.synchronize()``. Skipped (not failed)
   without megatron-core >= 0.19 or, on CUDA, flash-attn.

``--dry-run`` prints the plan and writes it as the JSON without touching a GPU
(CI runs it). ``--device cpu`` runs steps 1-4 and 6 on the CPU with gloo at small
sizes (what the test suite does to keep this script working); sync checks are
then skipped, and the dynamic engine runs without CUDA graphs. ``--steps``
runs a subset.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from megatron_capaware._compat.cli import add_cli_flags, run_cli
from megatron_capaware.registry import CAPACITY_DROP, LASER, TOPK

PROG = "python -m megatron_capaware.tools.gpu_check"
ROUTERS = [TOPK, "capacity-drop:gamma=1.25", "capacity-drop:gamma=1.25,policy=weight",
           "capacity-reroute:gamma=1.25", "expanded-drop:gamma=1.25", LASER]
TIME_SHAPES = [(t, e, k) for t in (4096, 16384) for e in (8, 64, 128) for k in (2, 8)]
MAIN_JOB_ROUTERS = [TOPK, "capacity-drop:gamma=1.25", "capacity-reroute:gamma=1.25", LASER]
CPU_REFERENCE = Path("docs/results/reference_eval.json")
#: Steps ``--steps`` can choose (``experts`` comes with ``routers``), in the order they run.
STEP_NAMES = ("nccl", "routers", "placement", "router_time", "main_job", "dynamic_engine")
#: The whole check's time bound (``scripts/gpu_check.sh`` kills it then), read to bound the last step.
BUDGET_ENV = "CAPAWARE_GPU_CHECK_TIMEOUT_S"


def plan(args: argparse.Namespace) -> Dict[str, Any]:
    return {
        "device": args.device,
        "steps": {
            "nccl": "NCCL group of world size 1; collectives and reduce_summaries / totals through it; each "
                    "collective form of the routing and the weight exchange run through NCCL once "
                    "(collectives.backend_self_test; EP > 1 needs two GPUs: docs/gpu.md)",
            "routers": {"routers": ROUTERS, "layer": "MoELayer E=8 k=2 H=1024, bf16, alltoall dispatcher",
                        "sync_debug_mode": "error around the router forward (check_scores off); counted with it on"},
            "experts": "TEGroupedMLP when transformer_engine imports (moe_grouped_gemm), else SequentialMLP",
            "placement": "the same layer with its experts permuted by a plan (R = 0, EP 1): output equals "
                         "the contiguous layer's, the placed router sync-free; then the layout restored; a plan "
                         "with replicas at EP 1 refused before any weight moves (replicas need EP >= 2)",
            "router_time": {"shapes_T_E_k": TIME_SHAPES if args.device == "cuda" else [(256, 8, 2), (256, 16, 4)],
                            "routers": ROUTERS[1:], "baseline": "Megatron TopKRouter", "timer": "CUDA events"},
            "main_job": {"skipped": args.skip_main_job or args.device != "cuda", "ep": 1, "dtype": "bf16",
                         "routers": MAIN_JOB_ROUTERS, "cpu_reference": str(CPU_REFERENCE)},
            "dynamic_engine": _dynamic_engine_plan(args),
        },
    }


def _dynamic_engine_plan(args: argparse.Namespace) -> Dict[str, Any]:
    from megatron_capaware.tools.bench import dynamic_engine

    graphs = args.device == "cuda"
    return {
        "engine": "megatron.core.inference.apis.MegatronLLM, EP 1, direct mode (no coordinator), greedy",
        "model": "bundled 8x2 reference model, " + ("bf16, cuda_graph_impl=local" if graphs else "fp32"),
        "prompts": len(dynamic_engine.PROMPTS), "tokens": args.dynamic_engine_tokens,
        "configs": [dynamic_engine.MEGATRON, *dynamic_engine.ENGINE_ROUTERS],
        "per_config": "installed before a fresh engine (graphs captured with the router in place; the previous "
                      "engine's deleted)",
        "cuda_graphs": ("num_cuda_graphs=4, cuda_graph_max_tokens=64, cuda_graph_mixed_prefill_count=4, "
                        "use_cuda_graphs_for_non_decode_steps" if graphs else "off (graphs need CUDA)"),
        "records": "text hash, text == Megatron's, steps graph/eager, graph replays, per-phase stats"
                   + (", host syncs under set_sync_debug_mode('warn') minus Megatron's, closing synchronize"
                      if graphs else ""),
        "ok": "topk text == Megatron's and every config generated"
              + (" and graph replays > 0 and synchronize passed for every config" if graphs else ""),
        "skipped_when": "megatron-core < 0.19 (no megatron.core.inference.apis.MegatronLLM)"
                        + (" or flash-attn not importable" if graphs else "")
                        + ": reported as skipped with the reason; a skipped step does not fail the check",
        "moe_pad_experts_for_cuda_graph_inference": args.dynamic_engine_moe_pad,
        "process": f"its own, at most --dynamic-engine-timeout-s {args.dynamic_engine_timeout_s:g} s and what is "
                   f"left of {BUDGET_ENV}; run last",
    }


# ----------------------------------------------------------------------------- steps


def _init(device: str) -> Any:
    import torch
    import torch.distributed as dist

    from megatron_capaware import parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from megatron_capaware._compat.launcher import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if device == "cuda":
        torch.cuda.set_device(0)
    parallel.init_model_parallel(parallel.ParallelSizes())
    return dist.get_backend()


def step_nccl(device: str) -> Dict[str, Any]:
    import torch

    from megatron_capaware.adapters import reduce_summaries
    from megatron_capaware.adapters.stats import LayerRoutingStats
    from megatron_capaware.policies import collectives

    backend = _init(device)
    out: Dict[str, Any] = {"backend": backend, "group_device": str(collectives.group_device())}
    cpu = torch.arange(4, dtype=torch.float64)
    out["all_reduce_cpu_tensor"] = collectives.all_reduce(cpu).tolist()
    on_device = torch.arange(4, device=collectives.group_device(), dtype=torch.int64)
    out["all_reduce_device_tensor"] = collectives.all_reduce(on_device).cpu().tolist()
    out["all_gather_objects"] = collectives.all_gather_objects({"rank": 0})
    collectives.barrier()
    stats = LayerRoutingStats(layer_number=1, num_experts=4, ep_size=1, local_experts=[0, 1, 2, 3])
    out["reduce_summaries_layers"] = sorted(reduce_summaries({1: stats}))
    # The routing helpers skip their collectives at world size 1: run each form through the backend
    # (EP > 1 on NCCL needs two GPUs: docs/gpu.md).
    out["collective_forms"] = collectives.backend_self_test()
    out["ok"] = out["all_reduce_cpu_tensor"] == [0.0, 1.0, 2.0, 3.0] and out["collective_forms"]["ok"]
    return out


def _layer(device: str, experts: int, topk: int, hidden: int, ffn: int, grouped: bool):
    import torch

    from megatron_capaware.models.builder import MoEModelArgs, build_moe_layer, build_transformer_config

    args = MoEModelArgs(num_layers=1, hidden_size=hidden, num_attention_heads=8, num_moe_experts=experts,
                        moe_router_topk=topk, moe_ffn_hidden_size=ffn, vocab_size=8, max_sequence_length=8)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = build_transformer_config(args, dispatcher="alltoall", params_dtype=dtype, grouped_gemm=grouped)
    return build_moe_layer(config).eval(), dtype


def step_routers(device: str, tokens: int) -> Dict[str, Any]:
    import torch

    from megatron_capaware.adapters import collect_stats, install_capaware_routers
    from megatron_capaware.models.builder import use_transformer_engine
    from megatron_capaware.policies import compiled
    from megatron_capaware.tools.router_specs import parse_router_specs

    grouped = use_transformer_engine()
    layer, dtype = _layer(device, 8, 2, 1024 if device == "cuda" else 64, 512 if device == "cuda" else 32, grouped)
    out: Dict[str, Any] = {"experts_class": type(layer.experts).__name__, "dtype": str(dtype), "routers": {}}
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(tokens, 1, layer.config.hidden_size, generator=g) * 0.5).to(layer.router.weight.device, dtype)
    original = type(layer.router)
    with torch.no_grad():
        vanilla_probs, vanilla_map = layer.router(hidden)
    for cfg in parse_router_specs(ROUTERS):
        row: Dict[str, Any] = {}
        try:
            layer.router.__class__ = original
            install_capaware_routers(layer, cfg.replace(check_scores=False))
            stats = collect_stats(layer)[1]
            with torch.no_grad():
                # One call before the sync check: LASER compiles its wave segments, the others move
                # their one-time tables (local experts, ...) host to device.
                start = time.perf_counter()
                layer.router(hidden)
                row["first_call_s"] = time.perf_counter() - start
                regions = compiled.STATS["compiled_calls"]
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    probs, routing_map = layer.router(hidden)
                finally:
                    if device == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
                # LASER's device path runs its wave segments through torch.compile on CUDA (policies/compiled.py).
                row["compiled_regions"] = compiled.STATS["compiled_calls"] - regions
                layer(hidden)
            row["sync_free_router"] = device == "cuda"
            if cfg.router_type == TOPK:
                row["equals_vanilla"] = bool(torch.equal(routing_map, vanilla_map) and torch.equal(probs, vanilla_probs))
            if cfg.router_type == CAPACITY_DROP and cfg.drop_policy == "score":
                # Issue 22 item 1: on bf16 logits, gamma = inf keeps Megatron's top-k bit for bit.
                install_capaware_routers(layer, cfg.replace(check_scores=False, gamma=float("inf")))
                inf_probs, inf_map = layer.router(hidden)
                row["gamma_inf_equals_vanilla"] = bool(torch.equal(inf_map, vanilla_map)
                                                       and torch.equal(inf_probs, vanilla_probs))
                install_capaware_routers(layer, cfg.replace(check_scores=False))
            received = stats.received[-1]
            cap = stats.capacity[-1]
            row["max_received"] = int(received.max())
            row["capacity"] = cap
            row["capacity_holds"] = cap is None or not cfg.uses_capacity or int(received.max()) <= cap
            if device == "cuda":  # what the score check costs: the layer's forward (its hook reads the
                # deferred check there; calling the router alone never fires it), on minus off
                import warnings

                syncs = {}
                for check in (False, True):
                    install_capaware_routers(layer, cfg.replace(check_scores=check))
                    with torch.no_grad():
                        layer(hidden)  # warm
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("warn")
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        with torch.no_grad():
                            layer(hidden)
                    torch.cuda.set_sync_debug_mode("default")
                    syncs[check] = sum("synchroniz" in str(w.message) for w in caught)
                row["layer_syncs_without_score_check"] = syncs[False]
                row["syncs_with_score_check"] = syncs[True] - syncs[False]
            row["ok"] = (row.get("equals_vanilla", True) and row.get("gamma_inf_equals_vanilla", True)
                         and row["capacity_holds"])
        except Exception as err:  # record and go on: the JSON says what failed
            row.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-2000:])
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        out["routers"][cfg.describe()] = row
    out["ok"] = all(r["ok"] for r in out["routers"].values())
    return out


def step_placement(device: str, tokens: int) -> Dict[str, Any]:
    """A permuted layout on one rank: the experts' weights move (SequentialMLP / TEGroupedMLP in place)."""
    import torch

    from megatron_capaware.adapters import install_capaware_routers, remove_placement
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.models.builder import use_transformer_engine
    from megatron_capaware.placement.plan_file import PlacementPlan
    from megatron_capaware.placement.planner import LayerPlacement

    layer, dtype = _layer(device, 8, 2, 1024 if device == "cuda" else 64, 512 if device == "cuda" else 32,
                          use_transformer_engine())
    g = torch.Generator().manual_seed(1)
    hidden = (torch.randn(tokens, 1, layer.config.hidden_size, generator=g) * 0.5).to(layer.router.weight.device, dtype)
    slots = [3, 1, 7, 0, 5, 2, 6, 4]
    number = int(layer.layer_number)
    plan = PlacementPlan(model={"num_moe_experts": 8, "moe_layer_numbers": [number]}, ep=1, redundant=0,
                         layers={number: LayerPlacement(slots, 1, 0.0, 0.0)})
    install_capaware_routers(layer, CapawareConfig(TOPK, check_scores=False))
    with torch.no_grad():
        contiguous, _ = layer(hidden)
        install_capaware_routers(layer, CapawareConfig(TOPK, check_scores=False), placement=plan)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            layer.router(hidden)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        placed, _ = layer(hidden)
        remove_placement(layer)
        restored, _ = layer(hidden)
    diff = float((placed.float() - contiguous.float()).abs().max())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    out = {"experts_class": type(layer.experts).__name__, "max_abs_diff": diff, "tolerance": tol,
           "restored_equal": bool(torch.equal(restored, contiguous)), "sync_free_router": device == "cuda",
           "ok": diff <= tol and bool(torch.equal(restored, contiguous))}
    # A plan with replicas needs EP >= 2 (a rank never holds two replicas of one expert): two GPUs,
    # docs/gpu.md. Its refusal at EP 1 must come before any weight moves:
    out["replicas_at_ep1_refused_before_moving"] = _replicas_refused_first(device, number, tokens)
    out["ok"] = out["ok"] and out["replicas_at_ep1_refused_before_moving"]
    return out


def _replicas_refused_first(device: str, number: int, tokens: int) -> bool:
    import torch

    from megatron_capaware.adapters import install_capaware_routers
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.placement.plan_file import PlacementPlan
    from megatron_capaware.placement.planner import LayerPlacement, PlacementError

    layer, _ = _layer(device, 8, 2, 1024 if device == "cuda" else 64, 512 if device == "cuda" else 32, False)
    before = [p.detach().clone() for p in layer.experts.parameters()]
    replicas = PlacementPlan(model={"num_moe_experts": 8, "moe_layer_numbers": [number]}, ep=1, redundant=2,
                             layers={number: LayerPlacement([0, 1, 2, 3, 4, 5, 6, 7, 3, 5], 1, 0.0, 0.0)})
    try:
        install_capaware_routers(layer, CapawareConfig(TOPK, check_scores=False), placement=replicas)
    except PlacementError:
        return all(torch.equal(a, b) for a, b in zip(before, layer.experts.parameters())) and \
            getattr(layer.router, "capaware_layout", None) is None
    return False



def _event_time(fn: Callable[[], Any], device: str, repeats: int) -> float:
    import torch

    for _ in range(2):
        fn()
    if device != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 1000.0 / repeats


def step_router_time(device: str, shapes: List[tuple], repeats: int) -> Dict[str, Any]:
    import torch

    from megatron_capaware.adapters import install_capaware_routers
    from megatron_capaware.models.builder import use_transformer_engine
    from megatron_capaware.tools.bench.common import inject_scores, skewed_scores
    from megatron_capaware.tools.router_specs import parse_router_specs

    rows = []
    for tokens, experts, k in shapes:
        hidden_size = 1024 if device == "cuda" else 64
        layer, dtype = _layer(device, experts, k, hidden_size, 256 if device == "cuda" else 16, use_transformer_engine())
        dev = layer.router.weight.device
        hidden = torch.randn(tokens, 1, hidden_size, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
        scores = skewed_scores(tokens, experts, 1.0, seed=0).to(dev)
        set_scores = inject_scores(layer.router, experts)
        original = type(layer.router)
        row: Dict[str, Any] = {"tokens": tokens, "experts": experts, "topk": k}
        with torch.no_grad():
            set_scores(scores)
            row["megatron_topk_s"] = _event_time(lambda: layer.router(hidden), device, repeats)
            row["layer_s"] = _event_time(lambda: layer(hidden), device, max(1, repeats // 4))
            for cfg in parse_router_specs(ROUTERS[1:], record_stats=False):
                layer.router.__class__ = original
                install_capaware_routers(layer, cfg.replace(check_scores=False))
                seconds = _event_time(lambda: layer.router(hidden), device, repeats)
                row[cfg.describe()] = {"router_s": seconds, "ratio_vs_topk": seconds / row["megatron_topk_s"],
                                       "share_of_layer": (seconds - row["megatron_topk_s"]) / row["layer_s"]}
            set_scores(None)
        rows.append(row)
        layer = None  # free it before the next shape (not del: the closures above name it)
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows, "ok": True}


def step_dynamic_engine(device: str, out_dir: Path, tokens: int, timeout_s: float,
                        moe_pad: bool = False) -> Dict[str, Any]:
    """``tools/bench/dynamic_engine.py`` in a process of its own, bounded by ``timeout_s`` (a hang in graph
    capture or a sticky CUDA error stays there); its JSON is this step's record."""
    import subprocess

    from megatron_capaware.tools.bench.dynamic_engine import skip_reason

    reason = skip_reason(device)
    if reason is not None:
        return {"skipped": True, "ok": False, "reason": reason}
    if timeout_s < 30:
        return {"ok": False, "error": f"not started: {timeout_s:.0f} s left of the check's time budget; raise "
                                      f"{BUDGET_ENV} or pass --skip-main-job"}
    path = out_dir / "dynamic_engine.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "megatron_capaware.tools.bench.dynamic_engine", "--device", device,
           "--tokens", str(tokens), "--json", str(path)] + (["--moe-pad"] if moe_pad else [])
    env = dict(os.environ)
    for name in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # its own process group
        env.pop(name, None)
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as err:
        return {"ok": False, "command": " ".join(cmd), "error": f"timed out after {timeout_s:.0f} s",
                "stderr": (err.stderr or b"")[-3000:].decode(errors="replace")
                if isinstance(err.stderr, bytes) else (err.stderr or "")[-3000:]}
    if not path.exists():
        return {"ok": False, "command": " ".join(cmd), "returncode": proc.returncode,
                "error": "no record written", "stderr": proc.stderr[-3000:]}
    record: Dict[str, Any] = json.loads(path.read_text())
    record.update(command=" ".join(cmd), returncode=proc.returncode, process_s=time.perf_counter() - started)
    return record


def _ppl_by_label(records: Any) -> Dict[str, float]:
    rows = records["records"] if isinstance(records, dict) else records
    return {r["label"]: r["ppl"] for r in rows}


def step_main_job(out_dir: Path, timeout_s: float) -> Dict[str, Any]:
    import subprocess

    cmd = [sys.executable, "-m", "megatron_capaware.tools.evaluate", "--ep", "1", "--dtype", "bf16",
           "--routers", *MAIN_JOB_ROUTERS, "--no-plots", "--no-progress", "--out", str(out_dir / "eval"),
           "--json", str(out_dir / "main_job.json")]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    result: Dict[str, Any] = {"command": " ".join(cmd), "seconds": time.perf_counter() - started,
                              "returncode": proc.returncode}
    if proc.returncode != 0:
        result.update(ok=False, stderr=proc.stderr[-3000:])
        return result
    gpu = _ppl_by_label(json.loads((out_dir / "main_job.json").read_text()))
    cpu = _ppl_by_label(json.loads(CPU_REFERENCE.read_text())) if CPU_REFERENCE.exists() else {}
    result["ppl"] = {name: {"gpu_bf16": ppl, "cpu_fp32": cpu.get(name)} for name, ppl in gpu.items()}
    result["ok"] = all(math.isfinite(p) for p in gpu.values())
    return result


# ----------------------------------------------------------------------------- driver


def _table(record: Dict[str, Any]) -> str:
    lines = [f"megatron-capaware GPU check on {record.get('gpu', record['plan']['device'])}"]
    for name, step in record["steps"].items():
        status = "ok" if step.get("ok") else ("skipped" if step.get("skipped") else "FAILED")
        lines.append(f"  {name:14} {status}{'  ' + step['error'] if step.get('error') else ''}")
    routers = record["steps"].get("routers", {}).get("routers", {})
    for label, row in routers.items():
        lines.append(f"    {label:48} ok={row.get('ok')} C={row.get('capacity')} max_recv={row.get('max_received')} "
                     f"syncs(check on)={row.get('syncs_with_score_check')} compiled regions={row.get('compiled_regions')}")
    for row in record["steps"].get("router_time", {}).get("rows", []):
        parts = [f"T={row['tokens']} E={row['experts']} k={row['topk']} topk {row['megatron_topk_s'] * 1e6:.0f}us"]
        parts += [f"{label.split('(')[0]} x{value['ratio_vs_topk']:.2f}" for label, value in row.items()
                  if isinstance(value, dict)]
        lines.append("    " + "  ".join(parts))
    for name, ppl in record["steps"].get("main_job", {}).get("ppl", {}).items():
        lines.append(f"    {name:48} ppl bf16 GPU {ppl['gpu_bf16']:.3f}  fp32 CPU {ppl['cpu_fp32']}")
    engine = record["steps"].get("dynamic_engine", {})
    if engine.get("skipped"):
        lines.append(f"    {engine.get('reason')}")
    for label, row in engine.get("configs", {}).items():
        lines.append(f"    {label:48} " + (f"ERROR {row['error']}" if "error" in row else
                     f"text {row.get('text_sha256_16')} =megatron {row.get('text_equals_megatron', '-')} "
                     f"steps graph/eager {row.get('graph_steps')}/{row.get('eager_steps')} "
                     f"replays {row.get('graph_replays')} syncs-megatron {row.get('syncs_minus_megatron', '-')}"))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for gpu_check.json")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="print and write the plan only")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the router-correctness step")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per router and shape")
    parser.add_argument("--skip-main-job", action="store_true", help="skip the bundled model's evaluation")
    parser.add_argument("--main-job-timeout-s", type=float, default=240.0)
    parser.add_argument("--steps", default=",".join(STEP_NAMES),
                        help=f"comma-separated steps to run, of {', '.join(STEP_NAMES)}")
    parser.add_argument("--dynamic-engine-tokens", type=int, default=8,
                        help="tokens the dynamic-engine step generates per prompt")
    parser.add_argument("--dynamic-engine-timeout-s", type=float, default=240.0,
                        help=f"the dynamic-engine step's bound (also at most what is left of {BUDGET_ENV})")
    parser.add_argument("--dynamic-engine-moe-pad", action="store_true",
                        help="build the dynamic-engine step's model with Megatron's "
                             "moe_pad_experts_for_cuda_graph_inference (if its alltoall dispatcher cannot be "
                             "captured without it at EP 1, where megatron-core 0.19 does not require it; every "
                             "router accepts it)")
    return add_cli_flags(parser)


def _main(argv: List[str]) -> int:
    started_at = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.steps.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(STEP_NAMES))
    if unknown:
        parser.error(f"--steps: unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEP_NAMES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    record: Dict[str, Any] = {"format": "capaware-gpu-check/1", "plan": plan(args), "steps": {},
                              "python": platform.python_version()}
    path = args.out / "gpu_check.json"
    if args.dry_run:
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record["plan"], indent=2))
        print(f"wrote {path} (dry run: nothing was executed)")
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        from megatron_capaware._compat.cli import UserInputError

        raise UserInputError("no CUDA device is visible: run on a GPU machine, or pass --device cpu / --dry-run")
    if args.device == "cpu":
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    record["torch"] = torch.__version__
    try:
        import megatron.core

        record["megatron_core"] = megatron.core.__version__
    except ImportError as err:
        record["megatron_core"] = f"not importable: {err}"
    try:
        import transformer_engine  # noqa: F401

        record["transformer_engine"] = getattr(transformer_engine, "__version__", "importable")
    except ImportError:
        record["transformer_engine"] = None
    if args.device == "cuda":
        record["gpu"] = torch.cuda.get_device_name(0)
    shapes = TIME_SHAPES if args.device == "cuda" else [(256, 8, 2), (256, 16, 4)]
    steps: Dict[str, Callable[[], Dict[str, Any]]] = {
        "nccl": lambda: step_nccl(args.device),
        "routers": lambda: step_routers(args.device, args.tokens if args.device == "cuda" else 256),
        "placement": lambda: step_placement(args.device, args.tokens if args.device == "cuda" else 256),
        "router_time": lambda: step_router_time(args.device, shapes, args.repeats if args.device == "cuda" else 3),
    }
    for name, fn in steps.items():
        if name not in chosen:
            continue
        started = time.perf_counter()
        try:
            record["steps"][name] = fn()
        except Exception as err:
            record["steps"][name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                     "traceback": traceback.format_exc()[-3000:]}
        record["steps"][name]["seconds"] = time.perf_counter() - started
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")  # progress survives a stop
    if "routers" in chosen:
        routers = record["steps"].get("routers", {})
        record["steps"]["experts"] = {"ok": "experts_class" in routers, "class": routers.get("experts_class"),
                                      "transformer_engine": record["transformer_engine"]}
    from megatron_capaware import parallel

    parallel.destroy()
    if "main_job" in chosen:
        if args.device == "cuda" and not args.skip_main_job:
            try:
                record["steps"]["main_job"] = step_main_job(args.out, args.main_job_timeout_s)
            except Exception as err:
                record["steps"]["main_job"] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        else:
            record["steps"]["main_job"] = {"skipped": True, "ok": False}
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    if "dynamic_engine" in chosen:  # last: a failure or a timeout here keeps every other step's record
        budget = float(os.environ.get(BUDGET_ENV, "480"))
        left = budget - (time.perf_counter() - started_at) - 10.0  # time to write the record and the table
        started = time.perf_counter()
        try:
            record["steps"]["dynamic_engine"] = step_dynamic_engine(
                args.device, args.out, args.dynamic_engine_tokens, min(args.dynamic_engine_timeout_s, left),
                args.dynamic_engine_moe_pad)
        except Exception as err:
            record["steps"]["dynamic_engine"] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                                 "traceback": traceback.format_exc()[-3000:]}
        record["steps"]["dynamic_engine"]["seconds"] = time.perf_counter() - started
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(_table(record))
    print(f"wrote {path}")
    failed = [n for n, s in record["steps"].items() if not s.get("ok") and not s.get("skipped")]
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
