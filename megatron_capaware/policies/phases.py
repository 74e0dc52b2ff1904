"""Which steps of a dynamic inference engine a routing policy applies to (pure; no Megatron).

See :mod:`megatron_capaware.adapters.phases` for how the steps are read from
Megatron's ``DynamicInferenceContext`` and why an eager step at EP > 1 runs the
policy whatever its phase.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional, Tuple

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


def route_with_policy(step: Optional[StepComposition], phases: Iterable[str], load_group: Any) -> bool:
    """Whether this call runs the configured policy (else ``topk`` on the placement).

    Args:
        step: the current step's composition (None: no dynamic step: the policy).
        phases: the phases the policy applies to.
        load_group: the router's load group (its size decides whether ranks can choose alone).
    """
    if step is None:
        return True
    if step.captured:
        return False
    if step.phase in tuple(phases):
        return True
    from megatron_capaware.policies.collectives import group_size

    return group_size(load_group) > 1  # eager at EP > 1: ranks may differ in phase; keep the collectives


