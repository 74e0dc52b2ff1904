"""Functions run on spawned gloo ranks by the reliability tests (module level: picklable)."""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List

import torch

from megatron_capaware import parallel
from tests.helpers.mp_workers import build_moe_layer, deterministic_tokens

E, K, H, F, SEED = 8, 2, 32, 16, 4321

# Every router, as CapawareConfig keyword arguments.
ROUTERS: Dict[str, Dict[str, Any]] = {
    "topk": dict(router_type="topk"),
    "drop": dict(router_type="capacity-drop", gamma=1.0),
    "drop_position": dict(router_type="capacity-drop", gamma=1.0, drop_policy="position"),
    "drop_random": dict(router_type="capacity-drop", gamma=1.0, drop_policy="random", seed=3),
    "drop_local": dict(router_type="capacity-drop", gamma=1.0, scope="local"),
    "reroute": dict(router_type="capacity-reroute", gamma=1.0, reroute_rounds=2),
    "reroute_load": dict(router_type="capacity-reroute", gamma=1.0, reroute_policy="load"),
    "expanded": dict(router_type="expanded-drop", gamma=1.0),
    "laser": dict(router_type="laser", laser_eps_high=0.9, laser_t_fix=0.2, laser_pool=4),
}


def _layer_spec(dispatcher: str) -> Dict[str, Any]:
    return dict(experts=E, k=K, hidden=H, ffn=F, seed=SEED, tp=1, ep=2, etp=1, dispatcher=dispatcher)


def _error_text(err: BaseException) -> Dict[str, str]:
    return {"type": type(err).__name__, "message": str(err)}


