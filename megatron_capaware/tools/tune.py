"""capaware-tune: the fastest router setting within a perplexity budget, found on a calibration text.

Loads the model once per rank (as ``capaware-eval`` does, at any EP through
torchrun/gloo) and sweeps router settings over a **calibration** text (by
default the bundled model's ``calibration.txt``, never the held-out text):

1. a coarse grid: ``capacity-drop`` with ``unit=expert`` and ``unit=rank``
   under the ``score`` and ``weight`` drop policies, ``capacity-reroute``
   (``drop=weight``; rounds 1 / 2, ``rho`` 0 / 0.5), over gamma;
2. a refinement: for each budget, the two router families (type, unit, drop
   policy, rounds, rho) with the fastest setting within the budget get their
   gamma bisected between that setting and the next faster one that is over
   the budget (or stepped down by 0.1 when none is), ``--refine`` rounds;
3. LASER per layer, greedy (:func:`laser_greedy`): every rung of a ladder of
   ``(eps_high, t_fix)`` (:data:`LASER_LADDER`) is measured alone on each
   layer on a probe of the calibration batches (balance gained: that layer's
   busiest-rank load; cost: calibration NLL); from top-k everywhere, each step
   moves the layer with the most balance gained per unit of NLL, and states
   along that path are evaluated on the whole calibration text like the
   other settings. (This replaces ``capaware-calibrate``'s fixed
   "imbalance / 1.6" target.)

Speed is ``capaware-eval``'s predicted speedup ``peak_rank(topk) /
peak_rank(setting)``; quality is the calibration perplexity change against
top-k in percent. For every ``--budget`` (percent; several may be given) it
writes the setting with the highest predicted speedup whose change is within
the budget: its Megatron flags, its router spec for ``capaware-eval
--routers`` and, for LASER, its calibration file; and prints the frontier it
found::

    capaware-tune --ep 2 --budget 0.25 0.5 1 2 --out tune-ep2
    capaware-eval --ep 2 --routers topk "$(jq -r '.choices[0].spec' tune-ep2/tune.json)"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_capaware._compat.cli import UserInputError, add_cli_flags, run_cli, run_torchrun
from megatron_capaware.config import Calibration, CapawareConfig, LaserParams
from megatron_capaware.registry import LASER, TOPK

PROG = "capaware-tune"

#: The coarse grid (router spec strings; ``|`` sweeps).
COARSE_SPECS = [
    TOPK,
    "capacity-drop:gamma=1.0|1.25|1.5|2.0,drop_policy=weight",
    "capacity-drop:gamma=1.25|1.5",
    "capacity-drop:gamma=0.8|0.9|1.0|1.1|1.25,unit=rank,drop_policy=weight",
    "capacity-drop:gamma=0.9|1.0|1.1,unit=rank",
    "capacity-reroute:gamma=1.0|1.25|1.5,drop_policy=weight",
    "capacity-reroute:gamma=1.25,drop_policy=weight,rounds=2",
    "capacity-reroute:gamma=1.25,drop_policy=weight,rho=0.5",
]
#: On each placement plan (shipped beside the checkpoint, or --placement): top-k and the rank unit.
PLACED_SPECS = [
    TOPK,
    "capacity-drop:gamma=0.75|0.8|0.9|1.0|1.1|1.2,unit=rank,drop_policy=weight",
]
#: LASER rungs per layer, least to most aggressive: (eps_high, t_fix). Rung -1 is top-k (eps_high 0).
LASER_LADDER: Tuple[Tuple[float, float], ...] = (
    (0.5, 0.7), (0.6, 0.5), (0.7, 0.5), (0.8, 0.4), (0.9, 0.3), (1.0, 0.2))
#: NLL per token (nats) below which a cost counts as this much (noise on a calibration probe).
NLL_FLOOR = 1e-4
MIN_GAMMA_STEP = 0.02
#: A choice's validation change must be within ``budget * (1 - DEFAULT_MARGIN)`` (docs/tuning.md, "When your traffic changes").
DEFAULT_MARGIN = 0.5


def family(cfg: CapawareConfig) -> Tuple[Any, ...]:
    """Settings that differ only in gamma."""
    return (cfg.router_type, cfg.capacity_unit, cfg.drop_policy, cfg.reroute_rounds, cfg.reroute_min_ratio,
            cfg.reroute_policy, cfg.scope)


def choose(records: Sequence[Dict[str, Any]], budget: float) -> Dict[str, Any]:
    """The fastest record within ``budget`` percent (ties: lower perplexity); top-k when none is faster."""
    feasible = [r for r in records if r.get("predicted_speedup") is not None and r["delta_ppl_pct"] <= budget]
    return max(feasible, key=lambda r: (round(r["predicted_speedup"], 9), -r["ppl"]))


def choose_validated(records: Sequence[Dict[str, Any]], validation: Dict[str, Dict[str, Any]], budget: float,
                     margin: float) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]], List[str]]:
    """The fastest search record within ``budget`` whose validation change is within ``budget * (1 - margin)``.

    ``records``: the search split's records; ``validation``: label -> the same
    setting's record on the validation split (settings not validated are
    skipped). Candidates are tried fastest first (ties: lower perplexity);
    returns ``(record, its validation record, labels rejected on validation)``.
    Top-k (change 0 on both splits) is the fallback.
    """
    feasible = [r for r in records if r.get("predicted_speedup") is not None and r["delta_ppl_pct"] <= budget]
    feasible.sort(key=lambda r: (-round(r["predicted_speedup"], 9), r["ppl"]))
    rejected: List[str] = []
    for record in feasible:
        check = validation.get(record["label"])
        if check is None:
            continue
        if check["delta_ppl_pct"] <= budget * (1 - margin) or record["router"] == TOPK:
            return record, check, rejected
        rejected.append(record["label"])
    topk = next(r for r in records if r["router"] == TOPK and not r.get("placement"))
    return topk, validation.get(topk["label"]), rejected


def validation_candidates(records: Sequence[Dict[str, Any]], budget: float, count: int) -> List[str]:
    """Labels of the ``count`` fastest search records within ``budget`` (the order :func:`choose_validated` tries)."""
    feasible = [r for r in records if r.get("predicted_speedup") is not None and r["delta_ppl_pct"] <= budget
                and r["router"] != TOPK]
    feasible.sort(key=lambda r: (-round(r["predicted_speedup"], 9), r["ppl"]))
    return [r["label"] for r in feasible[:count]]


def refinements(records: Sequence[Dict[str, Any]], configs: Dict[str, CapawareConfig], budget: float,
                families: int = 2) -> List[CapawareConfig]:
    """New gammas to try for ``budget``: bisect each leading family between its fastest setting
    within the budget and its next faster setting over it (step down 0.1 when there is none)."""
    by_family: Dict[Tuple[Any, ...], List[Dict[str, Any]]] = {}
    for r in records:
        cfg = configs[r["label"]]
        if cfg.uses_capacity and r.get("predicted_speedup") is not None:
            by_family.setdefault(family(cfg), []).append(r)
    leaders = []
    for fam, items in by_family.items():
        feasible = [r for r in items if r["delta_ppl_pct"] <= budget]
        if feasible:
            best = max(feasible, key=lambda r: r["predicted_speedup"])
            leaders.append((best["predicted_speedup"], fam, best, items))
    leaders.sort(key=lambda t: -t[0])
    out: List[CapawareConfig] = []
    for _, _fam, best, items in leaders[:families]:
        cfg = configs[best["label"]]
        faster = [r for r in items if r["predicted_speedup"] > best["predicted_speedup"] and r["delta_ppl_pct"] > budget]
        if faster:
            other = min(faster, key=lambda r: abs(configs[r["label"]].gamma - cfg.gamma))
            gamma = round((cfg.gamma + configs[other["label"]].gamma) / 2, 3)
            if abs(gamma - cfg.gamma) < MIN_GAMMA_STEP:
                continue
        else:
            gamma = round(cfg.gamma - 0.1, 3)
            if gamma < 0.5:
                continue
        fam_gammas = {configs[r["label"]].gamma for r in items}
        if gamma not in fam_gammas:
            out.append(cfg.replace(gamma=gamma))
    return out


class Sweep:
    """Settings evaluated so far on the session's batches (identical on every rank)."""

    def __init__(self, session: Any, log: Any) -> None:
        self.session = session
        self.results: List[Any] = []
        self.configs: Dict[str, CapawareConfig] = {}
        self.placements: Dict[str, Any] = {}  # label -> EvalPlacement of the placed settings
        self.placement: Any = None  # the layout the model is in now (an EvalPlacement or None)
        self.log = log

    def place(self, placement: Any) -> None:
        """Move the experts into ``placement``'s layout (None: back to Megatron's); every rank."""
        from megatron_capaware.adapters import install_capaware_routers, remove_placement

        if self.placement is not None:
            remove_placement(self.session.model)
        if placement is not None:
            install_capaware_routers(self.session.model, CapawareConfig(TOPK), placement=placement.plan,
                                     replica_policy=placement.replica_policy)
        self.placement = placement

    def run(self, configs: Sequence[CapawareConfig]) -> List[Dict[str, Any]]:
        from megatron_capaware.tools.evaluate import evaluate_config

        for cfg in configs:
            label = self.label(cfg)
            if label in self.configs:
                continue
            result = evaluate_config(self.session, cfg)
            result.placement = self.placement
            self.results.append(result)
            self.configs[label] = cfg
            if self.placement is not None:
                self.placements[label] = self.placement
            records = self.records()
            self.log(f"  {label:<58} dppl {records[-1]['delta_ppl_pct']:+7.2f}%  "
                     f"speedup {records[-1]['predicted_speedup']:.3f}x  ({result.seconds:.0f} s)")
        return self.records()

    def label(self, cfg: CapawareConfig, placement: Any = "current") -> str:
        """The setting's label; ``placement``: the layout it ran on (default: the current one)."""
        placement = self.placement if placement == "current" else placement
        base = laser_label(cfg) if cfg.router_type == LASER and cfg.layer_params else cfg.describe()
        return base + (f" @{placement.describe()}" if placement is not None else "")

    def records(self) -> List[Dict[str, Any]]:
        from megatron_capaware.tools import report

        records = report.make_records(self.results, self.session.options)
        for record, result in zip(records, self.results):
            record["label"] = self.label(result.config, result.placement)
        return records


