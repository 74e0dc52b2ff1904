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

from typing import Any, Optional

import torch

from megatron.core.transformer.moe.router import TopKRouter

from megatron_capaware import policies
from megatron_capaware.adapters import phases, slots
from megatron_capaware.adapters.guards import check_scores_over_group, routing_collectives
from megatron_capaware.adapters.inference_padding import megatron_pads_experts, step_padding_mask
from megatron_capaware.adapters.megatron_topk import vanilla_topk
from megatron_capaware.adapters.megatron_topk import ranked_for_groups
from megatron_capaware.adapters.state import LayerRoutingState
from megatron_capaware.config import CapawareConfig, CapawareConfigError
from megatron_capaware.placement.replicas import replica_choice, to_physical
from megatron_capaware.refusals import raise_if_refused
from megatron_capaware.registry import CAPACITY_DROP, CAPACITY_REROUTE, DECODE_PACK, EXPANDED_DROP, LASER, TOPK, router_type


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

    Everything it reads besides Megatron's own attributes is one
    :class:`~megatron_capaware.adapters.state.LayerRoutingState`,
    ``capaware_state``, made by the installer (:mod:`megatron_capaware.adapters.install`)
    and shared with the layer's dispatchers. The ``capaware_*`` properties
    below read and write that state.
    """

    capaware_state: LayerRoutingState

    def __init__(self, config: Any, pg_collection: Any = None, *, capaware: Optional[CapawareConfig] = None,
                 **kwargs: Any):
        # kwargs: what newer MoELayers pass on (0.19: is_mtp_layer).
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self.capaware_setup(capaware or CapawareConfig())

    def capaware_setup(self, capaware: CapawareConfig) -> None:
        """(Re)configure; also called on a ``TopKRouter`` turned into this class in place."""
        check_supported(self.config, capaware)
        state = self.__dict__.get("capaware_state")
        if state is None:
            state = LayerRoutingState(config=capaware, num_experts=self.config.num_moe_experts,
                                      ep_size=self.config.expert_model_parallel_size, device=self.weight.device)
            self.capaware_state = state
        state.config = capaware

    # Views of the state under the names the rest of the package (and users' scripts) read.
    capaware = property(lambda self: self.capaware_state.config)
    capaware_installed = property(lambda self: self.capaware_state.installed)
    capaware_load_group = property(lambda self: self.capaware_state.load_group)
    capaware_local_experts = property(lambda self: self.capaware_state.local_experts or None)
    capaware_local_slots = property(lambda self: self.capaware_state.local_slots)
    capaware_layout = property(lambda self: self.capaware_state.layout)
    capaware_stats = property(lambda self: self.capaware_state.stats)
    capaware_score_check = property(lambda self: self.capaware_state.score_check)

    @property
    def capaware_score_hook(self) -> Any:
        """Optional callable receiving each call's scores ``[T, E]`` (calibration, traces)."""
        return self.capaware_state.score_hook

    @capaware_score_hook.setter
    def capaware_score_hook(self, hook: Any) -> None:
        self.capaware_state.score_hook = hook

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
        return self.capaware_state.load_group

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
        state = self.capaware_state.on(logits.device)  # its tensors on the router's device (built at install)
        with routing_collectives(self.layer_number, state.load_group):
            cfg = state.config
            mtp = getattr(self, "is_mtp_layer", False)
            if not mtp and megatron_pads_experts(self.config):
                # Megatron's drop-and-pad (--moe-pad-experts-for-cuda-graph-inference, on its
                # CUDA-graph steps): its TopKRouter's padded output exactly, on the layout,
                # capture-safe, whatever the router (the dispatcher pads every slot to capacity).
                return self._topk_on_layout(logits, padding_mask, capture_safe=True)
            # MTP layers keep Megatron's routing (adapters/mtp.py) and run outside the dynamic step.
            if not router_type(cfg.router_type).is_vanilla and not mtp:
                route = phases.choose_route(state, logits.device)
                if route == phases.TOPK_ON_LAYOUT:
                    step = phases.current_composition()
                    return self._topk_on_layout(logits, padding_mask, capture_safe=step is not None and step.captured)
                if route == phases.DECODE:  # --capaware-decode-router on a decode-only step
                    cfg = cfg.decode_config()
                phases.check_not_capturing(self.layer_number)
            probs, routing_map, decision = self._capaware_routing(logits, padding_mask, cfg)
            layout = self.capaware_layout
            slot_loads = None
            if layout is not None and layout.placed:
                if self._decides_on_slots() and router_type(cfg.router_type).capacity:
                    slot_loads, decision = slots.logical_decision(self.capaware_state, decision)
                else:
                    probs, routing_map = slots.to_slots(self.capaware_state, probs, routing_map)
                    if decision is not None:
                        slot_loads = slots.slot_loads(self.capaware_state, decision, routing_map)
            if decision is not None:
                self._record(decision, slot_loads, cfg.router_type)
            return probs, routing_map

    def _topk_on_layout(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor], capture_safe: bool):
        """Megatron's top-k on the placement's layout (a phase outside ``phases``, a captured step, or a
        forward Megatron pads: :func:`~megatron_capaware.adapters.inference_padding.megatron_pads_experts`).

        ``TopKRouter.routing`` itself, so Megatron's token dropping applies when Megatron set a
        capacity factor (under its padding: every expert's column of the map True, ``[T, E]``).
        ``capture_safe`` (a captured or padded step): replicas round-robin by token index (no
        collective), no score check, no statistics (a padded map counts padding as assignments).
        """
        probs, routing_map = TopKRouter.routing(self, logits, padding_mask=padding_mask)
        decision = None
        if not capture_safe and self.capaware_stats is not None and self.capaware.record_stats:
            decision = policies.map_decision(probs, routing_map, self._group())
        layout, slot_loads = self.capaware_layout, None
        if layout is not None and layout.placed:
            table = layout.table
            rule = "round-robin" if capture_safe else layout.replica_policy
            replica = replica_choice(routing_map, table, rule, self.capaware_load_group)
            probs, routing_map = to_physical(probs, routing_map, table, replica)
            if decision is not None:
                slot_loads = slots.slot_loads(self.capaware_state, decision, routing_map)
        if decision is not None:
            self._record(decision, slot_loads, TOPK)
        return probs, routing_map

    def _decides_on_slots(self) -> bool:
        """Capacity per physical slot: the capacity routers under a plan with replicas decide on the ``S`` slots.

        Each chosen expert is first given its replica (as for top-k), then the
        capacity rule runs over slots (``C = ceil(gamma * T * k / S)`` each;
        ``unit=rank``: the plan's ranks), so a replicated expert holds
        ``m_e * C`` and the decision comes out physical. Reroute and
        expanded-drop may add, per token, one designated slot of each expert
        it does not hold (:func:`~megatron_capaware.adapters.slots.slot_allowed`): never a second replica of
        an expert the token has.
        """
        return self.capaware_state.decides_on_slots

    def _capaware_routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor],
                          capaware: Optional[CapawareConfig] = None):
        """``(probs [T, E], routing_map [T, E], decision or None)`` under ``capaware`` (default: the
        layer's configuration; a decode router's on decode-only steps)."""
        capaware = capaware if capaware is not None else self.capaware
        if getattr(self, "is_mtp_layer", False):  # MTP layers keep Megatron's routing (adapters/mtp.py)
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
            return probs, routing_map, None
        if router_type(capaware.router_type).is_vanilla:
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
            padding_mask = step_padding_mask(logits.shape[0], logits.device, self.config, self.layer_number)
        state = self.capaware_state
        vanilla_probs, vanilla_map, indices, scores = self._vanilla_topk(logits)  # [T, E], [T, E], [T, k], [T, E]
        # Only the routers that add experts need the group mask (drop and LASER only keep or
        # reorder within Megatron's choice; LASER refuses group-limited routing).
        allowed = self._selected_groups(logits, indices) if router_type(capaware.router_type).adds_experts \
            else None  # [T, E] or None
        valid_tokens = None
        if padding_mask is not None:
            valid_tokens = ~padding_mask.reshape(-1).to(device=scores.device, dtype=torch.bool)
        state.padded = valid_tokens is not None  # read by the dispatcher (LASER keeps k otherwise)
        if state.score_hook is not None:
            state.score_hook(scores)
        if capaware.check_scores:
            # Over the load group (whatever the scope: the dispatch spans it), so a
            # NaN on one rank raises on all of them instead of leaving them waiting.
            # Device path: read once per model forward (guards.DeferredScoreCheck).
            deferred = state.score_check
            if deferred is not None and policies.common.use_device_path(scores):
                deferred.note(self.layer_number, scores, key=id(state))
            else:
                check_scores_over_group(scores, state.load_group, self.layer_number)
        on_slots = self._decides_on_slots() and router_type(capaware.router_type).capacity
        if on_slots:
            logical = indices
            indices, scores = slots.slot_choice(state, scores, indices)  # [T, k] slots, [T, S]
            if router_type(capaware.router_type).adds_experts:
                allowed = slots.slot_allowed(state, allowed, logical, indices)  # [T, S]
        decision = self._decide(scores, indices, valid_tokens, allowed, capaware)
        scaling = self.config.moe_router_topk_scaling_factor or 1.0
        if capaware.renormalize:
            probs = decision.probs * scaling
        else:
            # Kept assignments: vanilla's weights bit for bit. New ones (rerouted,
            # moved, added): s[t, e] under the model's normalisation and scaling.
            # New weights: scores * (scaling / sum of the token's top-k scores) when the model normalises,
            # else scores * scaling. The 0-d scaling tensor is built once per device and dtype (the
            # division is the same IEEE division per element as with a [T, 1] tensor of it).
            if model_normalizes(self.config):
                new = scores * (self._constant(scaling, scores) / scores.gather(1, indices).sum(
                    dim=1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny))
            else:
                new = scores if scaling == 1.0 else scores * self._constant(scaling, scores)
            if on_slots:  # Megatron's weights moved to the chosen slots ([T, S])
                vanilla = torch.zeros_like(scores).scatter_(1, indices, vanilla_probs.gather(1, logical).float())
                vanilla_map = torch.zeros_like(decision.routing_map).scatter_(1, indices, True)
            else:  # Megatron's own [T, E] outputs (zero off its map)
                vanilla = vanilla_probs.float()
            probs = torch.where(vanilla_map, vanilla, new) * decision.routing_map
        recorded = decision if self.capaware_stats is not None and capaware.record_stats else None
        return probs.to(logits.dtype), decision.routing_map, recorded

    def _constant(self, value: float, like: torch.Tensor) -> torch.Tensor:
        """A 0-d tensor holding ``value`` in ``like``'s dtype and device, made once (no op per call)."""
        cache = self.__dict__.setdefault("_capaware_constants", {})
        key = (value, like.dtype, like.device)
        if key not in cache:
            cache[key] = torch.full((), value, dtype=like.dtype, device=like.device)
        return cache[key]

    def _vanilla_topk(self, logits: torch.Tensor):
        """Megatron's own top-k: ``(probs [T, E], routing_map [T, E], experts [T, k], scores [T, E])``.

        Megatron's ``topk_routing_with_score_function`` itself, on the installed
        megatron-core (:mod:`megatron_capaware.adapters.megatron_topk`), so the
        selection and the kept weights are vanilla's bit for bit, bf16 logits
        included. ``scores`` is the full float32 score distribution the policies rank by.
        """
        scores = self._scores(logits)
        probs, routing_map, indices = vanilla_topk(self, logits, scores)
        return probs, routing_map, indices, scores

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

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's full score distribution ``[T, E]`` in float32 (softmax or sigmoid)."""
        if self.score_function == "softmax":
            return torch.softmax(logits.float(), dim=-1)
        return torch.sigmoid(logits.float())

    def _decide(self, scores: torch.Tensor, indices: torch.Tensor, valid_tokens: Optional[torch.Tensor] = None,
                allowed: Optional[torch.Tensor] = None, capaware: Optional[CapawareConfig] = None):
        capaware = capaware if capaware is not None else self.capaware
        k = self.topk
        group = self._group()
        normalize = model_normalizes(self.config)
        common = dict(normalize=normalize, renormalize=capaware.renormalize, group=group,
                      check_values=False, topk_indices=indices,  # checked in routing()
                      weights=capaware.renormalize, return_decision=True, valid_tokens=valid_tokens)
        if capaware.router_type == LASER:
            params = capaware.laser_params(self.layer_number, k)
            if capaware.laser_load == "rank":  # the rank loads follow the EP layout (a placement's, when placed)
                common.update(load="rank", expert_ranks=self.capaware_state.expert_ranks,
                              num_ranks=self.config.expert_model_parallel_size)
            return policies.laser(
                scores, k, params.eps_high, params.t_fix, params.pool,
                waves=capaware.laser_waves, rounds=capaware.laser_rounds, **common,
            )
        if capaware.router_type == DECODE_PACK:  # the EP layout's ranks (a placement's, when placed)
            return policies.decode_pack(
                scores, k, capaware.decode_floor_for(k), t_fix=capaware.decode_t_fix, pool=capaware.decode_pool,
                slack=capaware.decode_slack, rank_aware=capaware.decode_rank_aware,
                expert_ranks=self.capaware_state.expert_ranks, num_ranks=self.config.expert_model_parallel_size,
                allowed=allowed, **common)
        if capaware.capacity_unit == "rank" and router_type(capaware.router_type).rank_unit:
            # The EP rank of each expert (contiguous, or the placement's with R = 0).
            common.update(unit="rank", expert_ranks=self.capaware_state.expert_ranks,
                          num_ranks=self.config.expert_model_parallel_size)
        if capaware.router_type == CAPACITY_DROP:
            return policies.capacity_drop(
                scores, k, capaware.gamma, policy=capaware.drop_policy, seed=capaware.seed, **common,
            )
        if capaware.router_type == CAPACITY_REROUTE:
            return policies.capacity_reroute(
                scores, k, capaware.gamma, rounds=capaware.reroute_rounds,
                policy=capaware.reroute_policy, min_ratio=capaware.reroute_min_ratio,
                drop_policy=capaware.drop_policy, seed=capaware.seed, allowed=allowed, **common,
            )
        if capaware.router_type == EXPANDED_DROP:
            if not self.capaware_state.local_experts:
                raise CapawareConfigError(
                    "expanded-drop needs the experts of this rank: install the router in an MoE "
                    "layer (install_capaware_routers) so the EP layout is known"
                )
            state = self.capaware_state
            local = state.local_slots_t if self._decides_on_slots() else state.local_experts_t  # among the S slots
            return policies.expanded_drop(scores, k, capaware.gamma, local, allowed=allowed, **common)
        raise CapawareConfigError(f"unknown router type {capaware.router_type!r}")

    def _record(self, decision, slot_loads: Optional[torch.Tensor] = None, router: str = "") -> None:
        """Keep one call's figures; ``slot_loads [S]``: under a placement, the physical slots' loads;
        ``router``: the label of the router that decided (the per-phase statistics name it).

        No collective at either scope: at ``--capaware-scope local`` the decision's figures are this
        rank's, and the stats recorder sums them over the load group when they are reported
        (``LayerRoutingStats.reduce_pending``, from ``collect_stats``).
        """
        self.capaware_stats.record_decision(decision, slot_loads)
        phases.record_phase(self.capaware_state, decision, slot_loads, router)

