"""What a routing policy decided, with the load figures it already knows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass
class RoutingDecision:
    """A policy's full result. The public functions return ``(probs, routing_map)``.

    Attributes:
        probs: ``[T, E]`` combine weights, zero off the map (None when the
            caller asked for no weights).
        routing_map: ``[T, E]`` bool, the experts each token is sent to.
        global_loads: ``[E]`` int64, assignments per expert over the group
            after the decision (what the experts will process).
        requested_assignments: 0-d int64, the assignments asked for over the
            group before any capacity rule (``T_glob * k`` for top-k based).
        dropped: 0-d int64, this rank's assignments dropped (never computed).
        rerouted: 0-d int64, this rank's assignments moved to another expert.
        capacity: 0-d int64 capacity ``C`` (None where no capacity applies).
        global_tokens: 0-d int64, tokens over the group.
        flexible: 0-d int64, this rank's LASER-flexible tokens (None otherwise).
    """

    probs: Optional[torch.Tensor]
    routing_map: torch.Tensor
    global_loads: torch.Tensor
    requested_assignments: torch.Tensor
    dropped: torch.Tensor
    rerouted: torch.Tensor
    global_tokens: torch.Tensor
    capacity: Optional[torch.Tensor] = None
    flexible: Optional[torch.Tensor] = None

    def as_tuple(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(probs [T, E], routing_map [T, E])``, as the public functions return them.

        Raises:
            ValueError: the decision was made with ``weights=False`` (no ``probs``).
        """
        if self.probs is None:
            raise ValueError("this RoutingDecision was made with weights=False and has no probs: "
                             "call the policy with weights=True for (probs, routing_map)")
        return self.probs, self.routing_map
