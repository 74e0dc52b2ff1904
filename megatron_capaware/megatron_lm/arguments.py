"""Megatron-style command-line flags for the capaware routers.

:func:`add_capaware_args` adds ``--moe-router-type`` and the ``--capaware-*``
knobs to an ``argparse`` parser and returns it, like Megatron's own argument
providers, so it can be Megatron's ``extra_args_provider`` or be called inside
one::

    from megatron.training.arguments import parse_and_validate_args
    from megatron_capaware.megatron_lm.arguments import add_capaware_args, config_from_args

    parse_and_validate_args(extra_args_provider=add_capaware_args)
    cfg = config_from_args(get_args())          # a CapawareConfig

It also checks the flags, and the flags against Megatron's own, when the
parser parses: a bad value or a contradiction ends the run at parse time with
``error: ...`` and exit status 2, before Megatron initialises anything.

What wins between Megatron's flags and these (see ``docs/megatron_lm.md``):

* ``--moe-router-type topk`` (the default) is Megatron's routing unchanged,
  including Megatron's own capacity dropping (``--moe-expert-capacity-factor``,
  ``--moe-token-drop-policy``, ``--moe-pad-expert-input-to-capacity``).
* Any other router type replaces Megatron's capacity logic: combining it with
  ``--moe-expert-capacity-factor`` or ``--moe-pad-expert-input-to-capacity`` is
  an error (use ``--capaware-gamma``).
* ``--moe-token-drop-policy`` is honoured as the default of
  ``--capaware-drop-policy`` (``probs`` -> ``score``, ``position`` ->
  ``position``); giving both with different meanings is an error.

This module imports no Megatron: it works with any ``argparse`` parser (the
Megatron checks apply to the Megatron flags the parsed namespace holds).
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable, Dict, List, Optional

from megatron_capaware.config import ROUTER_TYPES, CapawareConfig, CapawareConfigError
from megatron_capaware.placement.replicas import REPLICA_POLICIES
from megatron_capaware.refusals import raise_if_refused
from megatron_capaware.registry import KNOBS, ROUTER_TYPES as REGISTERED, TOPK, Knob

GROUP_TITLE = "capaware routing (megatron-capaware)"
_MARK = "_capaware_args_added"
_RESOLVED = "_capaware_resolved"

#: Documented defaults of the knob flags, whose argparse default is None (so that an explicit
#: value can be told from the default when checking combinations): from the registry.
DEFAULTS: Dict[str, Any] = {knob.dest: (not knob.default) if knob.inverted else knob.default for knob in KNOBS}

#: Flags of the placement runtime (any router type).
PLACEMENT_FLAGS = ["--capaware-placement", "--capaware-replica-policy"]

#: Which router types read each knob (a knob given with another router type is an error).
KNOB_ROUTERS: Dict[str, tuple] = {knob.dest: knob.routers for knob in KNOBS}

#: Megatron's --moe-token-drop-policy values and the capaware policy each means.
MEGATRON_DROP_POLICY = {"probs": "score", "position": "position"}


def flag(dest: str) -> str:
    """``capaware_laser_t_fix`` -> ``--capaware-laser-t-fix``."""
    return "--" + dest.replace("_", "-")


# --- value types: argparse reports their errors as "argument --x: invalid ..." ---


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0.0 <= value < math.inf):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"file {text!r} does not exist")
    return text


_CHECKS: Dict[str, Callable[[str], Any]] = {
    "positive": _positive_float,
    "nonnegative": _nonnegative_float,
    "unit": _unit_float,
    "int>=0": _int_at_least(0),
    "int>=1": _int_at_least(1),
    "file": _existing_file,
}


def _add_knob_flag(group: Any, knob: Knob) -> None:
    """One ``--capaware-*`` flag from its registry entry (argparse default None: see :data:`DEFAULTS`)."""
    users = " / ".join(knob.routers)
    text = f"({users}) {knob.help}"
    if knob.default is not None and "Default:" not in knob.help and not knob.inverted:
        text += f" Default: {knob.default}."
    if knob.kind == "bool":
        group.add_argument(knob.flag, action="store_true", default=None, help=text)
    elif knob.choices is not None:
        group.add_argument(knob.flag, choices=knob.choices, default=None, help=text)
    else:
        kind = _CHECKS.get(knob.check or "") or {"int": int, "float": float}.get(knob.kind, str)
        group.add_argument(knob.flag, type=kind, default=None, metavar=knob.metavar, help=text)


def add_capaware_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--moe-router-type`` and the ``--capaware-*`` flags; returns ``parser``.

    Usable as Megatron's ``extra_args_provider`` or inside one. Idempotent:
    a parser that already has the flags is returned unchanged. After parsing,
    the flags are resolved (documented defaults filled in, Megatron's
    ``--moe-token-drop-policy`` honoured) and checked; an invalid value or
    combination ends the run with ``error: ...`` (exit status 2).
    """
    if getattr(parser, _MARK, False):
        return parser
    existing = {opt for action in parser._actions for opt in action.option_strings}
    mine = ["--moe-router-type"] + [flag(d) for d in DEFAULTS] + ["--capaware-stats-output"] + PLACEMENT_FLAGS + \
        ["--capaware-no-stats", "--capaware-no-score-check"]
    clash = sorted(set(mine) & existing)
    if clash:
        raise argparse.ArgumentError(
            None,
            f"megatron-capaware cannot add {', '.join(clash)}: this parser already defines them "
            "(a newer Megatron with flags of the same name?)",
        )
    group = parser.add_argument_group(
        title=GROUP_TITLE,
        description="Inference-time MoE routers of megatron-capaware (see docs/megatron_lm.md). "
        "Loads and capacities are counted per MoE layer and per forward call, over the whole "
        "expert-parallel group unless --capaware-scope local.",
    )
    group.add_argument(
        "--moe-router-type", choices=ROUTER_TYPES, default=TOPK,
        help="MoE routing decision at inference. " + "; ".join(
            f"{entry.name}: {entry.summary}" for entry in REGISTERED.values()) + f". Default: {TOPK}.",
    )
    for knob in KNOBS:
        _add_knob_flag(group, knob)
    group.add_argument(
        "--capaware-stats-output", type=str, default=None, metavar="PATH",
        help="Write per-layer expert-load statistics (imbalance max/mean load per expert and "
        "per EP rank, dropped and rerouted fractions, over every forward call) as JSON to "
        "PATH at the end of the run (rank 0 writes). Works with every router type, topk "
        "included. Default: not written.",
    )
    group.add_argument(
        "--capaware-placement", type=str, default=None, metavar="PLAN",
        help="Expert placement plan (capaware-plan's JSON, made for this model and EP size): "
        "after loading, expert weights move over the EP group so each rank holds the plan's "
        "slots, hot experts possibly replicated; the model's function is unchanged (docs/"
        "placement.md). Works with every router type (with replicas: all but laser, for now). "
        "Default: Megatron's contiguous layout.",
    )
    group.add_argument(
        "--capaware-replica-policy", choices=REPLICA_POLICIES, default=None,
        help="Which replica computes a chosen expert under a --capaware-placement with "
        "redundant experts: least-loaded (equal shares, exact over the EP group: one small "
        "all-gather per layer) or round-robin (by token index, no collective). Default: "
        "least-loaded.",
    )
    group.add_argument(
        "--capaware-no-stats", action="store_true",
        help="Record no per-layer load statistics (with --capaware-scope local this also drops the "
        "per-layer all-reduce of the loads each forward). Cannot be combined with "
        "--capaware-stats-output. Default: recorded.",
    )
    group.add_argument(
        "--capaware-no-score-check", action="store_true",
        help="Skip the group-wide NaN/Inf check of the router scores (one small all-gather per model "
        "forward on the device path). A NaN then routes silently. Default: checked.",
    )
    _install_validation(parser)
    setattr(parser, _MARK, True)
    return parser


