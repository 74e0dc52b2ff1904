"""Guards that keep every rank of a load group on the same path.

A rank that raises alone while the others enter a collective leaves them
waiting until the process-group timeout, then failing with a message that
says nothing of the cause. Two guards turn such situations into the same
clear error on every rank, at once:

* :func:`check_scores_over_group` (every forward of a capaware router, when
  ``CapawareConfig.check_scores``): NaN / Inf / negative router scores on
  any rank of the load group raise :class:`RoutingInputError` on all of them,
  naming the layer and the ranks. Cost: one all-gather of 2 int64 per layer
  and one host read (the policies' own local check, which it replaces, had
  the host read already). On the device (CUDA) path the layers hand their
  flags to a :class:`DeferredScoreCheck` instead, read once per forward of
  the model (one all-gather of ``[layers, 2]`` and one host read); the
  routing collectives have data-independent shapes, so a rank with bad
  scores cannot leave the others waiting before that read.
* :func:`check_rank_agreement` (once per :func:`install_capaware_routers`):
  ranks whose router configuration or MoE layer layout differ (a different
  gamma, router type, calibration, number of layers, experts, top-k...)
  would silently route with different rules, or issue different
  collectives and hang. One all-gather of a fixed-size vector of per-field
  hashes finds them; every rank raises :class:`CapawareConfigError` naming
  the differing fields with each rank's value. A rank whose own validation
  failed makes every rank raise.
"""

from __future__ import annotations

from megatron_capaware.errors import RoutingCollectiveError  # noqa: F401 (defined there; re-exported)

import hashlib
import json
import os
from contextlib import contextmanager
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_capaware.config import CapawareConfig, CapawareConfigError
from megatron_capaware.policies.common import RoutingInputError, score_value_flags
from megatron_capaware.policies.collectives import group_timeout_s
from megatron_capaware.policies.collectives import LoadGroup, all_gather_stack, group_size

# ----------------------------------------------------------------------------- failed collectives