def ep2_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """EP=2, one spawn: decode-sized batches under every router, rank disagreement at
    install, NaN on one rank, and the pure policies on the real gloo group."""
    from megatron.core import parallel_state as ps

    from megatron_capaware import policies as P
    from megatron_capaware.adapters import collect_stats, install_capaware_routers
    from megatron_capaware.config import CapawareConfig

    parallel.init_model_parallel(parallel.ParallelSizes(1, 2, 1), timeout_s=float(spec["collective_timeout_s"]))
    rank = torch.distributed.get_rank()
    out: Dict[str, Any] = {"rank": rank, "decode": {}, "errors": {}}
    for dispatcher, scenarios in spec["decode"].items():
        layer = build_moe_layer(_layer_spec(dispatcher))
        out["local_experts"] = list(layer.local_expert_indices)
        captured: Dict[str, Any] = {}
        layer.router.register_forward_hook(lambda mod, inp, res: captured.update(probs=res[0], map=res[1]))
        for sizes in scenarios:
            tokens = deterministic_tokens(sum(sizes), H, SEED + 1)
            start = sum(sizes[:rank])
            hidden = tokens[start:start + sizes[rank]].unsqueeze(1)  # [T, 1, H]
            install_capaware_routers(layer, CapawareConfig("topk"))  # Megatron's gate fails on T=0
            with torch.no_grad():
                scores = torch.softmax(layer.router.gating(hidden).view(-1, E).float(), dim=-1)
            key = f"{dispatcher}:{'_'.join(map(str, sizes))}"
            out["decode"][key] = {"scores": scores, "sizes": sizes, "routers": {}}
            for name, kwargs in ROUTERS.items():
                install_capaware_routers(layer, CapawareConfig(**kwargs))
                with torch.no_grad():
                    result, _ = layer(hidden)
                stats = collect_stats(layer)[1]
                out["decode"][key]["routers"][name] = {
                    "map": captured["map"].clone(), "probs": captured["probs"].clone(),
                    "out": result.clone(), "received": stats.received[-1].clone(),
                    "global_loads": stats.global_loads[-1].clone(), "capacity": stats.capacity[-1],
                }
                stats.reset()

    # --- ranks that disagree: different gamma on the two ranks.
    layer = build_moe_layer(_layer_spec("alltoall"))
    install_capaware_routers(layer, CapawareConfig("capacity-drop", gamma=1.5))
    hidden = deterministic_tokens(6, H, SEED + 2).unsqueeze(1)
    t0 = time.monotonic()
    try:
        install_capaware_routers(layer, CapawareConfig("capacity-drop", gamma=1.0 + rank))
    except Exception as err:  # noqa: BLE001 - reported to the parent
        out["errors"]["gamma_differs"] = dict(_error_text(err), seconds=time.monotonic() - t0)
    out["gamma_after_refusal"] = layer.router.capaware.gamma
    # --- one rank fails its own validation (pool < k): every rank raises.
    try:
        install_capaware_routers(layer, CapawareConfig("laser", laser_pool=1 if rank == 1 else 4))
    except Exception as err:  # noqa: BLE001
        out["errors"]["validation_on_one_rank"] = _error_text(err)
    # --- router type differs.
    try:
        install_capaware_routers(layer, CapawareConfig("laser" if rank == 0 else "capacity-reroute"))
    except Exception as err:  # noqa: BLE001
        out["errors"]["router_type_differs"] = _error_text(err)
    # The refusals left the groups usable: a consistent install and forward work.
    install_capaware_routers(layer, CapawareConfig("capacity-drop", gamma=1.0))
    with torch.no_grad():
        out["forward_after_refusals"] = layer(hidden)[0].clone()

    # --- NaN from the gate on rank 1 only: both ranks raise the same clear error, at once.
    saved = layer.router.weight.detach().clone()
    if rank == 1:
        with torch.no_grad():
            layer.router.weight[0, 0] = float("nan")
    t0 = time.monotonic()
    try:
        with torch.no_grad():
            layer(hidden)
        out["errors"]["nan_on_rank_1"] = None
    except Exception as err:  # noqa: BLE001
        out["errors"]["nan_on_rank_1"] = dict(_error_text(err), seconds=time.monotonic() - t0)
    with torch.no_grad():
        layer.router.weight.copy_(saved)
        out["forward_after_nan"] = layer(hidden)[0].clone()

    # --- the pure policies on the real gloo group (checks megatron_capaware/tools/bench/sim_dist.py's simulation).
    group = ps.get_expert_model_parallel_group()
    real: List[Dict[str, Any]] = []
    for case in spec["policy_cases"]:
        g = torch.Generator().manual_seed(case["seed"])
        sizes = case["sizes"]
        scores = torch.softmax(torch.randn(sum(sizes), case["E"], generator=g) * 2, dim=-1)
        part = scores[sum(sizes[:rank]):sum(sizes[:rank + 1])]
        k, gamma = case["k"], case["gamma"]
        local = list(range(case["E"]))[rank::2]
        real.append({
            "scores": scores,
            "drop": P.capacity_drop(part, k, gamma, policy="random", seed=5, group=group)[1],
            "reroute": P.capacity_reroute(part, k, gamma, rounds=2, policy="load", group=group)[1],
            "expanded": P.expanded_drop(part, k, gamma, local, group=group)[1],
            "laser": P.laser(part, k, 0.9, 0.2, k + 2, group=group)[1],
        })
    out["policy_cases"] = real
    parallel.destroy()
    return out


# ----------------------------------------------------------------------------- rank faults

TINY_GPT = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=8, moe_router_topk=2,
                moe_ffn_hidden_size=16, vocab_size=64, max_sequence_length=32)


