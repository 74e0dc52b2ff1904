"""Property-based tests of the routing policies (hypothesis).

Every generated case checks the docs/routers.md invariants and fast == reference, on
both selection code paths (``CAPAWARE_DEVICE_PATH=0``: the CPU path that
compacts and stops early; ``=1``: the sync-free device path), over arbitrary
``T`` (0 included), ``E``, ``k``, ``gamma``, pools and degenerate scores:
zeros, exactly equal values, one-hot rows, 1.0s, denormals, values near the
float32 limit, ties from a tiny value set.

Multi-rank behaviour is simulated with threads (``megatron_capaware/tools/bench/sim_dist.py``): the
same global batch split over W ranks in any way (empty ranks included, TP
copies included) must give, rank by rank, the slice of the reference run on
the concatenation.

How many cases: ``CAPAWARE_HYPOTHESIS_PROFILE=ci`` (default, a few thousand
cases, derandomized) or ``nightly`` (>= 10^5 cases)::

    CAPAWARE_HYPOTHESIS_PROFILE=nightly python -m pytest tests/test_properties.py -p no:cacheprovider
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from megatron_capaware import policies as P
from megatron_capaware.policies import common
from megatron_capaware.policies import reference as R
from megatron_capaware.policies.common import DEVICE_PATH_ENV
from megatron_capaware.tools.bench.sim_dist import run_ranks

# pytest-timeout's 600 s per test (pyproject.toml) fits the ci profile; a
# nightly property runs 15,000 cases and may take much longer.
if os.environ.get("CAPAWARE_HYPOTHESIS_PROFILE", "ci") in ("nightly",):
    pytestmark = pytest.mark.timeout(0)

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal
F32_DENORM = float(np.float32(1e-45))  # smallest subnormal (1.4e-45)
SPECIAL_VALUES = (0.0, F32_DENORM, 2 * F32_DENORM, 1e-40, F32_TINY, 1e-30, 0.125, 0.25, 0.5, 1.0)


# ----------------------------------------------------------------------------- strategies


def _huge_elements(num_experts: int):
    # Near the float32 limit but every row's sum stays finite (a top-k sum that
    # overflows to inf is a different, documented degenerate case).
    upper = float(np.float32(F32_MAX / (num_experts + 1)))
    return st.floats(upper / 16, upper, width=32)


@st.composite
def score_matrices(draw, max_tokens: int = 24, max_experts: int = 10, min_tokens: int = 0):
    """Router probabilities ``[T, E]`` (float32, >= 0, finite) of many characters."""
    num_experts = draw(st.integers(1, max_experts))
    num_tokens = draw(st.one_of(st.integers(min_tokens, 4), st.integers(min_tokens, max_tokens)))
    shape = (num_tokens, num_experts)
    kind = draw(st.sampled_from(
        ("uniform01", "softmax", "zeros", "equal", "ones", "one_hot", "special", "denormal", "huge", "few_values")
    ))
    if kind == "uniform01":
        arr = draw(hnp.arrays(np.float32, shape, elements=st.floats(0, 1, width=32)))
    elif kind == "softmax":
        logits = draw(hnp.arrays(np.float32, shape, elements=st.floats(-40, 40, width=32)))
        arr = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    elif kind == "zeros":
        arr = np.zeros(shape, np.float32)
    elif kind == "equal":
        arr = np.full(shape, draw(st.floats(0, 1, width=32)), np.float32)
    elif kind == "ones":
        arr = np.ones(shape, np.float32)
    elif kind == "one_hot":
        same = draw(st.booleans())
        cols = [draw(st.integers(0, num_experts - 1))] * num_tokens if same else [
            draw(st.integers(0, num_experts - 1)) for _ in range(num_tokens)]
        arr = np.zeros(shape, np.float32)
        arr[np.arange(num_tokens), cols] = 1.0
    elif kind == "special":
        arr = draw(hnp.arrays(np.float32, shape, elements=st.sampled_from(SPECIAL_VALUES)))
    elif kind == "denormal":
        arr = draw(hnp.arrays(np.float32, shape, elements=st.floats(0, F32_TINY, width=32, allow_subnormal=True)))
    elif kind == "huge":
        arr = draw(hnp.arrays(np.float32, shape, elements=_huge_elements(num_experts)))
    else:  # few_values: heavy ties
        arr = draw(hnp.arrays(np.float32, shape, elements=st.sampled_from((0.0, 0.25, 0.5))))
    scores = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if draw(st.booleans()):  # -0.0 is a valid zero score (it must tie with +0.0)
        scores = torch.where(scores == 0, torch.full_like(scores, -0.0), scores)
    note(f"scores kind={kind} T={num_tokens} E={num_experts}")
    return scores


GAMMAS = st.one_of(
    st.sampled_from((5e-324, 1e-30, 0.01, 0.25, 0.5, 1.0, 1.25, 1.5, 2.0, 3.0, 8.0, 1e6, 1e20, 1e300, math.inf)),
    st.floats(1e-3, 16.0),
)


@st.composite
def topk_case(draw, **kwargs):
    scores = draw(score_matrices(**kwargs))
    k = draw(st.integers(1, scores.shape[1]))
    return scores, k


@contextmanager
def sync_free(value: Optional[bool]):
    """Force the device path (True), the CPU path (False) or neither (None), as CAPAWARE_DEVICE_PATH does."""
    saved = os.environ.get(DEVICE_PATH_ENV)
    if value is None:
        os.environ.pop(DEVICE_PATH_ENV, None)
    else:
        os.environ[DEVICE_PATH_ENV] = "1" if value else "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(DEVICE_PATH_ENV, None)
        else:
            os.environ[DEVICE_PATH_ENV] = saved


SYNC_MODES = (False, True)


# ----------------------------------------------------------------------------- router table


def fast_decision(name: str, scores: torch.Tensor, k: int, p: Dict[str, Any], group=None, local=None, **masks):
    """``masks``: optional valid_tokens / allowed / topk_indices, passed on as given."""
    common = dict(normalize=p["normalize"], renormalize=p["renormalize"], group=group, return_decision=True,
                  **masks)
    if name == "drop":
        return P.capacity_drop(scores, k, p["gamma"], policy=p["policy"], seed=p["seed"], **common)
    if name == "reroute":
        return P.capacity_reroute(
            scores, k, p["gamma"], rounds=p["rounds"], policy=p["policy"], min_ratio=p["min_ratio"],
            drop_policy=p["drop_policy"], seed=p["seed"], **common)
    if name == "expanded":
        return P.expanded_drop(scores, k, p["gamma"], local, **common)
    if name == "laser":
        return P.laser(scores, k, p["eps_high"], p["t_fix"], p["pool"], waves=p["waves"],
                       rounds=p["laser_rounds"], **_laser_load(p), **common)
    raise KeyError(name)


def reference(name: str, scores: torch.Tensor, k: int, p: Dict[str, Any], local_per_rank=None, sizes=None,
              **masks):
    common = dict(normalize=p["normalize"], renormalize=p["renormalize"], **masks)
    if name == "drop":
        return R.capacity_drop(scores, k, p["gamma"], policy=p["policy"], seed=p["seed"], **common)
    if name == "reroute":
        return R.capacity_reroute(scores, k, p["gamma"], rounds=p["rounds"], policy=p["policy"],
                                  min_ratio=p["min_ratio"], drop_policy=p["drop_policy"], seed=p["seed"], **common)
    if name == "expanded":
        return R.expanded_drop(scores, k, p["gamma"], local_per_rank, sizes or [scores.shape[0]], **common)
    if name == "laser":
        return R.laser_waves(scores, k, p["eps_high"], p["t_fix"], p["pool"], waves=p["waves"],
                             rounds=p["laser_rounds"], expert_ranks=p.get("expert_ranks"), **common)
    raise KeyError(name)


@st.composite
def router_params(draw, name: str, k: int, num_experts: int) -> Dict[str, Any]:
    p: Dict[str, Any] = dict(normalize=draw(st.booleans()), renormalize=draw(st.booleans()))
    if name in ("drop", "reroute", "expanded"):
        p["gamma"] = draw(GAMMAS)
    if name in ("drop", "reroute"):
        p["seed"] = draw(st.integers(0, 2**31 - 1))
    if name == "drop":
        p["policy"] = draw(st.sampled_from(common.DROP_POLICIES))
    if name == "reroute":
        p["rounds"] = draw(st.integers(0, 3))
        p["policy"] = draw(st.sampled_from(common.REROUTE_POLICIES))
        p["drop_policy"] = draw(st.sampled_from(common.DROP_POLICIES))
        p["min_ratio"] = draw(st.sampled_from((0.0, 0.0, 0.2, 0.5, 1.0, 2.0)))
    if name == "laser":
        p["eps_high"] = draw(st.one_of(st.sampled_from((0.0, 0.25, 0.5, 0.9, 1.0, 1.5, 1e30)), st.floats(0, 2)))
        p["t_fix"] = draw(st.one_of(st.sampled_from((1.0, 0.5, 0.25, 1e-6)), st.floats(1e-6, 1.0)))
        p["pool"] = draw(st.integers(k, num_experts + 2))
        p["waves"] = draw(st.integers(1, 9))
        p["laser_rounds"] = draw(st.integers(0, 3))
        # load=rank: each expert on one of LASER_RANKS EP ranks (any map: a placement; a rank may hold none).
        p["expert_ranks"] = draw(st.one_of(st.none(), st.lists(st.integers(0, LASER_RANKS - 1), min_size=num_experts,
                                                               max_size=num_experts)))
    return p


LASER_RANKS = 3


def _laser_load(p: Dict[str, Any]) -> Dict[str, Any]:
    """The fast path's arguments for ``p["expert_ranks"]`` (None: load=expert)."""
    if p.get("expert_ranks") is None:
        return {}
    return dict(load="rank", expert_ranks=torch.tensor(p["expert_ranks"], dtype=torch.int64), num_ranks=LASER_RANKS)