def laser_label(cfg: CapawareConfig) -> str:
    """``laser(L1:-,L2:0.6/0.5,...)``: each layer's (eps_high/t_fix), ``-`` where it stays top-k."""
    parts = []
    for layer, p in sorted(cfg.layer_params.items()):
        parts.append(f"L{layer}:" + ("-" if p.eps_high == 0 else f"{p.eps_high:g}/{p.t_fix:g}"))
    return "laser(" + ",".join(parts) + ")"


def laser_config(state: Dict[int, int], pool: int) -> CapawareConfig:
    params = {}
    for layer, rung in state.items():
        eps, t_fix = (0.0, 0.5) if rung < 0 else LASER_LADDER[rung]
        params[layer] = LaserParams(eps_high=eps, t_fix=t_fix, pool=pool)
    return CapawareConfig(LASER, layer_params=params)


def laser_greedy(sweep: Sweep, probe: List[torch.Tensor], *, steps: int, max_dppl: float) -> List[CapawareConfig]:
    """Per-layer LASER settings, chosen greedily by balance gained per unit of calibration NLL.

    Each rung of :data:`LASER_LADDER` is measured alone on each layer (the other layers top-k) on the
    ``probe`` batches: its gain is the drop of that layer's busiest-rank load (``rank_peak_load``), its cost
    the rise of the NLL per token (floored at :data:`NLL_FLOOR`, so noise cannot look free). Per layer the
    rungs off the lower convex hull of (cost, gain) are skipped; then, from top-k everywhere, each step
    moves the layer whose next hull rung has the most gain per unit of cost (the classic marginal greedy),
    until no move gains or the summed cost passes ``max_dppl``. ``steps`` states of that path, evenly spread
    and always the last, are returned for evaluation on the whole calibration text.
    """
    from megatron_capaware.tools.evaluate import evaluate_config

    session = sweep.session
    layers = sorted(int(n) for n in session.model_args.moe_layer_numbers)
    pool = 2 * int(session.model_args.moe_router_topk)
    base = evaluate_config(session, CapawareConfig(TOPK), batches=probe)
    base_nll = base.nll / base.tokens
    # profile[layer] = [(cost, gain, rung)] with rung -1 = top-k
    profile: Dict[int, List[Tuple[float, float, int]]] = {}
    for layer in layers:
        points = [(0.0, 0.0, -1)]
        for rung in range(len(LASER_LADDER)):
            state = {l: (rung if l == layer else -1) for l in layers}
            result = evaluate_config(session, laser_config(state, pool), batches=probe)
            gain = base.per_layer[layer]["rank_peak_load"] - result.per_layer[layer]["rank_peak_load"]
            cost = max(result.nll / result.tokens - base_nll, NLL_FLOOR)
            points.append((cost, gain, rung))
        profile[layer] = _upper_hull(points)
        sweep.log(f"  laser layer {layer}: " + ", ".join(
            f"{'-' if r < 0 else '%g/%g' % LASER_LADDER[r]} gain {g:+.3f} cost {c:.4f}" for c, g, r in points[1:]))
    state = {layer: 0 for layer in layers}  # index into the layer's hull
    path: List[Dict[int, int]] = []
    spent = 0.0
    budget_nll = math.log1p(max_dppl / 100.0)
    while True:
        moves = []
        for layer in layers:
            hull, i = profile[layer], state[layer]
            if i + 1 < len(hull):
                (c0, g0, _), (c1, g1, _) = hull[i], hull[i + 1]
                if g1 > g0:
                    moves.append(((g1 - g0) / max(c1 - c0, NLL_FLOOR), layer, c1 - c0))
        if not moves:
            break
        _, layer, cost = max(moves)
        if spent + cost > budget_nll:
            break
        spent += cost
        state[layer] += 1
        path.append({l: profile[l][state[l]][2] for l in layers})
    if not path:
        sweep.log("  laser greedy: no layer setting gains balance; LASER not searched further")
        return []
    picks = sorted({round(i * (len(path) - 1) / max(steps - 1, 1)) for i in range(steps)}) if steps > 1 else [
        len(path) - 1]
    chosen = [laser_config(path[i], pool) for i in picks]
    sweep.log(f"  laser greedy: a path of {len(path)} steps; evaluating {len(chosen)} of them")
    return chosen


