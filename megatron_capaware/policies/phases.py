"""Which steps of a dynamic inference engine a routing policy applies to (pure; no Megatron).

See :mod:`megatron_capaware.adapters.phases` for how the steps are read from
Megatron's ``DynamicInferenceContext`` and how the ranks of an EP group agree on
an eager step's phase.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Tuple

PHASES = ("prefill", "mixed", "decode", "idle")
#: The phases the policy applies to by default (``--capaware-phases``).
DEFAULT_PHASES = "prefill,mixed"


class PhaseConfigError(ValueError):
    """A bad ``--capaware-phases`` value."""


def parse_phases(text: str) -> Tuple[str, ...]:
    """``"prefill,mixed"`` -> ``("prefill", "mixed")``; ``"all"`` -> every phase.

    Raises:
        PhaseConfigError: an unknown or empty phase list, naming the choices.
    """
    if not isinstance(text, str):
        raise PhaseConfigError(f"phases={text!r} must be a comma-separated string such as {DEFAULT_PHASES!r}")
    if text.strip() == "all":
        return PHASES
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in names if p not in PHASES]
    if bad or not names:
        raise PhaseConfigError(
            f"--capaware-phases {text!r}: use 'all' or a comma-separated list of {', '.join(PHASES)} "
            f"(default {DEFAULT_PHASES!r}: the policy on prefill and mixed steps, top-k on decode-only steps)"
        )
    return names


@dataclasses.dataclass(frozen=True)
class StepComposition:
    """One dynamic step, as the engine's host bookkeeping states it (Python ints: no sync).

    Attributes:
        prefill_tokens: real tokens of prefilling requests.
        decode_tokens: real tokens of decoding requests.
        captured: whether the step runs as a captured CUDA graph.
    """

    prefill_tokens: int
    decode_tokens: int
    captured: bool = False

    @property
    def phase(self) -> str:
        """``prefill``, ``mixed``, ``decode`` or ``idle`` (no real token)."""
        if self.prefill_tokens and self.decode_tokens:
            return "mixed"
        if self.prefill_tokens:
            return "prefill"
        if self.decode_tokens:
            return "decode"
        return "idle"


#: What routes a call (:func:`step_route`): the configured policy, the decode router, or top-k.
POLICY, DECODE, TOPK_ON_LAYOUT = "policy", "decode", "top-k on the layout"


def step_route(step: Optional[StepComposition], phases: Iterable[str], group_size: int,
               decode_router: bool = False, group_decode_only: Optional[bool] = None) -> str:
    """Which router a call of the dynamic engine runs: :data:`POLICY`, :data:`DECODE` or :data:`TOPK_ON_LAYOUT`.

    Args:
        step: the current step's composition (None: outside a dynamic step: the policy).
        phases: the phases the policy applies to.
        group_size: ranks of the router's load group.
        decode_router: whether a decode router (``--capaware-decode-router``) takes decode-only steps.
        group_decode_only: at ``group_size > 1``, whether the step is decode-only (or idle) on every rank
            of the group, as the ranks agreed (None: not agreed).

    One rank (``group_size == 1``) chooses by its own phase. At EP > 1 the ranks
    must choose alike (the routers' collectives span the group), so they choose
    by the step's *group* phase, which they agree on (:func:`needs_group_phase`
    says when): decode-only (or idle) on every rank, or not. A decode-only step
    runs the decode router, else the policy if ``decode`` is among ``phases``,
    else top-k on the layout; any other step runs the policy if ``prefill`` or
    ``mixed`` is among ``phases``, else top-k. Without an agreement
    (``group_decode_only`` None) an eager step at EP > 1 runs the policy. A
    captured step is top-k (capture-safe).
    """
    if step is None:
        return POLICY
    if step.captured:
        return TOPK_ON_LAYOUT
    chosen = tuple(phases)
    if group_size <= 1:
        if step.phase in chosen:
            return POLICY
        return DECODE if decode_router and step.phase == "decode" else TOPK_ON_LAYOUT
    if group_decode_only is None:
        return POLICY  # eager at EP > 1, not agreed: ranks may differ in phase; keep the collectives
    if group_decode_only:
        if decode_router:
            return DECODE
        return POLICY if "decode" in chosen else TOPK_ON_LAYOUT
    return POLICY if ("prefill" in chosen or "mixed" in chosen) else TOPK_ON_LAYOUT


def needs_group_phase(step: Optional[StepComposition], phases: Iterable[str], group_size: int,
                      decode_router: bool = False) -> bool:
    """Whether the ranks of a load group must agree on the step's group phase (one all-reduce per step).

    Only for an eager dynamic step at ``group_size > 1`` whose route depends on
    the phase: with a decode router, or when ``phases`` route decode-only steps
    and the others differently (the default ``prefill,mixed`` does).
    """
    if step is None or step.captured or group_size <= 1:
        return False
    chosen = set(phases)
    return decode_router or ("decode" in chosen) != bool(chosen & {"prefill", "mixed"})
