"""The Megatron options a capaware router cannot honour: one table.

Used in two places with the same rows: :func:`check_supported` on a built
layer's ``TransformerConfig`` (every install) and the Megatron-LM command
line (:func:`megatron_capaware.megatron_lm.arguments.resolve_args`, at parse
time). Both objects use Megatron's own field names, so a row reads the same
attribute from either; an attribute that is absent (another Megatron
release, a partial namespace) counts as unset.

``topk`` is Megatron's own routing and is never refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from megatron_capaware.errors import CapawareConfigError
from megatron_capaware.registry import router_names

#: What a row receives: ``get(field)`` -> the value, None when absent.
Getter = Callable[[str], Any]

CAPACITY_ROUTERS = router_names(capacity=True)
NON_TOPK = router_names(is_vanilla=False)
SUPPORTED_DISPATCHERS = ("alltoall", "allgather")
SUPPORTED_SCORE_FUNCTIONS = ("softmax", "sigmoid")
REPLACING_BALANCERS = ("sinkhorn", "quantile_balancing")


@dataclass(frozen=True)
class Refusal:
    """One refused option: which routers, when, and the message (what and how to fix)."""

    option: str  # the Megatron flag, for docs and tests
    routers: Tuple[str, ...]
    refused: Callable[[Getter], bool]
    message: Callable[[str, Getter], str]  # (router option text, get) -> message


def _balancers(get: Getter) -> list:
    value = get("moe_router_load_balancing_type")
    return [value] if isinstance(value, str) else list(value or [])


def _replacing_balancer(get: Getter) -> Optional[str]:
    return next((b for b in _balancers(get) if b in REPLACING_BALANCERS), None)


#: The CUDA-graph implementation whose inference graphs are the dynamic engine's: it marks the
#: steps it captures (``using_cuda_graph_this_step()``), and a marked step routes capture-safe
#: (``adapters.phases``: topk on the placement, no collective, no host sync).
CAPTURE_SAFE_GRAPH_IMPLS = ("none", "local")

#: Capture modules (``cuda_graph_modules``, before 0.19 ``cuda_graph_scope``) that include the MoE router.
ROUTER_GRAPH_SCOPES = frozenset({"full", "moe", "moe_router", "moe_preprocess", "full_iteration",
                                 "full_iteration_inference"})


def _scope_names(value: Any) -> list:
    """A scope setting (a name, an enum member, or a list of them) as lower-case names."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [str(getattr(item, "name", item)).lower() for item in items]


def _cuda_graphs(get: Getter) -> bool:
    """Whether the CUDA graphs the settings ask for would capture a capaware policy itself.

    ``--cuda-graph-impl local`` is the dynamic engine's: the steps it captures are
    marked and route capture-safe (top-k on the placement), eager steps run the
    policy, so it is allowed (a capture outside a marked step raises at run time,
    ``adapters.phases.check_not_capturing``). Whole-layer graphs of other
    implementations (``--enable-cuda-graph``, ``--external-cuda-graph``,
    ``--cuda-graph-impl full_iteration``, an empty or ``full`` scope) and the
    scopes ``moe``, ``moe_router``, ``moe_preprocess`` capture the router;
    ``attn``, ``mlp`` (dense layers only) and ``mamba`` alone do not.
    """
    if get("enable_cuda_graph") or get("external_cuda_graph"):
        return True
    impl = get("cuda_graph_impl")
    if impl is None or impl in CAPTURE_SAFE_GRAPH_IMPLS:
        return False
    if impl == "full_iteration":
        return True
    names = _scope_names(get("cuda_graph_modules") if get("cuda_graph_modules") is not None else get("cuda_graph_scope"))
    return not names or bool(set(names) & ROUTER_GRAPH_SCOPES)


