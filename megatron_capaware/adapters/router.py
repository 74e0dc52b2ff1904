"""Megatron-Core router that applies the capaware routing policies.

:class:`CapawareRouter` subclasses Megatron's ``TopKRouter`` and overrides
``routing`` only: the gate (``weight``, ``bias``, ``expert_bias``) is the same
module with the same state-dict keys, so every checkpoint loads unchanged.

For every router type it first computes Megatron's own top-k routing
(score function, pre-softmax, group-limited top-k, expert bias, scaling
factor), then asks the policy to change the decision. Assignments the
policy keeps get vanilla's weights bit for bit; new assignments (rerouted,
moved by LASER, added by Expanded Drop) get ``s[t, e]`` under the model's
own normalisation and scaling. ``router_type="topk"`` is vanilla exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional

import torch

from megatron_capaware import policies
from megatron_capaware.config import CapawareConfig, CapawareConfigError
from megatron_capaware.refusals import raise_if_refused

from megatron.core.transformer.moe.router import TopKRouter


def check_supported(config: Any, capaware: CapawareConfig) -> None:
    """Reject Megatron settings that a capaware router cannot honour (:mod:`megatron_capaware.refusals`).

    Raises:
        CapawareConfigError: naming the conflicting Megatron option and the fix.
    """
    capaware.validate(
        num_experts=config.num_moe_experts,
        topk=config.moe_router_topk,
        score_function=config.moe_router_score_function,
    )
    raise_if_refused(capaware.router_type, config)  # topk: vanilla Megatron, whatever its options


def model_normalizes(config: Any) -> bool:
    """Whether the model divides the chosen weights by their sum (Mixtral-style)."""
    if config.moe_router_score_function == "softmax":
        return not config.moe_router_pre_softmax
    return config.moe_router_topk > 1


class CapawareRouter(TopKRouter):
    """``TopKRouter`` whose routing decision comes from a capaware policy.

    Attributes set by :func:`megatron_capaware.adapters.swap.install_capaware_routers`:
        capaware: the :class:`CapawareConfig`.
        capaware_load_group: group over which loads are global (scope global).
        capaware_local_experts: expert ids of this rank (Expanded Drop).
        capaware_stats: a :class:`LayerRoutingStats` or None.
    """

    def __init__(self, config: Any, pg_collection: Any = None, *, capaware: Optional[CapawareConfig] = None,
                 **kwargs: Any):
        # kwargs: what newer MoELayers pass on (0.19: is_mtp_layer).
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self.capaware_setup(capaware or CapawareConfig())

    def capaware_setup(self, capaware: CapawareConfig) -> None:
        """(Re)configure; also called on a ``TopKRouter`` turned into this class in place."""
        check_supported(self.config, capaware)
        self.capaware = capaware
        self.capaware_installed = getattr(self, "capaware_installed", False)
        self.capaware_load_group = getattr(self, "capaware_load_group", None)
        self.capaware_local_experts: Optional[List[int]] = getattr(self, "capaware_local_experts", None)
        self.capaware_stats = getattr(self, "capaware_stats", None)
        # The placement's LayerLayout (adapters/placement.py), or None: Megatron's contiguous layout;
        # and this rank's slot ids under it.
        self.capaware_layout = getattr(self, "capaware_layout", None)
        self.capaware_local_slots: List[int] = getattr(self, "capaware_local_slots", [])
        # Optional callable receiving each call's scores [T, E] (calibration, traces).
        self.capaware_score_hook = getattr(self, "capaware_score_hook", None)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Megatron's gate; an empty batch (a rank with no tokens) gives empty logits.

        Megatron's own gate reshapes with ``-1`` and fails on zero tokens, which
        happens at decode time when an EP rank has no sequence this step; the
        rank must still take part in the routing collectives.
        """
        if input.numel() == 0:
            # The dtype Megatron's gate would return (router_gating_linear's router_dtype).
            dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
            return input.new_zeros((*input.shape[:-1], self.config.num_moe_experts), dtype=dtype)
        return super().gating(input)

    def _group(self) -> Any:
        if self.capaware.scope == "local":
            return None
        if not self.capaware_installed:
            raise RuntimeError(
                "CapawareRouter is not attached to an MoE layer: build the layer through "
                "megatron_capaware.adapters.spec, or call install_capaware_routers(model, config)"
            )
        return self.capaware_load_group

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Route ``logits [S, B, E]``: ``(probs [S*B, E], routing_map [S*B, E] bool)``.

        ``padding_mask [S, B]`` bool marks padding tokens True, as Megatron's
        own code uses it (z-loss, aux loss and expert bias all take
        ``~padding_mask`` as the valid tokens; some of its docstrings say the
        opposite). ``topk`` hands it to Megatron unchanged; the other routers
        give padding tokens no expert and no capacity and leave them out of
        ``T_glob``.

        A failed routing collective (another rank crashed, hung past the
        process-group timeout, or raised) surfaces as a
        :class:`~megatron_capaware.adapters.guards.RoutingCollectiveError`
        naming the layer and the group.
        """
        from megatron_capaware.adapters.guards import routing_collectives

        with routing_collectives(self.layer_number, self.capaware_load_group):
            probs, routing_map, decision = self._capaware_routing(logits, padding_mask)
            layout = self.capaware_layout
            slot_loads = None
            if layout is not None and layout.placed:
                if self._decides_on_slots():
                    slot_loads, decision = self._logical_decision(decision)
                else:
                    probs, routing_map = self._to_slots(probs, routing_map, layout)
                    if decision is not None:
                        slot_loads = self._slot_loads(decision, routing_map, layout)
            if decision is not None:
                self._record(decision, slot_loads)
            return probs, routing_map

    def _slot_loads(self, decision, physical_map: torch.Tensor, layout) -> torch.Tensor:
        """This call's global per-slot loads ``[S]`` (device-side; for the stats)."""
        from megatron_capaware.placement.replicas import even_slot_loads
        from megatron_capaware.policies.collectives import all_reduce_sum

        if layout.replica_policy == "least-loaded":  # exact from the expert loads, no collective
            return even_slot_loads(decision.global_loads, layout.table)
        # round-robin splits are data-dependent: count them (one all-reduce of [S], with stats on only).
        return all_reduce_sum(physical_map.sum(dim=0).to(torch.int64), self.capaware_load_group)

    def _logical_decision(self, decision):
        """A slot-space decision -> ``(slot loads [S], the decision with logical loads [E])``."""
        if decision is None:
            return None, None
        table = self.capaware_layout.table
        slot_loads = decision.global_loads.to(torch.int64)
        logical = torch.zeros(table.num_experts, dtype=torch.int64, device=slot_loads.device).index_add_(
            0, table.slot_expert, slot_loads)
        return slot_loads, dataclasses.replace(decision, global_loads=logical)

    def _decides_on_slots(self) -> bool:
        """Capacity per physical slot: the capacity routers under a plan with replicas decide on the ``S`` slots.

        Each chosen expert is first given its replica (as for top-k), then the
        capacity rule runs over slots (``C = ceil(gamma * T * k / S)`` each;
        ``unit=rank``: the plan's ranks), so a replicated expert holds
        ``m_e * C`` and the decision comes out physical. Reroute and
        expanded-drop may add, per token, one designated slot of each expert
        it does not hold (:meth:`_slot_allowed`): never a second replica of
        an expert the token has.
        """
        layout = self.capaware_layout
        return (layout is not None and layout.table.num_slots > layout.table.num_experts
                and self.capaware.router_type in ("capacity-drop", "capacity-reroute", "expanded-drop"))

    def _slot_allowed(self, allowed: Optional[torch.Tensor], logical: torch.Tensor, slots: torch.Tensor
                      ) -> torch.Tensor:
        """``[T, S]`` bool: the slots a reroute or an expansion may give each token.

        A held expert (in the token's top-k): only the replica already chosen.
        Any other expert: one designated replica, round-robin by token index
        (expanded-drop: this rank's own where it has one, as it adds local slots).
        Under group-limited routing, only the experts of the token's groups.
        """
        from megatron_capaware.policies.collectives import group_rank

        table = self.capaware_layout.table
        num_tokens = slots.shape[0]
        device = slots.device
        count = table.replica_count  # [E]
        index = group_rank(self.capaware_load_group) * num_tokens + torch.arange(num_tokens, device=device)
        replica = index.unsqueeze(1) % count  # [T, E] round-robin
        if self.capaware.router_type == "expanded-drop":  # it adds this rank's slots (refused with TP copies,
            # whose ranks differ: reroute must not depend on the rank, so TP copies decide alike)
            local = self._local_replica(device)  # [E]: this rank's replica index of each expert, -1: none
            replica = torch.where(local >= 0, local, replica)
        width = table.replica_slots.shape[1]
        designated = table.replica_slots.reshape(-1)[torch.arange(table.num_experts, device=device) * width + replica]
        mask = torch.zeros((num_tokens, table.num_slots), dtype=torch.bool, device=device).scatter_(1, designated, True)
        held = torch.zeros((num_tokens, table.num_experts), dtype=torch.bool, device=device).scatter_(1, logical, True)
        chosen = torch.zeros_like(mask).scatter_(1, slots, True)
        mask = (mask & ~held[:, table.slot_expert]) | chosen
        if allowed is not None:
            mask = mask & allowed[:, table.slot_expert]
        return mask

    def _local_replica(self, device: torch.device) -> torch.Tensor:
        """``[E]`` int64: which replica of each expert this rank holds (-1: none), from the layout."""
        layout = self.capaware_layout
        key = (tuple(layout.slots), tuple(self.capaware_local_slots), device)
        cached = getattr(self, "_capaware_local_replica", None)
        if cached is None or cached[0] != key:
            table = layout.table
            out = torch.full((table.num_experts,), -1, dtype=torch.int64)
            cpu = table.to(torch.device("cpu"))
            for s in self.capaware_local_slots:
                out[int(cpu.slot_expert[s])] = int(cpu.slot_replica[s])
            cached = (key, out.to(device))
            self._capaware_local_replica = cached
        return cached[1]

    def _slot_choice(self, scores: torch.Tensor, indices: torch.Tensor):
        """Logical top-k ``indices [T, k]`` -> their replicas' slots ``[T, k]``, and scores per slot ``[T, S]``."""
        from megatron_capaware.placement.replicas import replica_choice

        layout = self.capaware_layout
        table = self._slot_table(scores.device)
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, indices, True)  # [T, E]
        replica = replica_choice(chosen, table, layout.replica_policy, self.capaware_load_group)  # [T, E]
        width = table.replica_slots.shape[1]
        slots = table.replica_slots.reshape(-1)[indices * width + replica.gather(1, indices)]  # [T, k]
        return slots, scores[:, table.slot_expert]

    def _slot_table(self, device: torch.device):
        """The layout's :class:`~megatron_capaware.placement.replicas.SlotTable` on ``device`` (moved once)."""
        layout = self.capaware_layout
        if layout.table.replica_slots.device != device:
            layout.table = layout.table.to(device)
        return layout.table

    def _to_slots(self, probs: torch.Tensor, routing_map: torch.Tensor, layout):
        """Logical ``[T, E]`` decision -> the placement's physical slots ``[T, S]`` (adapters/placement.py).

        Replica choice over the load group whatever the scope (a placement
        changes where experts run, not the routing semantics).
        """
        from megatron_capaware.placement.replicas import replica_choice, to_physical

        group = self.capaware_load_group
        table = self._slot_table(routing_map.device)
        replica = replica_choice(routing_map, table, layout.replica_policy, group)
        return to_physical(probs, routing_map, table, replica)

    def _capaware_routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor]):
        capaware = self.capaware
        if getattr(self, "is_mtp_layer", False):  # MTP layers keep Megatron's routing (adapters/mtp.py)
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
            return probs, routing_map, None
        if capaware.router_type == "topk":
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
            if self.capaware_score_hook is not None:
                self.capaware_score_hook(self._scores(logits.reshape(-1, self.config.num_moe_experts)))
            decision = None
            if self.capaware_stats is not None and capaware.record_stats:
                decision = policies.map_decision(probs, routing_map, self._group())
            return probs, routing_map, decision
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"--moe-router-type {capaware.router_type} is an inference router: call model.eval() "
                "(or run under torch.no_grad()); train with --moe-router-type topk"
            )
        num_experts = self.config.num_moe_experts
        logits = logits.reshape(-1, num_experts)
        if padding_mask is None:
            # Megatron's dynamic engine pads each step (and runs all-padding dummy steps on
            # idle EP ranks) without a padding_mask: see adapters.inference_padding.
            from megatron_capaware.adapters.inference_padding import step_padding_mask

            padding_mask = step_padding_mask(logits.shape[0], logits.device, self.config, self.layer_number)
        vanilla_top, indices, scores = self._vanilla_topk(logits)  # [T, k], [T, k], [T, E]
        # Only the routers that add experts need the group mask (drop and LASER only keep or
        # reorder within Megatron's choice; LASER refuses group-limited routing).
        allowed = self._selected_groups(logits, indices) if capaware.router_type in (
            "capacity-reroute", "expanded-drop") else None  # [T, E] or None
        valid_tokens = None
        if padding_mask is not None:
            valid_tokens = ~padding_mask.reshape(-1).to(device=scores.device, dtype=torch.bool)
        self.capaware_padded = valid_tokens is not None  # read by the dispatcher (LASER keeps k otherwise)
        if self.capaware_score_hook is not None:
            self.capaware_score_hook(scores)
        if capaware.check_scores:
            # Over the load group (whatever the scope: the dispatch spans it), so a
            # NaN on one rank raises on all of them instead of leaving them waiting.
            # Device path: read once per model forward (guards.DeferredScoreCheck).
            deferred = getattr(self, "capaware_score_check", None)
            if deferred is not None and policies.common.use_device_path(scores):
                deferred.note(self.layer_number, scores)
            else:
                from megatron_capaware.adapters.guards import check_scores_over_group

                check_scores_over_group(scores, self.capaware_load_group, self.layer_number)
        if self._decides_on_slots():
            logical = indices
            indices, scores = self._slot_choice(scores, indices)  # [T, k] slots, [T, S]
            if capaware.router_type != "capacity-drop":
                allowed = self._slot_allowed(allowed, logical, indices)  # [T, S]
        decision = self._decide(scores, indices, valid_tokens, allowed)
        scaling = self.config.moe_router_topk_scaling_factor or 1.0
        if capaware.renormalize:
            probs = decision.probs * scaling
        else:
            # Kept assignments: vanilla's weights bit for bit. New ones (rerouted,
            # moved, added): s[t, e] under the model's normalisation and scaling.
            factor = torch.full((scores.shape[0], 1), scaling, dtype=scores.dtype, device=scores.device)
            if model_normalizes(self.config):
                factor = factor / scores.gather(1, indices).sum(dim=1, keepdim=True).clamp_min(
                    torch.finfo(scores.dtype).tiny)
            vanilla = torch.zeros_like(scores).scatter_(1, indices, vanilla_top.float())
            vanilla_map = torch.zeros_like(decision.routing_map).scatter_(1, indices, True)
            probs = torch.where(vanilla_map, vanilla, scores * factor) * decision.routing_map
        recorded = decision if self.capaware_stats is not None and capaware.record_stats else None
        return probs.to(logits.dtype), decision.routing_map, recorded

    def _vanilla_topk(self, logits: torch.Tensor):
        """Megatron's own top-k: ``(weights [T, k], experts [T, k], scores [T, E])``.

        Megatron's ``topk_routing_with_score_function`` itself, on the installed
        megatron-core (:mod:`megatron_capaware.adapters.megatron_topk`), so the
        selection and the kept weights are vanilla's bit for bit, bf16 logits
        included. ``scores`` is the full float32 score distribution the policies rank by.
        """
        from megatron_capaware.adapters.megatron_topk import vanilla_topk

        scores = self._scores(logits)
        top, indices = vanilla_topk(self, logits, scores)
        return top, indices, scores

    def _selected_groups(self, logits: torch.Tensor, indices: torch.Tensor) -> Optional[torch.Tensor]:
        """``[T, E]`` bool, the experts of the groups Megatron selected for each token (None: no groups).

        Megatron's group selection recomputed with its own operations on the
        tensor it ranks (``topk_routing_with_score_function``: the logits, the
        pre-softmax probabilities, or the sigmoid scores plus expert bias, in
        the dtype of the installed version: ``megatron_topk.ranked_for_groups``), so
        on the unfused path it is Megatron's selection exactly. With the fused
        kernel (``moe_router_fusion``), which may break a tie between groups
        differently, a token whose top-k are not all inside the recomputed
        groups keeps the groups its top-k experts lie in: reroute and
        expanded-drop never add an expert outside the groups the token was
        actually routed to.
        """
        config, k = self.config, self.topk
        num_groups, group_topk = config.moe_router_num_groups, config.moe_router_group_topk
        if not group_topk:
            return None
        from megatron_capaware.adapters.megatron_topk import ranked_for_groups

        ranked = ranked_for_groups(self, logits)  # what the installed megatron-core ranks groups on
        allowed = policies.group_limited_mask(ranked, k, num_groups, group_topk)
        if not config.moe_router_fusion:
            return allowed
        num_tokens, num_experts = logits.shape
        group_size = num_experts // num_groups
        touched = torch.zeros((num_tokens, num_groups), dtype=torch.bool, device=logits.device).scatter_(
            1, indices // group_size, True)
        own = touched.unsqueeze(-1).expand(num_tokens, num_groups, group_size).reshape(num_tokens, num_experts)
        inside = allowed.gather(1, indices).all(dim=1, keepdim=True)
        return torch.where(inside, allowed, own)

    def _local_experts_tensor(self, device: torch.device) -> torch.Tensor:
        """This rank's expert ids as a checked device tensor, built once per layout and device.

        The policy checks a list on the host every call; a tensor it built
        itself (:func:`policies.local_experts_tensor`) it takes as it is.
        """
        ids = tuple(int(e) for e in self.capaware_local_experts)
        cached = getattr(self, "_capaware_local_cache", None)
        if cached is None or cached[0] != (ids, self.config.num_moe_experts, torch.device(device)):
            tensor = policies.local_experts_tensor(list(ids), self.config.num_moe_experts, device)
            cached = ((ids, self.config.num_moe_experts, torch.device(device)), tensor)
            self._capaware_local_cache = cached
        return cached[1]

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's full score distribution ``[T, E]`` in float32 (softmax or sigmoid)."""
        if self.score_function == "softmax":
            return torch.softmax(logits.float(), dim=-1)
        return torch.sigmoid(logits.float())

    def _decide(self, scores: torch.Tensor, indices: torch.Tensor, valid_tokens: Optional[torch.Tensor] = None,
                allowed: Optional[torch.Tensor] = None):
        capaware = self.capaware
        k = self.topk
        group = self._group()
        normalize = model_normalizes(self.config)
        common = dict(normalize=normalize, renormalize=capaware.renormalize, group=group,
                      check_values=False, topk_indices=indices,  # checked in routing()
                      weights=capaware.renormalize, return_decision=True, valid_tokens=valid_tokens)
        if capaware.router_type == "laser":
            params = capaware.laser_params(self.layer_number, k)
            if capaware.laser_load == "rank":  # the rank loads follow the EP layout (a placement's, when placed)
                common.update(load="rank", expert_ranks=self._expert_ranks(scores.device),
                              num_ranks=self.config.expert_model_parallel_size)
            return policies.laser(
                scores, k, params.eps_high, params.t_fix, params.pool,
                waves=capaware.laser_waves, rounds=capaware.laser_rounds, **common,
            )
        if capaware.capacity_unit == "rank" and capaware.router_type in ("capacity-drop", "capacity-reroute"):
            # The EP rank of each expert (contiguous, or the placement's with R = 0).
            common.update(unit="rank", expert_ranks=self._expert_ranks(scores.device),
                          num_ranks=self.config.expert_model_parallel_size)
        if capaware.router_type == "capacity-drop":
            return policies.capacity_drop(
                scores, k, capaware.gamma, policy=capaware.drop_policy, seed=capaware.seed, **common,
            )
        if capaware.router_type == "capacity-reroute":
            return policies.capacity_reroute(
                scores, k, capaware.gamma, rounds=capaware.reroute_rounds,
                policy=capaware.reroute_policy, min_ratio=capaware.reroute_min_ratio,
                drop_policy=capaware.drop_policy, seed=capaware.seed, allowed=allowed, **common,
            )
        if capaware.router_type == "expanded-drop":
            if self.capaware_local_experts is None:
                raise CapawareConfigError(
                    "expanded-drop needs the experts of this rank: install the router in an MoE "
                    "layer (install_capaware_routers) so the EP layout is known"
                )
            local = self._local_experts_tensor(scores.device)
            if self._decides_on_slots():  # this rank's slots, among the S
                local = policies.local_experts_tensor(list(self.capaware_local_slots), scores.shape[1], scores.device)
            return policies.expanded_drop(scores, k, capaware.gamma, local, allowed=allowed, **common)
        raise CapawareConfigError(f"unknown router type {capaware.router_type!r}")

    def _expert_ranks(self, device: torch.device) -> torch.Tensor:
        """``[E]``: the EP rank of each expert (contiguous, or the placement's), built once per layout and device."""
        layout = self.capaware_layout
        key = (tuple(layout.slots) if layout is not None else None, self.capaware.router_type, device)
        cached = getattr(self, "_capaware_expert_ranks", None)
        if cached is None or cached[0] != key:
            ranks = policies.expert_rank_map(self.config.num_moe_experts, self.config.expert_model_parallel_size,
                                             device)
            per = len(layout.slots) // layout.num_ranks if layout is not None else 1
            if layout is not None and self._decides_on_slots():  # [S]: the rank of each slot
                ranks = torch.arange(len(layout.slots), device=device) // per
            elif layout is not None and layout.placed:  # [E]: one slot per expert
                ranks = torch.tensor([layout.slots.index(e) // per for e in range(self.config.num_moe_experts)],
                                     dtype=torch.int64, device=device)
            cached = (key, ranks)
            self._capaware_expert_ranks = cached
        return cached[1]

    def _record(self, decision, slot_loads: Optional[torch.Tensor] = None) -> None:
        """Keep one call's figures; ``slot_loads [S]``: under a placement, the physical slots' loads."""
        if self.capaware.scope == "local" and self.capaware_load_group is not None:
            # The decision only saw this rank's tokens; the stats report what the
            # experts process, so sum the loads over the ranks that feed them.
            from megatron_capaware.policies.collectives import all_reduce_sum

            counts = torch.cat([
                decision.global_loads,
                torch.stack([decision.requested_assignments, decision.global_tokens]),
            ]).to(torch.int64)
            counts = all_reduce_sum(counts, self.capaware_load_group)
            decision = dataclasses.replace(
                decision, global_loads=counts[:-2], requested_assignments=counts[-2],
                global_tokens=counts[-1], capacity=None,
            )
            layout = self.capaware_layout
            if slot_loads is not None and self._decides_on_slots():
                slot_loads = all_reduce_sum(slot_loads.clone(), self.capaware_load_group)
            elif slot_loads is not None and layout.replica_policy == "least-loaded":
                from megatron_capaware.placement.replicas import even_slot_loads

                slot_loads = even_slot_loads(decision.global_loads, layout.table)
        self.capaware_stats.record_decision(decision, slot_loads)

