"""Router settings written as short strings on command lines.

Grammar: ``TYPE[:KEY=VALUE[,KEY=VALUE...]]``, e.g. ``topk``,
``capacity-drop:gamma=1.25``, ``capacity-reroute:gamma=1.5,rounds=2,policy=load``,
``laser:eps_high=0.7,t_fix=0.5,pool=4``, ``laser:load=rank`` or ``laser:calibration=cal.json``,
``decode-pack:floor=2,pool=16,t_fix=0.1`` (``rank=0``: OEA's rule).
A value may list alternatives with ``|`` to sweep: ``capacity-drop:gamma=1|1.25|1.5``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Dict, List

from megatron_capaware.config import ROUTER_TYPES, CapawareConfig, CapawareConfigError

# Short keys -> CapawareConfig fields (``policy`` depends on the router type).
_KEYS: Dict[str, str] = {
    "gamma": "gamma",
    "scope": "scope",
    "rounds": "reroute_rounds",
    "min_ratio": "reroute_min_ratio",
    "rho": "reroute_min_ratio",
    "drop_policy": "drop_policy",
    "renormalize": "renormalize",
    "eps_high": "laser_eps_high",
    "eps": "laser_eps_high",
    "t_fix": "laser_t_fix",
    "pool": "laser_pool",
    "calibration": "laser_calibration",
    "waves": "laser_waves",
    "laser_rounds": "laser_rounds",
    "seed": "seed",
    "unit": "capacity_unit",
    "load": "laser_load",
    "floor": "decode_floor",
    "slack": "decode_slack",
    "rank": "decode_rank_aware",
}
# decode-pack reads t_fix and pool as its own pool's.
_DECODE_KEYS = {"t_fix": "decode_t_fix", "pool": "decode_pool"}
_INTS = {"reroute_rounds", "laser_pool", "laser_waves", "laser_rounds", "seed", "decode_floor", "decode_pool",
         "decode_slack"}
_FLOATS = {"gamma", "reroute_min_ratio", "laser_eps_high", "laser_t_fix", "decode_t_fix"}
_BOOLS = {"renormalize", "decode_rank_aware"}


def _value(field: str, raw: str) -> Any:
    try:
        if field in _INTS:
            return int(raw)
        if field in _FLOATS:
            return math.inf if raw in ("inf", "infinity") else float(raw)
        if field in _BOOLS:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise CapawareConfigError(f"router setting: {field}={raw!r} is not a valid value") from None
    return raw


def parse_router_spec(spec: str, **defaults: Any) -> List[CapawareConfig]:
    """All configurations a spec string describes (several when it sweeps with ``|``).

    Raises:
        CapawareConfigError: unknown router type or key, bad values.
    """
    router_type, _, rest = spec.strip().partition(":")
    if router_type not in ROUTER_TYPES:
        raise CapawareConfigError(
            f"unknown router type {router_type!r} in {spec!r}: use one of {', '.join(ROUTER_TYPES)}"
        )
    choices: Dict[str, List[Any]] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq:
            raise CapawareConfigError(f"router setting {item!r} in {spec!r} must be KEY=VALUE")
        key = key.strip()
        if key == "policy":
            field = "reroute_policy" if router_type == "capacity-reroute" else "drop_policy"
        elif router_type == "decode-pack" and key in _DECODE_KEYS:
            field = _DECODE_KEYS[key]
        elif key in _KEYS:
            field = _KEYS[key]
        else:
            raise CapawareConfigError(
                f"unknown key {key!r} in router setting {spec!r}; keys: policy, {', '.join(sorted(_KEYS))}"
            )
        choices[field] = [_value(field, v.strip()) for v in raw.split("|")]
    fields = list(choices)
    configs = []
    for combo in itertools.product(*(choices[f] for f in fields)):
        kwargs = dict(defaults)
        kwargs.update(zip(fields, combo))
        configs.append(CapawareConfig(router_type=router_type, **kwargs))
    return configs


def parse_router_specs(specs: List[str], **defaults: Any) -> List[CapawareConfig]:
    """Concatenate :func:`parse_router_spec` over several strings, in order."""
    out: List[CapawareConfig] = []
    for spec in specs:
        out.extend(parse_router_spec(spec, **defaults))
    return out


def format_router_spec(cfg: CapawareConfig, calibration: Any = None) -> str:
    """The spec string of one configuration (the inverse of :func:`parse_router_spec`, defaults left out).

    ``calibration``: the file a LASER configuration's per-layer parameters were saved to (written as
    ``calibration=PATH``); per-layer parameters without a file cannot be written as a spec.
    """
    parts: List[str] = []
    if cfg.router_type == "laser":
        if calibration is not None or cfg.laser_calibration:
            parts.append(f"calibration={calibration or cfg.laser_calibration}")
        elif cfg.layer_params:
            raise CapawareConfigError("per-layer LASER parameters need a calibration file to be written as a spec")
        else:
            parts.append(f"eps_high={cfg.laser_eps_high:g}")
            parts.append(f"t_fix={cfg.laser_t_fix:g}")
            if cfg.laser_pool is not None:
                parts.append(f"pool={cfg.laser_pool}")
        if cfg.laser_load != "expert":
            parts.append(f"load={cfg.laser_load}")
    if cfg.router_type == "decode-pack":
        parts += [f"{key}={value}" for key, value in _decode_items(cfg)]
    if cfg.uses_capacity:
        parts.append(f"gamma={cfg.gamma:g}")
    if cfg.router_type in ("capacity-drop", "capacity-reroute") and cfg.drop_policy != "score":
        parts.append(f"drop_policy={cfg.drop_policy}")
    if cfg.capacity_unit != "expert":
        parts.append(f"unit={cfg.capacity_unit}")
    if cfg.router_type == "capacity-reroute":
        parts.append(f"rounds={cfg.reroute_rounds}")
        if cfg.reroute_min_ratio:
            parts.append(f"rho={cfg.reroute_min_ratio:g}")
        if cfg.reroute_policy != "score":
            parts.append(f"policy={cfg.reroute_policy}")
    if cfg.router_type != "topk" and cfg.scope != "global":
        parts.append(f"scope={cfg.scope}")
    if cfg.router_type != "topk" and cfg.renormalize:
        parts.append("renormalize=true")
    return cfg.router_type + (":" + ",".join(parts) if parts else "")


def _decode_items(cfg: CapawareConfig) -> List[tuple]:
    """decode-pack's non-default knobs as (spec key, value text)."""
    items = []
    if cfg.decode_floor is not None:
        items.append(("floor", str(cfg.decode_floor)))
    if cfg.decode_pool is not None:
        items.append(("pool", str(cfg.decode_pool)))
    if cfg.decode_t_fix != 1.0:
        items.append(("t_fix", f"{cfg.decode_t_fix:g}"))
    if cfg.decode_slack:
        items.append(("slack", str(cfg.decode_slack)))
    if not cfg.decode_rank_aware:
        items.append(("rank", "0"))
    return items