# ----------------------------------------------------------------------------- invariants


def assert_same(fast: Tuple[torch.Tensor, torch.Tensor], ref: Tuple[torch.Tensor, torch.Tensor], what: str) -> None:
    probs, routing_map = fast
    ref_probs, ref_map = ref
    assert torch.equal(routing_map, ref_map), f"{what}: routing map differs from the reference"
    assert torch.allclose(probs, ref_probs, rtol=1e-6, atol=1e-7, equal_nan=True), f"{what}: weights differ"


def check_invariants(name: str, scores: torch.Tensor, k: int, p: Dict[str, Any], decision, global_tokens: int,
                     local=None) -> None:
    """docs/routers.md invariants of one rank's decision (``global_tokens`` over the group)."""
    probs, routing_map = decision.probs, decision.routing_map
    num_tokens, num_experts = scores.shape
    assert routing_map.shape == scores.shape and routing_map.dtype == torch.bool
    assert probs.shape == scores.shape
    assert torch.all(probs[~routing_map] == 0), "weights must be zero off the routing map"
    assert torch.all(torch.isfinite(probs)) and torch.all(probs >= 0), "weights must be finite and >= 0"
    per_token = routing_map.sum(1)
    top_map, _ = common.topk_map(scores, k)
    if name == "laser":
        assert torch.all(per_token == k), "LASER gives every token exactly k experts"
    elif name != "expanded":
        assert torch.all(per_token <= k), "a token has more than k experts"
    if name == "drop":
        assert not torch.any(routing_map & ~top_map), "drop may only remove top-k assignments"
    if name == "expanded":
        allowed = top_map.clone()
        allowed[:, torch.as_tensor(local, dtype=torch.int64)] = True
        assert not torch.any(routing_map & ~allowed), "expanded-drop used an expert neither top-k nor local"
    if name in ("drop", "reroute", "expanded"):
        capacity = common.capacity_from_total(p["gamma"], global_tokens * k, num_experts)
        assert int(decision.capacity) == capacity
        assert capacity >= 1, "C >= 1 always (a decode step keeps its experts)"
        assert int(decision.global_loads.max()) <= capacity, "an expert's global load exceeds C"
        assert torch.all(decision.global_loads >= 0)
    assert int(decision.global_tokens) == global_tokens
    assert int(decision.global_loads.sum()) <= max(global_tokens * num_experts, 0)


