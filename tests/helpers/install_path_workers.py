"""Rank workers of tests/test_install_paths.py: one tiny GPT MoE installed through each path."""

from __future__ import annotations

import argparse
from typing import Any, Dict, List

import torch

from megatron_capaware import parallel
from tests.helpers.mp_workers import TINY_GPT

PATHS = ("installer", "spec", "launcher")
ROUTING_CODE = ("adapters/", "policies/", "placement/", "config.py", "registry.py")


def _build(path: str, cfg: Any, ep: int) -> Any:
    """A tiny GPT MoE (2 MoE layers) routing with ``cfg``, installed through ``path``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_capaware.adapters import capaware_spec, install_capaware_routers, moe_layers
    from megatron_capaware.megatron_lm.launch import LaunchSession
    from megatron_capaware.models.builder import MoEModelArgs, build_gpt_model, build_transformer_config

    parallel.set_seed(7)
    args = MoEModelArgs(**TINY_GPT)
    config = build_transformer_config(args, expert_parallel=ep, dispatcher="alltoall")
    if path == "spec":
        block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
        return GPTModel(
            config=config, transformer_layer_spec=capaware_spec(block, cfg), vocab_size=args.vocab_size,
            max_sequence_length=args.max_sequence_length, share_embeddings_and_output_weights=True,
            position_embedding_type="rope", parallel_output=False,
        ).eval()
    model = build_gpt_model(args, config).eval()
    if path == "installer":
        install_capaware_routers(model, cfg)
    else:  # the Megatron-LM launcher's hook: each layer installs at its first forward
        session = LaunchSession()
        session._config = cfg
        session.megatron_args = lambda: argparse.Namespace(  # type: ignore[method-assign]
            capaware_replica_policy="least-loaded", capaware_stats_output=None, capaware_placement=None)
        for layer in moe_layers(model):
            session.register_layer(layer)
    return model


def install_path_worker(path: str, ep: int) -> Dict[str, Any]:
    """Per path: capaware host syncs of the first and a later forward, disagreement and NaN errors."""
    from megatron_capaware.adapters import layer_states
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.tools.bench.launch_count import count_call

    parallel.init_model_parallel(parallel.ParallelSizes(expert_parallel=ep), timeout_s=60)
    rank = torch.distributed.get_rank()
    cfg = CapawareConfig("capacity-drop", gamma=1.0)
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, TINY_GPT["vocab_size"], (2, 16), generator=g)
    pos = torch.arange(16).unsqueeze(0).expand(2, 16)
    out: Dict[str, Any] = {"rank": rank, "path": path}

    def capaware_syncs(model: Any) -> List[str]:
        work = count_call(lambda: model(ids, pos, attention_mask=None))
        # Sites name the innermost frame of the package: the routing code's (not the CPU stand-ins'
        # in _compat/, which a GPU does not run, nor Megatron's own code). Megatron's alltoall
        # split-size reads pass through our dispatcher subclass: not the routers'.
        wheres = [(s, s.rsplit(" at ", 1)[-1]) for s in work.sync_sites]
        return [s for s, where in wheres if where.startswith(ROUTING_CODE) and "adapters/dispatcher.py" not in where]

    with torch.no_grad():
        model = _build(path, cfg, ep)
        if path == "launcher":
            model(ids, pos, attention_mask=None)  # installs (validate, agree, place): not a routing call
        out["first"] = capaware_syncs(model)
        out["later"] = capaware_syncs(model)
        states = layer_states(model)
        out["layers"] = len(states)
        out["shared_check"] = len({id(s.score_check) for s in states})
        out["names"] = [s.name for s in states]
        out["stats_calls"] = [len(s.stats.global_loads) for s in states]
        # Ranks that disagree: gamma differs on rank 1.
        try:
            _build(path, cfg.replace(gamma=1.5 if rank == 1 else 1.0), ep)(ids, pos, attention_mask=None)
            out["disagree"] = None
        except Exception as err:  # noqa: BLE001
            out["disagree"] = f"{type(err).__name__}: {err}"
        # A NaN gate on rank 1: the deferred check raises on every rank, once per forward.
        bad = _build(path, cfg, ep)
        bad(ids, pos, attention_mask=None)
        if rank == 1:
            next(s for s in bad.modules() if hasattr(s, "capaware_state")).weight[0, 0] = float("nan")
        try:
            bad(ids, pos, attention_mask=None)
            out["nan"] = None
        except Exception as err:  # noqa: BLE001
            out["nan"] = f"{type(err).__name__}: {err}"
    parallel.destroy()
    return out