def _megatron_padding_toggle(get: Getter) -> bool:
    """Whether the capacity fields hold what Megatron's inference engine sets at run time, not the user's.

    With ``--moe-pad-experts-for-cuda-graph-inference`` Megatron's text-generation
    controller switches every step between drop-and-pad (``moe_pad_expert_input_to_capacity``
    True, ``moe_expert_capacity_factor = E / k``: capacity ``T`` per expert, nothing dropped)
    on its CUDA-graph steps and no capacity (``False`` / ``None``) on the others
    (``megatron.core.inference.utils.set_decode_expert_padding``). The routers route that
    padded step by Megatron's own top-k (``adapters/router.py``), so a config read after
    such a step (a router installed between engines) is not refused for it.
    """
    if not get("moe_pad_experts_for_cuda_graph_inference") or not get("moe_pad_expert_input_to_capacity"):
        return False
    experts, k, factor = get("num_moe_experts"), get("moe_router_topk"), get("moe_expert_capacity_factor")
    return bool(experts and k and factor is not None and factor == experts / k)


REFUSALS: Tuple[Refusal, ...] = (
    Refusal(
        "--moe-expert-capacity-factor", NON_TOPK,
        # Megatron treats a negative factor as unset.
        lambda get: get("moe_expert_capacity_factor") is not None and get("moe_expert_capacity_factor") >= 0
        and not _megatron_padding_toggle(get),
        lambda name, get: (
            f"{name} cannot be combined with Megatron's --moe-expert-capacity-factor "
            f"{get('moe_expert_capacity_factor'):g}: both limit expert load, and Megatron's drops on each "
            "rank's local tokens after the capaware decision. Unset --moe-expert-capacity-factor (the "
            "capaware gamma replaces it). Use --capaware-gamma for the capacity factor, or "
            "--moe-router-type topk to keep Megatron's own token dropping"
        ),
    ),
    Refusal(
        "--moe-pad-expert-input-to-capacity", NON_TOPK,
        lambda get: bool(get("moe_pad_expert_input_to_capacity")) and not _megatron_padding_toggle(get),
        lambda name, get: (
            f"{name} cannot be combined with --moe-pad-expert-input-to-capacity (Megatron's padded "
            "capacity path); unset it"
        ),
    ),
    Refusal(
        "--moe-router-load-balancing-type", NON_TOPK,
        lambda get: _replacing_balancer(get) is not None,
        lambda name, get: (
            f"{name} cannot be combined with --moe-router-load-balancing-type {_replacing_balancer(get)}, "
            "which replaces top-k routing itself; use aux_loss, seq_aux_loss, global_aux_loss or none"
        ),
    ),
    Refusal(
        "--moe-enable-routing-replay", NON_TOPK,
        lambda get: bool(get("moe_enable_routing_replay")),
        lambda name, get: (
            f"{name} cannot be combined with routing replay (--moe-enable-routing-replay replays "
            "recorded top-k decisions); unset it"
        ),
    ),
    Refusal(
        "--moe-token-dispatcher-type", NON_TOPK,
        lambda get: get("moe_token_dispatcher_type") is not None
        and get("moe_token_dispatcher_type") not in SUPPORTED_DISPATCHERS,
        lambda name, get: (
            f"{name} supports --moe-token-dispatcher-type alltoall and allgather (dropped assignments "
            f"must not be sent); got --moe-token-dispatcher-type {get('moe_token_dispatcher_type')}"
        ),
    ),
    Refusal(
        "--context-parallel-size", NON_TOPK,
        lambda get: (get("context_parallel_size") or 1) > 1,
        lambda name, get: (
            f"{name} does not support context parallelism yet (--context-parallel-size "
            f"{get('context_parallel_size')}): use --context-parallel-size 1, or --moe-router-type topk"
        ),
    ),
    Refusal(
        "--moe-router-score-function", NON_TOPK,
        lambda get: get("moe_router_score_function") is not None
        and get("moe_router_score_function") not in SUPPORTED_SCORE_FUNCTIONS,
        lambda name, get: (
            f"{name} knows the softmax and sigmoid score functions, not --moe-router-score-function "
            f"{get('moe_router_score_function')} (newer than this megatron-capaware); use "
            "--moe-router-type topk, or a megatron-capaware release that supports it"
        ),
    ),
    Refusal(
        "--moe-router-padding-for-quantization", NON_TOPK,
        lambda get: bool(get("moe_router_padding_for_quantization") or get("moe_router_padding_for_fp8")),
        lambda name, get: (
            f"{name} cannot be combined with --moe-router-padding-for-quantization "
            "(--moe-router-padding-for-fp8): the dispatcher would pad every expert's tokens to a "
            "multiple of the quantization block after the routing decision, so experts would "
            "process more than the capacity allows; unset it"
        ),
    ),
    Refusal(
        "--transformer-impl inference_optimized", NON_TOPK,
        lambda get: get("transformer_impl") == "inference_optimized",
        lambda name, get: (
            f"{name} replaces Megatron's TopKRouter, which --transformer-impl inference_optimized "
            "does not use (it builds InferenceTopKRouter); use --transformer-impl transformer_engine or local"
        ),
    ),
    Refusal(
        "--cuda-graph-impl", NON_TOPK,
        _cuda_graphs,
        lambda name, get: (
            f"{name}'s policy is not CUDA-graph capturable (data-dependent control flow and "
            f"collectives), and these CUDA-graph settings capture the MoE router (--cuda-graph-impl "
            f"{get('cuda_graph_impl')}, --enable-cuda-graph {bool(get('enable_cuda_graph'))}, "
            f"--external-cuda-graph {bool(get('external_cuda_graph'))}); use --cuda-graph-impl local "
            "(Megatron's dynamic inference engine: its captured steps route by top-k on the placement, eager "
            "steps by the policy) or none, or capture only what leaves the router out (--cuda-graph-modules "
            "attn / --cuda-graph-scope attn), or --moe-router-type topk"
        ),
    ),
    Refusal(
        "--mlp-chunks-for-prefill", NON_TOPK,
        lambda get: (get("mlp_chunks_for_prefill") or 1) > 1,
        lambda name, get: (
            f"{name} cannot be combined with --mlp-chunks-for-prefill {get('mlp_chunks_for_prefill')}: prefill "
            "ranks would route each layer in several chunks while decode-only and idle EP ranks route it once, "
            "so the ranks' routing collectives would not match (a hang); use --mlp-chunks-for-prefill 1, or "
            "--moe-router-type topk"
        ),
    ),
    Refusal(
        "--tensor-model-parallel-size without --sequence-parallel", router_names(token_copies=False),
        lambda get: (get("tensor_model_parallel_size") or 1) > 1 and not get("sequence_parallel"),
        lambda name, get: (
            f"{name} with --tensor-model-parallel-size > 1 needs --sequence-parallel: without it the "
            "TP ranks hold copies of the same tokens on different EP ranks, whose local experts differ"
        ),
    ),
    Refusal(
        "--moe-router-num-groups / --moe-router-group-topk", router_names(group_limited=False),
        lambda get: bool(get("moe_router_num_groups") or get("moe_router_group_topk")),
        lambda name, get: (
            f"{name} does not support group-limited routing (--moe-router-num-groups / "
            "--moe-router-group-topk): its pools are drawn from all experts; use a capacity router"
        ),
    ),
    Refusal(
        "--moe-router-enable-expert-bias", router_names(expert_bias=False),
        lambda get: bool(get("moe_router_enable_expert_bias")),
        lambda name, get: (
            f"{name} does not support --moe-router-enable-expert-bias: its confident tokens must take "
            "the model's own top-k; use a capacity router"
        ),
    ),
)


def refusal_for(router_type: str, settings: Any) -> Optional[str]:
    """The message of the first row that refuses ``settings`` for ``router_type``, else None.

    Args:
        router_type: a ``--moe-router-type`` value.
        settings: a Megatron ``TransformerConfig`` or parsed-arguments namespace.
    """
    def get(field: str) -> Any:
        return getattr(settings, field, None)

    name = f"--moe-router-type {router_type}"
    for row in REFUSALS:
        if router_type in row.routers and row.refused(get):
            return row.message(name, get)
    return None


def raise_if_refused(router_type: str, settings: Any) -> None:
    """Raise :class:`CapawareConfigError` with the refusal's message, if a row refuses."""
    message = refusal_for(router_type, settings)
    if message is not None:
        raise CapawareConfigError(message)
