"""Catalogue of bad inputs: each gets a clear error naming the problem and the fix.

Never a crash deep inside Megatron or torch, never a silent fallback to top-k.
Pure inputs (policies, configuration, router specs, calibration files) are
tried in this process; Megatron-, checkpoint- and tokenizer-level ones on one
spawned rank (``tests/helpers/reliability_workers.py: catalogue_worker``).
docs/reliability.md lists them all with their messages; regenerate that
table with ``CAPAWARE_WRITE_CATALOGUE=catalogue.md python -m pytest tests/test_bad_input.py``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch

from megatron_capaware import policies as P
from megatron_capaware.config import CapawareConfig, CapawareConfigError, load_calibration
from megatron_capaware.models.builder import MoEModelArgs
from megatron_capaware.policies import RoutingInputError
from megatron_capaware.tools.router_specs import parse_router_spec
from megatron_capaware._compat.launcher import run_distributed

S = torch.softmax(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)


def with_value(value: float) -> torch.Tensor:
    scores = S.clone()
    scores[3, 5] = value
    return scores


def calibration_file(tmp: Path, content: Any) -> Path:
    path = tmp / f"cal-{abs(hash(json.dumps(content, default=str))) % 10**8}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


GOOD_CAL = {"format": "capaware-laser-calibration/1", "model": {}, "layers": {"1": {"eps_high": 0.5, "t_fix": 0.3, "pool": 4}}}
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=8, moe_router_topk=2,
            moe_ffn_hidden_size=32, vocab_size=100, max_sequence_length=64)

# (name, call(tmp_path), error type, message fragment)
IN_PROCESS: List[Tuple[str, Callable[[Path], Any], type, str]] = [
    # --- router scores
    ("policy: NaN score", lambda t: P.capacity_drop(with_value(math.nan), 2, 1.0), RoutingInputError,
     "router scores contain NaN or Inf (first at token 3, expert 5"),
    ("policy: +Inf score", lambda t: P.laser(with_value(math.inf), 2, 0.5, 0.5, 4), RoutingInputError,
     "router scores contain NaN or Inf"),
    ("policy: negative score (logits passed)", lambda t: P.capacity_reroute(with_value(-0.5), 2, 1.0),
     RoutingInputError, "pass probabilities, not logits"),
    ("policy: 1-D scores", lambda t: P.topk(S[0], 2), RoutingInputError, "scores must be 2-D [tokens, experts]"),
    ("policy: integer scores", lambda t: P.topk(S.long(), 2), RoutingInputError, "floating point probabilities"),
    ("policy: no expert column", lambda t: P.capacity_drop(torch.empty(3, 0), 1, 1.0), RoutingInputError,
     "no expert column (E == 0)"),
    # --- k
    ("policy: k > E", lambda t: P.capacity_drop(S, 9, 1.0), RoutingInputError, "k=9 must be in [1, E=8]"),
    ("policy: k = 0", lambda t: P.expanded_drop(S, 0, 1.0, [0]), RoutingInputError, "k=0 must be in [1, E=8]"),
    ("policy: k not an integer", lambda t: P.laser(S, 2.0, 0.5, 0.5, 4), RoutingInputError, "k must be an integer"),
    # --- gamma
    ("policy: gamma = 0", lambda t: P.capacity_drop(S, 2, 0.0), RoutingInputError, "capacity factor must be > 0"),
    ("policy: gamma < 0", lambda t: P.capacity_reroute(S, 2, -1.0), RoutingInputError, "gamma=-1.0 is invalid"),
    ("policy: gamma NaN", lambda t: P.expanded_drop(S, 2, math.nan, [0]), RoutingInputError, "gamma=nan is invalid"),
    ("policy: gamma a string", lambda t: P.capacity_drop(S, 2, "1.25"), RoutingInputError, "gamma must be a number > 0"),
    # --- other knobs
    ("policy: unknown drop policy", lambda t: P.capacity_drop(S, 2, 1.0, policy="lowest"), RoutingInputError,
     "policy='lowest' is not one of score, weight, position, random"),
    ("policy: unknown reroute policy", lambda t: P.capacity_reroute(S, 2, 1.0, policy="far"), RoutingInputError,
     "policy='far' is not one of score, load"),
    ("policy: rank-unit reroute without the layout", lambda t: P.capacity_reroute(S, 2, 1.0, unit="rank"),
     RoutingInputError, "unit='rank' needs expert_ranks [E] and num_ranks"),
    ("policy: rank-unit expert_ranks of the wrong shape", lambda t: P.capacity_reroute(
        S, 2, 1.0, unit="rank", expert_ranks=torch.tensor([0, 1]), num_ranks=2), RoutingInputError,
     "expert_ranks must be an integer tensor [E=8] (the EP rank of each expert), got torch.int64 (2,)"),
    ("policy: reroute rounds < 0", lambda t: P.capacity_reroute(S, 2, 1.0, rounds=-1), RoutingInputError,
     "rounds must be an integer >= 0"),
    ("policy: reroute min_ratio < 0", lambda t: P.capacity_reroute(S, 2, 1.0, min_ratio=-0.1), RoutingInputError,
     "min_ratio=-0.1 must be a finite number >= 0"),
    ("policy: reroute min_ratio NaN", lambda t: P.capacity_reroute(S, 2, 1.0, min_ratio=math.nan), RoutingInputError,
     "min_ratio=nan must be a finite number >= 0"),
    ("policy: LASER pool < k", lambda t: P.laser(S, 2, 0.5, 0.5, 1), RoutingInputError,
     "pool=1 is smaller than k=2"),
    ("policy: LASER t_fix = 0", lambda t: P.laser(S, 2, 0.5, 0.0, 4), RoutingInputError, "t_fix=0.0 must be in (0, 1]"),
    ("policy: LASER t_fix > 1", lambda t: P.laser(S, 2, 0.5, 1.5, 4), RoutingInputError, "t_fix=1.5 must be in (0, 1]"),
    ("policy: LASER t_fix NaN", lambda t: P.laser(S, 2, 0.5, math.nan, 4), RoutingInputError, "t_fix=nan must be in (0, 1]"),
    ("policy: LASER eps_high < 0", lambda t: P.laser(S, 2, -0.1, 0.5, 4), RoutingInputError,
     "eps_high=-0.1 must be a finite number >= 0"),
    ("policy: LASER eps_high inf", lambda t: P.laser(S, 2, math.inf, 0.5, 4), RoutingInputError,
     "eps_high=inf must be a finite number >= 0"),
    ("policy: LASER waves = 0", lambda t: P.laser(S, 2, 0.5, 0.5, 4, waves=0), RoutingInputError,
     "waves must be an integer >= 1"),
    ("policy: expanded-drop without local experts", lambda t: P.expanded_drop(S, 2, 1.0, None), RoutingInputError,
     "expanded_drop needs local_experts"),
    ("policy: expanded-drop local expert out of range", lambda t: P.expanded_drop(S, 2, 1.0, [0, 8]),
     RoutingInputError, "local_experts [0, 8] must lie in [0, E=8)"),
    ("policy: expanded-drop duplicate local experts", lambda t: P.expanded_drop(S, 2, 1.0, [1, 1]),
     RoutingInputError, "local_experts [1, 1] has duplicates"),
    ("policy: topk_indices of the wrong shape", lambda t: P.capacity_drop(S, 2, 1.0, topk_indices=torch.zeros(6, 3,
     dtype=torch.long)), RoutingInputError, "topk_indices must be [T=6, k=2], got (6, 3)"),
    ("policy: more than 1024 experts (reroute)", lambda t: P.capacity_reroute(torch.full((2, 1025), 1 / 1025), 1, 0.5),
     RoutingInputError, "at most 1024 experts are supported, got 1025"),
    # --- configuration (the --capaware-* flags)
    ("config: unknown router type", lambda t: CapawareConfig("capacity-swap"), CapawareConfigError,
     "unknown router type 'capacity-swap': this version of megatron-capaware supports topk, capacity-drop"),
    ("config: gamma = 0", lambda t: CapawareConfig("capacity-drop", gamma=0), CapawareConfigError,
     "capacity factor gamma=0 must be > 0"),
    ("config: gamma NaN", lambda t: CapawareConfig("capacity-drop", gamma=math.nan), CapawareConfigError,
     "capacity factor gamma=nan must be > 0"),
    ("config: gamma absurd (1e9)", lambda t: CapawareConfig("capacity-drop", gamma=1e9), CapawareConfigError,
     "is absurdly large (> 1e+06); to disable the capacity limit use --moe-router-type topk"),
    ("config: unknown scope", lambda t: CapawareConfig(scope="world"), CapawareConfigError,
     "scope='world' must be one of global, local"),
    ("config: unknown drop policy", lambda t: CapawareConfig(drop_policy="lowest"), CapawareConfigError,
     "drop policy 'lowest' must be one of score, weight, position, random"),
    ("config: unknown reroute policy", lambda t: CapawareConfig(reroute_policy="far"), CapawareConfigError,
     "reroute policy 'far' must be one of score, load"),
    ("config: unknown capacity unit", lambda t: CapawareConfig("capacity-drop", capacity_unit="node"),
     CapawareConfigError, "capacity unit 'node' must be one of expert, rank"),
    ("config: rank unit with expanded-drop", lambda t: CapawareConfig("expanded-drop", capacity_unit="rank"),
     CapawareConfigError, "capacity unit 'rank' is built for capacity-drop and capacity-reroute only"),
    ("config: reroute rounds < 0", lambda t: CapawareConfig(reroute_rounds=-1), CapawareConfigError,
     "reroute rounds=-1 must be an integer >= 0"),
    ("config: reroute min ratio inf", lambda t: CapawareConfig(reroute_min_ratio=math.inf), CapawareConfigError,
     "reroute min ratio=inf must be a finite number >= 0"),
    ("config: LASER eps_high > 1 (softmax)", lambda t: CapawareConfig("laser", laser_eps_high=1.5), CapawareConfigError,
     "eps_high=1.5 must be in [0, 1]"),
    ("config: LASER eps_high < 0", lambda t: CapawareConfig("laser", laser_eps_high=-0.2), CapawareConfigError,
     "eps_high=-0.2 must be in [0, 1]"),
    ("config: LASER t_fix = 0", lambda t: CapawareConfig("laser", laser_t_fix=0), CapawareConfigError,
     "t_fix=0 must be in (0, 1]"),
    ("config: LASER t_fix > 1", lambda t: CapawareConfig("laser", laser_t_fix=2.0), CapawareConfigError,
     "t_fix=2.0 must be in (0, 1]"),
    ("config: LASER pool < k (for the model's k)", lambda t: CapawareConfig("laser", laser_pool=1).validate(
        num_experts=8, topk=2), CapawareConfigError, "pool=1 is smaller than top-k=2"),
    ("config: LASER pool not positive", lambda t: CapawareConfig("laser", laser_pool=0), CapawareConfigError,
     "pool=0 must be a positive integer"),
    ("config: LASER waves = 0", lambda t: CapawareConfig(laser_waves=0), CapawareConfigError,
     "laser_waves=0 must be an integer >= 1"),
    ("config: LASER load unknown", lambda t: CapawareConfig(router_type="laser", laser_load="token"),
     CapawareConfigError, "LASER load 'token' must be one of expert, rank"),
    ("config: LASER load with another router", lambda t: CapawareConfig(router_type="capacity-drop", laser_load="rank"),
     CapawareConfigError, "is a LASER option"),
    ("config: top-k > experts", lambda t: CapawareConfig().validate(num_experts=8, topk=9), CapawareConfigError,
     "top-k=9 exceeds the number of experts 8"),
    ("model args: top-k > experts", lambda t: MoEModelArgs(**dict(TINY, moe_router_topk=9)), ValueError,
     "moe_router_topk=9 exceeds num_moe_experts=8"),
    # --- router specs (command lines)
    ("router spec: unknown router type", lambda t: parse_router_spec("capacity-swap:gamma=1"), CapawareConfigError,
     "unknown router type 'capacity-swap' in 'capacity-swap:gamma=1'"),
    ("router spec: unknown key", lambda t: parse_router_spec("capacity-drop:gama=1.25"), CapawareConfigError,
     "unknown key 'gama' in router setting"),
    ("router spec: bad value", lambda t: parse_router_spec("capacity-drop:gamma=big"), CapawareConfigError,
     "router setting: gamma='big' is not a valid value"),
    ("router spec: missing =", lambda t: parse_router_spec("capacity-drop:gamma"), CapawareConfigError,
     "must be KEY=VALUE"),
    # --- calibration files
    ("calibration: file missing", lambda t: load_calibration(t / "missing.json"), CapawareConfigError,
     "missing.json does not exist"),
    ("calibration: not JSON", lambda t: load_calibration(calibration_file(t, "{not json")), CapawareConfigError,
     "is not valid JSON"),
    ("calibration: another format", lambda t: load_calibration(calibration_file(t, {"format": "x"})),
     CapawareConfigError, "is not a LASER calibration file (expected format 'capaware-laser-calibration/1')"),
    ("calibration: no layers", lambda t: load_calibration(calibration_file(t, dict(GOOD_CAL, layers={}))),
     CapawareConfigError, "holds no layers"),
    ("calibration: malformed layer", lambda t: load_calibration(calibration_file(
        t, dict(GOOD_CAL, layers={"1": {"eps_high": 0.5}}))), CapawareConfigError, "layer 1 is malformed"),
    ("calibration: out-of-range value in a layer", lambda t: CapawareConfig("laser", laser_calibration=str(
        calibration_file(t, dict(GOOD_CAL, layers={"3": {"eps_high": 2.0, "t_fix": 0.3, "pool": 4}})))),
     CapawareConfigError, "LASER calibration, layer 3: eps_high=2.0 must be in [0, 1]"),
]


@pytest.mark.parametrize("name,call,error,fragment", IN_PROCESS, ids=[c[0] for c in IN_PROCESS])
def test_bad_input_in_process(name: str, call, error: type, fragment: str, tmp_path) -> None:
    with pytest.raises(error) as info:
        call(tmp_path)
    assert type(info.value) is error, f"{name}: got {type(info.value).__name__}"
    assert fragment in str(info.value), f"{name}: message was {str(info.value)!r}"
    _record(name, info.value)


# (name, error type or None for "no error", message fragment)
SPAWNED: List[Tuple[str, Optional[str], str]] = [
    ("megatron: moe_expert_capacity_factor", "CapawareConfigError",
     "Unset --moe-expert-capacity-factor (the capaware gamma replaces it)"),
    ("megatron: pad_expert_input_to_capacity", "CapawareConfigError",
     "cannot be combined with --moe-pad-expert-input-to-capacity"),
    ("megatron: sinkhorn load balancing", "CapawareConfigError",
     "cannot be combined with --moe-router-load-balancing-type sinkhorn"),
    ("megatron: flex dispatcher", "CapawareConfigError",
     "supports --moe-token-dispatcher-type alltoall and allgather (dropped assignments must not be sent); got "
     "--moe-token-dispatcher-type flex"),
    ("megatron: group-limited routing with laser", "CapawareConfigError", "laser does not support group-limited routing"),
    ("megatron: expert bias with laser", "CapawareConfigError",
     "laser does not support --moe-router-enable-expert-bias"),
    ("megatron: routing replay", "CapawareConfigError", "cannot be combined with routing replay"),
    ("megatron: context parallelism", "CapawareConfigError", "use --context-parallel-size 1"),
    ("megatron: unknown score function", "CapawareConfigError",
     "knows the softmax and sigmoid score functions, not --moe-router-score-function sqrtsoftplus"),
    ("megatron: router padding for quantization", "CapawareConfigError",
     "cannot be combined with --moe-router-padding-for-quantization"),
    ("megatron: mlp chunks for prefill", "CapawareConfigError",
     "cannot be combined with --mlp-chunks-for-prefill 2"),
    ("megatron: cuda graphs capturing the router", "CapawareConfigError",
     "these CUDA-graph settings capture the MoE router"),
    ("config: pool < k (checked at install)", "CapawareConfigError", "pool=1 is smaller than top-k=2"),
    ("model without MoE layers", "CapawareConfigError", "the model has no MoE layer"),
    ("a router that is not Megatron's TopKRouter", "CapawareConfigError",
     "uses OtherRouter; capaware routing replaces Megatron's TopKRouter only"),
    ("capacity router in training mode", "RuntimeError", "is an inference router: call model.eval()"),
    *[(f"{kind} gate weight, {r}", "RoutingInputError", "MoE layer 2: router scores contain NaN or Inf")
      for r in ("capacity-drop", "capacity-reroute", "expanded-drop", "laser") for kind in ("NaN", "Inf")],
    ("NaN gate weight, topk (vanilla Megatron)", None, ""),
    ("calibration for other layers", "CapawareConfigError",
     "LASER calibration is for MoE layers [1, 2, 3, 4] but the model's MoE layers are [1, 2]: it was made for a "
     "different model"),
    ("calibration for another expert count", "CapawareConfigError",
     "LASER calibration has num_moe_experts=16 but the model has 8"),
    ("calibration for another top-k", "CapawareConfigError", "LASER calibration has moe_router_topk=1 but the model has 2"),
    ("checkpoint: load_weights with other MoEModelArgs", "CheckpointError",
     "was saved for a different architecture (num_moe_experts: checkpoint 8 vs model 16)"),
    ("checkpoint: no capaware_model.json (load_model)", "CheckpointError",
     "capaware_model.json is missing: this checkpoint has no model description"),
    ("checkpoint: no capaware_model.json, other architecture (load_weights)", "CheckpointError",
     "Global shape mismatch for loaded (torch.Size([2, 8, 64])) and expected ((2, 16, 64)) tensor for key "
     "decoder.layers.mlp.router.weight"),
    ("checkpoint: capaware_model.json with unknown fields", "CheckpointError",
     "model args: unknown fields ['num_experts_per_tok']"),
    ("checkpoint: directory does not exist", "CheckpointError", "nowhere does not exist"),
    ("checkpoint: not a checkpoint directory", "CheckpointError",
     "is not a Megatron dist checkpoint: expected latest_checkpointed_iteration.txt or metadata.json"),
    ("tokenizer: larger vocabulary than the model", "TokenizerError",
     "the tokenizer has 5001 tokens but the model's vocabulary is"),
    ("tokenizer: another tokenizer that fits the vocabulary", "TokenizerError",
     "is not the one shipped with the checkpoint"),
    ("tokenizer: the checkpoint's own, passed explicitly", None, ""),
    ("evaluation: held-out text too short", "ValueError", "too few for one batch of 2 sequences"),
]


@pytest.fixture(scope="module")
def spawned(tiny_checkpoint, tmp_path_factory) -> Dict[str, Any]:
    from tests.helpers.reliability_workers import catalogue_worker

    tmp = tmp_path_factory.mktemp("catalogue")
    return run_distributed(catalogue_worker, 1, tiny_checkpoint, str(tmp), timeout_s=420)[0]


@pytest.mark.multirank
def test_bad_input_through_megatron_checkpoints_and_tokenizers(spawned) -> None:
    assert set(spawned) - {"refused install left the router unchanged"} == {c[0] for c in SPAWNED}
    assert spawned["refused install left the router unchanged"] == "TopKRouter", \
        "a refused install must leave Megatron's router as it was"
    failures = []
    for name, error, fragment in SPAWNED:
        got = spawned[name]
        if error is None:
            if got is not None:
                failures.append(f"{name}: expected no error, got {got}")
            continue
        if got is None:
            failures.append(f"{name}: no error")
        elif got["type"] != error or fragment not in got["message"]:
            failures.append(f"{name}: got {got['type']}: {got['message'][:500]}")
        else:
            assert "Traceback" not in got["message"], f"{name}: a traceback in the message"
            _record(name, got)
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- docs table

_ROWS: List[Tuple[str, str, str]] = []


def _record(name: str, err: Any) -> None:
    if isinstance(err, dict):
        _ROWS.append((name, err["type"], err["message"]))
    else:
        _ROWS.append((name, type(err).__name__, str(err)))
    out = os.environ.get("CAPAWARE_WRITE_CATALOGUE")
    if out:
        clean = lambda text: re.sub(r"/tmp/[^\s'\"]*/", ".../", text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines = ["| bad input | error | message |", "|---|---|---|"]
        lines += [f"| {n} | `{t}` | {clean(m)} |" for n, t, m in _ROWS]
        Path(out).write_text("\n".join(lines) + "\n")