def _is_distributed_failure(err: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    text = str(err)
    return any(marker in text for marker in ("gloo/", "NCCL", "ProcessGroup", "c10d", "Connection closed by peer"))


@contextmanager
def routing_collectives(layer_number: Optional[int], group: Any):
    """Re-raise a failed collective of this block as :class:`RoutingCollectiveError`, with context."""
    try:
        yield
    except RuntimeError as err:
        if isinstance(err, RoutingCollectiveError) or not _is_distributed_failure(err):
            raise
        pg = group.group if isinstance(group, LoadGroup) else group
        members = _global_ranks(group, range(group_size(group))) if pg is not None else []
        me = dist.get_rank() if dist.is_initialized() else 0
        seconds = group_timeout_s(pg)  # the group's own (Megatron: --distributed-timeout-minutes)
        timeout = os.environ.get("CAPAWARE_COLLECTIVE_TIMEOUT_S")
        if seconds is not None:
            limit = f"{seconds:g} s (this process group's timeout; Megatron sets it from --distributed-timeout-minutes)"
        elif timeout:
            limit = f"{float(timeout):g} s (CAPAWARE_COLLECTIVE_TIMEOUT_S)"
        else:
            limit = "the process group's timeout (Megatron: --distributed-timeout-minutes)"
        raise RoutingCollectiveError(
            f"MoE layer {layer_number}: a routing collective over the load group (ranks {members}) "
            f"failed on rank {me}: {err}. Another rank of the group most likely crashed, hung or "
            "raised before reaching this collective: its log has the cause. Collectives give up "
            f"after {limit}."
        ) from err


# ----------------------------------------------------------------------------- bad scores


def check_scores_over_group(scores: torch.Tensor, group: Any, layer_number: Optional[int] = None) -> None:
    """Raise on every rank of ``group`` if any rank's router scores are not finite or negative.

    Args:
        scores: this rank's ``[T, E]`` router scores (``T`` may be 0).
        group: the layer's load group (``LoadGroup``, process group or None).
        layer_number: for the message.

    Raises:
        RoutingInputError: on every rank, naming the layer, the ranks with bad
            scores, and on those ranks the first bad position.
    """
    local = score_value_flags(scores)
    gathered = all_gather_stack(local, group) if group_size(group) > 1 else local.unsqueeze(0)
    if not bool(gathered.any()):  # the one host read
        return
    where = f"MoE layer {layer_number}: " if layer_number is not None else ""
    bad_ranks = gathered.any(dim=1).nonzero().view(-1).tolist()
    ranks = _global_ranks(group, bad_ranks)
    others = "" if group_size(group) == 1 else (
        f" on rank(s) {ranks} of the load group (every rank of the group raises this error, so "
        "none is left waiting in a collective)"
    )
    if bool((gathered[:, 0] != 0).any()):  # flag 0: NaN / Inf (nonzero, NaN included)
        detail = ""
        nonfinite = ~torch.isfinite(scores)
        if bool(nonfinite.any()):
            t, e = (int(i) for i in nonfinite.nonzero()[0])
            detail = f"; {int(nonfinite.sum())} non-finite values on this rank, the first at token {t}, expert {e}"
        raise RoutingInputError(
            f"{where}router scores contain NaN or Inf{others}{detail}. The gate produced non-finite "
            "logits: check the model weights (a bad checkpoint or an overflow in a low-precision "
            "dtype) and the inputs of this layer. Routing them would silently corrupt the batch."
        )
    raise RoutingInputError(
        f"{where}router scores must be probabilities >= 0 (softmax or sigmoid output), got negative "
        f"values{others}; pass probabilities, not logits"
    )


class DeferredScoreCheck:
    """The score check of a model's MoE layers, read once per forward (device path).

    Each router :meth:`note` s its layer's flags (device tensors, no sync);
    after each MoE layer's forward (a hook the installer puts on the layer)
    :meth:`maybe_check` checks them once ``expected`` layers have noted (every
    installed layer routed once: one forward of the model): one all-gather
    over the load group, one host read, after the last MoE layer's experts.
    A layer that notes twice before that (a forward that skipped a layer)
    first has the earlier forward's flags checked. Every rank of the group
    routes the same layers in the same order, so every rank checks at the
    same point and enters the same all-gather. Needs no hook on the model,
    so it serves every way of installing (the installer, a capaware spec,
    the Megatron-LM launcher).
    """

    def __init__(self, group: Any, expected: int = 1):
        self.group = group  # None until the first layer is installed (spec, launcher)
        self.expected = int(expected)
        self.pending: List[Tuple[Any, Optional[int], torch.Tensor]] = []

    def note(self, layer_number: Optional[int], scores: torch.Tensor, key: Any = None) -> None:
        """Record one layer's ``[2]`` flags (``score_value_flags``); check when the forward is complete."""
        key = layer_number if key is None else key
        if any(seen == key for seen, _, _ in self.pending):
            self.check()
        self.pending.append((key, layer_number, score_value_flags(scores)))

    def maybe_check(self, *_: Any) -> None:
        """Check once the forward is complete (every expected layer noted); else nothing."""
        if len(self.pending) >= max(self.expected, 1):
            self.check()

    def clear(self, *_: Any) -> None:
        self.pending.clear()

    def check(self, *_: Any) -> None:
        """Raise on every rank of the group if any layer of any rank saw bad scores."""
        if not self.pending:
            return
        layers = [number for _, number, _ in self.pending]
        flags = [flags for _, _, flags in self.pending]
        local = flags[0].unsqueeze(0) if len(flags) == 1 else torch.stack(flags)  # [L, 2]
        self.pending = []
        gathered = all_gather_stack(local, self.group) if group_size(self.group) > 1 else local.unsqueeze(0)
        if not bool(gathered.any()):  # the one host read of the forward
            return
        bad = gathered.any(dim=2)  # [W, L]
        first = int(bad.any(dim=0).nonzero()[0])
        ranks = _global_ranks(self.group, bad[:, first].nonzero().view(-1).tolist())
        where = f"MoE layer {layers[first]}: " if layers[first] is not None else ""
        others = "" if group_size(self.group) == 1 else (
            f" on rank(s) {ranks} of the load group (every rank of the group raises this error, so "
            "none is left waiting in a collective)"
        )
        if bool((gathered[:, first, 0] != 0).any()):  # flag 0: NaN / Inf
            raise RoutingInputError(
                f"{where}router scores contain NaN or Inf{others}. The gate produced non-finite "
                "logits: check the model weights (a bad checkpoint or an overflow in a low-precision "
                "dtype) and the inputs of this layer. Routing them would silently corrupt the batch."
            )
        raise RoutingInputError(
            f"{where}router scores must be probabilities >= 0 (softmax or sigmoid output), got negative "
            f"values{others}; pass probabilities, not logits"
        )


def _global_ranks(group: Any, group_ranks: Sequence[int]) -> List[int]:
    pg = group.group if isinstance(group, LoadGroup) else group
    if pg is None or not dist.is_initialized():
        return list(group_ranks)
    try:
        members = dist.get_process_group_ranks(pg)
    except Exception:  # a stand-in group (tests) has no global ranks
        return list(group_ranks)
    return [members[r] for r in group_ranks]


# ----------------------------------------------------------------------------- rank agreement

_SLOTS = 64  # fixed vector length: ranks running different versions still gather equal shapes
_TEXT_BYTES = 240
_MAX_REPORTED = 8


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def agreement_fields(layers: Sequence[Any], capaware: CapawareConfig) -> List[Tuple[str, str]]:
    """``(name, canonical value)`` of everything the ranks of a load group must share.

    The router configuration (every ``CapawareConfig`` field but the
    calibration file's path, whose content is ``layer_params``) and the MoE
    layer layout (layer numbers, experts, top-k, score function, local expert
    count, dispatcher, parallel sizes).
    """
    data = capaware.to_dict()
    data.pop("laser_calibration", None)
    fields = [(f"{name}", _canonical(value)) for name, value in sorted(data.items())]

    def per_layer(fn) -> str:
        return _canonical([fn(layer) for layer in layers])

    def cfg(name: str, default: Any = None):
        return lambda layer: getattr(layer.config, name, default)

    fields += [
        ("MoE layer numbers", per_layer(lambda l: int(l.layer_number or 0))),
        ("num_moe_experts", per_layer(cfg("num_moe_experts"))),
        ("moe_router_topk", per_layer(cfg("moe_router_topk"))),
        ("moe_router_score_function", per_layer(cfg("moe_router_score_function"))),
        ("moe_router_pre_softmax", per_layer(cfg("moe_router_pre_softmax"))),
        ("moe_router_topk_scaling_factor", per_layer(cfg("moe_router_topk_scaling_factor"))),
        ("moe_router_num_groups/group_topk", per_layer(
            lambda l: [l.config.moe_router_num_groups, l.config.moe_router_group_topk])),
        ("moe_router_enable_expert_bias", per_layer(cfg("moe_router_enable_expert_bias", False))),
        ("moe_expert_capacity_factor", per_layer(cfg("moe_expert_capacity_factor"))),
        ("moe_token_dispatcher_type", per_layer(cfg("moe_token_dispatcher_type"))),
        ("num_local_experts", per_layer(lambda l: int(l.num_local_experts))),
        ("sequence_parallel", per_layer(cfg("sequence_parallel", False))),
        ("tensor/expert/expert-tensor parallel sizes", per_layer(lambda l: [
            l.config.tensor_model_parallel_size, l.config.expert_model_parallel_size,
            l.config.expert_tensor_parallel_size])),
    ]
    return fields


def _text_tensor(texts: Sequence[str], device: torch.device) -> torch.Tensor:
    out = torch.zeros(len(texts), _TEXT_BYTES, dtype=torch.uint8)
    for i, text in enumerate(texts):
        raw = text.encode()[:_TEXT_BYTES]
        out[i, :len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    return out.to(device)


def _collective_device(layers: Sequence[Any]) -> torch.device:
    """Where the group's collectives take tensors: the model's device (CUDA for NCCL)."""
    for layer in layers:
        for param in layer.router.parameters():
            return param.device
    return torch.device("cpu")


def _decode(row: torch.Tensor) -> str:
    return bytes(row.tolist()).rstrip(b"\0").decode(errors="replace")


def _all_gather(tensor: torch.Tensor, pg: Any, world: int) -> torch.Tensor:
    return all_gather_stack(tensor, pg).cpu()


def check_rank_agreement(
    layers: Sequence[Any],
    capaware: CapawareConfig,
    load_group: Any,
    validation_error: Optional[BaseException] = None,
) -> None:
    """Raise on every rank of ``load_group`` if the ranks disagree, or any failed validation.

    Every rank of the group must call this (one all-gather of ``65`` int64,
    plus one of a few hundred bytes per differing field when they differ).

    Args:
        layers: this rank's MoE layers.
        capaware: the configuration being installed.
        load_group: the layers' load group (``LoadGroup``, process group or None: no-op).
        validation_error: the error this rank's own checks raised, if any.

    Raises:
        CapawareConfigError: the ranks disagree (naming each differing field with
            every rank's value), or another rank failed validation.
        the ``validation_error`` itself on the rank that had it.
    """
    pg = load_group.group if isinstance(load_group, LoadGroup) else load_group
    if pg is None or not dist.is_initialized():
        if validation_error is not None:
            raise validation_error
        return
    world = dist.get_world_size(pg)
    members = dist.get_process_group_ranks(pg)
    me = dist.get_rank()
    status = "ok" if validation_error is None else f"{type(validation_error).__name__}: {validation_error}"
    device = _collective_device(layers)
    fields = agreement_fields(layers, capaware)[: _SLOTS - 2]
    hashes = torch.zeros(_SLOTS, dtype=torch.int64)
    hashes[0] = _digest("|".join(name for name, _ in fields))
    hashes[1] = 0 if validation_error is None else 1
    for i, (_, value) in enumerate(fields):
        hashes[2 + i] = _digest(value)
    table = _all_gather(hashes.to(device), pg, world)  # [W, SLOTS]

    failed = table[:, 1].nonzero().view(-1).tolist()
    if failed:
        texts = _all_gather(_text_tensor([status], device), pg, world)[:, 0]
        if validation_error is not None:
            raise validation_error
        first = failed[0]
        raise CapawareConfigError(
            f"installing capaware routers failed on rank(s) {[members[r] for r in failed]} of this "
            f"load group (this is rank {me}); rank {members[first]} reported: {_decode(texts[first])}"
        )

    differ = (table != table[:1]).any(dim=0)
    if not bool(differ.any()):
        return
    slots = [i for i in differ.nonzero().view(-1).tolist() if i >= 2][:_MAX_REPORTED]
    names = [fields[i - 2][0] for i in slots]
    texts = _all_gather(_text_tensor([fields[i - 2][1] for i in slots], device), pg, world)  # [W, n, BYTES]
    lines = []
    for j, name in enumerate(names):
        values = ", ".join(f"rank {members[r]}: {_decode(texts[r, j])}" for r in range(world))
        lines.append(f"{name} ({values})")
    version_note = ""
    if bool(differ[0]):
        version_note = (" The ranks also know different sets of fields: they run different "
                        "megatron-capaware versions.")
    raise CapawareConfigError(
        f"the ranks of this load group (ranks {members}) disagree on the router configuration or "
        f"the MoE layout, so they would route by different rules or wait in different collectives: "
        f"{'; '.join(lines)}.{version_note} Launch every rank with the same router flags, "
        "calibration file and model."
    )
