"""One dataclass that carries the router type and its knobs, with validation.

Used by the Megatron adapters, the command-line flags
(:mod:`megatron_capaware.megatron_lm.arguments`) and the evaluation. Every invalid value
raises :class:`CapawareConfigError` with what is wrong and how to fix it.
"""

from __future__ import annotations

from megatron_capaware.errors import CapawareConfigError  # noqa: F401 (defined there; re-exported)

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from megatron_capaware.policies.common import CAPACITY_UNITS, DROP_POLICIES, LASER_LOADS, REROUTE_POLICIES
from megatron_capaware.registry import (
    CAPACITY_REROUTE,
    DECODE_PACK,
    DECODE_ROUTERS,
    KNOBS_BY_FIELD,
    LASER,
    SCOPES,
    TOPK,
    router_names,
    router_type,
)

#: Every registered router type (megatron_capaware.registry), in table order.
ROUTER_TYPES = router_names()
#: The routers that take --capaware-capacity-unit rank.
RANK_UNIT_ROUTERS = router_names(rank_unit=True)
CALIBRATION_FORMAT = "capaware-laser-calibration/1"
MAX_GAMMA = 1e6  # beyond this a capacity factor is a typo, not a setting



@dataclass
class LaserParams:
    """LASER's per-layer knobs."""

    eps_high: float
    t_fix: float
    pool: int

    def validate(self, where: str, k: Optional[int] = None, score_function: str = "softmax") -> None:
        upper = 1.0 if score_function == "softmax" else float(k or 1)
        if not isinstance(self.eps_high, (int, float)) or isinstance(self.eps_high, bool) or not (
            0.0 <= float(self.eps_high) <= upper
        ):
            raise CapawareConfigError(
                f"{where}: eps_high={self.eps_high!r} must be in [0, {upper:g}] (the top-k score "
                "mass of a token; 0 makes every token confident, i.e. top-k)"
            )
        if not isinstance(self.t_fix, (int, float)) or isinstance(self.t_fix, bool) or not (
            0.0 < float(self.t_fix) <= 1.0
        ):
            raise CapawareConfigError(
                f"{where}: t_fix={self.t_fix!r} must be in (0, 1] (pool keeps experts scoring "
                ">= t_fix x the best score)"
            )
        if not isinstance(self.pool, int) or isinstance(self.pool, bool) or self.pool < 1:
            raise CapawareConfigError(f"{where}: pool={self.pool!r} must be a positive integer")
        if k is not None and self.pool < k:
            raise CapawareConfigError(
                f"{where}: pool={self.pool} is smaller than top-k={k}; the pool always holds the "
                f"top-k, use pool >= {k} (pool == k reproduces top-k)"
            )


def check_decode_knobs(cfg: "CapawareConfig", topk: Optional[int]) -> None:
    """decode-pack's knobs (and, with the model's top-k, against it); CapawareConfigError names the fix."""
    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if cfg.decode_floor is not None and (not integer(cfg.decode_floor) or cfg.decode_floor < 1):
        raise CapawareConfigError(f"decode floor={cfg.decode_floor!r} must be an integer >= 1 (the best experts "
                                  "each token keeps)")
    if cfg.decode_pool is not None and (not integer(cfg.decode_pool) or cfg.decode_pool < 1):
        raise CapawareConfigError(f"decode pool={cfg.decode_pool!r} must be a positive integer")
    if not integer(cfg.decode_slack) or cfg.decode_slack < 0:
        raise CapawareConfigError(f"decode slack={cfg.decode_slack!r} must be an integer >= 0")
    if isinstance(cfg.decode_t_fix, bool) or not isinstance(cfg.decode_t_fix, (int, float)) or not (
            0.0 < float(cfg.decode_t_fix) <= 1.0):
        raise CapawareConfigError(f"decode t_fix={cfg.decode_t_fix!r} must be in (0, 1] (the pool keeps experts "
                                  "scoring >= t_fix x the token's best)")
    if not isinstance(cfg.decode_rank_aware, bool):
        raise CapawareConfigError(f"decode rank_aware={cfg.decode_rank_aware!r} must be true or false")
    if DECODE_PACK not in (cfg.router_type, cfg.decode_router):
        changed = [name for name, default in (("decode_floor", None), ("decode_t_fix", 1.0), ("decode_pool", None),
                                              ("decode_slack", 0), ("decode_rank_aware", True))
                   if getattr(cfg, name) != default]
        if changed:
            raise CapawareConfigError(f"{', '.join(changed)} are decode-pack options, not {cfg.router_type}'s; use "
                                      "--moe-router-type decode-pack (or --capaware-decode-router decode-pack) or "
                                      "leave them unset")
    if topk is not None:
        if cfg.decode_floor is not None and cfg.decode_floor > topk:
            raise CapawareConfigError(f"decode floor={cfg.decode_floor} exceeds the model's top-k={topk}; use "
                                      f"1..{topk} (floor == top-k is top-k)")
        if cfg.decode_pool is not None and cfg.decode_pool < topk:
            raise CapawareConfigError(f"decode pool={cfg.decode_pool} is smaller than top-k={topk}; the pool always "
                                      f"holds the top-k, use pool >= {topk}")


