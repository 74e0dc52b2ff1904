"""The device (CUDA) code path, counted on CPU tensors: host syncs and ATen ops.

``CAPAWARE_DEVICE_PATH=1`` makes the policies take the code path they take on
CUDA; :mod:`megatron_capaware.tools.bench.launch_count` counts what would
make the host wait for the device there.
"""

from __future__ import annotations

import torch

from megatron_capaware.tools.bench.launch_count import count_call, count_device_work


def test_the_counter_sees_host_reads_and_data_dependent_shapes() -> None:
    x = torch.arange(6.0)
    with count_device_work() as work:
        float(x.sum())
        x.nonzero()
        torch.tensor(3, device=x.device)
        x.tolist()
        y = x * 2 + 1  # device work, no sync
    assert work.syncs == 4, work.sync_sites
    assert work.ops >= 4 and y.shape == x.shape
    assert any("nonzero" in site for site in work.sync_sites)


def test_the_counter_sees_a_read_made_from_cpp() -> None:
    """Indexing with a 0-d tensor reads it on the host without a Python-level call."""
    x, at = torch.arange(6.0), torch.tensor(2)
    assert count_call(lambda: x[at]).syncs == 1
    assert count_call(lambda: x.gather(0, at.reshape(1))).syncs == 0


def test_pure_device_work_counts_no_sync() -> None:
    x = torch.randn(64, 8)
    work = count_call(lambda: torch.topk(torch.softmax(x, -1), 2, dim=1))
    assert work.syncs == 0 and work.ops >= 2


def test_recording_stats_costs_no_sync() -> None:
    """The router records every forward; that must not read anything back to the host."""
    from megatron_capaware import policies
    from megatron_capaware.adapters.stats import LayerRoutingStats

    scores = torch.softmax(torch.randn(256, 16, generator=torch.Generator().manual_seed(0)), -1)
    decision = policies.capacity_drop(scores, 4, 1.0, check_values=False, return_decision=True)
    stats = LayerRoutingStats(layer_number=1, num_experts=16, ep_size=2, local_experts=list(range(8)))
    received = decision.global_loads[:8].clone()
    work = count_call(lambda: (stats.record_decision(decision), stats.record_received(received)))
    assert work.syncs == 0, work.sync_sites
    assert stats.pending == 1 and stats.calls == 1
    # Reading copies the pending records to the host, once.
    assert torch.equal(stats.global_loads[-1], decision.global_loads) and not stats.pending
    assert stats.capacity[-1] == int(decision.capacity) and stats.dropped[-1] == int(decision.dropped)
    assert torch.equal(stats.received[-1], received)


# ----------------------------------------------------------------------------- the policies

import pytest  # noqa: E402

from megatron_capaware import policies as P  # noqa: E402
from megatron_capaware.policies.common import DEVICE_PATH_ENV  # noqa: E402

T, E, K = 2048, 64, 8  # issue 12's shape
RANKS = 8  # the EP ranks of the unit=rank calls (8 experts each)


def _router_calls(scores: torch.Tensor, masks: dict, group=None):
    """Each router's policy call as CapawareRouter._decide makes it (scores checked before, weights by the router)."""
    indices = torch.topk(scores, K, dim=1).indices
    local = P.local_experts_tensor(list(range(8)), E, scores.device)  # the router builds it once
    ranks = P.expert_rank_map(E, RANKS, scores.device)  # the router builds it once (_expert_ranks)
    common = dict(normalize=True, check_values=False, topk_indices=indices, weights=False, return_decision=True,
                  group=group)
    valid = dict(valid_tokens=masks["valid_tokens"]) if "valid_tokens" in masks else {}
    return {
        "topk": lambda: P.topk(scores, K, normalize=True, check_values=False, topk_indices=indices,
                               return_decision=True, group=group),
        "capacity-drop": lambda: P.capacity_drop(scores, K, 1.25, **common, **valid),
        "capacity-drop(random)": lambda: P.capacity_drop(scores, K, 1.25, policy="random", **common, **valid),
        "capacity-reroute": lambda: P.capacity_reroute(scores, K, 1.25, rounds=1, **common, **masks),
        "capacity-reroute(load, rho=0.3)": lambda: P.capacity_reroute(
            scores, K, 1.25, rounds=1, policy="load", min_ratio=0.3, **common, **masks),
        "capacity-reroute(unit=rank)": lambda: P.capacity_reroute(
            scores, K, 1.25, rounds=1, unit="rank", expert_ranks=ranks, num_ranks=RANKS, **common, **masks),
        "reroute(rank, load, rho=.3, drop=weight)": lambda: P.capacity_reroute(
            scores, K, 1.0, rounds=1, policy="load", min_ratio=0.3, unit="rank", expert_ranks=ranks,
            num_ranks=RANKS, drop_policy="weight", **common, **masks),
        "expanded-drop": lambda: P.expanded_drop(scores, K, 1.25, local, **common, **masks),
        "laser": lambda: P.laser(scores, K, 0.9, 0.3, 16, waves=8, rounds=1, **common, **valid),
    }


