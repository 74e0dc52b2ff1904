"""Spawned-rank workers of the placement runtime tests (module level: picklable)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

import torch

from megatron_capaware import parallel
from tests.helpers.mp_workers import TINY_GPT


def make_plan(layer_numbers: List[int], num_experts: int, ep: int, redundant: int, seed: int, k: int = 2):
    """A valid plan from random loads (the runtime must be right for any plan, not only good ones)."""
    from megatron_capaware.placement import plan_layer
    from megatron_capaware.placement.plan_file import plan_from_placements

    g = torch.Generator().manual_seed(seed)
    placements = [plan_layer(torch.rand(num_experts, generator=g) ** 2 * 100, ep, redundant) for _ in layer_numbers]
    if ep == 1:  # the planner keeps one rank's experts in order; permute them so the slots move
        placements = [dataclasses.replace(p, slots=torch.randperm(num_experts, generator=g).tolist())
                      for p in placements]
    model = {"moe_layer_numbers": list(layer_numbers), "num_moe_experts": num_experts, "moe_router_topk": k}
    return plan_from_placements(placements, layer_numbers, model, ep, redundant, None, {"test": True})


def placed_gpt_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Tiny GPT at TP x EP: logits of topk contiguous vs under plans, then the layout restored."""
    from megatron.core import parallel_state as ps

    from megatron_capaware.adapters import collect_stats, install_capaware_routers, layer_layouts, remove_placement
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.models.builder import MoEModelArgs, build_gpt_model, build_transformer_config
    from megatron_capaware.placement import PlacementError

    tp, ep = spec["tp"], spec["ep"]
    parallel.init_model_parallel(parallel.ParallelSizes(tensor_parallel=tp, expert_parallel=ep))
    parallel.set_seed(7)
    args = MoEModelArgs(**TINY_GPT)
    config = build_transformer_config(args, tensor_parallel=tp, expert_parallel=ep, dispatcher=spec["dispatcher"])
    model = build_gpt_model(args, config)
    dp_rank = ps.get_data_parallel_rank()
    g = torch.Generator().manual_seed(100 + dp_rank)
    ids = torch.randint(0, args.vocab_size, (2, 32), generator=g)
    pos = torch.arange(32).unsqueeze(0).expand(2, 32)
    experts_before = {k: v.clone() for k, v in model.state_dict().items() if ".experts." in k and torch.is_tensor(v)}
    layers = [1, 2]
    out: Dict[str, Any] = {"rank": torch.distributed.get_rank(), "ep_rank": ps.get_expert_model_parallel_rank(),
                           "runs": {}}
    captured: Dict[str, Any] = {}
    first_router = _moe_layers(model)[0].router
    first_router.register_forward_hook(lambda mod, inp, out: captured.update(map=out[1]))
    with torch.no_grad():
        for name, run in spec["runs"].items():
            router = CapawareConfig(**run.get("router", {"router_type": "topk"}))
            plan = make_plan(layers, args.num_moe_experts, ep, run["redundant"], run["seed"]) \
                if run["redundant"] is not None else None
            install_capaware_routers(model, router, placement=plan, replica_policy=run.get("policy", "least-loaded"))
            logits = model(ids, pos, attention_mask=None)
            stats = collect_stats(model)
            out["runs"][name] = {
                "logits": logits.clone(),
                "slots": {n: l.slots for n, l in layer_layouts(model).items()},
                "received": {n: s.received[-1].clone() for n, s in stats.items()},
                "duplication": {n: s.duplication for n, s in stats.items()},
                "capacity": {n: s.capacity[-1] for n, s in stats.items()},
                "slot_loads": {n: (s.slot_loads() or [None])[-1] for n, s in stats.items()},
                "global_loads": {n: s.global_loads[-1].clone() for n, s in stats.items()},
                "summary": {n: s.summary() for n, s in stats.items()},
                "num_local_experts": [layer.experts.num_local_experts for layer in _moe_layers(model)],
                # Layer 1's physical routing map [T, S], and the logical expert of each slot.
                "map": captured["map"].clone(),
                "slot_expert": (layer_layouts(model)[int(_moe_layers(model)[0].layer_number)].slots
                                if layer_layouts(model) else list(range(args.num_moe_experts))),
            }
            if plan is not None:
                remove_placement(model)
        after = {k: v for k, v in model.state_dict().items() if ".experts." in k and torch.is_tensor(v)}
        out["restored"] = sorted(experts_before) == sorted(after) and all(
            torch.equal(experts_before[k], after[k]) for k in experts_before)
        # A plan for another EP size is refused on every rank, changing nothing.
        try:
            install_capaware_routers(model, CapawareConfig("topk"),
                                     placement=make_plan(layers, args.num_moe_experts, ep * 2, 0, 1))
            out["wrong_ep"] = "accepted"
        except PlacementError as err:
            out["wrong_ep"] = str(err)
        # A replicated plan with a capacity router is refused before anything moves.
        if ep > 1:
            try:
                install_capaware_routers(model, CapawareConfig("laser"),
                                         placement=make_plan(layers, args.num_moe_experts, ep, ep, 2))
                out["replicas_with_drop"] = "accepted"
            except PlacementError as err:
                out["replicas_with_drop"] = str(err)
        out["still_contiguous"] = not layer_layouts(model) or all(
            not layout.placed for layout in layer_layouts(model).values())
    parallel.destroy()
    return out


def _moe_layers(model):
    from megatron_capaware.adapters import moe_layers

    return moe_layers(model)


