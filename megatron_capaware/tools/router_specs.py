"""Router settings written as short strings on command lines.

Grammar: ``TYPE[:KEY=VALUE[,KEY=VALUE...]]``, e.g. ``topk``,
``capacity-drop:gamma=1.25``, ``capacity-reroute:gamma=1.5,rounds=2,policy=load``,
``laser:eps_high=0.7,t_fix=0.5,pool=4``, ``laser:load=rank`` or ``laser:calibration=cal.json``.
A value may list alternatives with ``|`` to sweep: ``capacity-drop:gamma=1|1.25|1.5``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Dict, List, Tuple

from megatron_capaware.config import ROUTER_TYPES, CapawareConfig, CapawareConfigError
from megatron_capaware.registry import CALIBRATED_FIELDS, KNOBS, Knob, decode_router_knobs, knobs_for, spec_key

#: Every spec key (``policy`` depends on the router type: :func:`~megatron_capaware.registry.spec_key`).
_KEYS = sorted({key for knob in KNOBS for key in knob.keys} | {"policy"})
_INTS = {k.field for k in KNOBS if k.kind == "int"}
_FLOATS = {k.field for k in KNOBS if k.kind == "float"}
_BOOLS = {k.field for k in KNOBS if k.kind == "bool"}


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
        knob = spec_key(key, router_type)
        if knob is None:
            raise CapawareConfigError(f"unknown key {key!r} in router setting {spec!r}; keys: {', '.join(_KEYS)}")
        field = knob.field
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


def _shown(cfg: CapawareConfig, calibration: Any, what: str) -> List[Tuple[Knob, Any]]:
    """The knobs of ``cfg``'s router type that its spec or flags spell out, with their values.

    A knob is written when its router type always shows it (gamma, reroute rounds, LASER's
    eps_high / t_fix) or its value is not the default; a calibration file replaces the
    calibrated LASER knobs.
    """
    calibration = calibration if calibration is not None else cfg.laser_calibration
    knobs = knobs_for(cfg.router_type)
    knobs += tuple(k for k in decode_router_knobs(cfg.decode_router) if k not in knobs)
    if any(k.field == "laser_calibration" for k in knobs) and calibration is None and cfg.layer_params:
        raise CapawareConfigError(f"per-layer LASER parameters need a calibration file to be written as {what}")
    out: List[Tuple[Knob, Any]] = []
    for knob in knobs:
        value = calibration if knob.field == "laser_calibration" else getattr(cfg, knob.field)
        if calibration is not None and knob.field in CALIBRATED_FIELDS:
            continue
        if cfg.router_type in knob.shown or (value is not None and value != knob.default):
            out.append((knob, value))
    return out


def _key(knob: Knob, router: str) -> str:
    """The first of ``knob``'s spec keys that names it for ``router`` (a decode router's knobs on a
    capacity router or LASER: ``decode_pool``, since ``pool`` is LASER's there)."""
    return next((key for key in knob.keys if spec_key(key, router) is knob), knob.keys[-1])


def _text(knob: Knob, value: Any) -> str:
    if knob.kind == "float":
        return f"{value:g}"
    if knob.kind == "bool":
        return "true" if value else "false"
    return str(value)


def format_router_spec(cfg: CapawareConfig, calibration: Any = None) -> str:
    """The spec string of one configuration (the inverse of :func:`parse_router_spec`, defaults left out).

    ``calibration``: the file a LASER configuration's per-layer parameters were saved to (written as
    ``calibration=PATH``); per-layer parameters without a file cannot be written as a spec.
    """
    parts = [f"{_key(knob, cfg.router_type)}={_text(knob, value)}" for knob, value in _shown(cfg, calibration, "a spec")]
    return cfg.router_type + (":" + ",".join(parts) if parts else "")


def megatron_flags(cfg: CapawareConfig, calibration: Any = None) -> List[str]:
    """The Megatron command-line flags (``megatron_capaware.megatron_lm.arguments``) of one configuration."""
    flags = ["--moe-router-type", cfg.router_type]
    for knob, value in _shown(cfg, calibration, "flags"):
        if knob.kind == "bool":
            flags += [knob.flag] if bool(value) != knob.inverted else []
        else:
            flags += [knob.flag, _text(knob, value)]
    return flags
