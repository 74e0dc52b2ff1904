"""Score matrices for policy tests: random, skewed, tied and degenerate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from megatron_capaware.tools.bench.common import synthetic_scores as make_scores  # noqa: F401  (re-exported for the tests)

SCORE_MODES = ("random", "skewed", "ties", "uniform", "one_hot_expert", "peaked")


@dataclass
class Case:
    scores: torch.Tensor
    k: int
    gamma: float
    normalize: bool
    mode: str

    @property
    def shape(self) -> str:
        return f"T={self.scores.shape[0]} E={self.scores.shape[1]} k={self.k} {self.mode} gamma={self.gamma}"


GAMMAS = (0.25, 0.75, 1.0, 1.25, 2.0, math.inf)


def random_cases(count: int, seed: int, max_tokens: int = 40, max_experts: int = 9) -> Iterator[Case]:
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        T = int(torch.randint(0, max_tokens + 1, (1,), generator=g))
        E = int(torch.randint(1, max_experts + 1, (1,), generator=g))
        k = int(torch.randint(1, E + 1, (1,), generator=g))
        mode = SCORE_MODES[i % len(SCORE_MODES)]
        yield Case(
            scores=make_scores(T, E, mode, g),
            k=k,
            gamma=GAMMAS[i % len(GAMMAS)],
            normalize=bool(i % 2),
            mode=mode,
        )