def decode_label(cfg: "CapawareConfig") -> str:
    """``decode-pack(floor=2,pool=16,t_fix=0.1)``; OEA's rule: ``decode-pack(oea,floor=2)``."""
    parts = [] if cfg.decode_rank_aware else ["oea"]
    parts.append(f"floor={cfg.decode_floor if cfg.decode_floor is not None else 'k/2'}")
    if cfg.decode_pool is not None:
        parts.append(f"pool={cfg.decode_pool}")
    if cfg.decode_t_fix != 1.0:
        parts.append(f"t_fix={cfg.decode_t_fix:g}")
    if cfg.decode_slack:
        parts.append(f"slack={cfg.decode_slack}")
    if cfg.renormalize:
        parts.append("renorm")
    return f"{DECODE_PACK}({','.join(parts)})"


def check_decode_router(cfg: "CapawareConfig") -> None:
    """``decode_router`` (``--capaware-decode-router``): a decode router, on a router that hands it decode steps.

    Raises:
        CapawareConfigError: naming the flag and the fix.
    """
    name = cfg.decode_router
    if name is None:
        return
    if name not in DECODE_ROUTERS:
        what = "a router type" if name in ROUTER_TYPES else "not a router type"
        raise CapawareConfigError(
            f"--capaware-decode-router {name!r} is {what} but not a decode router: use "
            f"{' or '.join(DECODE_ROUTERS)} (it routes the dynamic engine's decode-only steps), or leave it unset "
            "(top-k on decode-only steps)")
    if cfg.router_type not in KNOBS_BY_FIELD["decode_router"].routers:
        if router_type(cfg.router_type).is_vanilla:
            fix = f"use --moe-router-type {name} alone (it routes decode-only steps and leaves the rest to top-k)"
        else:
            fix = f"--moe-router-type {cfg.router_type} is a decode router itself; use it alone"
        raise CapawareConfigError(
            f"--capaware-decode-router {name} needs a router for prefill and mixed steps (one of "
            f"{', '.join(KNOBS_BY_FIELD['decode_router'].routers)}): {fix}")
    if cfg.phases is not None:
        from megatron_capaware.policies.phases import parse_phases

        if "decode" in parse_phases(cfg.phases):
            raise CapawareConfigError(
                f"--capaware-phases {cfg.phases} applies {cfg.router_type} to decode-only steps, and "
                f"--capaware-decode-router {name} routes them too: remove decode from --capaware-phases or drop "
                "--capaware-decode-router")


def _check_phases(phases: str) -> None:
    from megatron_capaware.policies.phases import PhaseConfigError, parse_phases

    try:
        parse_phases(phases)
    except PhaseConfigError as err:
        raise CapawareConfigError(str(err)) from None


#: decode-pack's knob defaults (a host router's label leaves its decode router's knobs out).
_DECODE_DEFAULTS: Dict[str, Any] = dict(decode_floor=None, decode_t_fix=1.0, decode_pool=None, decode_slack=0,
                                        decode_rank_aware=True)


