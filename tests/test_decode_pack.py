"""decode-pack and OEA's rule (policies/decode.py): fast == loop reference, and the docs/routers.md invariants.

Every generated case runs both code paths (``CAPAWARE_DEVICE_PATH=0/1``), with
padding, group masks, any expert -> rank map and degenerate scores, and the
same batch split over simulated EP ranks (``megatron_capaware/tools/bench/sim_dist.py``, TP copies
included) must give each rank its slice of the reference on the
concatenation.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from megatron_capaware import policies as P
from megatron_capaware.policies import common
from megatron_capaware.policies import reference as R
from megatron_capaware.tools.bench.launch_count import count_call
from megatron_capaware.tools.bench.sim_dist import run_ranks
from tests.test_properties import SYNC_MODES, assert_same, score_matrices, split_of, sync_free


@st.composite
def decode_case(draw, max_tokens: int = 24, max_experts: int = 12):
    scores = draw(score_matrices(max_tokens=max_tokens, max_experts=max_experts))
    num_tokens, num_experts = scores.shape
    k = draw(st.integers(1, num_experts))
    num_ranks = draw(st.integers(1, num_experts))
    contiguous = draw(st.booleans())
    ranks = (torch.arange(num_experts) * num_ranks // num_experts if contiguous else
             torch.tensor(draw(st.lists(st.integers(0, num_ranks - 1), min_size=num_experts, max_size=num_experts))))
    p = dict(
        floor=draw(st.integers(1, k)),
        t_fix=draw(st.sampled_from((1e-30, 0.01, 0.1, 0.5, 1.0))),
        pool=draw(st.integers(k, num_experts + 2)),
        slack=draw(st.integers(0, 3)),
        rank_aware=draw(st.booleans()),
        normalize=draw(st.booleans()),
        renormalize=draw(st.booleans()),
    )
    note(f"k={k} ranks={ranks.tolist()} params={p}")
    return scores, k, ranks, num_ranks, p


def _fast(scores, k, ranks, num_ranks, p, **kw):
    return P.decode_pack(scores, k, p["floor"], t_fix=p["t_fix"], pool=p["pool"], slack=p["slack"],
                         rank_aware=p["rank_aware"], expert_ranks=ranks, num_ranks=num_ranks,
                         normalize=p["normalize"], renormalize=p["renormalize"], return_decision=True, **kw)


def _ref(scores, k, ranks, p, **kw):
    return R.decode_pack(scores, k, p["floor"], t_fix=p["t_fix"], pool=p["pool"], slack=p["slack"],
                         rank_aware=p["rank_aware"], expert_ranks=ranks.tolist(), normalize=p["normalize"],
                         renormalize=p["renormalize"], **kw)


def _rank_active(routing_map: torch.Tensor, ranks: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """``[W]``: experts of each rank with at least one token."""
    return torch.zeros(num_ranks, dtype=torch.int64).index_add_(0, ranks, routing_map.any(0).to(torch.int64))


def _check_invariants(scores, k, ranks, num_ranks, p, probs, routing_map, valid: Optional[torch.Tensor] = None,
                      allowed: Optional[torch.Tensor] = None) -> None:
    real = torch.ones(scores.shape[0], dtype=torch.bool) if valid is None else valid
    top = torch.topk(scores, k, dim=1).indices
    floor_map = torch.zeros_like(routing_map).scatter_(1, top[:, :p["floor"]], True) & real.unsqueeze(1)
    top_map = torch.zeros_like(routing_map).scatter_(1, top, True)
    assert torch.equal(routing_map & floor_map, floor_map), "a token lost its floor"
    assert torch.all(routing_map.sum(1) <= k), "a token has more than k experts"
    assert not torch.any(routing_map[~real]), "a padding token was routed"
    if allowed is not None:
        assert not torch.any(routing_map & ~top_map & ~allowed), "an expert outside the allowed set was added"
    assert torch.all(probs[~routing_map] == 0) and torch.all(torch.isfinite(probs)) and torch.all(probs >= 0)
    if p["renormalize"]:
        sums = probs.sum(1)[real]
        # Tokens whose kept scores sum to a normal float sum to 1 (common.weights_for clamps a
        # subnormal sum at the smallest normal; an all-zero token keeps zero weights).
        positive = (scores * routing_map).sum(1)[real] >= torch.finfo(torch.float32).tiny
        assert torch.allclose(sums[positive], torch.ones_like(sums[positive]), rtol=1e-5, atol=0)
    # The busiest rank never activates more experts than under top-k on the same scores.
    top_busiest = _rank_active(top_map & real.unsqueeze(1), ranks, num_ranks).max()
    assert _rank_active(routing_map, ranks, num_ranks).max() <= top_busiest
    # ...and with slack 0, exactly what the floor activates on its busiest rank.
    if p["slack"] == 0:
        assert _rank_active(routing_map, ranks, num_ranks).max() == _rank_active(floor_map, ranks, num_ranks).max()


@given(case=decode_case(), mode=st.sampled_from(SYNC_MODES), data=st.data())
def test_fast_equals_reference(case, mode: bool, data) -> None:
    scores, k, ranks, num_ranks, p = case
    num_tokens, num_experts = scores.shape
    masks: Dict[str, Any] = {}
    if data.draw(st.booleans()):
        masks["valid_tokens"] = torch.tensor(data.draw(st.lists(st.booleans(), min_size=num_tokens,
                                                                max_size=num_tokens)), dtype=torch.bool)
    if data.draw(st.booleans()):
        masks["allowed"] = torch.rand(num_tokens, num_experts,
                                      generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99)))) < 0.5
    with sync_free(mode):
        decision = _fast(scores, k, ranks, num_ranks, p, **masks)
        again = _fast(scores, k, ranks, num_ranks, p, **masks)
    ref = _ref(scores, k, ranks, p, **masks)
    assert_same(decision.as_tuple(), ref, "decode-pack")
    assert torch.equal(again.routing_map, decision.routing_map) and torch.equal(again.probs, decision.probs)
    assert torch.equal(decision.global_loads, ref[1].sum(0))
    _check_invariants(scores, k, ranks, num_ranks, p, *decision.as_tuple(), valid=masks.get("valid_tokens"),
                      allowed=masks.get("allowed"))


@given(case=decode_case(max_tokens=16), mode=st.sampled_from(SYNC_MODES), with_copies=st.booleans(), data=st.data())
def test_split_over_ranks_equals_reference_on_concatenation(case, mode: bool, with_copies: bool, data) -> None:
    scores, k, ranks, num_ranks, p = case
    sizes = data.draw(split_of(scores.shape[0]))
    world = len(sizes)
    offsets = [sum(sizes[:i]) for i in range(world)]
    copies_of = [r // 2 * 2 for r in range(2 * world)] if with_copies else None
    slice_of = (lambda r: r // 2) if with_copies else (lambda r: r)

    def rank_fn(rank: int, group) -> Any:
        s = slice_of(rank)
        return _fast(scores[offsets[s]:offsets[s] + sizes[s]], k, ranks, num_ranks, p, group=group)

    with sync_free(mode):
        results = run_ranks(rank_fn, 2 * world if with_copies else world, copies_of=copies_of)
    ref_probs, ref_map = _ref(scores, k, ranks, p)
    for rank, decision in enumerate(results):
        s = slice_of(rank)
        rows = slice(offsets[s], offsets[s] + sizes[s])
        assert_same(decision.as_tuple(), (ref_probs[rows], ref_map[rows]), f"rank {rank} of {sizes}")
        assert torch.equal(decision.global_loads, ref_map.sum(0)), f"rank {rank}: global loads"


@given(case=decode_case())
def test_floor_k_is_topk_and_rank_aware_keeps_more_at_the_same_busiest_rank(case) -> None:
    scores, k, ranks, num_ranks, p = case
    top = P.topk(scores, k, normalize=p["normalize"])
    full = _fast(scores, k, ranks, num_ranks, dict(p, floor=k, renormalize=False))
    assert_same(full.as_tuple(), top, "floor == k")
    aware = _fast(scores, k, ranks, num_ranks, dict(p, slack=0, rank_aware=True)).routing_map
    oea = _fast(scores, k, ranks, num_ranks, dict(p, slack=0, rank_aware=False)).routing_map
    # Same busiest rank; the rank-aware rule's active set holds OEA's, so each token's j-th best
    # kept score is at least OEA's (and it keeps at least as many experts).
    assert _rank_active(aware, ranks, num_ranks).max() == _rank_active(oea, ranks, num_ranks).max()
    assert torch.all(aware.sum(1) >= oea.sum(1))
    def kept(m):
        return torch.sort(torch.where(m, scores.double(), torch.full_like(scores.double(), -1.0)), 1,
                          descending=True).values
    assert torch.all(kept(aware) >= kept(oea))


def test_a_worked_example() -> None:
    """4 experts on 2 ranks ({0, 1}, {2, 3}), k = 2, floor 1, pool = k."""
    scores = torch.tensor([[0.6, 0.1, 0.3, 0.0],    # floor 0, then 2 (then 1)
                           [0.55, 0.0, 0.0, 0.45],  # floor 0, then 3
                           [0.0, 0.7, 0.3, 0.0]])   # floor 1, then 2
    ranks = torch.tensor([0, 0, 1, 1])
    # A0 = {0, 1}: rank 0 has 2 active, rank 1 none; top-k activates 2 and 2. Rank-aware: rank 1
    # may activate 2 - 0 = 2 experts: 2 (two tokens want it) and 3 (one): every token keeps its top-2.
    aware = P.decode_pack(scores, 2, 1, expert_ranks=ranks, num_ranks=2)[1]
    assert torch.equal(aware, P.topk(scores, 2)[1])
    # OEA: A = A0 = {0, 1}; no token's second choice is in it.
    oea = P.decode_pack(scores, 2, 1, rank_aware=False, expert_ranks=ranks, num_ranks=2)[1]
    assert oea.tolist() == [[True, False, False, False], [True, False, False, False], [False, True, False, False]]
    # A pool of 3: token 0 piggybacks on expert 1 (active through token 2's floor).
    wide = P.decode_pack(scores, 2, 1, rank_aware=False, t_fix=0.1, pool=3, expert_ranks=ranks, num_ranks=2)[1]
    assert wide[0].tolist() == [True, True, False, False] and wide[1:].tolist() == oea[1:].tolist()
    # One rank holds everything (expert_ranks=None): the busiest rank is all of A0, nothing to add.
    assert torch.equal(P.decode_pack(scores, 2, 1)[1], oea)


def test_device_path_has_no_host_sync_and_few_ops(monkeypatch) -> None:
    monkeypatch.setenv(common.DEVICE_PATH_ENV, "1")
    gen = torch.Generator().manual_seed(0)
    scores = torch.softmax(torch.randn(64, 64, generator=gen) * 2, -1)
    indices = torch.topk(scores, 8, dim=1).indices
    ranks = P.expert_rank_map(64, 8, scores.device)
    work = count_call(lambda: P.decode_pack(scores, 8, 2, t_fix=0.1, pool=16, expert_ranks=ranks, num_ranks=8,
                                            normalize=True, check_values=False, topk_indices=indices,
                                            weights=False, return_decision=True))
    assert work.syncs == 0, work.sync_sites
    assert work.ops <= 100, work.ops  # 92 at this shape (docs/routers.md)


@pytest.mark.parametrize("bad, match", [
    (dict(floor=0), "floor=0"), (dict(floor=9), "floor=9"), (dict(pool=4), "pool=4"),
    (dict(t_fix=0.0), "t_fix=0.0"), (dict(slack=-1), "slack=-1"),
])
def test_bad_knobs_are_refused_with_the_fix(bad, match) -> None:
    args = dict(floor=2, t_fix=0.5, pool=8, slack=0)
    args.update(bad)
    floor = args.pop("floor")
    with pytest.raises(common.RoutingInputError, match=match):
        P.decode_pack(torch.rand(4, 16), 8, floor, **args)