def megatron_flags(cfg: CapawareConfig, calibration: Any = None) -> List[str]:
    """The Megatron command-line flags (``megatron_capaware.megatron_lm.arguments``) of one configuration."""
    flags = ["--moe-router-type", cfg.router_type]
    if cfg.router_type == "laser":
        if calibration is not None or cfg.laser_calibration:
            flags += ["--capaware-laser-calibration", str(calibration or cfg.laser_calibration)]
        elif cfg.layer_params:
            raise CapawareConfigError("per-layer LASER parameters need a calibration file to be written as flags")
        else:
            flags += ["--capaware-laser-eps-high", f"{cfg.laser_eps_high:g}", "--capaware-laser-t-fix",
                      f"{cfg.laser_t_fix:g}"]
            if cfg.laser_pool is not None:
                flags += ["--capaware-laser-pool", str(cfg.laser_pool)]
        if cfg.laser_load != "expert":
            flags += ["--capaware-laser-load", cfg.laser_load]
    if cfg.router_type == "decode-pack":
        for key, value in _decode_items(cfg):
            flags += [f"--capaware-decode-{key.replace('_', '-')}", value] if key != "rank" else \
                ["--capaware-decode-oea"]
    if cfg.uses_capacity:
        flags += ["--capaware-gamma", f"{cfg.gamma:g}"]
    if cfg.router_type in ("capacity-drop", "capacity-reroute") and cfg.drop_policy != "score":
        flags += ["--capaware-drop-policy", cfg.drop_policy]
    if cfg.capacity_unit != "expert":
        flags += ["--capaware-capacity-unit", cfg.capacity_unit]
    if cfg.router_type == "capacity-reroute":
        flags += ["--capaware-reroute-rounds", str(cfg.reroute_rounds)]
        if cfg.reroute_min_ratio:
            flags += ["--capaware-reroute-min-ratio", f"{cfg.reroute_min_ratio:g}"]
        if cfg.reroute_policy != "score":
            flags += ["--capaware-reroute-policy", cfg.reroute_policy]
    if cfg.router_type != "topk" and cfg.scope != "global":
        flags += ["--capaware-scope", cfg.scope]
    if cfg.router_type != "topk" and cfg.renormalize:
        flags.append("--capaware-renormalize")
    return flags