def _scores(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(T, E, generator=gen) * 2 + torch.linspace(2, 0, E), -1)


@pytest.mark.parametrize("masks", ["none", "padding+groups"])
def test_no_host_sync_in_any_router_on_the_device_path(monkeypatch, masks: str, record_property) -> None:
    """Issue 12, item 2: with check_values=False the policies make no host sync on the
    device path, for every router, at T=2048, E=64, k=8 (also with padding and a group mask,
    as the router passes them). Op counts are printed and recorded, not asserted."""
    monkeypatch.setenv(DEVICE_PATH_ENV, "1")
    scores = _scores()
    extra = {}
    if masks != "none":
        valid = torch.ones(T, dtype=torch.bool)
        valid[::7] = False
        extra = dict(valid_tokens=valid, allowed=P.group_limited_mask(scores, K, 8, 4))
    failures = []
    for name, call in _router_calls(scores, extra).items():
        work = count_call(call)
        print(f"device path, {masks}: {name:34s} syncs={work.syncs} ops={work.ops}")
        record_property(f"{masks}:{name}:ops", work.ops)
        if work.syncs:
            failures.append(f"{name}: {work.syncs} syncs at {sorted(set(work.sync_sites))}")
    assert not failures, failures


def test_the_score_check_costs_one_host_read_per_call(monkeypatch) -> None:
    """check_values=True (the policies' own NaN / Inf / sign check) reads one flag pair per call."""
    monkeypatch.setenv(DEVICE_PATH_ENV, "1")
    scores = _scores()
    assert count_call(lambda: P.capacity_drop(scores, K, 1.25, check_values=True)).syncs == 1
    assert count_call(lambda: P.capacity_drop(scores, K, 1.25, check_values=False)).syncs == 0


def test_a_local_expert_list_is_read_on_the_host_a_checked_tensor_is_not(monkeypatch) -> None:
    monkeypatch.setenv(DEVICE_PATH_ENV, "1")
    scores = _scores()[:64]
    listed = count_call(lambda: P.expanded_drop(scores, K, 1.25, list(range(8)), check_values=False))
    ids = P.local_experts_tensor(list(range(8)), E, scores.device)
    prepared = count_call(lambda: P.expanded_drop(scores, K, 1.25, ids, check_values=False))
    assert listed.syncs > 0 and prepared.syncs == 0, (listed.sync_sites, prepared.sync_sites)


def test_laser_waves_are_fixed_shape_on_the_device_path(monkeypatch) -> None:
    """The CPU path compacts each wave (bincount().tolist()); the device path masks them."""
    scores = _scores()[:256]
    monkeypatch.setenv(DEVICE_PATH_ENV, "0")
    cpu = count_call(lambda: P.laser(scores, K, 0.9, 0.3, 16, check_values=False))
    cpu_result = P.laser(scores, K, 0.9, 0.3, 16, check_values=False)
    monkeypatch.setenv(DEVICE_PATH_ENV, "1")
    device = count_call(lambda: P.laser(scores, K, 0.9, 0.3, 16, check_values=False))
    device_result = P.laser(scores, K, 0.9, 0.3, 16, check_values=False)
    assert any("bincount" in site for site in cpu.sync_sites) and device.syncs == 0
    assert torch.equal(cpu_result[1], device_result[1]) and torch.equal(cpu_result[0], device_result[0])


# ----------------------------------------------------------------------------- the sorted selection

from megatron_capaware.policies import collectives  # noqa: E402
from megatron_capaware.policies.selection import select_top_per_expert, select_top_per_expert_radix  # noqa: E402
from megatron_capaware.tools.bench.sim_dist import run_ranks  # noqa: E402

