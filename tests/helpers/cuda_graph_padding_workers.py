"""Spawned-rank workers of tests/test_cuda_graph_padding.py (module level: picklable).

Megatron's ``--moe-pad-experts-for-cuda-graph-inference`` toggles drop-and-pad on
the model before each dynamic step (``set_decode_expert_padding``): on at capacity
factor E / k on CUDA-graph steps, off on eager ones. The worker does the same, on a
tiny GPT at EP 1 or 2, around forwards inside mocked dynamic steps (captured or eager).
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from megatron_capaware import parallel
from tests.helpers.dynamic_context import FakeContext
from tests.helpers.mp_workers import TINY_GPT


def set_padding(model: Any, layers: List[Any], on: bool) -> None:
    """Turn Megatron's decode drop-and-pad on (factor E / k) or off, as its controller does before a step.

    Megatron's own ``megatron.core.inference.utils.set_decode_expert_padding`` (0.16.1 and 0.19.2 ship it).
    """
    from megatron.core.inference.utils import set_decode_expert_padding

    config = layers[0].config
    set_decode_expert_padding(model, on, capacity_factor=config.num_moe_experts / config.moe_router_topk if on else None)


def padding_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Logits of Megatron's router and of each capaware router under padding (captured) and not (eager)."""
    from megatron.core import parallel_state as ps

    from megatron_capaware.adapters import collect_stats, install_capaware_routers, moe_layers, remove_placement
    from megatron_capaware.adapters.inference_padding import dynamic_step, step_padding
    from megatron_capaware.config import CapawareConfig, CapawareConfigError
    from megatron_capaware.models.builder import MoEModelArgs, build_gpt_model, build_transformer_config
    from tests.helpers.placement_workers import make_plan

    ep = spec["ep"]
    parallel.init_model_parallel(parallel.ParallelSizes(expert_parallel=ep))
    parallel.set_seed(11)
    args = MoEModelArgs(**TINY_GPT)
    config = build_transformer_config(args, expert_parallel=ep, dispatcher=spec["dispatcher"])
    model = build_gpt_model(args, config).eval()
    layers = moe_layers(model)
    # What --moe-pad-experts-for-cuda-graph-inference sets: a TransformerConfig field in 0.19 (0.16.1 keeps
    # it on InferenceWrapperConfig, which the installer does not see; set here so both run the same check).
    for layer in layers:
        layer.config.moe_pad_experts_for_cuda_graph_inference = True
    rank = ps.get_expert_model_parallel_rank()
    g = torch.Generator().manual_seed(200 + rank)
    ids = torch.randint(0, args.vocab_size, (2, 32), generator=g)
    pos = torch.arange(32).unsqueeze(0).expand(2, 32)
    rows = ids.numel()

    def forward(captured: bool) -> torch.Tensor:
        set_padding(model, layers, captured)  # Megatron: padding exactly on the CUDA-graph steps
        context = FakeContext(0 if captured else rows, rows if captured else 0, captured=captured)
        with torch.no_grad(), dynamic_step(step_padding(context)):
            return model(ids, pos, attention_mask=None).clone()

    def dropped() -> int:
        return int(sum(s.total("dropped") for s in collect_stats(model).values()))

    out: Dict[str, Any] = {"runs": {}}
    # Megatron's own router and dispatcher (nothing installed).
    out["megatron_captured"] = forward(True)
    out["megatron_capacity"] = [getattr(layer.token_dispatcher, "capacity", None) for layer in layers]
    out["rows"] = rows
    out["megatron_eager"] = forward(False)
    for name, run in spec["runs"].items():
        plan = make_plan([int(l.layer_number) for l in layers], args.num_moe_experts, ep, run["redundant"],
                         run.get("seed", 1)) if run["redundant"] is not None else None
        install_capaware_routers(model, CapawareConfig(**run["router"]), placement=plan,
                                 replica_policy="least-loaded")
        record: Dict[str, Any] = {}
        record["eager_before"] = forward(False)
        record["dropped_before"] = dropped()
        record["captured"] = forward(True)
        record["capacity"] = [getattr(layer.token_dispatcher, "capacity", None) for layer in layers]
        record["dropped_captured"] = dropped() - record["dropped_before"]
        record["eager_after"] = forward(False)
        record["dropped_after"] = dropped() - record["dropped_before"]
        out["runs"][name] = record
        if plan is not None:
            remove_placement(model)
    # Installing while Megatron's toggle has padding on (a router installed between engines) is
    # not refused; the same fields set without --moe-pad-experts-for-cuda-graph-inference are.
    set_padding(model, layers, True)
    try:
        install_capaware_routers(model, CapawareConfig("capacity-drop"))
        out["install_while_padded"] = "accepted"
    except CapawareConfigError as err:
        out["install_while_padded"] = str(err)
    for layer in layers:
        layer.config.moe_pad_experts_for_cuda_graph_inference = False
    try:
        install_capaware_routers(model, CapawareConfig("capacity-reroute"))
        out["static_padding"] = "accepted"
    except CapawareConfigError as err:
        out["static_padding"] = str(err)
    parallel.destroy()
    return out
