"""Input checks and small helpers shared by the fast and reference policies."""

from __future__ import annotations

from megatron_capaware.errors import RoutingInputError  # noqa: F401 (defined there; re-exported)

import math
import numbers
import os
from typing import Optional, Tuple

import torch

DROP_POLICIES = ("score", "weight", "position", "random")
REROUTE_POLICIES = ("score", "load")
CAPACITY_UNITS = ("expert", "rank")
LASER_LOADS = ("expert", "rank")  # what LASER's least-loaded choice compares



def check_scores(scores: torch.Tensor, k: int, *, check_values: bool = True) -> None:
    """Validate router probabilities ``scores [T, E]`` and ``k``.

    Raises:
        RoutingInputError: wrong type, rank or dtype; ``k`` outside ``[1, E]``;
            NaN, infinite or negative scores (when ``check_values``).
    """
    if not isinstance(scores, torch.Tensor):
        raise RoutingInputError(f"scores must be a torch.Tensor [tokens, experts], got {type(scores)}")
    if scores.dim() != 2:
        raise RoutingInputError(
            f"scores must be 2-D [tokens, experts], got shape {tuple(scores.shape)}; flatten the "
            "sequence and batch dimensions first"
        )
    if not scores.is_floating_point():
        raise RoutingInputError(f"scores must be floating point probabilities, got {scores.dtype}")
    num_experts = scores.shape[1]
    if num_experts < 1:
        raise RoutingInputError("scores has no expert column (E == 0)")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise RoutingInputError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= num_experts:
        raise RoutingInputError(f"k={k} must be in [1, E={num_experts}]")
    if check_values and scores.numel():
        if not bool(score_value_flags(scores).any()):  # the one host read in the normal case
            return
        bad = ~torch.isfinite(scores)
        if bool(bad.any()):
            t, e = (int(i) for i in bad.nonzero()[0])
            raise RoutingInputError(
                f"router scores contain NaN or Inf (first at token {t}, expert {e}, "
                f"{int(bad.sum())} values in all); the gate produced non-finite logits - check "
                "the model weights and inputs (routing them would silently corrupt the batch)"
            )
        if bool((scores < 0).any()):
            raise RoutingInputError(
                "router scores must be probabilities >= 0 (softmax or sigmoid output), got a "
                f"minimum of {float(scores.min())}; pass probabilities, not logits"
            )


def score_value_flags(scores: torch.Tensor) -> torch.Tensor:
    """``[2]`` in the scores' dtype, on their device; nonzero means bad: (NaN / Inf, negative).

    Element 0 is NaN when any score is NaN or +-inf, else 0; element 1 is
    ``min(min score, 0)``, nonzero when a score is negative. Test them with
    ``!= 0`` / ``.any()`` (NaN counts as nonzero), never by summing. The first
    takes precedence (a -inf minimum sets both). One ``aminmax`` pass (it
    propagates NaN) and five small ops, no host sync, so callers can all-gather
    the flags before reading them: ``x * 0`` is 0 for a finite ``x`` and NaN for
    NaN or +-inf (no ``isfinite``, four ops each on CPU, and no overflow).
    """
    if not scores.numel():
        return torch.zeros(2, dtype=scores.dtype, device=scores.device)
    lo, hi = torch.aminmax(scores)
    return torch.stack([lo * 0 + hi * 0, lo.clamp(max=0)])


def check_gamma(gamma: float) -> float:
    """Validate the capacity factor; ``math.inf`` means no capacity limit."""
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise RoutingInputError(f"gamma must be a number > 0, got {gamma!r}")
    gamma = float(gamma)
    if math.isnan(gamma) or gamma <= 0:
        raise RoutingInputError(
            f"gamma={gamma} is invalid: the capacity factor must be > 0 (1.0 = the mean load; "
            "typical values 1.0-2.0; inf = no capacity limit)"
        )
    return gamma


