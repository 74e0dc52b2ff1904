"""The one table of router types and their knobs.

Every other encoding of a router setting is derived from here: the
:class:`~megatron_capaware.config.CapawareConfig` validation (which types
exist, which take a capacity unit or a drop policy), the ``--routers`` spec
grammar (:mod:`megatron_capaware.tools.router_specs`), the Megatron-style
``--capaware-*`` flags (:mod:`megatron_capaware.megatron_lm.arguments`), the
printed labels, the refusal table's router sets and the command-line
choices. Adding a router type means one :class:`RouterType` entry here plus
its policy (and its dispatch in the router adapter).

Pure data: imports nothing from the package but the policies' option names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from megatron_capaware.policies.common import CAPACITY_UNITS, DROP_POLICIES, LASER_LOADS, REROUTE_POLICIES

SCOPES = ("global", "local")

# The names, once: code elsewhere compares with these (or, better, asks a capability).
TOPK = "topk"
CAPACITY_DROP = "capacity-drop"
CAPACITY_REROUTE = "capacity-reroute"
EXPANDED_DROP = "expanded-drop"
LASER = "laser"
DECODE_PACK = "decode-pack"


@dataclass(frozen=True)
class RouterType:
    """One ``--moe-router-type`` value and what it can do.

    Attributes:
        name: the ``--moe-router-type`` value.
        summary: one sentence for ``--help`` and the docs.
        capacity: caps expert (or rank) loads with ``C = ceil(gamma * T * k / E)``.
        rank_unit: accepts ``capacity_unit="rank"`` (capacity per EP rank).
        drop_policies: accepts the drop policies (which assignments an overloaded expert keeps).
        adds_experts: may give a token an expert outside its top-k (needs the group-limited mask).
        replicas: runs under a placement with redundant experts (decides on physical slots).
        group_limited: supports Megatron's group-limited routing (``--moe-router-num-groups``).
        expert_bias: supports ``--moe-router-enable-expert-bias``.
        token_copies: routes alike on TP ranks that hold copies of the same tokens (False: needs
            ``--sequence-parallel`` with TP > 1, its decision depends on the EP rank).
        variable_counts: changes Megatron's decision at all (False: vanilla top-k).
        keeps_k: gives every real token exactly k experts (the dispatcher keeps Megatron's sync point).
        marker: the matplotlib marker of its points in the pictures.
        phases: the dynamic engine's steps it applies to by default (``--capaware-phases``).
    """

    name: str
    summary: str
    capacity: bool = False
    rank_unit: bool = False
    drop_policies: bool = False
    adds_experts: bool = False
    replicas: bool = True
    group_limited: bool = True
    expert_bias: bool = True
    token_copies: bool = True
    variable_counts: bool = True
    keeps_k: bool = False
    marker: str = "o"
    phases: str = "prefill,mixed"

    @property
    def is_vanilla(self) -> bool:
        """Megatron's own routing, unchanged (never refused, reads no knob)."""
        return not self.variable_counts


@dataclass(frozen=True)
class Knob:
    """One router knob: a :class:`CapawareConfig` field, its spec keys and its flag.

    Attributes:
        field: the ``CapawareConfig`` attribute; the flag is ``--capaware-<field>``.
        keys: spec keys (``capacity-drop:gamma=1.25``), the first one canonical.
        kind: value type: ``float``, ``int``, ``bool``, ``str`` or ``path``.
        default: the documented default (``None``: derived, e.g. LASER's pool 2k).
        routers: the router types that read it (given with another type: an error).
        help: the flag's help text (without its default).
        check: the flag's value check: ``positive``, ``nonnegative``, ``unit``,
            ``int>=0``, ``int>=1``, ``file`` or None.
        choices: allowed values of a ``str`` knob.
        shown: router types whose spec / flags always print it (else only when not the default).
        metavar: the flag's metavar.
        flag_name: the flag when it is not ``--capaware-<field>`` (argparse dest ``capaware_<flag>``).
        inverted: a ``bool`` knob whose flag sets it False (``--capaware-decode-oea``: not rank-aware).
    """

    field: str
    keys: Tuple[str, ...]
    kind: str
    default: Any
    routers: Tuple[str, ...]
    help: str
    check: Optional[str] = None
    choices: Optional[Tuple[str, ...]] = None
    shown: Tuple[str, ...] = ()
    metavar: Optional[str] = None
    flag_name: Optional[str] = None
    inverted: bool = False

    @property
    def dest(self) -> str:
        """The argparse dest of the flag: ``capaware_<field>`` (or of its ``flag_name``)."""
        return "capaware_" + (self.flag_name or self.field)

    @property
    def flag(self) -> str:
        """``--capaware-<field>`` with hyphens."""
        return "--" + self.dest.replace("_", "-")


ROUTER_TYPES: Dict[str, RouterType] = {r.name: r for r in (
    RouterType(TOPK, "Megatron's own routing, unchanged (also keeps Megatron's --moe-expert-capacity-factor "
               "dropping)", variable_counts=False, keeps_k=True, marker="*"),
    RouterType(CAPACITY_DROP, "each expert keeps at most C = ceil(gamma x T x k / E) assignments, its "
               "highest-scoring ones", capacity=True, rank_unit=True, drop_policies=True, marker="o"),
    RouterType(CAPACITY_REROUTE, "overflow goes to experts with spare capacity", capacity=True, rank_unit=True,
               drop_policies=True, adds_experts=True, marker="s"),
    RouterType(EXPANDED_DROP, "top-k plus the token's own EP rank's experts, then the capacity rule",
               capacity=True, adds_experts=True, token_copies=False, marker="^"),
    RouterType(LASER, "top-k for confident tokens, the least-loaded good-enough experts for the others",
               replicas=False, group_limited=False, expert_bias=False, keeps_k=True, marker="D"),
    RouterType(DECODE_PACK, "(decode steps) each token keeps its best --capaware-decode-floor experts and fills the "
               "rest from experts already active, so the busiest EP rank activates as few experts as possible",
               adds_experts=True, replicas=False, marker="P", phases="decode"),
)}

_CAPACITY = tuple(n for n, r in ROUTER_TYPES.items() if r.capacity)
_DROPPING = tuple(n for n, r in ROUTER_TYPES.items() if r.drop_policies)
_NON_VANILLA = tuple(n for n, r in ROUTER_TYPES.items() if not r.is_vanilla)
_REROUTE = (CAPACITY_REROUTE,)
_LASER = (LASER,)
_DECODE = (DECODE_PACK,)
#: Routers of decode-only steps (``--capaware-decode-router``): their default phases are decode only.
DECODE_ROUTERS = tuple(n for n, r in ROUTER_TYPES.items() if r.phases == "decode")
#: Routers that may hand decode-only steps to a decode router (not top-k, not a decode router itself).
_TAKES_DECODE_ROUTER = tuple(n for n, r in ROUTER_TYPES.items() if not r.is_vanilla and n not in DECODE_ROUTERS)

KNOBS: Tuple[Knob, ...] = (
    Knob("gamma", ("gamma",), "float", 1.25, _CAPACITY, check="positive", shown=_CAPACITY, metavar="GAMMA",
         help="Capacity factor gamma > 0 of the capacity routers: an expert processes at most "
         "C = ceil(gamma x T x k / E) assignments per layer and forward call (T tokens, k = --moe-router-topk, "
         "E = --num-experts); 1.0 caps every expert at the mean load. Replaces Megatron's "
         "--moe-expert-capacity-factor."),
    Knob("drop_policy", ("drop_policy",), "str", "score", _DROPPING, choices=DROP_POLICIES,
         help="Which assignments an overloaded expert keeps: score (highest router score), weight (largest "
         "share of the token's top-k mass: first choices before second choices), position (earliest tokens), "
         "random (seeded by --capaware-seed). Default: follows Megatron's --moe-token-drop-policy (probs -> "
         "score, position -> position), i.e. score."),
    Knob("capacity_unit", ("unit",), "str", "expert", tuple(n for n, r in ROUTER_TYPES.items() if r.rank_unit),
         choices=CAPACITY_UNITS,
         help="What the capacity caps: expert (each expert keeps at most C, the papers') or rank (each EP rank "
         "keeps at most ceil(gamma * T * k / EP) assignments over its experts: the cap on what sets the layer's "
         "latency; reroute then offers dropped assignments to experts on ranks with room)."),
    Knob("renormalize", ("renormalize",), "bool", False, _NON_VANILLA,
         help="Rescale each token's surviving expert weights to sum to 1 after drops or reroutes (off: kept "
         "weights equal vanilla top-k's exactly)."),
    Knob("scope", ("scope",), "str", "global", _NON_VANILLA, choices=SCOPES,
         help="global: loads and capacity over the whole expert-parallel group (exact: no expert receives "
         "more than C after dispatch); local: each rank's own tokens, the papers' and Megatron's per-rank "
         "semantics."),
    Knob("reroute_rounds", ("rounds",), "int", 1, _REROUTE, check="int>=0", shown=_REROUTE, metavar="N",
         help="Rounds of rerouting dropped assignments to experts with spare capacity; what is still unplaced "
         "is dropped (0 = capacity-drop)."),
    Knob("reroute_policy", ("policy",), "str", "score", _REROUTE, choices=REROUTE_POLICIES,
         help="Order in which a dropped assignment tries other experts: score (router score, descending; the "
         "paper's) or load (least loaded first)."),
    Knob("reroute_min_ratio", ("rho", "min_ratio"), "float", 0.0, _REROUTE, check="nonnegative", metavar="RHO",
         help="Quality guard: reroute only to an expert whose score is at least RHO x the dropped "
         "assignment's score (0 = always reroute)."),
    Knob("laser_eps_high", ("eps_high", "eps"), "float", 0.6, _LASER, check="nonnegative", shown=_LASER,
         metavar="EPS",
         help="A token whose top-k score mass is >= EPS keeps its top-k (a probability mass in [0, 1] for "
         "softmax routers, [0, k] for sigmoid; 0 = always top-k); every layer unless a calibration file."),
    Knob("laser_t_fix", ("t_fix",), "float", 0.5, _LASER, check="unit", shown=_LASER, metavar="T",
         help="A flexible token's candidate pool holds the experts scoring >= T x its best score (a ratio in (0, 1])."),
    Knob("laser_pool", ("pool",), "int", None, _LASER, check="int>=1", metavar="C",
         help="At most C candidate experts per flexible token (>= --moe-router-topk; C = k reproduces top-k). "
         "Default: 2 x --moe-router-topk."),
    Knob("laser_calibration", ("calibration",), "path", None, _LASER, check="file", metavar="FILE",
         help="Per-layer eps_high / t_fix / pool from a calibration file written by capaware-calibrate (JSON); "
         "replaces the eps-high / t-fix / pool flags. Default: none."),
    Knob("laser_waves", ("waves",), "int", 8, _LASER, check="int>=1", metavar="N",
         help="Flexible tokens are placed in N waves, loads updated between waves (more = closer to "
         "one-at-a-time placement, slower)."),
    Knob("laser_rounds", ("laser_rounds",), "int", 1, _LASER, check="int>=0", metavar="N",
         help="Repair rounds after the waves."),
    Knob("laser_load", ("load",), "str", "expert", _LASER, choices=LASER_LOADS,
         help="What a flexible token's least-loaded choice compares: expert (each candidate expert's own "
         "load) or rank (the load of the candidate's EP rank, global over the EP group), so LASER moves work "
         "between ranks."),
    Knob("phases", ("phases",), "str", None, _NON_VANILLA, metavar="PHASES",
         help="Megatron's dynamic inference engine: the steps the policy applies to, 'all' or a comma list of "
         "prefill, mixed, decode, idle; other steps are routed by top-k on the placement's layout (steps "
         "captured as CUDA graphs always are). At EP > 1 the ranks agree on each eager step "
         "(one all-reduce per step): decode-only on every rank, or not. Default: prefill,mixed (decode-pack: decode)."),
    Knob("decode_router", ("decode_router",), "str", None, _TAKES_DECODE_ROUTER, choices=DECODE_ROUTERS,
         metavar="ROUTER",
         help="Megatron's dynamic inference engine: route decode-only steps by this decode router (its "
         "--capaware-decode-* knobs apply) instead of top-k, while the policy keeps prefill and mixed steps: one "
         "router per phase in one run. Needs the dynamic engine and --capaware-phases without decode. At EP > 1 "
         "the ranks agree on each eager step's phase (one all-reduce of one integer per step). Default: none "
         "(top-k on decode-only steps)."),
    Knob("seed", ("seed",), "int", 0, _DROPPING, check="int>=0", metavar="SEED",
         help="Seed of the random drop policy (independent of Megatron's --seed)."),
    Knob("decode_floor", ("floor", "decode_floor"), "int", None, _DECODE, check="int>=1", metavar="K0",
         help="Every token keeps its K0 best experts (1 <= K0 <= --moe-router-topk; K0 = top-k is top-k). "
         "Default: ceil(top-k / 2)."),
    Knob("decode_pool", ("pool", "decode_pool"), "int", None, _DECODE, check="int>=1", metavar="C",
         help="A token fills its other slots from at most C candidates: its top-k, then experts scoring >= "
         "--capaware-decode-t-fix x its best (C >= top-k). Default: top-k."),
    Knob("decode_t_fix", ("t_fix", "decode_t_fix"), "float", 1.0, _DECODE, check="unit", metavar="T",
         help="Candidates beyond the top-k score >= T x the token's best (a ratio in (0, 1])."),
    Knob("decode_slack", ("slack", "decode_slack"), "int", 0, _DECODE, check="int>=0", metavar="N",
         help="Each EP rank may activate up to N experts beyond what the floor activates on the busiest rank "
         "(never beyond top-k's busiest rank)."),
    Knob("decode_rank_aware", ("rank", "decode_rank"), "bool", True, _DECODE, flag_name="decode_oea", inverted=True,
         help="OEA's rule (arXiv 2511.02237): fill only from experts the floor already activates, no rank "
         "awareness (the outside baseline). Default: off (rank-aware)."),
)

KNOBS_BY_FIELD: Dict[str, Knob] = {k.field: k for k in KNOBS}

#: LASER knobs that a calibration file replaces (per layer).
CALIBRATED_FIELDS = ("laser_eps_high", "laser_t_fix", "laser_pool")


def router_type(name: str) -> RouterType:
    """The registered type called ``name``.

    Raises:
        KeyError: an unknown name (callers turn it into their own message).
    """
    return ROUTER_TYPES[name]


def router_names(**capabilities: bool) -> Tuple[str, ...]:
    """Names of the registered types with the given capabilities, in table order.

    ``router_names()`` is every type; ``router_names(capacity=True)`` the
    capacity routers; ``router_names(is_vanilla=False)`` all but ``topk``.
    """
    return tuple(name for name, entry in ROUTER_TYPES.items()
                 if all(getattr(entry, cap) == want for cap, want in capabilities.items()))


def knobs_for(name: str) -> Tuple[Knob, ...]:
    """The knobs router type ``name`` reads, in table order."""
    return tuple(k for k in KNOBS if name in k.routers)


def spec_key(key: str, router: str) -> Optional[Knob]:
    """The knob a spec key names for ``router`` (``policy`` is the drop policy except for reroute;
    a key two types share, like ``pool``, names the one ``router`` reads; the decode router's
    knobs have ``decode_*`` keys of their own for the routers that take ``decode_router``)."""
    if key == "policy" and router not in _REROUTE:
        return KNOBS_BY_FIELD["drop_policy"]
    named = [k for k in KNOBS if key in k.keys]
    return next((k for k in named if router in k.routers), named[0] if named else None)


def decode_router_knobs(decode_router: Optional[str]) -> Tuple[Knob, ...]:
    """The knobs a ``--capaware-decode-router`` reads besides its host router's (none without one)."""
    return knobs_for(decode_router) if decode_router else ()


def knob_applies(knob: Knob, router: str, decode_router: Optional[str] = None) -> bool:
    """Whether router type ``router`` (with ``decode_router`` on decode-only steps) reads ``knob``."""
    return router in knob.routers or (decode_router is not None and decode_router in knob.routers)


__all__ = ["CALIBRATED_FIELDS", "CAPACITY_DROP", "DECODE_PACK", "DECODE_ROUTERS", "decode_router_knobs", "knob_applies", "CAPACITY_REROUTE", "EXPANDED_DROP", "LASER", "TOPK", "KNOBS", "KNOBS_BY_FIELD", "Knob", "ROUTER_TYPES", "RouterType", "SCOPES", "knobs_for", "router_names",
           "router_type", "spec_key"]
