"""Refused without need, or not refused (issue 22, items 3, 4, 7, 13, 14).

In process, no Megatron parallel state: the refusal table on Megatron-like
namespaces (parse time; install time reads the same rows from the layer's
``TransformerConfig``, see test_bad_input's spawned rows), the placement
checks on stand-in layers, the TE weight-cache reset, and the dispatcher
adaptation (topk under flex, LASER's sync point).
"""

from __future__ import annotations

import types
from typing import Any, Dict

import pytest
import torch

from megatron_capaware.adapters.dispatcher import CapawareAlltoAllTokenDispatcher, adapt_dispatchers
from megatron_capaware.adapters.placement_checks import check_layer, invalidate_weight_caches, is_quantized
from megatron_capaware.config import CapawareConfigError
from megatron_capaware.megatron_lm.arguments import resolve_args
from megatron_capaware.placement.planner import PlacementError
from megatron_capaware.refusals import refusal_for
from tests.test_arguments import megatron_namespace


def _ns(**values: Any) -> types.SimpleNamespace:
    return types.SimpleNamespace(**values)


# --------------------------------------------------------------------------- item 7: --mlp-chunks-for-prefill


@pytest.mark.parametrize("router", ["capacity-drop", "capacity-reroute", "expanded-drop", "laser"])
def test_mlp_chunks_for_prefill_is_refused_at_parse_time(router: str) -> None:
    with pytest.raises(CapawareConfigError) as err:
        resolve_args(megatron_namespace(moe_router_type=router, mlp_chunks_for_prefill=4))
    assert "--mlp-chunks-for-prefill 4" in str(err.value) and "hang" in str(err.value)


def test_mlp_chunks_for_prefill_one_and_topk_pass() -> None:
    resolve_args(megatron_namespace(moe_router_type="capacity-drop", mlp_chunks_for_prefill=1))
    resolve_args(megatron_namespace(moe_router_type="topk", mlp_chunks_for_prefill=4))


@pytest.mark.parametrize("router", ["topk", "capacity-drop", "capacity-reroute", "expanded-drop", "laser"])
def test_pad_experts_for_cuda_graph_inference_is_accepted_with_every_router(router: str) -> None:
    # megatron-core 0.19 asserts it for the dynamic engine's CUDA graphs at EP > 1; its padded
    # (captured) steps route by Megatron's own top-k (tests/test_cuda_graph_padding.py).
    pad = dict(moe_pad_experts_for_cuda_graph_inference=True)
    assert refusal_for(router, _ns(cuda_graph_impl="local", **pad)) is None
    assert refusal_for(router, _ns(**pad)) is None
    resolve_args(megatron_namespace(moe_router_type=router, cuda_graph_impl="local",
                                    expert_model_parallel_size=2, **pad))
    if router != "topk":  # graphs that capture the router stay refused, the flag or not
        message = refusal_for(router, _ns(cuda_graph_impl="full_iteration", **pad))
        assert message is not None and "--cuda-graph-impl" in message


def test_megatron_padding_toggle_is_told_from_a_static_capacity_factor() -> None:
    # What set_decode_expert_padding leaves on the config after a CUDA-graph step (E / k = 8 / 2).
    toggled = dict(moe_pad_expert_input_to_capacity=True, moe_expert_capacity_factor=4.0, num_moe_experts=8,
                   moe_router_topk=2)
    assert refusal_for("capacity-drop", _ns(moe_pad_experts_for_cuda_graph_inference=True, **toggled)) is None
    # The same fields without the flag, or another factor with it: a user's static setting.
    message = refusal_for("capacity-drop", _ns(**toggled))
    assert message is not None and "--moe-expert-capacity-factor 4" in message
    other = dict(toggled, moe_expert_capacity_factor=1.0)
    message = refusal_for("capacity-drop", _ns(moe_pad_experts_for_cuda_graph_inference=True, **other))
    assert message is not None and "--moe-expert-capacity-factor 1" in message


# --------------------------------------------------------------------------- item 14: CUDA-graph scopes