def _upper_hull(points: List[Tuple[float, float, int]]) -> List[Tuple[float, float, int]]:
    """The (cost, gain) points on the upper-left concave hull from (0, 0): more gain for more cost, at a
    falling rate (so the marginal greedy is optimal over them)."""
    pts = sorted(points, key=lambda p: (p[0], -p[1]))
    hull: List[Tuple[float, float, int]] = []
    for p in pts:
        if hull and p[1] <= hull[-1][1]:
            continue  # costs more, gains no more
        while len(hull) >= 2:
            (c1, g1, _), (c2, g2, _) = hull[-2], hull[-1]
            # drop the middle point if it lies on or below the chord
            if (g2 - g1) * (p[0] - c1) <= (p[1] - g1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def brief(record: Dict[str, Any]) -> Dict[str, Any]:
    keys = ("label", "router", "gamma", "ppl", "delta_ppl_pct", "predicted_speedup", "rank_peak_load", "i_agg",
            "dropped_frac", "rerouted_frac", "frontier", "tokens")
    return {k: record.get(k) for k in keys}


def split_batches(count: int, fraction: float) -> int:
    """Search batches of ``count``: the last ``ceil(fraction * count)`` validate (at least one each); 0: all search."""
    if fraction <= 0:
        return count
    if count < 2:
        raise UserInputError(f"{count} calibration batch(es) per rank: a validation split needs at least 2; give "
                             "more --text, fewer --sequences-per-rank, or --validation-fraction 0")
    return count - min(max(1, math.ceil(fraction * count)), count - 1)


def run_tune(options: Any, budgets: Sequence[float], *, refine: int, laser_steps: int,
             laser_probe_batches: int, log: Any, placements: Optional[List[Any]] = None,
             validation_fraction: float = 0.0, margin: float = 0.0, candidates: int = 4) -> Dict[str, Any]:
    """The whole search (every rank; identical results on every rank).

    With ``validation_fraction`` > 0 the search sees only the first batches;
    per budget up to ``candidates`` of its fastest settings within the budget
    are then run on the last batches (the validation split), fastest first,
    until one is within ``budget * (1 - margin)`` there.
    """
    from megatron_capaware.tools.evaluate import close_session, open_session
    from megatron_capaware.tools.router_specs import parse_router_specs

    session = open_session(options)
    all_batches = session.batches
    cut = split_batches(len(all_batches), validation_fraction)
    session.batches, validation_batches = all_batches[:cut], all_batches[cut:]
    sweep = Sweep(session, log)
    log(f"{PROG}: coarse grid on {Path(options.text).name} ({len(session.batches)} batches per rank)")
    records = sweep.run(parse_router_specs(COARSE_SPECS))
    for round_ in range(refine):
        new: List[CapawareConfig] = []
        for budget in budgets:
            for cfg in refinements(records, sweep.configs, budget):
                if sweep.label(cfg) not in sweep.configs and all(sweep.label(cfg) != sweep.label(c) for c in new):
                    new.append(cfg)
        if not new:
            break
        log(f"{PROG}: refinement round {round_ + 1}: {len(new)} settings")
        records = sweep.run(new)
    laser_path: List[CapawareConfig] = []
    if laser_steps > 0:
        log(f"{PROG}: LASER per-layer greedy on {min(laser_probe_batches, len(session.batches))} probe batches")
        laser_path = laser_greedy(sweep, session.batches[:max(1, laser_probe_batches)], steps=laser_steps,
                                  max_dppl=2 * max(budgets))
        records = sweep.run(laser_path)
    for placement in placements or []:
        log(f"{PROG}: on placement {placement.label} (R={placement.plan.redundant})")
        sweep.place(placement)
        records = sweep.run(parse_router_specs(PLACED_SPECS))
    sweep.place(None)
    validation: Dict[str, Dict[str, Any]] = {}
    val_choices: Dict[float, Any] = {}
    if validation_batches:
        val_choices, validation = validate_choices(sweep, records, budgets, validation_batches, margin, candidates,
                                                   log)
    margs = session.model_args
    model = {"moe_layer_numbers": sorted(int(n) for n in margs.moe_layer_numbers),
             "num_moe_experts": int(margs.num_moe_experts), "moe_router_topk": int(margs.moe_router_topk),
             "checkpoint": Path(options.checkpoint).name}
    close_session(session)
    return {"records": records, "configs": sweep.configs, "model": model, "placements": sweep.placements,
            "validation": validation, "validated_choices": val_choices,
            "split": {"search_batches": cut, "validation_batches": len(validation_batches),
                      "validation_fraction": validation_fraction, "margin": margin}}


def validate_choices(sweep: "Sweep", records: List[Dict[str, Any]], budgets: Sequence[float],
                     batches: List[torch.Tensor], margin: float, candidates: int, log: Any
                     ) -> Tuple[Dict[float, Any], Dict[str, Dict[str, Any]]]:
    """Run the candidates of every budget on the validation batches (lazily, fastest first; every rank the same).

    Returns ``({budget: (record, validation record, rejected)}, {label: validation record})``.
    """
    from megatron_capaware.tools import report
    from megatron_capaware.tools.evaluate import evaluate_config

    results: List[Any] = []
    labels: List[str] = []

    def run(label: str) -> None:
        if label in labels:
            return
        cfg = sweep.configs[label]
        placement = sweep.placements.get(label)
        if placement is not sweep.placement:
            sweep.place(placement)
        result = evaluate_config(sweep.session, cfg, batches=batches)
        result.placement = placement
        results.append(result)
        labels.append(label)

    def validated() -> Dict[str, Dict[str, Any]]:
        out = report.make_records(results, sweep.session.options)
        return {label: record for label, record in zip(labels, out)}

    topk = next(r["label"] for r in records if r["router"] == TOPK and not r.get("placement"))
    log(f"{PROG}: validation split ({len(batches)} batches per rank): candidates per budget, fastest first")
    run(topk)
    chosen: Dict[float, Any] = {}
    for budget in budgets:
        for label in validation_candidates(records, budget, candidates):
            run(label)
            pick = choose_validated(records, validated(), budget, margin)
            if pick[0]["label"] == label:
                break
        chosen[budget] = choose_validated(records, validated(), budget, margin)
        record, check, rejected = chosen[budget]
        log(f"  {budget:g}%: {record['label']}  search {record['delta_ppl_pct']:+.2f}%  validation "
            f"{check['delta_ppl_pct']:+.2f}%" + (f"  (rejected on validation: {', '.join(rejected)})" if rejected else ""))
    sweep.place(None)
    return chosen, validated()


def summarize(records: List[Dict[str, Any]], configs: Dict[str, CapawareConfig], budgets: Sequence[float],
              out_dir: Path, model: Optional[Dict[str, Any]] = None,
              placements: Optional[Dict[str, Any]] = None,
              validated: Optional[Dict[float, Any]] = None) -> Dict[str, Any]:
    """The choices per budget (with their files), the frontier and the LASER verdict."""
    from megatron_capaware.tools.router_specs import format_router_spec, megatron_flags

    out_dir.mkdir(parents=True, exist_ok=True)
    choices = []
    for budget in budgets:
        check, rejected = None, []
        if validated and budget in validated:
            record, check, rejected = validated[budget]
        else:
            record = choose(records, budget)
        cfg = configs[record["label"]]
        calibration = None
        if cfg.router_type == LASER and cfg.layer_params:
            calibration = (out_dir / f"laser_calibration_budget_{budget:g}.json").resolve()
            Calibration(layer_params=cfg.layer_params, model=model or {},
                        rule={"name": "capaware-tune greedy (speedup per calibration NLL)",
                              "ladder": [list(r) for r in LASER_LADDER], "budget_pct": budget}).save(calibration)
        placement = (placements or {}).get(record["label"])
        flags = megatron_flags(cfg, calibration)
        if placement is not None:  # the plan goes with the setting (and into capaware-eval --placement)
            flags += ["--capaware-placement", str(Path(placement.path).resolve())]
            if placement.replica_policy != "least-loaded":
                flags += ["--capaware-replica-policy", placement.replica_policy]
        choices.append({
            "budget_pct": budget, "label": record["label"], "spec": format_router_spec(cfg, calibration),
            "placement": str(Path(placement.path).resolve()) if placement is not None else None,
            "megatron_flags": " ".join(flags),
            "calibration_file": str(calibration) if calibration else None,
            "calib_ppl": record["ppl"], "calib_delta_ppl_pct": record["delta_ppl_pct"],
            "predicted_speedup": record["predicted_speedup"], "config": cfg.to_dict(),
            # The expected serving cost: the same setting on calibration batches the search never saw.
            "validation_delta_ppl_pct": check["delta_ppl_pct"] if check else None,
            "validation_speedup": check["predicted_speedup"] if check else None,
            "rejected_on_validation": rejected,
        })
    frontier = sorted((r for r in records if r["frontier"] == "yes"), key=lambda r: r["predicted_speedup"])
    lasers = [r for r in records if r["router"] == LASER]
    laser_on = [r for r in lasers if r["frontier"] == "yes"]
    chosen_laser = [c["budget_pct"] for c in choices if c["config"]["router_type"] == LASER]
    if not lasers:
        note = "LASER was not searched (--laser-steps 0, or no layer setting gained balance)"
    else:
        fastest = max(lasers, key=lambda r: r["predicted_speedup"])
        note = (f"LASER (greedy per layer): its fastest setting reaches {fastest['predicted_speedup']:.3f}x at "
                f"{fastest['delta_ppl_pct']:+.2f}%; ")
        if laser_on:
            note += "on the frontier at " + ", ".join(
                f"{r['predicted_speedup']:.3f}x / {r['delta_ppl_pct']:+.2f}%" for r in laser_on) + "; "
        else:
            note += "every LASER setting is dominated; "
        note += (f"chosen at budget(s) {', '.join(f'{b:g}%' for b in chosen_laser)}" if chosen_laser
                 else "it does not beat the capacity routers at any budget given")
    return {"choices": choices, "frontier": [brief(r) for r in frontier], "laser_note": note,
            "records": [brief(r) for r in records]}


def format_choices(summary: Dict[str, Any]) -> str:
    rows = [("budget", "chosen setting", "calib dppl%", "expected serving dppl%", "predicted speedup")]
    for c in summary["choices"]:
        serving = c.get("validation_delta_ppl_pct")
        rows.append((f"{c['budget_pct']:g}%", c["label"], f"{c['calib_delta_ppl_pct']:+.2f}",
                     "-" if serving is None else f"{serving:+.2f}", f"{c['predicted_speedup']:.3f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(v.ljust(w) if i == 1 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Search router settings on a calibration text; write the fastest within a perplexity budget.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="Megatron checkpoint root (default: the bundled reference model)")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="a bundled reference model by name instead of --checkpoint")
    parser.add_argument("--text", type=Path, default=None,
                        help="calibration text (default: the bundled calibration text; never the held-out one)")
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size")
    parser.add_argument("--budget", type=float, nargs="+", required=True, metavar="PCT",
                        help="allowed calibration perplexity change vs top-k, percent (several: one choice each)")
    parser.add_argument("--out", type=Path, default=Path("capaware-tune-results"),
                        help="folder for tune.json, the calibration records and frontier.png")
    parser.add_argument("--refine", type=int, default=2, help="gamma bisection rounds after the coarse grid")
    parser.add_argument("--laser-steps", type=int, default=6,
                        help="states of the greedy LASER path evaluated on the whole text (0: no LASER search)")
    parser.add_argument("--laser-probe-batches", type=int, default=1,
                        help="calibration batches the greedy LASER steps are measured on")
    parser.add_argument("--placement", type=Path, nargs="*", default=None, metavar="PLAN",
                        help="capaware-plan files to search on too (top-k and the rank unit on each); default: "
                             "the plans shipped beside the checkpoint for --ep; none given: no placement")
    parser.add_argument("--validation-fraction", type=float, default=0.25,
                        help="share of the calibration batches (the last ones) the search never sees; the choice "
                             "is checked there (0: choose on the search figures alone, as before)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="a choice's validation change must be within budget * (1 - margin) "
                             "(docs/tuning.md: how the default was chosen)")
    parser.add_argument("--validation-candidates", type=int, default=4,
                        help="fastest settings within each budget tried on the validation split")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sequences-per-rank", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=None, help="use at most this many calibration tokens")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--no-plots", action="store_true")
    return add_cli_flags(parser)


def check_args(args: argparse.Namespace) -> None:
    for budget in args.budget:
        if not math.isfinite(budget) or budget <= 0:
            raise UserInputError(
                f"--budget {budget:g} is invalid: it is the allowed perplexity change vs top-k in percent, "
                "a number > 0 (e.g. --budget 0.5)"
            )
    if not 0.0 <= args.validation_fraction < 1.0:
        raise UserInputError(f"--validation-fraction {args.validation_fraction:g} is invalid: use a value in [0, 1), "
                             "e.g. 0.25")
    if not 0.0 <= args.margin < 1.0:
        raise UserInputError(f"--margin {args.margin:g} is invalid: use a value in [0, 1) (0.5: the validation change "
                             "must be within half the budget)")
    for name, value, low in (("--refine", args.refine, 0), ("--laser-steps", args.laser_steps, 0),
                             ("--laser-probe-batches", args.laser_probe_batches, 1),
                             ("--validation-candidates", args.validation_candidates, 1)):
        if value < low:
            raise UserInputError(f"{name} {value} is invalid: it must be an integer >= {low}")


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, _main, argv)


def _main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    from megatron_capaware.models import reference_models
    from megatron_capaware.tools import preflight, report
    from megatron_capaware.tools.evaluate import EvalOptions

    checkpoint, text = reference_models.checkpoint_and_text(args.checkpoint, args.text,
                                                            reference_models.CALIBRATION_TEXT, model=args.model)
    if Path(text).resolve() == reference_models.HELDOUT_TEXT.resolve():
        raise UserInputError(
            f"--text {text} is the bundled held-out text: tuning on it would make its evaluation in-sample; "
            "tune on a calibration text (the default) and evaluate on the held-out one"
        )
    launching = "RANK" not in os.environ
    if launching:
        preflight.check_run(checkpoint, text, args.tokenizer, [], ep=args.ep, tp=1, etp=1,
                            seq_len=args.seq_len, sequences_per_rank=args.sequences_per_rank)
    from megatron_capaware.tools.evaluate import eval_placements

    placements = eval_placements(argparse.Namespace(no_placement=args.placement == [], placement=args.placement,
                                                    ep=args.ep, replica_policy="least-loaded"), checkpoint, text)
    if launching and args.ep > 1:
        env = dict(os.environ)
        if not torch.cuda.is_available():
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.ep)))
        return run_torchrun(PROG, args.ep, "megatron_capaware.tools.tune", argv, env)
    rank0 = int(os.environ.get("RANK", "0")) == 0

    def log(line: str) -> None:
        if rank0:
            print(line, flush=True)

    options = EvalOptions(checkpoint=checkpoint, text=text, tokenizer=args.tokenizer, seq_len=args.seq_len,
                          sequences_per_rank=args.sequences_per_rank, max_tokens=args.max_tokens,
                          expert_parallel=args.ep, dtype=args.dtype, progress=False)
    budgets = sorted(set(args.budget))
    found = run_tune(options, budgets, refine=args.refine, laser_steps=args.laser_steps,
                     laser_probe_batches=args.laser_probe_batches, log=log, placements=placements,
                     validation_fraction=args.validation_fraction, margin=args.margin,
                     candidates=args.validation_candidates)
    if not rank0:
        return 0
    records, configs = found["records"], found["configs"]
    summary = summarize(records, configs, budgets, args.out, found["model"], found["placements"],
                        found["validated_choices"])
    summary.update({
        "split": found["split"], "validation_records": [brief(r) for r in found["validation"].values()],
        "tool": PROG, "checkpoint": str(checkpoint), "text": str(text), "ep": args.ep,
        "calibration_tokens": records[0]["tokens"], "budgets_pct": budgets,
        "command": "capaware-tune " + " ".join(argv),
    })
    print()
    print("frontier on the calibration text (every setting: records in "
          f"{args.out / 'calibration_results.json'}):")
    print(report.format_table(sorted((r for r in records if r["frontier"] == "yes"),
                                     key=lambda r: r["predicted_speedup"])))
    print()
    print(summary["laser_note"])
    print()
    split = found["split"]
    if split["validation_batches"]:
        print(f"search on the first {split['search_batches']} batches per rank, choice checked on the last "
              f"{split['validation_batches']} (validation change within budget x {1 - split['margin']:g}); the "
              "expected serving cost is the validation change (same kind of text; another genre can cost more: "
              "docs/tuning.md)")
    print(format_choices(summary))
    for c in summary["choices"]:
        print(f"  {c['budget_pct']:g}%: --routers {c['spec']}\n        {c['megatron_flags']}")
    (args.out / "tune.json").write_text(json.dumps(summary, indent=2) + "\n")
    report.write_outputs(records, args.out, json_path=args.out / "calibration_results.json", plots=not args.no_plots,
                         text_kind="calibration")
    print(f"wrote {args.out / 'tune.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