_SPECIAL = torch.tensor([0.0, -0.0, 1e-45, 1e-38, 0.25, 0.5, 1.0, 3.0e38, float("inf")])


def _selection_case(seed: int):
    """Random items spread over 1-4 simulated ranks: heavy ties, signed zeros, subnormals, inf,
    padding, capacities from a rule or a tensor (zeros included), TP copies on some seeds."""
    gen = torch.Generator().manual_seed(seed)

    def draw(high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=gen))

    world, num_experts = 1 + seed % 4, 1 + draw(9)
    ranks = []
    for _ in range(world):
        n = draw(60)
        kind = draw(3)
        if kind == 0:  # few distinct values: ties everywhere
            priority = torch.randint(0, 3, (n,), generator=gen).float() / 4
        elif kind == 1:
            priority = _SPECIAL[torch.randint(0, len(_SPECIAL), (n,), generator=gen)]
        else:
            priority = torch.rand(n, generator=gen)
        valid = torch.rand(n, generator=gen) > 0.3 if draw(2) else None
        ranks.append(dict(priority=priority, expert=torch.randint(0, num_experts, (n,), generator=gen),
                          valid=valid, extra=draw(50) if draw(2) else torch.tensor(draw(50))))
    if draw(2):
        gamma = [1e-30, 0.3, 1.0, 1.7, 1e300, float("inf")][draw(6)]
        # The rule itself (alone, with an int count, the sorted path takes its host form).
        capacity = P.capacity._token_capacity(gamma, 2, num_experts)
    else:
        capacity = torch.randint(0, 6, (num_experts,), generator=gen)
    copies = world > 1 and seed % 5 == 0
    return world, num_experts, ranks, capacity, copies