@dataclass
class CapawareConfig:
    """Router type and knobs (names follow the ``--moe-router-type`` / ``--capaware-*`` flags).

    Attributes:
        router_type: one of ``topk``, ``capacity-drop``, ``capacity-reroute``,
            ``expanded-drop``, ``laser``, ``decode-pack``.
        gamma: capacity factor: ``C = ceil(gamma * T_glob * k / E)``.
        drop_policy: which assignments an overloaded expert keeps.
        renormalize: make each token's surviving weights sum to 1.
        scope: ``global`` (loads over the EP group, exact) or ``local`` (each
            rank's own tokens, the papers' and Megatron's semantics).
        reroute_rounds, reroute_policy, reroute_min_ratio: Token Reroute knobs.
        laser_eps_high, laser_t_fix, laser_pool: LASER defaults for every
            layer (``laser_pool=None``: ``2k``); a calibration file overrides
            them per layer.
        laser_waves, laser_rounds: LASER fast-path granularity.
        laser_calibration: path of a calibration file (``capaware-calibrate``).
        laser_load: what LASER's least-loaded choice compares: ``expert`` (each
            candidate's own global load) or ``rank`` (the global load of the
            candidate's EP rank, summed over its experts), so that it moves
            work between ranks.
        seed: seed of the ``random`` drop policy.
        capacity_unit: ``expert`` (the papers': each expert keeps at most C)
            or ``rank`` (capacity-drop, capacity-reroute: each EP rank keeps at
            most ``C_rank = ceil(gamma * T_glob * k / EP)`` over its experts;
            reroute then offers the dropped assignments to ranks with room).
        decode_floor, decode_t_fix, decode_pool, decode_slack, decode_rank_aware:
            decode-pack's knobs (:func:`megatron_capaware.policies.decode_pack`):
            the top experts every token keeps (None: ``ceil(k / 2)``), the
            pool (``t_fix``, ``pool``; None: ``k``), the experts a rank may
            activate beyond the floor's busiest rank, and whether the other
            ranks' room is spent (False: OEA's rule).
        record_stats: record per-layer load statistics on every forward.
        check_scores: reject NaN / Inf router scores (one host sync per layer).
        layer_params: per-layer LASER knobs (from the calibration file).
        phases: the dynamic engine's steps the policy applies to
            (``--capaware-phases``; :mod:`megatron_capaware.adapters.phases`):
            ``all`` or a comma list of ``prefill``, ``mixed``, ``decode``,
            ``idle``; other steps are routed by ``topk`` on the placement. None: the router
            type's default (:attr:`megatron_capaware.registry.RouterType.phases`: ``prefill,mixed``,
            ``decode`` for ``decode-pack``).
        decode_router: a decode router (``decode-pack``) for the dynamic engine's decode-only
            steps instead of top-k (``--capaware-decode-router``); its ``decode_*`` knobs apply.
    """

    router_type: str = TOPK
    gamma: float = 1.25
    drop_policy: str = "score"
    renormalize: bool = False
    scope: str = "global"
    reroute_rounds: int = 1
    reroute_policy: str = "score"
    reroute_min_ratio: float = 0.0
    laser_eps_high: float = 0.6
    laser_t_fix: float = 0.5
    laser_pool: Optional[int] = None
    laser_waves: int = 8
    laser_rounds: int = 1
    laser_calibration: Optional[str] = None
    laser_load: str = "expert"
    decode_floor: Optional[int] = None
    decode_t_fix: float = 1.0
    decode_pool: Optional[int] = None
    decode_slack: int = 0
    decode_rank_aware: bool = True
    seed: int = 0
    capacity_unit: str = "expert"
    record_stats: bool = True
    check_scores: bool = True
    layer_params: Dict[int, LaserParams] = field(default_factory=dict)
    phases: Optional[str] = None
    decode_router: Optional[str] = None

    def __post_init__(self) -> None:
        if self.laser_calibration and not self.layer_params:
            self.layer_params = load_calibration(self.laser_calibration).layer_params
        self.validate()

    @property
    def uses_capacity(self) -> bool:
        return router_type(self.router_type).capacity

    def validate(
        self,
        *,
        num_experts: Optional[int] = None,
        topk: Optional[int] = None,
        score_function: str = "softmax",
    ) -> None:
        """Check the knobs; with the model's sizes, also check them against the model.

        Raises:
            CapawareConfigError: naming the field and the fix.
        """
        if self.router_type not in ROUTER_TYPES:
            raise CapawareConfigError(
                f"unknown router type {self.router_type!r}: this version of megatron-capaware "
                f"supports {', '.join(ROUTER_TYPES)}"
            )
        if self.scope not in SCOPES:
            raise CapawareConfigError(f"scope={self.scope!r} must be one of {', '.join(SCOPES)}")
        if self.drop_policy not in DROP_POLICIES:
            raise CapawareConfigError(
                f"drop policy {self.drop_policy!r} must be one of {', '.join(DROP_POLICIES)}"
            )
        if self.capacity_unit not in CAPACITY_UNITS:
            raise CapawareConfigError(
                f"capacity unit {self.capacity_unit!r} must be one of {', '.join(CAPACITY_UNITS)}"
            )
        if self.capacity_unit == "rank" and self.router_type not in RANK_UNIT_ROUTERS:
            raise CapawareConfigError(
                f"capacity unit 'rank' is built for {' and '.join(RANK_UNIT_ROUTERS)} only, not "
                f"{self.router_type}; use one of those, or --capaware-capacity-unit expert"
            )
        if self.laser_load not in LASER_LOADS:
            raise CapawareConfigError(f"LASER load {self.laser_load!r} must be one of {', '.join(LASER_LOADS)}")
        if self.laser_load != "expert" and self.router_type != LASER:
            raise CapawareConfigError(
                f"laser_load={self.laser_load!r} is a LASER option, not one of {self.router_type}; use "
                "--moe-router-type laser, or leave --capaware-laser-load at expert"
            )
        if self.phases is not None:
            _check_phases(self.phases)
        check_decode_router(self)
        if self.reroute_policy not in REROUTE_POLICIES:
            raise CapawareConfigError(
                f"reroute policy {self.reroute_policy!r} must be one of {', '.join(REROUTE_POLICIES)}"
            )
        gamma = self.gamma
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or math.isnan(gamma) or gamma <= 0:
            raise CapawareConfigError(
                f"capacity factor gamma={gamma!r} must be > 0 (1.0 caps every expert at the mean "
                "load; typical values 1.0-2.0)"
            )
        if gamma > MAX_GAMMA and not math.isinf(gamma):
            raise CapawareConfigError(
                f"capacity factor gamma={gamma} is absurdly large (> {MAX_GAMMA:g}); to disable the "
                "capacity limit use --moe-router-type topk (or gamma=inf)"
            )
        if not isinstance(self.reroute_rounds, int) or isinstance(self.reroute_rounds, bool) or self.reroute_rounds < 0:
            raise CapawareConfigError(f"reroute rounds={self.reroute_rounds!r} must be an integer >= 0")
        if not (isinstance(self.reroute_min_ratio, (int, float)) and 0 <= self.reroute_min_ratio < math.inf):
            raise CapawareConfigError(
                f"reroute min ratio={self.reroute_min_ratio!r} must be a finite number >= 0"
            )
        for name in ("laser_waves",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CapawareConfigError(f"{name}={value!r} must be an integer >= 1")
        if not isinstance(self.laser_rounds, int) or isinstance(self.laser_rounds, bool) or self.laser_rounds < 0:
            raise CapawareConfigError(f"laser_rounds={self.laser_rounds!r} must be an integer >= 0")
        pool = self.laser_pool if self.laser_pool is not None else (2 * topk if topk else 2)
        LaserParams(self.laser_eps_high, self.laser_t_fix, pool).validate(
            "LASER defaults", topk, score_function
        )
        for layer, params in self.layer_params.items():
            params.validate(f"LASER calibration, layer {layer}", topk, score_function)
        check_decode_knobs(self, topk)
        if topk is not None and num_experts is not None and topk > num_experts:
            raise CapawareConfigError(f"top-k={topk} exceeds the number of experts {num_experts}")

    def decode_config(self) -> "Optional[CapawareConfig]":
        """The configuration of the decode router (``decode_router``) for decode-only steps, or None.

        Its own knobs (``decode_*``) and the shared ones (renormalize, scope, stats, score check)
        carry over; the host router's capacity or LASER knobs do not apply to it.
        """
        if self.decode_router is None:
            return None
        values = dict(router_type=self.decode_router, decode_floor=self.decode_floor,
                      decode_t_fix=self.decode_t_fix, decode_pool=self.decode_pool, decode_slack=self.decode_slack,
                      decode_rank_aware=self.decode_rank_aware, renormalize=self.renormalize, scope=self.scope,
                      record_stats=self.record_stats, check_scores=self.check_scores)
        key = tuple(values.values())
        cached = self.__dict__.get("_decode_config")  # (key, config): built once per setting, not per call
        if cached is None or cached[0] != key:
            cached = (key, CapawareConfig(**values))
            self.__dict__["_decode_config"] = cached
        return cached[1]

    def decode_floor_for(self, topk: int) -> int:
        """decode-pack's floor for a model's top-k (``decode_floor``, default ``ceil(k / 2)``)."""
        return self.decode_floor if self.decode_floor is not None else (topk + 1) // 2

    def laser_params(self, layer_number: Optional[int], topk: int) -> LaserParams:
        """LASER knobs of one layer: the calibrated ones, else the defaults."""
        if layer_number is not None and layer_number in self.layer_params:
            return self.layer_params[layer_number]
        pool = self.laser_pool if self.laser_pool is not None else 2 * topk
        return LaserParams(self.laser_eps_high, self.laser_t_fix, pool)

    def describe(self) -> str:
        """A short label for tables: ``capacity-drop(gamma=1.25)``, ``laser(cal)``...; with a decode
        router: ``capacity-drop(gamma=1)+decode:decode-pack(floor=k/2)``."""
        decode = self.decode_config()
        if decode is not None:
            return f"{self.replace(decode_router=None, **_DECODE_DEFAULTS)._describe()}+decode:{decode.describe()}"
        return self._describe()

    def _describe(self) -> str:
        if router_type(self.router_type).is_vanilla:
            return self.router_type
        if self.router_type == DECODE_PACK:
            return decode_label(self)
        if self.router_type == LASER:
            if self.layer_params:
                return "laser(calibrated,load=rank)" if self.laser_load == "rank" else "laser(calibrated)"
            load = ",load=rank" if self.laser_load == "rank" else ""
            return (f"laser(eps={self.laser_eps_high:g},t_fix={self.laser_t_fix:g},pool={self.laser_pool or '2k'}"
                    f"{load})")
        extra = ""
        if self.drop_policy != "score" and router_type(self.router_type).drop_policies:
            extra += f",drop={self.drop_policy}"
        if self.router_type == CAPACITY_REROUTE:
            extra += f",rounds={self.reroute_rounds}"
            if self.reroute_min_ratio:
                extra += f",rho={self.reroute_min_ratio:g}"
            if self.reroute_policy != "score":  # else two sweeps' labels collide
                extra += f",policy={self.reroute_policy}"
        if self.capacity_unit == "rank":
            extra += ",unit=rank"
        if self.scope == "local":
            extra += ",local"
        return f"{self.router_type}(gamma={self.gamma:g}{extra})"

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layer_params"] = {str(k): dataclasses.asdict(v) for k, v in self.layer_params.items()}
        return data

    def replace(self, **changes: Any) -> "CapawareConfig":
        return dataclasses.replace(self, **changes)


@dataclass
class Calibration:
    """A LASER calibration file's content."""

    layer_params: Dict[int, LaserParams]
    model: Dict[str, Any] = field(default_factory=dict)
    rule: Dict[str, Any] = field(default_factory=dict)
    statistics: Dict[str, Any] = field(default_factory=dict)

    def save(self, path: Union[str, Path]) -> None:
        data = {
            "format": CALIBRATION_FORMAT,
            "model": self.model,
            "rule": self.rule,
            "layers": {str(k): dataclasses.asdict(v) for k, v in sorted(self.layer_params.items())},
            "statistics": self.statistics,
        }
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def check_model(self, num_moe_layers: Optional[Sequence[int]], num_experts: int, topk: int) -> None:
        """Raise if this file was made for another model (layers, experts, top-k).

        ``num_moe_layers`` None: the model's layer set is not known (installation layer by layer),
        only the experts and top-k are checked.
        """
        expected = sorted(int(x) for x in self.model.get("moe_layer_numbers", self.layer_params.keys()))
        if num_moe_layers is not None and sorted(num_moe_layers) != expected:
            raise CapawareConfigError(
                f"LASER calibration is for MoE layers {expected} but the model's MoE layers are "
                f"{sorted(num_moe_layers)}: it was made for a different model; run "
                "capaware-calibrate on this checkpoint"
            )
        for key, actual in (("num_moe_experts", num_experts), ("moe_router_topk", topk)):
            if key in self.model and int(self.model[key]) != int(actual):
                raise CapawareConfigError(
                    f"LASER calibration has {key}={self.model[key]} but the model has {actual}: "
                    "it was made for a different model; run capaware-calibrate on this checkpoint"
                )


def load_calibration(path: Union[str, Path]) -> Calibration:
    """Read a calibration file written by ``capaware-calibrate``.

    Raises:
        CapawareConfigError: missing file, not JSON, wrong format, bad values.
    """
    path = Path(path)
    if not path.exists():
        raise CapawareConfigError(f"LASER calibration file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CapawareConfigError(f"LASER calibration file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        raise CapawareConfigError(
            f"{path} is not a LASER calibration file (expected format {CALIBRATION_FORMAT!r}); "
            "make one with capaware-calibrate"
        )
    layers: Dict[int, LaserParams] = {}
    for key, params in data.get("layers", {}).items():
        try:
            layers[int(key)] = LaserParams(
                eps_high=float(params["eps_high"]), t_fix=float(params["t_fix"]), pool=int(params["pool"])
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CapawareConfigError(f"{path}: layer {key} is malformed ({err})") from err
    if not layers:
        raise CapawareConfigError(f"{path} holds no layers")
    return Calibration(
        layer_params=layers,
        model=data.get("model", {}),
        rule=data.get("rule", {}),
        statistics=data.get("statistics", {}),
    )