def check_single_rank_figures(name: str, scores: torch.Tensor, k: int, p: Dict[str, Any], decision) -> None:
    """On one rank the decision's figures are those of its own map."""
    routing_map = decision.routing_map
    num_tokens, num_experts = scores.shape
    assert torch.equal(decision.global_loads, routing_map.sum(0)), "global loads != the map's loads"
    if name in ("drop", "reroute"):
        top_map, _ = common.topk_map(scores, k)
        kept_top = int((routing_map & top_map).sum())
        if name == "drop":
            assert int(decision.dropped) == num_tokens * k - kept_top
            # Never more dropped than the capacity forces: each expert keeps min(offered, C).
            offered = top_map.sum(0)
            expected = torch.minimum(offered, torch.tensor(int(decision.capacity)))
            assert torch.equal(routing_map.sum(0), expected), "an expert kept fewer than min(offered, C)"
            if num_tokens:
                assert int(routing_map.sum()) >= 1, "every expert of every token was dropped"
        else:
            assert int(decision.rerouted) + int(decision.dropped) == num_tokens * k - kept_top


# ----------------------------------------------------------------------------- single process


def _run_single(name: str, scores: torch.Tensor, k: int, p: Dict[str, Any], local=None) -> None:
    ref = reference(name, scores, k, p, [local] if local is not None else None)
    for mode in SYNC_MODES:
        with sync_free(mode):
            decision = fast_decision(name, scores, k, p, local=local)
        what = f"{name} sync_free={mode} params={p}"
        assert_same(decision.as_tuple(), ref, what)
        check_invariants(name, scores, k, p, decision, scores.shape[0], local)
        check_single_rank_figures(name, scores, k, p, decision)