GRAPH_CASES = [
    # (settings, refused?)
    (dict(cuda_graph_impl="none"), False),
    (dict(), False),
    (dict(enable_cuda_graph=True), True),
    (dict(external_cuda_graph=True), True),
    (dict(cuda_graph_impl="full_iteration"), True),
    # --cuda-graph-impl local: the dynamic engine's graphs; its captured steps are marked and route
    # capture-safe (adapters/phases.py), whatever the scope.
    (dict(cuda_graph_impl="local", cuda_graph_scope="full"), False),
    (dict(cuda_graph_impl="local", cuda_graph_modules=["attn"]), False),
    (dict(cuda_graph_impl="local", cuda_graph_scope=["moe_router"]), False),
    # other implementations: refused when the scope captures the router
    # megatron-core 0.16 style (cuda_graph_scope, no cuda_graph_modules)
    (dict(cuda_graph_impl="transformer_engine", cuda_graph_scope="full"), True),
    (dict(cuda_graph_impl="transformer_engine", cuda_graph_scope=[]), True),
    (dict(cuda_graph_impl="transformer_engine", cuda_graph_scope=["attn"]), False),
    (dict(cuda_graph_impl="transformer_engine", cuda_graph_scope=["attn", "mamba"]), False),
    (dict(cuda_graph_impl="transformer_engine", cuda_graph_scope=["attn", "moe_router"]), True),
    (dict(cuda_graph_impl="transformer_engine", cuda_graph_scope=["moe"]), True),
    # megatron-core 0.19 style (cuda_graph_modules)
    (dict(cuda_graph_impl="transformer_engine", cuda_graph_modules=["attn"], inference_cuda_graph_scope="none"),
     False),
    (dict(cuda_graph_impl="transformer_engine", cuda_graph_modules=["moe_preprocess"]), True),
]


@pytest.mark.parametrize("settings, refused", GRAPH_CASES)
def test_cuda_graphs_are_refused_only_when_they_capture_the_router(settings: Dict[str, Any], refused: bool) -> None:
    message = refusal_for("capacity-drop", _ns(**settings))
    assert (message is not None) == refused, (settings, message)
    assert refusal_for("topk", _ns(**settings)) is None


def test_cuda_graph_scope_enums_are_read_by_name() -> None:
    import enum

    class Scope(enum.Enum):
        attn = 1
        moe_router = 2

    assert refusal_for("laser", _ns(cuda_graph_impl="transformer_engine", cuda_graph_scope=[Scope.attn])) is None
    assert refusal_for("laser", _ns(cuda_graph_impl="transformer_engine",
                                    cuda_graph_scope=[Scope.moe_router])) is not None


# --------------------------------------------------------------------------- items 3, 4: placement refusals


class TEGroupedMLP(torch.nn.Module):  # stand-in: the name is what placement recognises
    def __init__(self, single: bool):
        super().__init__()
        self.linear_fc1 = torch.nn.Module()
        self.linear_fc1.weight0 = None if single else torch.nn.Parameter(torch.zeros(2, 2))
        self.num_local_experts = 1


class MoEAlltoAllTokenDispatcher:  # stand-in names
    pass


class MoEFlexTokenDispatcher:
    pass


def _layer(experts: torch.nn.Module, **config: Any) -> Any:
    return _ns(layer_number=3, config=_ns(**config), experts=experts)


def test_single_grouped_weight_is_refused_before_anything_moves() -> None:
    with pytest.raises(PlacementError, match="single grouped expert weight"):
        check_layer(_layer(TEGroupedMLP(single=True)), [MoEAlltoAllTokenDispatcher()])
    with pytest.raises(PlacementError, match="--moe-single-grouped-weight"):
        check_layer(_layer(TEGroupedMLP(single=False), moe_single_grouped_weight=True),
                    [MoEAlltoAllTokenDispatcher()])
    check_layer(_layer(TEGroupedMLP(single=False)), [MoEAlltoAllTokenDispatcher()])


def test_fp8_parameters_are_refused() -> None:
    with pytest.raises(PlacementError, match="FP8 parameters"):
        check_layer(_layer(TEGroupedMLP(single=False), fp8_param=True), [MoEAlltoAllTokenDispatcher()])

    class Float8Tensor(torch.Tensor):  # what TE's FP8 parameters are (by class name)
        pass

    experts = torch.nn.Linear(2, 2)
    experts.weight = torch.nn.Parameter(torch.zeros(2, 2).as_subclass(Float8Tensor))
    assert is_quantized(experts.weight) and not is_quantized(torch.zeros(1))
    with pytest.raises(PlacementError, match="FP8 parameters"):
        check_layer(_layer(experts), [MoEAlltoAllTokenDispatcher()])


def test_placement_under_flex_is_refused_with_a_message() -> None:
    with pytest.raises(PlacementError, match="not MoEFlexTokenDispatcher"):
        check_layer(_layer(torch.nn.Linear(2, 2)), [MoEFlexTokenDispatcher()])


def test_te_weight_caches_are_reset_after_a_move() -> None:
    root = torch.nn.Module()
    root.fc1 = torch.nn.Linear(2, 2)
    root.fc1.is_first_microbatch = False
    root.fc1._fp8_workspaces = {"weight": torch.zeros(1)}
    root.fc2 = torch.nn.Linear(2, 2)
    assert invalidate_weight_caches(root) == 1
    assert root.fc1.is_first_microbatch is True and root.fc1._fp8_workspaces == {}


# --------------------------------------------------------------------------- items 13, 14: dispatchers


class _Flex:
    pass