def _record(path: Path, **event: Any) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(event) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def fault_worker(mode: str, events_dir: str, hang_s: float, router_type: str = "capacity-drop") -> Dict[str, Any]:
    """A tiny GPT MoE at EP=2; on rank 1, the SECOND MoE layer's router misbehaves.

    ``mode``: ``raise`` (an exception escapes the forward; the process exits),
    ``raise_and_stay`` (rank 1 catches it and lives on, as a server would),
    ``exit`` (``os._exit(1)``: the process vanishes), ``hang`` (rank 1 sleeps
    ``hang_s`` seconds inside the forward, then goes on). Rank 0 is by then
    waiting in a collective of that layer (routing or dispatch). Every rank
    writes timestamped events to ``events_dir/rank{r}.jsonl``.
    """
    from megatron_capaware.adapters import install_capaware_routers, moe_layers
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.models.builder import MoEModelArgs, build_gpt_model, build_transformer_config

    timeout = float(os.environ["CAPAWARE_COLLECTIVE_TIMEOUT_S"])
    parallel.init_model_parallel(parallel.ParallelSizes(expert_parallel=2), timeout_s=timeout)
    parallel.set_seed(1)
    rank = torch.distributed.get_rank()
    log = Path(events_dir) / f"rank{rank}.jsonl"
    args = MoEModelArgs(**TINY_GPT)
    model = build_gpt_model(args, build_transformer_config(args, expert_parallel=2))
    install_capaware_routers(model, CapawareConfig(router_type, gamma=1.0))
    second = moe_layers(model)[1]

    def misbehave(module, inputs):
        _record(log, event="inject", mode=mode, t=time.time())
        if mode in ("raise", "raise_and_stay"):
            raise RuntimeError("injected failure in the second MoE layer on rank 1")
        if mode == "exit":
            os._exit(1)
        if mode == "hang":
            time.sleep(hang_s)
            _record(log, event="woke", t=time.time())

    if rank == 1:
        second.router.register_forward_pre_hook(misbehave)
    ids = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
    pos = torch.arange(16).unsqueeze(0).expand(2, 16)
    torch.distributed.barrier()
    _record(log, event="forward", t=time.time())
    try:
        with torch.no_grad():
            model(ids, pos, attention_mask=None)
        _record(log, event="finished", t=time.time())
    except BaseException as err:  # noqa: BLE001
        _record(log, event="error", t=time.time(), type=type(err).__name__, message=str(err)[:2000],
                trace=traceback.format_exc()[-3000:])
        if mode == "raise_and_stay" and rank == 1:
            time.sleep(hang_s)  # a server would catch the error and keep serving
            _record(log, event="exit", t=time.time())
            return {"rank": rank, "survived": True}
        _record(log, event="exit", t=time.time())
        raise
    _record(log, event="exit", t=time.time())
    return {"rank": rank}


# ----------------------------------------------------------------------------- bad-input catalogue


def _attempt(results: Dict[str, Any], name: str, fn) -> None:
    try:
        fn()
        results[name] = None
    except BaseException as err:  # noqa: BLE001 - the catalogue records what surfaced
        results[name] = {"type": type(err).__name__, "module": type(err).__module__, "message": str(err)}