@given(data=st.data(), case=topk_case())
def test_capacity_drop_properties(data, case) -> None:
    scores, k = case
    p = data.draw(router_params("drop", k, scores.shape[1]))
    _run_single("drop", scores, k, p)
    top_map, _ = common.topk_map(scores, k)
    top_probs, _ = P.topk(scores, k, normalize=p["normalize"])
    probs, routing_map = P.capacity_drop(scores, k, p["gamma"], policy=p["policy"], seed=p["seed"],
                                         normalize=p["normalize"])
    assert torch.equal(probs[routing_map], top_probs[routing_map]), "kept weights must equal vanilla's"


@given(data=st.data(), case=topk_case())
def test_capacity_reroute_properties(data, case) -> None:
    scores, k = case
    p = data.draw(router_params("reroute", k, scores.shape[1]))
    _run_single("reroute", scores, k, p)
    _, drop_map = P.capacity_drop(scores, k, p["gamma"], policy=p["drop_policy"], seed=p["seed"])
    _, rr_map = P.capacity_reroute(scores, k, p["gamma"], rounds=p["rounds"], policy=p["policy"],
                                   min_ratio=p["min_ratio"], drop_policy=p["drop_policy"], seed=p["seed"])
    assert not torch.any(drop_map & ~rr_map), "reroute must keep everything the drop kept"


