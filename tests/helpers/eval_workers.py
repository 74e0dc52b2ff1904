"""Evaluation entry points run on spawned ranks by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List


def evaluate_worker(paths: Dict[str, str], ep: int, specs: List[str], max_tokens: int) -> List[Dict[str, Any]]:
    from megatron_capaware.tools import report
    from megatron_capaware.tools.evaluate import EvalOptions, run_evaluation
    from megatron_capaware.tools.router_specs import parse_router_specs

    options = EvalOptions(checkpoint=Path(paths["checkpoint"]), text=Path(paths["heldout"]), seq_len=32,
                          sequences_per_rank=8, max_tokens=max_tokens, expert_parallel=ep, progress=False)
    results = run_evaluation(options, parse_router_specs(specs))
    return report.make_records(results, options)


def decode_worker(paths: Dict[str, str], ep: int, specs: List[str], batch: int) -> Dict[str, Any]:
    """``--decode`` records, plus top-k's teacher-forced NLL over the same positions from one full forward."""
    import math

    import torch

    from megatron_capaware.adapters import install_capaware_routers
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.tools import report
    from megatron_capaware.tools.evaluate import EvalOptions, close_session, evaluate_config, open_session
    from megatron_capaware.tools.router_specs import parse_router_specs
    from megatron_capaware.policies.collectives import all_reduce

    options = EvalOptions(checkpoint=Path(paths["checkpoint"]), text=Path(paths["heldout"]), seq_len=32,
                          sequences_per_rank=8, max_tokens=1024, expert_parallel=ep, progress=False,
                          decode_batch=batch, decode_prompt_len=12, decode_steps=6, decode_rounds=2)
    session = open_session(options)
    results = [evaluate_config(session, cfg) for cfg in parse_router_specs(specs)]
    install_capaware_routers(session.model, CapawareConfig("topk"))
    per_rank, nll, n = batch // session.dp_size, 0.0, 0
    with torch.no_grad():
        for r in range(2):
            first = r * batch + session.dp_rank * per_rank
            window = session.windows[first:first + per_rank]
            ids = window[:, :-1]
            pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
            logp = torch.log_softmax(session.model(ids, pos, attention_mask=None).float(), dim=-1)
            labels = window[:, 13:19]
            nll -= float(logp[:, 12:18].gather(-1, labels.unsqueeze(-1)).sum())
            n += labels.numel()
    totals = all_reduce(torch.tensor([nll, n], dtype=torch.float64))
    close_session(session)
    return {"records": report.make_records(results, options),
            "full_forward_ppl": math.exp(float(totals[0]) / float(totals[1]))}


def tune_worker(paths: Dict[str, str], ep: int, budgets: List[float], out_dir: str) -> Dict[str, Any]:
    """capaware-tune's search on the tiny model's calibration text (small grid settings)."""
    from megatron_capaware.tools import tune
    from megatron_capaware.tools.evaluate import EvalOptions

    from megatron_capaware.placement import load_plan
    from megatron_capaware.tools.evaluate import EvalPlacement
    from tests.helpers.placement_workers import make_plan

    options = EvalOptions(checkpoint=Path(paths["checkpoint"]), text=Path(paths["calibration"]), seq_len=32,
                          sequences_per_rank=8, expert_parallel=ep, progress=False)
    plan_path = Path(out_dir) / "plan.json"  # a replicated plan: tune searches on it too
    make_plan([1, 2], 8, ep, ep, seed=5).save(plan_path)
    placements = [EvalPlacement(plan_path.name, plan_path, load_plan(plan_path))]
    found = tune.run_tune(options, budgets, refine=1, laser_steps=2, laser_probe_batches=1, log=lambda line: None,
                          placements=placements, validation_fraction=0.25, margin=0.2)
    summary = tune.summarize(found["records"], found["configs"], budgets, Path(out_dir) / f"rank{ep}",
                             found["model"], found["placements"], found["validated_choices"])
    return {"records": found["records"], "summary": summary, "validation": found["validation"],
            "split": found["split"]}