def test_topk_keeps_an_unadapted_dispatcher_and_others_are_refused() -> None:
    flex = _Flex()
    assert adapt_dispatchers([flex], _ns(config=_ns(router_type="topk"), padded=False)) == []
    assert type(flex) is _Flex
    with pytest.raises(TypeError, match="alltoall and allgather"):
        adapt_dispatchers([_Flex()], _ns(config=_ns(router_type="capacity-drop"), padded=False))


def _alltoall() -> Any:
    # A bare instance of Megatron's class (no __init__: no process groups needed for the flags).
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher as Real

    return Real.__new__(Real)


@pytest.mark.parametrize("router_type, padded, varies", [
    ("topk", False, False), ("laser", False, False), ("laser", True, True),
    ("capacity-drop", False, True), ("capacity-reroute", False, True), ("expanded-drop", False, True),
])
def test_the_sync_point_moves_only_when_the_count_can_change(router_type: str, padded: bool, varies: bool) -> None:
    state = _ns(config=_ns(router_type=router_type), padded=padded)
    dispatcher = _alltoall()
    adapt_dispatchers([dispatcher], state)
    assert isinstance(dispatcher, CapawareAlltoAllTokenDispatcher)
    assert dispatcher.capaware_variable_counts is varies


# --------------------------------------------------------------------------- item 10: --capaware-no-stats / -score-check


def test_no_stats_and_no_score_check_reach_the_config() -> None:
    import argparse

    from megatron_capaware.megatron_lm.arguments import add_capaware_args, config_from_args

    parser = add_capaware_args(argparse.ArgumentParser())
    default = config_from_args(parser.parse_args(["--moe-router-type", "capacity-drop"]))
    assert default.record_stats and default.check_scores
    args = parser.parse_args(["--moe-router-type", "capacity-drop", "--capaware-scope", "local",
                              "--capaware-no-stats", "--capaware-no-score-check"])
    config = config_from_args(args)
    assert not config.record_stats and not config.check_scores


def test_no_stats_contradicts_a_stats_file(capsys) -> None:
    import argparse

    from megatron_capaware.megatron_lm.arguments import add_capaware_args

    parser = add_capaware_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(["--capaware-no-stats", "--capaware-stats-output", "s.json"])
    assert "--capaware-no-stats and --capaware-stats-output contradict" in capsys.readouterr().err


# --------------------------------------------------------------------------- item 2: MTP layers keep topk


def test_mtp_layers_are_left_to_megatrons_topk() -> None:
    """The installers, stats and placement walk moe_layers(): MTP layers are not in it (stand-in modules)."""
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    from megatron_capaware.adapters.mtp import mtp_moe_layers
    from megatron_capaware.adapters.layers import moe_layers

    class FakeMoE(BaseMoELayer):
        def __init__(self, mtp_flag: bool = False):
            torch.nn.Module.__init__(self)
            self.router = torch.nn.Module()
            self.router.is_mtp_layer = mtp_flag

        def forward(self, hidden):  # abstract in BaseMoELayer
            return hidden

    class MultiTokenPredictionBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([FakeMoE()])

    model = torch.nn.Module()
    model.decoder = torch.nn.ModuleList([FakeMoE(), FakeMoE()])
    model.mtp = MultiTokenPredictionBlock()  # 0.16: found by its container
    model.flagged = FakeMoE(mtp_flag=True)  # 0.19: found by the router's is_mtp_layer
    assert moe_layers(model) == list(model.decoder)
    assert mtp_moe_layers(model) == [model.mtp.layers[0], model.flagged]


# --------------------------------------------------------------------------- item 5: idle-rank dummy steps


def test_a_pre_019_dummy_forward_is_a_step_of_padding_rows() -> None:
    from megatron_capaware.adapters import inference_padding as ip

    class Wrapper:  # stand-in for AbstractModelInferenceWrapper (megatron-core < 0.19)
        tp_size = 2

        def dummy_forward(self):
            return self.model()

        def model(self):
            return ip.step_padding_mask(2, torch.device("cpu"))

    ip._wrap_dummy_forward(Wrapper)
    ip._wrap_dummy_forward(Wrapper)  # idempotent
    assert torch.equal(Wrapper().dummy_forward(), torch.tensor([True, True]))
    assert ip.step_padding_mask(2, torch.device("cpu")) is None  # only inside the dummy step


def test_the_dummy_step_hook_exists_where_megatron_has_the_method() -> None:
    from megatron.core import __version__ as version

    from megatron_capaware.adapters.inference_padding import install_dummy_step_hook

    try:
        from megatron.core.inference.model_inference_wrappers.abstract_model_inference_wrapper import (
            AbstractModelInferenceWrapper,
        )
        has = "dummy_forward" in AbstractModelInferenceWrapper.__dict__
    except ImportError:
        has = False
    assert install_dummy_step_hook() is has, version