@given(data=st.data(), case=topk_case())
def test_expanded_drop_properties(data, case) -> None:
    scores, k = case
    num_experts = scores.shape[1]
    p = data.draw(router_params("expanded", k, num_experts))
    local = data.draw(st.lists(st.integers(0, num_experts - 1), unique=True, max_size=num_experts))
    _run_single("expanded", scores, k, p, local)


@given(data=st.data(), case=topk_case())
def test_laser_properties(data, case) -> None:
    scores, k = case
    num_experts = scores.shape[1]
    p = data.draw(router_params("laser", k, num_experts))
    _run_single("laser", scores, k, p)
    # One flexible token per wave and no quota rounds is the exact sequential greedy.
    exact = dict(p, waves=max(scores.shape[0], 1), laser_rounds=0)
    ref = R.laser_greedy(scores, k, p["eps_high"], p["t_fix"], p["pool"], normalize=p["normalize"],
                         renormalize=p["renormalize"], expert_ranks=p.get("expert_ranks"))
    for mode in SYNC_MODES:
        with sync_free(mode):
            assert_same(fast_decision("laser", scores, k, exact).as_tuple(), ref, "laser exact greedy")
    # pool == k, and eps_high == 0, are top-k exactly.
    expected = P.topk(scores, k, normalize=p["normalize"])
    for eps, pool in ((p["eps_high"], k), (0.0, p["pool"])):
        got = P.laser(scores, k, eps, p["t_fix"], pool, normalize=p["normalize"], waves=p["waves"],
                      rounds=p["laser_rounds"])
        assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0]), f"eps={eps} pool={pool}"


@given(case=topk_case(), gamma=st.sampled_from((1e7, 1e18, 1e20, 1e100, 1e300, 1.7e308, math.inf)),
       normalize=st.booleans(), rounds=st.integers(0, 3))
def test_huge_gamma_equals_topk(case, gamma: float, normalize: bool, rounds: int) -> None:
    scores, k = case
    expected = P.topk(scores, k, normalize=normalize)
    for mode in SYNC_MODES:
        with sync_free(mode):
            for policy in common.DROP_POLICIES:
                got = P.capacity_drop(scores, k, gamma, policy=policy, normalize=normalize)
                assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0]), (gamma, policy)
            got = P.capacity_reroute(scores, k, gamma, rounds=rounds, normalize=normalize)
            assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0]), gamma
    assert torch.equal(R.capacity_drop(scores, k, gamma, normalize=normalize)[1], expected[1])


def test_capacity_saturates_instead_of_overflowing() -> None:
    """Regression: gamma >= ~1e19 overflowed int64 in capacity_tensor (C became 0: every
    assignment dropped); the reference raised OverflowError at 1.7e308; a tiny gamma
    underflowed to C = 0 on a decode step."""
    scores = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), -1)
    for gamma in (1e20, 1e300, 1.7e308):
        assert int(P.capacity_drop(scores, 2, gamma)[1].sum()) == 12
        assert int(R.capacity_drop(scores, 2, gamma)[1].sum()) == 12
        assert int(P.capacity_drop(scores, 2, gamma, return_decision=True).capacity) == common.CAPACITY_MAX
    one = scores[:1]
    assert int(P.capacity_drop(one, 1, 5e-324, return_decision=True).capacity) == 1
    assert int(P.capacity_drop(one, 1, 5e-324)[1].sum()) == 1


# ----------------------------------------------------------------------------- simulated ranks


@st.composite
def split_of(draw, total: int, max_world: int = 4) -> List[int]:
    world = draw(st.integers(1, max_world))
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=world - 1, max_size=world - 1)))
    bounds = [0, *cuts, total]
    return [bounds[i + 1] - bounds[i] for i in range(world)]


@given(data=st.data(), case=topk_case(max_tokens=20), name=st.sampled_from(("drop", "reroute", "expanded", "laser")),
       mode=st.sampled_from(SYNC_MODES), with_copies=st.booleans(), padded=st.booleans())