def catalogue_worker(paths: Dict[str, str], tmp: str) -> Dict[str, Any]:
    """Every Megatron-, checkpoint- and tokenizer-level bad input, on one rank."""
    import dataclasses
    import shutil

    from megatron_capaware.adapters import install_capaware_routers, moe_layers
    from megatron_capaware.models.checkpoint import load_model, load_model_args, load_weights
    from megatron_capaware.config import Calibration, CapawareConfig, LaserParams
    from megatron_capaware.tools.evaluate import EvalOptions, run_evaluation
    from megatron_capaware.models.builder import (
        MoEModelArgs, build_gpt_model, build_moe_layer as build_layer, build_transformer_config,
    )

    results: Dict[str, Any] = {}
    tmp_path = Path(tmp)
    parallel.init_model_parallel(parallel.ParallelSizes(), timeout_s=60)
    parallel.set_seed(0)
    args = MoEModelArgs(num_layers=1, hidden_size=32, num_attention_heads=4, num_moe_experts=8,
                        moe_router_topk=2, moe_ffn_hidden_size=16, vocab_size=8, max_sequence_length=8)

    def layer_with(**overrides):
        return build_layer(build_transformer_config(args, **overrides), use_te=False).eval()

    # --- Megatron MoE flags that contradict a capaware router.
    _attempt(results, "megatron: moe_expert_capacity_factor", lambda: install_capaware_routers(
        layer_with(moe_expert_capacity_factor=1.0), CapawareConfig("capacity-drop")))
    _attempt(results, "megatron: sinkhorn load balancing", lambda: install_capaware_routers(
        layer_with(moe_router_load_balancing_type="sinkhorn"), CapawareConfig("capacity-reroute")))
    _attempt(results, "megatron: group-limited routing with laser", lambda: install_capaware_routers(
        layer_with(moe_router_num_groups=2, moe_router_group_topk=1), CapawareConfig("laser")))
    _attempt(results, "megatron: expert bias with laser", lambda: install_capaware_routers(
        layer_with(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid"),
        CapawareConfig("laser")))
    base = layer_with()
    # Flags Megatron itself refuses to build on one CPU rank: set them on a built layer's config.
    for name, attr, value in (
        ("megatron: pad_expert_input_to_capacity", "moe_pad_expert_input_to_capacity", True),
        ("megatron: flex dispatcher", "moe_token_dispatcher_type", "flex"),
        ("megatron: routing replay", "moe_enable_routing_replay", True),
        ("megatron: context parallelism", "context_parallel_size", 2),
        ("megatron: unknown score function", "moe_router_score_function", "sqrtsoftplus"),
        ("megatron: router padding for quantization", "moe_router_padding_for_quantization", True),
        ("megatron: mlp chunks for prefill", "mlp_chunks_for_prefill", 2),
        ("megatron: cuda graphs capturing the router", "enable_cuda_graph", True),
    ):
        saved = getattr(base.config, attr, None)
        setattr(base.config, attr, value)
        _attempt(results, name, lambda: install_capaware_routers(base, CapawareConfig("capacity-drop")))
        setattr(base.config, attr, saved)
    results["refused install left the router unchanged"] = type(base.router).__name__
    _attempt(results, "config: pool < k (checked at install)", lambda: install_capaware_routers(
        base, CapawareConfig("laser", laser_pool=1)))
    _attempt(results, "model without MoE layers", lambda: install_capaware_routers(
        torch.nn.Linear(2, 2), CapawareConfig("capacity-drop")))

    class OtherRouter(type(base.router)):
        pass

    other = layer_with()
    other.router.__class__ = OtherRouter
    _attempt(results, "a router that is not Megatron's TopKRouter", lambda: install_capaware_routers(
        other, CapawareConfig("capacity-drop")))

    def train_mode():
        layer = layer_with()
        install_capaware_routers(layer, CapawareConfig("capacity-drop"))
        layer.train()
        layer(torch.randn(4, 1, 32))

    _attempt(results, "capacity router in training mode", train_mode)

    # --- NaN / Inf from the gate of a real GPT MoE (layer 2 of 2).
    gpt_args = MoEModelArgs(num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=8,
                            moe_router_topk=2, moe_ffn_hidden_size=16, vocab_size=64, max_sequence_length=16)
    gpt = build_gpt_model(gpt_args, build_transformer_config(gpt_args))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8).unsqueeze(0).expand(2, 8)
    second = moe_layers(gpt)[1]
    for router_type in ("capacity-drop", "capacity-reroute", "expanded-drop", "laser"):
        install_capaware_routers(gpt, CapawareConfig(router_type))
        with torch.no_grad():
            saved = second.router.weight.detach().clone()
            second.router.weight[3, 5] = float("nan")
            _attempt(results, f"NaN gate weight, {router_type}", lambda: gpt(ids, pos, attention_mask=None))
            second.router.weight.copy_(saved)
            second.router.weight[1] = float("inf")  # +inf logits -> softmax NaN
            _attempt(results, f"Inf gate weight, {router_type}", lambda: gpt(ids, pos, attention_mask=None))
            second.router.weight.copy_(saved)
    install_capaware_routers(gpt, CapawareConfig("topk"))
    with torch.no_grad():
        second.router.weight[3, 5] = float("nan")
        _attempt(results, "NaN gate weight, topk (vanilla Megatron)", lambda: gpt(ids, pos, attention_mask=None))
        second.router.weight.copy_(saved)

    # --- LASER calibration made for another model.
    layer_params = {1: LaserParams(0.5, 0.3, 4), 2: LaserParams(0.5, 0.3, 4)}
    model_info = {"moe_layer_numbers": [1, 2], "num_moe_experts": 8, "moe_router_topk": 2}
    for name, changes in (("calibration for other layers", {"moe_layer_numbers": [1, 2, 3, 4]}),
                          ("calibration for another expert count", {"num_moe_experts": 16}),
                          ("calibration for another top-k", {"moe_router_topk": 1})):
        path = tmp_path / f"cal-{len(results)}.json"
        Calibration(layer_params=dict(layer_params), model=dict(model_info, **changes)).save(path)
        _attempt(results, name, lambda: install_capaware_routers(
            gpt, CapawareConfig("laser", laser_calibration=str(path))))

    # --- checkpoints of another architecture.
    ckpt = Path(paths["checkpoint"])
    saved_args = load_model_args(ckpt)
    wider = dataclasses.replace(saved_args, num_moe_experts=16)
    wider_model = build_gpt_model(wider, build_transformer_config(wider))
    _attempt(results, "checkpoint: load_weights with other MoEModelArgs",
             lambda: load_weights(wider_model, ckpt, wider))
    bare = tmp_path / "ckpt-without-json"
    shutil.copytree(ckpt, bare)
    (bare / "capaware_model.json").unlink()
    _attempt(results, "checkpoint: no capaware_model.json (load_model)", lambda: load_model(bare))
    _attempt(results, "checkpoint: no capaware_model.json, other architecture (load_weights)",
             lambda: load_weights(wider_model, bare, wider))
    odd = tmp_path / "ckpt-odd-json"
    shutil.copytree(ckpt, odd)
    data = json.loads((odd / "capaware_model.json").read_text())
    data["num_experts_per_tok"] = 2
    (odd / "capaware_model.json").write_text(json.dumps(data))
    _attempt(results, "checkpoint: capaware_model.json with unknown fields", lambda: load_model(odd))
    _attempt(results, "checkpoint: directory does not exist", lambda: load_model(tmp_path / "nowhere"))
    _attempt(results, "checkpoint: not a checkpoint directory", lambda: load_weights(
        wider_model, tmp_path, wider))

    # --- wrong tokenizers (through the evaluation).
    from tokenizers import Tokenizer, models, pre_tokenizers

    def word_tokenizer(size: int, name: str) -> Path:
        vocab = {f"w{i}": i for i in range(size)}
        vocab["[UNK]"] = size
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        path = tmp_path / name
        tok.save(str(path))
        return path

    def evaluate(**kw):
        options = EvalOptions(checkpoint=ckpt, text=Path(paths["heldout"]), seq_len=16, sequences_per_rank=2,
                              max_tokens=64, progress=False, **kw)
        run_evaluation(options, [CapawareConfig("topk")])

    _attempt(results, "tokenizer: larger vocabulary than the model",
             lambda: evaluate(tokenizer=word_tokenizer(5000, "big.json")))
    _attempt(results, "tokenizer: another tokenizer that fits the vocabulary",
             lambda: evaluate(tokenizer=word_tokenizer(50, "small.json")))
    _attempt(results, "tokenizer: the checkpoint's own, passed explicitly",
             lambda: evaluate(tokenizer=ckpt / "tokenizer" / "tokenizer.json"))
    short = tmp_path / "short.txt"
    short.write_text("the king.\n")
    _attempt(results, "evaluation: held-out text too short",
             lambda: run_evaluation(EvalOptions(checkpoint=ckpt, text=short, seq_len=16, sequences_per_rank=2,
                                                progress=False), [CapawareConfig("topk")]))
    parallel.destroy()
    return results
