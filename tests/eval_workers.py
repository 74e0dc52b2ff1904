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