def test_split_over_ranks_equals_reference_on_concatenation(data, case, name: str, mode: bool,
                                                            with_copies: bool, padded: bool) -> None:
    scores, k = case
    num_tokens, num_experts = scores.shape
    p = data.draw(router_params(name, k, num_experts))
    # Optionally some tokens are padding (Megatron's padding_mask): on any rank, in any place.
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=num_tokens, max_size=num_tokens)),
                         dtype=torch.bool).reshape(num_tokens) if padded else None
    real_tokens = num_tokens if valid is None else int(valid.sum())
    sizes = data.draw(split_of(num_tokens))
    world = len(sizes)
    offsets = [sum(sizes[:i]) for i in range(world)]
    # Expanded drop: each slice's rank owns a block of experts (or an arbitrary set).
    local_per_slice = [data.draw(st.lists(st.integers(0, num_experts - 1), unique=True, max_size=num_experts))
                       for _ in range(world)]
    # With copies, ranks 2i and 2i+1 hold slice i (2i+1 a TP copy: counts weight 0).
    copies_of = [r // 2 * 2 for r in range(2 * world)] if with_copies else None
    slice_of = (lambda r: r // 2) if with_copies else (lambda r: r)
    note(f"sizes={sizes} copies={with_copies} params={p}")

    def rank_fn(rank: int, group) -> Any:
        s = slice_of(rank)
        rows = slice(offsets[s], offsets[s] + sizes[s])
        masks = {} if valid is None else dict(valid_tokens=valid[rows])
        return fast_decision(name, scores[rows], k, p, group=group, local=local_per_slice[s], **masks)

    # The code path is process-wide (an environment variable): set it once around the
    # threads, not in each (their save / restore would race and leak the setting).
    with sync_free(mode):
        results = run_ranks(rank_fn, 2 * world if with_copies else world, copies_of=copies_of)
    ref_probs, ref_map = reference(name, scores, k, p, local_per_slice, sizes,
                                   **({} if valid is None else dict(valid_tokens=valid)))
    for rank, decision in enumerate(results):
        s = slice_of(rank)
        rows = slice(offsets[s], offsets[s] + sizes[s])
        assert_same(decision.as_tuple(), (ref_probs[rows], ref_map[rows]), f"{name} rank {rank} of {sizes}")
        if valid is None:
            check_invariants(name, scores[rows], k, p, decision, num_tokens, local_per_slice[s])
        else:
            real = valid[rows]
            assert not torch.any(decision.routing_map[~real]), f"{name}: a padding token was routed"
            check_invariants(name, scores[rows][real], k, p, _rows_of(decision, real), real_tokens,
                             local_per_slice[s])
        # Loads are global: every rank reports the loads of the whole reference map.
        assert torch.equal(decision.global_loads, ref_map.sum(0)), f"{name} rank {rank}: global loads"
    if with_copies:
        for rank in range(1, len(results), 2):  # copies decide bit-identically to their primary
            assert torch.equal(results[rank].routing_map, results[rank - 1].routing_map)
            assert torch.equal(results[rank].probs, results[rank - 1].probs)


def _rows_of(decision, rows):
    """The decision restricted to some of its tokens (figures unchanged)."""
    import dataclasses

    return dataclasses.replace(decision, routing_map=decision.routing_map[rows], probs=decision.probs[rows])


@given(data=st.data(), case=topk_case(), name=st.sampled_from(("drop", "reroute", "expanded", "laser")))
def test_padding_tokens_are_ignored(data, case, name: str) -> None:
    """Issue 12, item 7: padding tokens take no expert and no capacity and are not in
    T_glob: the real tokens are routed as the reference routes them alone, on both paths."""
    scores, k = case
    num_tokens, num_experts = scores.shape
    p = data.draw(router_params(name, k, num_experts))
    local = data.draw(st.lists(st.integers(0, num_experts - 1), unique=True, max_size=num_experts))
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=num_tokens, max_size=num_tokens)),
                         dtype=torch.bool).reshape(num_tokens)
    ref = reference(name, scores, k, p, [local], valid_tokens=valid)
    alone = reference(name, scores[valid], k, p, [local])
    assert torch.equal(ref[1][valid], alone[1]) and not torch.any(ref[1][~valid])
    for mode in SYNC_MODES:
        with sync_free(mode):
            decision = fast_decision(name, scores, k, p, local=local, valid_tokens=valid)
        assert_same(decision.as_tuple(), ref, f"{name} sync_free={mode} params={p} valid={valid.tolist()}")
        assert torch.all(decision.probs[~valid] == 0)
        check_invariants(name, scores[valid], k, p, _rows_of(decision, valid), int(valid.sum()), local)
        check_single_rank_figures(name, scores[valid], k, p, _rows_of(decision, valid))