def check_choice(name: str, value: str, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise RoutingInputError(f"{name}={value!r} is not one of {', '.join(allowed)}")


# Capacities saturate here: any C >= T*k is "no limit", and float64 -> int64
# conversion of a larger value is undefined (on x86 it gives INT64_MIN, which
# the selection clamps to 0 and so drops every assignment).
CAPACITY_MAX = 1 << 62


def capacity_from_total(gamma: float, total_assignments: int, num_experts: int) -> int:
    """``C = ceil(gamma * T*k / E)`` in float64; ``gamma = inf`` gives no limit.

    The same float64 expression is used by the fast and the reference code so
    they agree to the last unit. ``C >= 1`` always (``gamma * T*k / E > 0``
    rounds up to at least 1 even where the float product underflows, e.g.
    a decode step with ``T*k < E``), and ``C`` saturates at
    :data:`CAPACITY_MAX` (a huge ``gamma`` is no limit, never an overflow).
    """
    if math.isinf(gamma):
        return max(int(total_assignments), 1)
    value = gamma * float(total_assignments) / float(num_experts)
    return CAPACITY_MAX if value >= CAPACITY_MAX else max(int(math.ceil(value)), 1)


def capacity_tensor(gamma: float, total_assignments: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tensor form of :func:`capacity_from_total` (no host sync): a 0-d int64."""
    total = total_assignments.to(torch.float64)
    if math.isinf(gamma):
        return total.clamp(min=1).to(torch.int64)
    return torch.ceil(gamma * total / float(num_experts)).clamp(1.0, float(CAPACITY_MAX)).to(torch.int64)


def topk_indices(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k by score per token: ``(values [T, k], indices [T, k])``.

    ``torch.topk`` is what Megatron's own router uses, so the ``topk`` policy
    is bit-identical to vanilla routing.
    """
    return torch.topk(scores, k=k, dim=1)


def topk_map(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(routing_map [T, E] bool, sum of the top-k scores [T])``."""
    values, indices = topk_indices(scores, k)
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, indices, True)
    return routing_map, values.sum(dim=1)


def weights_for(
    scores: torch.Tensor,
    routing_map: torch.Tensor,
    topk_sum: torch.Tensor,
    *,
    normalize: bool,
    renormalize: bool = False,
) -> torch.Tensor:
    """Combine weights ``probs [T, E]``, zero off the map.

    Args:
        scores: ``[T, E]`` router probabilities.
        routing_map: ``[T, E]`` the experts each token finally uses.
        topk_sum: ``[T]`` sum of the token's ORIGINAL top-k scores.
        normalize: the model's own top-k normalisation (Mixtral-style): divide
            by ``topk_sum``, so kept weights equal vanilla's exactly and drops
            never inflate the survivors.
        renormalize: divide by the sum of the surviving scores instead, so
            each token's weights sum to 1 (``--capaware-renormalize``).
    """
    probs = scores * routing_map
    if renormalize:
        denom = probs.sum(dim=1, keepdim=True)
        return torch.where(denom > 0, probs / denom.clamp_min(torch.finfo(probs.dtype).tiny), probs)
    if normalize:
        return probs / topk_sum.unsqueeze(1).clamp_min(torch.finfo(probs.dtype).tiny)
    return probs


def token_count(num_tokens: int, device: torch.device, valid_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """0-d int64 on ``device``: the tokens that take part (``valid_tokens.sum()``, or ``num_tokens``).

    ``torch.full`` launches a fill with the value as a kernel argument; a
    ``torch.tensor(n, device=...)`` would be a blocking host-to-device copy.
    """
    if valid_tokens is not None:
        return valid_tokens.sum()
    return torch.full((), num_tokens, dtype=torch.int64, device=device)


def local_token_offset(
    num_tokens: int, device: torch.device, group, valid_tokens: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's first global token index and the global token count (0-d int64).

    With ``valid_tokens`` only those count (padding tokens have no index).
    """
    from megatron_capaware.policies.collectives import all_gather_stack, group_rank

    counts = all_gather_stack(token_count(num_tokens, device, valid_tokens).reshape(1), group)
    counts = counts.view(-1)
    return counts[: group_rank(group)].sum(), counts.sum()


def _bool_mask(mask: Optional[torch.Tensor], name: str, kind: str, shape: tuple, shape_text: str,
               scores: torch.Tensor) -> Optional[torch.Tensor]:
    """An optional bool mask checked for dtype and shape (no value read), on the scores' device."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise RoutingInputError(f"{name} must be a bool tensor {kind}, got {getattr(mask, 'dtype', type(mask))}")
    if tuple(mask.shape) != shape:
        raise RoutingInputError(f"{name} must be {shape_text}, got {tuple(mask.shape)}")
    return mask.to(scores.device)


def check_valid_tokens(valid_tokens: Optional[torch.Tensor], scores: torch.Tensor) -> Optional[torch.Tensor]:
    """Validate the optional ``[T]`` bool mask of real (non-padding) tokens (shape and dtype only)."""
    return _bool_mask(valid_tokens, "valid_tokens", "[T] (True = a real token, False = padding)",
                      (scores.shape[0],), f"[T={scores.shape[0]}]", scores)


def check_allowed(allowed: Optional[torch.Tensor], scores: torch.Tensor) -> Optional[torch.Tensor]:
    """Validate the optional ``[T, E]`` bool mask of experts each token may use (shape and dtype only)."""
    return _bool_mask(allowed, "allowed", "[T, E] (the experts each token may use)", tuple(scores.shape),
                      f"[T, E]={tuple(scores.shape)}", scores)


def group_limited_mask(route_scores: torch.Tensor, k: int, num_groups: int, group_topk: int) -> torch.Tensor:
    """``[T, E]`` bool: the experts of the ``group_topk`` groups each token selects.

    Megatron's group selection (``moe_utils.group_limited_topk``, DeepSeek-V2/V3
    device- and node-limited routing) with the same operations: experts split
    into ``num_groups`` equal consecutive groups, a group's score the sum of
    its ``k // group_topk`` best ``route_scores``, the ``group_topk`` best
    groups selected. ``route_scores`` is what Megatron ranks by (logits,
    probabilities, or sigmoid scores plus expert bias).
    """
    num_tokens, num_experts = route_scores.shape
    if num_groups < 1 or num_experts % num_groups or not 1 <= group_topk <= num_groups:
        raise RoutingInputError(
            f"group-limited routing needs E={num_experts} divisible by num_groups={num_groups} and "
            f"1 <= group_topk={group_topk} <= num_groups"
        )
    group_size = num_experts // num_groups
    group_scores = route_scores.view(num_tokens, num_groups, group_size).topk(k // group_topk, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    return group_mask.unsqueeze(-1).expand(num_tokens, num_groups, group_size).reshape(num_tokens, num_experts)


EXPERT_ID_BITS = 10  # composite keys hold expert ids below 2**10
SPARE_LIMIT = (1 << 22) - 1  # spare capacities above this compare as equal in load order


def topk_mass(values: torch.Tensor) -> torch.Tensor:
    """``M_k [T]`` float64: each row's top-k scores summed left to right.

    Compared with ``eps_high`` in float64: a float32 comparison rounds
    ``eps_high`` (``1e-167`` becomes 0, ``0.7`` becomes ``0.69999999``) and
    flips tokens sitting on the threshold, against the calibration, which
    compares in float64. A fixed left-to-right order makes ``M_k`` of a token
    independent of how many tokens share its call (its EP split) and equal to
    the reference's ``sum()``.
    """
    if not values.shape[1]:
        return values.new_zeros(values.shape[0], dtype=torch.float64)
    wide = values.double()  # one conversion, then the same column-by-column adds
    mass = wide[:, 0]
    for j in range(1, values.shape[1]):
        mass = mass + wide[:, j]
    return mass


def score_bits(scores: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys of non-negative float scores (``-0.0`` as ``+0.0``)."""
    s = scores.to(torch.float32) + 0.0  # IEEE: -0.0 + 0.0 == +0.0
    return s.view(torch.int32).to(torch.int64)


def ranked_experts(
    scores: torch.Tensor,
    available: torch.Tensor,
    count: int,
    spare: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``count`` best available experts, best first, ties by lower id.

    "Best" is the highest score, or with ``spare [E]`` the largest spare
    capacity, then the highest score. Unique int64 keys (spare, score bits,
    inverted expert id) make ``torch.topk`` deterministic and replace a full
    ``[T, E]`` sort.

    Returns:
        ``(experts [T, count] int64, ok [T, count] bool)``; ``ok`` is False
        where fewer than ``count`` experts are available.
    """
    num_experts = scores.shape[1]
    key = expert_keys(scores, spare).masked_fill_(~available, -1)  # in place: the keys are this call's own
    values, experts = torch.topk(key, min(count, num_experts), dim=1)
    return experts, values >= 0


def expert_keys(scores: torch.Tensor, spare: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[T, E]`` int64 keys, unique per row, ordering experts as :func:`ranked_experts` does (larger = better)."""
    num_experts = scores.shape[1]
    if num_experts > (1 << EXPERT_ID_BITS):
        raise RoutingInputError(f"at most {1 << EXPERT_ID_BITS} experts are supported, got {num_experts}")
    # bits << 10 | (1023 - id), as one add: the low 10 bits of bits * 1024 are zero.
    inverted_ids = torch.arange((1 << EXPERT_ID_BITS) - 1, (1 << EXPERT_ID_BITS) - 1 - num_experts, -1,
                                device=scores.device)
    key = torch.add(inverted_ids, score_bits(scores), alpha=1 << EXPERT_ID_BITS)
    if spare is not None:
        key = key | (spare.clamp(0, SPARE_LIMIT).to(torch.int64) << (31 + EXPERT_ID_BITS)).unsqueeze(0)
    return key


DEVICE_PATH_ENV = "CAPAWARE_DEVICE_PATH"


def use_device_path(tensor: torch.Tensor) -> bool:
    """Whether a policy takes its device code path for ``tensor``.

    The device path does fixed-shape work with no host synchronisation (what
    CUDA needs); the CPU path compacts to the rows that matter and stops
    early (reading a CPU tensor costs nothing). Both decide identically.
    CUDA tensors take the device path; ``CAPAWARE_DEVICE_PATH=1`` in the
    environment forces it on CPU tensors (to count syncs and ops without a
    GPU), ``CAPAWARE_DEVICE_PATH=0`` forces the CPU path.
    """
    forced = os.environ.get(DEVICE_PATH_ENV, "")
    if not forced:
        return tensor.is_cuda
    if forced in ("1", "0"):
        return forced == "1"
    raise RoutingInputError(f"{DEVICE_PATH_ENV}={forced!r} must be 1 (device path), 0 (CPU path) or unset")


def check_expert_ranks(expert_ranks: Optional[torch.Tensor], num_ranks: Optional[int], num_experts: int,
                       device: torch.device) -> torch.Tensor:
    """Validate an ``[E]`` expert -> EP rank map and the EP size (shape, dtype, ``num_ranks``; no value read).

    Returns the map as int64 on ``device`` (a no-op when it is already there:
    the router builds it once per layout and device).
    """
    if expert_ranks is None or isinstance(num_ranks, bool) or not isinstance(num_ranks, numbers.Integral) \
            or num_ranks < 1:
        raise RoutingInputError(
            f"load='rank' needs expert_ranks [E] and num_ranks >= 1 (got num_ranks={num_ranks!r}); "
            "policies.expert_rank_map builds Megatron's contiguous layout"
        )
    if not isinstance(expert_ranks, torch.Tensor) or tuple(expert_ranks.shape) != (num_experts,) \
            or expert_ranks.is_floating_point() or expert_ranks.dtype == torch.bool:
        raise RoutingInputError(f"expert_ranks must be an integer tensor [E={num_experts}], got "
                                f"{getattr(expert_ranks, 'dtype', type(expert_ranks))} "
                                f"{tuple(getattr(expert_ranks, 'shape', ()))}")
    return expert_ranks.to(device=device, dtype=torch.int64)