def with_capaware_args(provider: Optional[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """An ``extra_args_provider`` that runs ``provider`` (may be None), then adds ours."""

    def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if provider is not None:
            parser = provider(parser)
        return add_capaware_args(parser)

    extra_args_provider.capaware_wrapped = provider  # type: ignore[attr-defined]
    return extra_args_provider


def _install_validation(parser: argparse.ArgumentParser) -> None:
    """Check the parsed flags right after parsing (``parse_args`` goes through this)."""
    original = parser.parse_known_args

    def parse_known_args(args: Optional[List[str]] = None, namespace: Any = None):
        namespace, extras = original(args, namespace)
        try:
            resolve_args(namespace)
        except CapawareConfigError as err:
            parser.exit(2, f"{parser.prog}: error: {err}\n")
        return namespace, extras

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def resolve_args(args: Any) -> Any:
    """Fill in the documented defaults and check the flags against each other and Megatron's.

    Idempotent; called by the parser after parsing. Returns ``args``.

    Raises:
        CapawareConfigError: naming the flags and the fix.
    """
    if getattr(args, _RESOLVED, False):
        return args
    add_megatron_lm_aliases(args)
    if getattr(args, "capaware_no_stats", False) and getattr(args, "capaware_stats_output", None):
        raise CapawareConfigError(
            "--capaware-no-stats and --capaware-stats-output contradict: the statistics file needs the "
            "statistics; drop one of them")
    router = getattr(args, "moe_router_type", TOPK) or TOPK
    if router not in ROUTER_TYPES:
        raise CapawareConfigError(
            f"--moe-router-type {router!r} is unknown; choose from {', '.join(ROUTER_TYPES)}"
        )
    given = {d for d in DEFAULTS if getattr(args, d, None) is not None}
    _check_knobs_apply(router, given, getattr(args, "capaware_decode_router", None))
    _check_megatron(args, router, given)
    drop = _effective_drop_policy(args)
    cfg = config_from_args(args)  # the dataclass's own checks (ranges, calibration file)
    num_experts = getattr(args, "num_experts", None)
    if num_experts:
        cfg.validate(
            num_experts=num_experts,
            topk=getattr(args, "moe_router_topk", None),
            score_function=getattr(args, "moe_router_score_function", "softmax") or "softmax",
        )
    for dest, default in DEFAULTS.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, default)
    args.capaware_drop_policy = drop
    args.capaware_renormalize = bool(args.capaware_renormalize)
    if not hasattr(args, "capaware_stats_output"):
        args.capaware_stats_output = None
    _resolve_placement(args, cfg)
    setattr(args, _RESOLVED, True)
    return args


def _resolve_placement(args: Any, cfg: CapawareConfig) -> None:
    """Check ``--capaware-placement`` (file, model sizes, router) and default the replica policy."""
    plan_path = getattr(args, "capaware_placement", None)
    policy = getattr(args, "capaware_replica_policy", None)
    if policy is not None and not plan_path:
        raise CapawareConfigError("--capaware-replica-policy needs --capaware-placement PLAN (capaware-plan)")
    args.capaware_placement = plan_path or None
    args.capaware_replica_policy = policy or "least-loaded"
    if not plan_path:
        return
    from megatron_capaware.placement import PlacementError, load_plan

    try:
        plan = load_plan(plan_path)
        num_experts = getattr(args, "num_experts", None)
        if num_experts and int(plan.model.get("num_moe_experts", num_experts)) != int(num_experts):
            raise PlacementError(f"the placement plan is for {plan.model['num_moe_experts']} experts, --num-experts "
                                 f"is {num_experts}: run capaware-plan on this checkpoint")
        ep = getattr(args, "expert_model_parallel_size", None)
        if ep and int(ep) != plan.ep:
            raise PlacementError(f"the placement plan is for EP {plan.ep}, --expert-model-parallel-size is {ep}: "
                                 f"run capaware-plan --ep {ep}")
        if plan.redundant and not REGISTERED[cfg.router_type].replicas:
            raise PlacementError(
                f"--moe-router-type {cfg.router_type} with a placement that has {plan.redundant} redundant experts is not "
                "supported yet: use a plan made with --redundant-experts 0, or another router"
            )
        decode = getattr(cfg, "decode_router", None)
        if plan.redundant and decode is not None and not REGISTERED[decode].replicas:
            raise PlacementError(
                f"--capaware-decode-router {decode} with a placement that has {plan.redundant} redundant experts is "
                "not supported yet: use a plan made with --redundant-experts 0, or drop the decode router"
            )
    except PlacementError as err:
        raise CapawareConfigError(f"--capaware-placement {plan_path}: {err}") from None


def placement_from_args(args: Any) -> Optional[str]:
    """The ``--capaware-placement`` plan path, or None."""
    return getattr(args, "capaware_placement", None) or None


#: Attribute names Megatron-LM's scripts read that its parser does not define,
#: as ``{name the script reads: dest the parser sets}``.
#:
#: ``tools/run_text_generation_server.py`` reads ``args.inference_max_sequence_length``
#: but the flag ``--inference-max-seq-length`` has dest ``inference_max_seq_length``
#: (a Megatron-LM bug since 2026-02-04, at core_v0.17.1, core_v0.19.0 and main
#: d98e8a64dd): the server dies with ``AttributeError`` on every device. WORKAROUND,
#: remove it once Megatron-LM reads the right name.
MEGATRON_LM_ALIASES: Dict[str, str] = {"inference_max_sequence_length": "inference_max_seq_length"}


def add_megatron_lm_aliases(args: Any) -> Any:
    """Set each of :data:`MEGATRON_LM_ALIASES` the parsed flags lack (the value of its dest).

    Only when the dest exists and the alias does not: a Megatron-LM that
    defines the alias itself is left alone. Returns ``args``.
    """
    for alias, dest in MEGATRON_LM_ALIASES.items():
        if not hasattr(args, alias) and hasattr(args, dest):
            setattr(args, alias, getattr(args, dest))
    return args


def _effective_drop_policy(args: Any) -> str:
    """``--capaware-drop-policy``, else the meaning of Megatron's ``--moe-token-drop-policy``."""
    drop = getattr(args, "capaware_drop_policy", None)
    if drop is None:
        drop = MEGATRON_DROP_POLICY.get(getattr(args, "moe_token_drop_policy", None) or "probs", "score")
    return drop


def _check_knobs_apply(router: str, given: set, decode_router: Optional[str] = None) -> None:
    for dest in sorted(given):
        users = KNOB_ROUTERS[dest]
        if router not in users and decode_router not in users:  # a decode router's knobs apply to it
            raise CapawareConfigError(
                f"{flag(dest)} has no effect with --moe-router-type {router}; it applies to "
                f"--moe-router-type {' / '.join(users)}. Remove it or choose one of those routers"
            )


def _check_megatron(args: Any, router: str, given: set) -> None:
    """Contradictions with Megatron's own flags (absent flags are skipped)."""
    name = f"--moe-router-type {router}"
    if "capaware_seed" in given and _effective_drop_policy(args) != "random":
        raise CapawareConfigError(
            "--capaware-seed only seeds --capaware-drop-policy random; remove it or use that policy"
        )
    if "capaware_laser_calibration" in given:
        both = sorted(flag(d) for d in ("capaware_laser_eps_high", "capaware_laser_t_fix", "capaware_laser_pool") if d in given)
        if both:
            raise CapawareConfigError(
                f"--capaware-laser-calibration sets eps_high, t_fix and pool for every layer; "
                f"{', '.join(both)} would be ignored. Give either the calibration file or the flags"
            )
    megatron_policy = getattr(args, "moe_token_drop_policy", None)
    mine = getattr(args, "capaware_drop_policy", None)
    if REGISTERED[router].is_vanilla:
        return  # Megatron's routing, Megatron's flags: nothing to reconcile
    raise_if_refused(router, args)  # the same table the router applies at install
    if megatron_policy == "position" and mine is not None and mine != "position":
        raise CapawareConfigError(
            f"--moe-token-drop-policy position and --capaware-drop-policy {mine} contradict each "
            f"other; with {name} the capaware policy decides. Give one of them"
        )
    if megatron_policy == "position" and router not in KNOB_ROUTERS["capaware_drop_policy"]:
        raise CapawareConfigError(
            f"--moe-token-drop-policy position has no effect with {name}; it applies to "
            "--moe-router-type capacity-drop / capacity-reroute (or Megatron's own topk dropping)"
        )


def config_from_args(args: Any) -> CapawareConfig:
    """The :class:`CapawareConfig` the parsed flags describe.

    Accepts a namespace from a parser with :func:`add_capaware_args` (resolved
    or not: unset knobs take their documented defaults).

    Raises:
        CapawareConfigError: invalid values.
    """

    values: Dict[str, Any] = {}
    for knob in KNOBS:
        value = getattr(args, knob.dest, None)
        value = knob.default if value is None else (not value) if knob.inverted else value
        if value is not None and knob.kind in ("int", "float", "bool"):
            value = {"int": int, "float": float, "bool": bool}[knob.kind](value)
        values[knob.field] = value
    values["drop_policy"] = _effective_drop_policy(args)
    values["record_stats"] = not getattr(args, "capaware_no_stats", False)
    values["check_scores"] = not getattr(args, "capaware_no_score_check", False)
    return CapawareConfig(router_type=getattr(args, "moe_router_type", None) or TOPK, **values)


def stats_requested(args: Any) -> bool:
    """Whether the run asked for the per-layer load statistics file."""
    return bool(getattr(args, "capaware_stats_output", None))