@pytest.mark.parametrize("seed", range(48))
def test_the_sorted_device_selection_equals_the_radix_select(seed: int) -> None:
    """The device path's sort + searchsorted selection decides bit for bit as the radix select
    it replaced (same keep, loads, capacity, item count), on every simulated rank, with the
    same collectives (kind and group, payload the same or 4 bytes less)."""
    world, num_experts, ranks, capacity, copies = _selection_case(seed)
    slice_of = (lambda r: r // 2) if copies else (lambda r: r)
    results = {}
    for name, fn in (("sorted", lambda **kw: select_top_per_expert(**kw, sync_free=True)),
                     ("radix", lambda **kw: select_top_per_expert_radix(**kw, sync_free=True)),
                     ("cpu", lambda **kw: select_top_per_expert(**kw, sync_free=False))):
        def rank_fn(rank: int, group, fn=fn):
            r = ranks[slice_of(rank)]
            return fn(priority=r["priority"], expert=r["expert"], num_experts=num_experts, capacity=capacity,
                      group=group if world > 1 else None, valid=r["valid"], extra_count=r["extra"])
        size = 2 * world if copies else world
        with collectives.record_collectives() as log:
            results[name] = run_ranks(rank_fn, size, copies_of=[r // 2 * 2 for r in range(size)] if copies else None)
        results[name + ":log"] = sorted(log.calls)
    new_log, old_log = results["sorted:log"], results["radix:log"]
    # Same collectives; the rounds after the first no longer carry the unused extra slot (4 bytes).
    assert [(op, w) for op, _, w in new_log] == [(op, w) for op, _, w in old_log], "the collectives changed"
    assert all(0 <= b_old - b_new <= 4 for (_, b_new, _), (_, b_old, _) in zip(new_log, old_log))
    for rank, (new, old, cpu) in enumerate(zip(results["sorted"], results["radix"], results["cpu"])):
        for field in ("keep", "global_offered", "global_kept", "capacity", "global_items"):
            a, b, c = getattr(new, field), getattr(old, field), getattr(cpu, field)
            assert a.dtype == b.dtype and torch.equal(a, b) and torch.equal(a, c), (seed, rank, field, a, b)


def test_the_selection_cases_drop_and_split_ties() -> None:
    """The cases above are not vacuous: most drop something, and some split a run of equal
    priorities of one expert (the tie step)."""
    dropping = splitting = 0
    for seed in range(48):
        world, num_experts, ranks, capacity, _ = _selection_case(seed)
        r = ranks[0]
        sel = select_top_per_expert(r["priority"], r["expert"], num_experts, capacity, None, valid=r["valid"],
                                    extra_count=r["extra"], sync_free=True)
        usable = sel.keep if r["valid"] is None else r["valid"]
        dropping += bool((usable & ~sel.keep).any()) if r["valid"] is not None else bool((~sel.keep).any())
        bits = r["priority"].view(torch.int32).tolist()
        groups = {}
        for i, (b, e) in enumerate(zip(bits, r["expert"].tolist())):
            if r["valid"] is None or bool(r["valid"][i]):
                groups.setdefault((b, e), set()).add(bool(sel.keep[i]))
        splitting += any(len(v) == 2 for v in groups.values())
    assert dropping >= 20 and splitting >= 5, (dropping, splitting)


# ----------------------------------------------------------------------------- ops per layer

# Issue 12, item 3: ATen ops per MoE layer on the device path at T=2048, E=64, k=8 (the
# policy call as the router makes it); expanded-drop "in proportion" to capacity-drop.
OPS_BUDGET = {"capacity-drop": 40, "capacity-reroute": 80, "capacity-reroute(unit=rank)": 80, "expanded-drop": 50,
              "laser": 150}


def _count_policy_ops(world: int, masks: str = "none") -> dict:
    """Ops of each router's policy call on every rank (``world`` simulated ranks, ``T`` tokens each).

    A collective counts as one op (one NCCL launch): the simulation's own tensor work is not counted.
    """
    from torch.utils._python_dispatch import _disable_current_modes

    from megatron_capaware.tools.bench import sim_dist

    def calls_for(rank: int, group):
        scores = _scores(rank)
        extra = {}
        if masks != "none":
            valid = torch.ones(T, dtype=torch.bool)
            valid[rank::7] = False
            extra = dict(valid_tokens=valid, allowed=P.group_limited_mask(scores, K, 8, 4))
        return _router_calls(scores, extra, group=group)

    if world == 1:
        return {name: [count_call(call).ops] for name, call in calls_for(0, None).items()}
    works = {}
    real = {name: getattr(sim_dist._SimDist, name) for name in ("all_reduce", "all_gather")}

    def counted(name):
        def collective(*args, **kwargs):
            with _disable_current_modes():
                real[name](*args, **kwargs)
            works[sim_dist._local.rank].ops += 1
        return staticmethod(collective)

    def rank_fn(rank: int, group):
        out = {}
        for name, call in calls_for(rank, group).items():
            with count_device_work() as work:
                works[rank] = work
                call()
            out[name] = work.ops
        return out

    with pytest.MonkeyPatch.context() as mp:
        for name in real:
            mp.setattr(sim_dist._SimDist, name, counted(name))
        per_rank = run_ranks(rank_fn, world)
    return {name: [r[name] for r in per_rank] for name in per_rank[0]}


@pytest.mark.parametrize("masks", ["none", "padding+groups"])
def test_ops_per_layer_on_the_device_path(monkeypatch, masks: str, record_property) -> None:
    """The budgets hold alone (EP = 1, --capaware-scope local); at EP = 2 (simulated, a
    collective counted once) the counts are printed and held to the budget plus what the
    exact group-wide selection needs (4 radix rounds and a tie split per selection)."""
    monkeypatch.setenv(DEVICE_PATH_ENV, "1")
    alone, ep2 = _count_policy_ops(1, masks), _count_policy_ops(2, masks)
    print(f"\nATen ops per layer, device path, T={T} E={E} k={K}, {masks}:")
    for name in alone:
        print(f"  {name:34s} EP=1 {alone[name][0]:4d}   EP=2 {max(ep2[name]):4d}   budget {OPS_BUDGET.get(name, '-')}")
        record_property(f"{masks}:{name}:ops", alone[name][0])
    over = {n: alone[n][0] for n, b in OPS_BUDGET.items() if n != "laser" and alone[n][0] > b}
    assert not over, f"over budget at EP=1: {over}"
    selections = {"capacity-drop": 1, "capacity-reroute": 2, "capacity-reroute(unit=rank)": 2, "expanded-drop": 1}
    over_ep = {n: max(ep2[n]) for n, s in selections.items() if max(ep2[n]) > OPS_BUDGET[n] + 45 * s}
    assert not over_ep, f"over budget at EP=2: {over_ep}"
    assert max(ep2["laser"]) <= 800 and alone["laser"][0] <= 650, "LASER regressed (its budget is not met yet)"


@pytest.fixture
def dynamo_on(monkeypatch):
    """Dynamo enabled for the compiled-path tests: CPU tools called in this process (``run_cli``) set
    ``TORCHDYNAMO_DISABLE=1``, which torch.compile reads when it wraps a function."""
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)


def test_laser_meets_its_ops_budget_compiled(monkeypatch, record_property, dynamo_on) -> None:
    """Issue 12, item 3, LASER: <= 150 ops per layer with the wave segments compiled (one op per
    compiled call, policies/compiled.py), as on CUDA. The count does not depend on the backend
    (a region is one op either way); aot_eager captures the same full graphs without codegen."""
    from megatron_capaware.policies.compiled import COMPILE_ENV

    monkeypatch.setenv(DEVICE_PATH_ENV, "1")
    monkeypatch.setenv(COMPILE_ENV, "0")
    eager = _count_policy_ops(1)["laser"][0]
    monkeypatch.setenv(COMPILE_ENV, "aot_eager")
    scores = _scores()
    call = _router_calls(scores, {})["laser"]
    call()  # compile outside the count
    work = count_call(call)
    regions = [n for n in work.op_names if n.startswith("compiled:")]
    ep2 = _count_policy_ops(2)["laser"]
    print(f"\nLASER ops per layer, device path, T={T} E={E} k={K}, 8 waves 1 round: eager {eager}, "
          f"compiled {work.ops} ({len(regions)} compiled calls), compiled EP=2 {max(ep2)}")
    record_property("laser:eager:ops", eager)
    record_property("laser:compiled:ops", work.ops)
    assert len(regions) == 8 * (1 + 1) + 1, regions  # waves * (rounds + 1) + 1: the compiled path was taken
    assert work.syncs == 0, work.sync_sites
    assert work.ops <= OPS_BUDGET["laser"] < eager, (work.ops, eager)
    assert max(ep2) <= OPS_BUDGET["laser"], ep2  # collectives counted one each


def _laser_case(seed: int):
    """Scores, knobs and a padding mask for the compiled-vs-eager comparison (ties and flat rows included)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, experts, k = (96, 16, 4) if seed % 2 else (128, 8, 2)
    logits = torch.randn(tokens, experts, generator=gen) * (0.2 if seed % 3 == 0 else 2.0)
    if seed % 4 == 1:
        logits = logits.round()  # equal scores: ties in the pool and the loads
    scores = torch.softmax(logits, -1)
    valid = torch.rand(tokens, generator=gen) > 0.2 if seed % 3 == 1 else None
    knobs = dict(eps_high=[0.9, 0.6, 1.1][seed % 3], t_fix=[0.3, 0.5, 0.05][seed % 3], pool=min(3 * k, experts),
                 waves=[8, 3, 1, 5][seed % 4], rounds=[1, 0, 2, 1][seed % 4])
    if seed % 4 in (2, 3):  # load=rank: experts on 2 EP ranks, contiguous or shuffled
        ranks = P.expert_rank_map(experts, 2)
        knobs["expert_ranks"] = ranks if seed % 4 == 2 else ranks[torch.randperm(experts, generator=gen)]
    return scores, k, knobs, valid


def _laser_run(scores, k, knobs, valid, group=None):
    load = {} if "expert_ranks" not in knobs else dict(load="rank", expert_ranks=knobs["expert_ranks"], num_ranks=2)
    return P.laser(scores, k, knobs["eps_high"], knobs["t_fix"], knobs["pool"], waves=knobs["waves"],
                   rounds=knobs["rounds"], normalize=True, check_values=False, return_decision=True,
                   valid_tokens=valid, group=group, **load)


def _same_decision(a, b) -> bool:
    return (torch.equal(a.routing_map, b.routing_map) and torch.equal(a.probs, b.probs)
            and torch.equal(a.global_loads, b.global_loads) and torch.equal(a.rerouted, b.rerouted))


@pytest.mark.parametrize("seed", range(8))
def test_compiled_laser_decides_as_eager(monkeypatch, seed: int, dynamo_on) -> None:
    """The compiled wave segments (aot_eager: full graph capture, no codegen) decide bit for bit
    as eager, alone and on 2 simulated EP ranks, for 0-2 quota rounds, 1-8 waves, padding, ties,
    load=expert and load=rank."""
    from megatron_capaware.policies import compiled

    scores, k, knobs, valid = _laser_case(seed)
    monkeypatch.setenv(DEVICE_PATH_ENV, "1")
    monkeypatch.setenv(compiled.COMPILE_ENV, "0")
    eager = _laser_run(scores, k, knobs, valid)
    halves = [scores[:scores.shape[0] // 2], scores[scores.shape[0] // 2:]]
    masks = [None, None] if valid is None else [valid[:scores.shape[0] // 2], valid[scores.shape[0] // 2:]]
    eager_ep = run_ranks(lambda r, g: _laser_run(halves[r], k, knobs, masks[r], g), 2)
    monkeypatch.setenv(compiled.COMPILE_ENV, "aot_eager")
    before = compiled.STATS["compiled_calls"]
    fast = _laser_run(scores, k, knobs, valid)
    fast_ep = run_ranks(lambda r, g: _laser_run(halves[r], k, knobs, masks[r], g), 2, timeout_s=120)
    assert compiled.STATS["compiled_calls"] > before, "the compiled path was not taken"
    assert _same_decision(eager, fast), seed
    assert all(_same_decision(a, b) for a, b in zip(eager_ep, fast_ep)), seed


def test_inductor_compiled_laser_decides_as_eager(monkeypatch, dynamo_on) -> None:
    """The same with inductor's generated code (CPU C++ here; Triton on CUDA), issue 12's shape."""
    from megatron_capaware.policies import compiled

    monkeypatch.setenv(DEVICE_PATH_ENV, "1")
    scores = _scores(3)
    call = _router_calls(scores, {})["laser"]
    monkeypatch.setenv(compiled.COMPILE_ENV, "0")
    eager = call()
    monkeypatch.setenv(compiled.COMPILE_ENV, "inductor")
    before = compiled.STATS["compiled_calls"]
    fast = call()
    if compiled.STATS["compiled_calls"] == before:
        pytest.skip("inductor could not compile on this machine (the regions fell back to eager)")
    assert torch.equal(eager.routing_map, fast.routing_map) and torch.equal(eager.global_loads, fast.global_loads)


def test_a_failing_compile_falls_back_to_eager_with_a_warning(dynamo_on) -> None:
    from megatron_capaware.policies import compiled

    def boom(gm, example_inputs):
        raise RuntimeError("no compiler here")

    def twice(x):
        return x * 2 + 1

    region = compiled.Region(twice)
    x = torch.arange(4)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        assert torch.equal(region(boom, x), twice(x))
    assert torch.equal(region(boom, x), twice(x))  # no second warning, still eager


def test_which_path_compiles(monkeypatch) -> None:
    """CUDA compiles by default, CPU does not; CAPAWARE_COMPILE and TORCHDYNAMO_DISABLE decide otherwise."""
    from types import SimpleNamespace

    from megatron_capaware.policies import compiled

    cuda, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    monkeypatch.delenv(compiled.COMPILE_ENV, raising=False)
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    assert compiled.backend_for(cuda) == "inductor" and compiled.backend_for(cpu) is None
    monkeypatch.setenv(compiled.COMPILE_ENV, "0")
    assert compiled.backend_for(cuda) is None
    monkeypatch.setenv(compiled.COMPILE_ENV, "aot_eager")
    assert compiled.backend_for(cpu) == "aot_eager"
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    assert compiled.backend_for(cpu) is None and compiled.backend_for(cuda) is None
    monkeypatch.delenv("TORCHDYNAMO_DISABLE")
    monkeypatch.setenv(compiled.COMPILE_ENV, "fast")
    with pytest.raises(P.RoutingInputError, match="CAPAWARE_COMPILE"):
        compiled.backend_for(cpu)


def test_the_host_form_of_the_capacity_rule_equals_the_tensor_form() -> None:
    """Alone with an int token count, the sorted selection takes C from the rule's host form."""
    for gamma in (1e-300, 1e-30, 0.1, 0.3, 1.0, 1.25, 1.7, 2.0, 3.3, 1e18, 1e300, float("inf")):
        for k, num_experts in ((1, 1), (2, 8), (8, 64), (6, 160)):
            rule = P.capacity._token_capacity(gamma, k, num_experts)
            for tokens in (0, 1, 3, 7, 1000, 2048, 65537, 10**12):
                tensor = rule(torch.zeros(num_experts, dtype=torch.int64), torch.tensor(tokens))
                assert int(tensor) == rule.from_count(tokens), (gamma, k, num_experts, tokens)