def replan_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Online re-planning on a tiny GPT at EP = spec['ep']: logits unchanged while the experts move."""
    from megatron.core import parallel_state as ps

    from megatron_capaware.adapters import collect_stats, install_capaware_routers, layer_layouts
    from megatron_capaware.adapters.replan import OnlineReplanner
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.models.builder import MoEModelArgs, build_gpt_model, build_transformer_config

    ep = spec["ep"]
    parallel.init_model_parallel(parallel.ParallelSizes(expert_parallel=ep))
    parallel.set_seed(7)
    args = MoEModelArgs(**TINY_GPT)
    model = build_gpt_model(args, build_transformer_config(args, expert_parallel=ep))
    g = torch.Generator().manual_seed(100 + ps.get_data_parallel_rank())
    ids = torch.randint(0, args.vocab_size, (2, 32), generator=g)
    pos = torch.arange(32).unsqueeze(0).expand(2, 32)
    install_capaware_routers(model, CapawareConfig("topk"))
    out: Dict[str, Any] = {"logits": []}
    replanner = OnlineReplanner(every=2, window=2, redundant=spec["redundant"]).attach(model)
    with torch.no_grad():
        for _ in range(5):
            out["logits"].append(model(ids, pos, attention_mask=None).clone())
    replanner.detach()
    out["events"] = [(e.call, e.seconds, e.rank_peak_before, e.rank_peak_after, e.transfers)
                     for e in replanner.events]
    out["slots"] = {n: l.slots for n, l in layer_layouts(model).items()}
    # Every call's global loads: the shift benchmark's simulation must reach the same layouts from them.
    out["call_loads"] = {n: [l.tolist() for l in s.global_loads] for n, s in collect_stats(model).items()}
    # A checkpoint saved from the placed model is an ordinary one (logical layout), and the model stays placed.
    from megatron_capaware.models.checkpoint import load_weights, save_checkpoint

    save_checkpoint(model, spec["ckpt"], args)
    out["still_placed"] = {n: l.slots for n, l in layer_layouts(model).items()} == out["slots"]
    fresh = build_gpt_model(args, build_transformer_config(args, expert_parallel=ep))
    load_weights(fresh, spec["ckpt"], args)
    with torch.no_grad():
        out["reloaded_logits"] = fresh(ids, pos, attention_mask=None)
    out["calls"] = {n: s.calls for n, s in collect_stats(model).items()}
    parallel.destroy()
    return out


def placement_fault_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """A 6-MoE-layer tiny GPT at EP 2: placements refused by the memory pre-check or failing inside layer 3.

    ``spec["faults"]``: the scenarios, in order, each ``{"kind": "memory" | "write", "rank": r,
    "redundant": R}``; ``memory``: rank r reports 1 KiB free; ``write``: rank r raises while writing
    the second expert row of MoE layer 3 (layers 1 and 2 moved already, layer 3 half-written).
    After each scenario: the error, whether the expert weights are bit-equal to before, the layouts,
    and the logits. Finally the same plan applied without a fault, and removed.
    """
    from megatron_capaware.adapters import apply_placement, install_capaware_routers, layer_layouts
    from megatron_capaware.adapters import placement as placement_module
    from megatron_capaware.adapters import remove_placement
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.models.builder import MoEModelArgs, build_gpt_model, build_transformer_config
    from megatron_capaware.placement import PlacementError

    ep = 2
    parallel.init_model_parallel(parallel.ParallelSizes(expert_parallel=ep))
    parallel.set_seed(7)
    args = MoEModelArgs(**{**TINY_GPT, "num_layers": 6})
    model = build_gpt_model(args, build_transformer_config(args, expert_parallel=ep))
    install_capaware_routers(model, CapawareConfig("topk"))
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, args.vocab_size, (2, 16), generator=g)
    pos = torch.arange(16).unsqueeze(0).expand(2, 16)

    def experts() -> Dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in model.state_dict().items() if ".experts." in k and torch.is_tensor(v)}

    def same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
        return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    layers = list(range(1, 7))
    out: Dict[str, Any] = {"rank": rank, "scenarios": []}
    with torch.no_grad():
        before = experts()
        logits_before = model(ids, pos, attention_mask=None).clone()
        write_row, free_bytes = placement_module._write_row, placement_module.free_bytes
        for fault in spec["faults"]:
            plan = make_plan(layers, args.num_moe_experts, ep, fault["redundant"], seed=21)
            calls = {"n": 0}

            def failing_write(layer_number, *rest):
                if layer_number == 3:
                    calls["n"] += 1
                    if calls["n"] == 2:
                        raise RuntimeError("injected failure writing MoE layer 3")
                return write_row(layer_number, *rest)

            if rank == fault["rank"]:
                if fault["kind"] == "memory":
                    placement_module.free_bytes = lambda device: (1024, "injected")
                else:
                    placement_module._write_row = failing_write
            try:
                apply_placement(model, plan)
                error = None
            except PlacementError as err:
                error = f"{type(err).__name__}: {err}"
            finally:
                placement_module._write_row, placement_module.free_bytes = write_row, free_bytes
            out["scenarios"].append({
                "fault": fault, "error": error, "bit_equal": same(before, experts()),
                "placed": any(layout.placed for layout in layer_layouts(model).values()),
                "num_local_experts": [layer.experts.num_local_experts for layer in _moe_layers(model)],
                "logits_equal": torch.equal(model(ids, pos, attention_mask=None), logits_before),
            })
        plan = make_plan(layers, args.num_moe_experts, ep, 2, seed=21)
        apply_placement(model, plan)
        out["placed_after"] = {n: l.slots for n, l in layer_layouts(model).items()}
        out["plan"] = {n: p.slots for n, p in plan.layers.items()}
        out["placed_logits_close"] = torch.allclose(model(ids, pos, attention_mask=None), logits_before,
                                                    rtol=1e-5, atol=1e-5)
        remove_placement(model)
        out["restored"] = same(before, experts())
    parallel.destroy()
    return out