@st.composite
def grouped_case(draw):
    """Scores with a group layout (DeepSeek group-limited routing): ``(scores, k, groups, group_topk)``."""
    groups, per_group = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    num_experts = groups * per_group
    num_tokens = draw(st.integers(0, 24))
    kind = draw(st.sampled_from(("uniform01", "few_values", "softmax")))
    shape = (num_tokens, num_experts)
    if kind == "uniform01":
        arr = draw(hnp.arrays(np.float32, shape, elements=st.floats(0, 1, width=32)))
    elif kind == "few_values":
        arr = draw(hnp.arrays(np.float32, shape, elements=st.sampled_from((0.0, 0.25, 0.5))))
    else:
        arr = torch.softmax(torch.from_numpy(draw(hnp.arrays(
            np.float32, shape, elements=st.floats(-20, 20, width=32)))), -1).numpy()
    scores = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    group_topk = draw(st.integers(1, groups))
    k = draw(st.integers(1, group_topk * per_group))
    return scores, k, groups, group_topk


@given(data=st.data(), case=grouped_case(), name=st.sampled_from(("drop", "reroute", "expanded")))
def test_group_limited_routing_stays_in_the_selected_groups(data, case, name: str) -> None:
    """Issue 12, item 5: with Megatron's group selection as ``allowed`` and its group-limited
    top-k as the baseline, no token is given an expert outside its selected groups; fast ==
    reference on both paths; capacity holds."""
    scores, k, groups, group_topk = case
    num_tokens, num_experts = scores.shape
    p = data.draw(router_params(name, k, num_experts))
    local = data.draw(st.lists(st.integers(0, num_experts - 1), unique=True, max_size=num_experts))
    allowed = P.group_limited_mask(scores, k, groups, group_topk)
    indices = torch.topk(scores.masked_fill(~allowed, float("-inf")), k, dim=1).indices
    masks = dict(topk_indices=indices) if name == "drop" else dict(topk_indices=indices, allowed=allowed)
    note(f"groups={groups} group_topk={group_topk} k={k} params={p}")
    ref = reference(name, scores, k, p, [local], **masks)
    capacity = common.capacity_from_total(p["gamma"], num_tokens * k, num_experts)
    for mode in SYNC_MODES:
        with sync_free(mode):
            decision = fast_decision(name, scores, k, p, local=local, **masks)
        assert_same(decision.as_tuple(), ref, f"{name} sync_free={mode}")
        assert not torch.any(decision.routing_map & ~allowed), f"{name}: a token left its selected groups"
        spans = decision.routing_map.view(num_tokens, groups, num_experts // groups).any(2).sum(1)
        assert torch.all(spans <= group_topk)
        if name != "expanded":
            assert torch.all(decision.routing_map.sum(1) <= k)
        assert int(decision.global_loads.max()) <= capacity


@given(data=st.data(), num_experts=st.integers(1, 16), k_frac=st.floats(0, 1), world=st.integers(1, 4),
       name=st.sampled_from(("drop", "reroute", "expanded", "laser")), mode=st.sampled_from(SYNC_MODES))
def test_decode_sized_batches_keep_their_experts(data, num_experts: int, k_frac: float, world: int, name: str,
                                                 mode: bool) -> None:
    """Decode: one token per sequence, T_glob*k/E < 1 on several ranks (some with T=0).

    ``C = ceil(gamma*T*k/E) >= 1``, so at gamma >= 1 a token whose experts are
    asked for by no one else keeps all of them; no router ever drops every
    expert of every token.
    """
    k = 1 + int(k_frac * (num_experts - 1))
    sizes = data.draw(st.lists(st.integers(0, 1), min_size=world, max_size=world))
    num_tokens = sum(sizes)
    logits = data.draw(hnp.arrays(np.float32, (num_tokens, num_experts), elements=st.floats(-8, 8, width=32)))
    scores = torch.softmax(torch.from_numpy(logits), dim=-1)
    p = data.draw(router_params(name, k, num_experts))
    if "gamma" in p:
        p["gamma"] = data.draw(st.floats(1.0, 4.0))
    offsets = [sum(sizes[:i]) for i in range(world)]
    local = [list(range(num_experts))[r::world] for r in range(world)]

    def rank_fn(rank: int, group) -> Any:
        part = scores[offsets[rank]:offsets[rank] + sizes[rank]]
        return fast_decision(name, part, k, p, group=group, local=local[rank])

    with sync_free(mode):  # once, around the threads (see above)
        results = run_ranks(rank_fn, world)
    full = torch.cat([r.routing_map for r in results]) if results else torch.zeros(0, num_experts, dtype=torch.bool)
    assert full.shape == (num_tokens, num_experts)
    if num_tokens:
        assert int(full.sum()) >= 1, "every expert of every token was dropped"
    top_map, _ = common.topk_map(scores, k)
    if name in ("drop", "reroute"):
        # Experts asked for by at most C tokens lose none of them (expanded-drop
        # excepted: a higher-scoring local candidate may take the slot).
        capacity = common.capacity_from_total(p["gamma"], num_tokens * k, num_experts)
        uncontested = top_map.sum(0) <= capacity
        assert torch.all(full[:, uncontested] >= top_map[:, uncontested]), "an uncontested expert was dropped"
        if num_tokens * k <= num_experts and torch.all(top_map.sum(0) <= 1):
            assert torch.all(full >= top_map), "a decode step with distinct experts lost one"


def test_laser_thresholds_are_compared_in_float64() -> None:
    """Regression (found by the properties): eps_high, t_fix and min_ratio were applied in
    float32, so 1e-167 became 0 and 0.7 became 0.69999999 (tokens on the threshold flipped)."""
    zeros = torch.zeros(2, 2)
    # M_k = 0 < 1e-167: both tokens are flexible and spread over the two experts.
    assert P.laser(zeros, 1, 1e-167, 1.0, 2, waves=2, rounds=0)[1].sum(0).tolist() == [1, 1]
    on_threshold = float(np.float32(0.7))  # 0.699999988..., below the float64 0.7
    scores = torch.tensor([[on_threshold, 1 - on_threshold]] * 2)
    fast = P.laser(scores, 1, 0.7, 0.1, 2, waves=2, rounds=0)
    assert_same(fast, R.laser_waves(scores, 1, 0.7, 0.1, 2, waves=2, rounds=0), "eps on the threshold")
    assert fast[1].sum(0).tolist() == [1, 1], "M_k = float32(0.7) < 0.7: flexible"
    from megatron_capaware.policies.laser import topk_mass

    values = torch.tensor([[0.5, 0.25, 0.125]])
    assert topk_mass(values).dtype == torch.float64 and float(topk_mass(values)) == 0.875
