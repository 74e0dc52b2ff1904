"""Router settings written as short strings on command lines.

Grammar: ``TYPE[:KEY=VALUE[,KEY=VALUE...]]``, e.g. ``topk``,
``capacity-drop:gamma=1.25``, ``capacity-reroute:gamma=1.5,rounds=2,policy=load``,
``laser:eps_high=0.7,t_fix=0.5,pool=4`` or ``laser:calibration=cal.json``.
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
}
_INTS = {"reroute_rounds", "laser_pool", "laser_waves", "laser_rounds", "seed"}
_FLOATS = {"gamma", "reroute_min_ratio", "laser_eps_high", "laser_t_fix"}
_BOOLS = {"renormalize"}


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
