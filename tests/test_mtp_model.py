"""MTP layers on a BUILT model keep Megatron's router (issue 22, item 2).

A tiny GPT MoE (2 decoder MoE layers) with 2 multi-token-prediction layers,
built with Megatron's own ``get_gpt_decoder_block_spec`` /
``get_gpt_mtp_block_spec`` and ``GPTModel(mtp_block_spec=...)``; capacity-drop
(gamma 1) and an EP-1 placement plan (a permutation of the experts) installed
by the one installer. At core_v0.19 the MTP layers' ``layer_number`` restarts
at 1 (the collision the issue describes); at 0.16 they follow the decoder's.
"""

from __future__ import annotations

import pytest
import torch

from megatron_capaware._compat.launcher import run_distributed
from tests.helpers.mtp_workers import mtp_model_worker

pytestmark = pytest.mark.multirank  # one spawned rank (Megatron's parallel state)


def test_mtp_layers_of_a_built_model_keep_megatrons_router() -> None:
    out = run_distributed(mtp_model_worker, 1, {"mtp_layers": 2, "router_type": "capacity-drop",
                                                "placement": True}, timeout_s=400)[0]
    # The model really has MTP MoE layers, inside the MTP block, numbered as this Megatron numbers them.
    assert out["decoder_moe"] == [1, 2] and len(out["mtp_moe"]) == 2 and out["mtp_moe_in_block"], out
    # Decoder MoE layers swapped, each with its own state and its module name as identity.
    assert out["decoder_routers"] == ["CapawareRouter"] * 2
    assert len(set(out["decoder_router_ids"])) == 2
    assert out["state_names"] == ["decoder.layers.0.mlp", "decoder.layers.1.mlp"]
    # MTP layers keep Megatron's own TopKRouter (not a CapawareRouter routing top-k).
    assert out["mtp_router_is_megatrons"] == [True, True], out["mtp_routers"]
    # No collision: stats, layouts and the plan in effect cover the decoder layers once each; one
    # forward recorded one call per decoder layer (an MTP layer under number 1 or 2 would add one).
    assert out["stats_layers"] == out["layout_layers"] == out["current_plan_layers"] == [1, 2]
    assert out["stats_calls"] == {1: 1, 2: 1}, out["stats_calls"]
    assert out["placement_checked"]  # check_model passed for the installed plan and the plan in effect
    # Capacity changed the decoder (so the MTP block's input changed) ...
    assert out["mtp_input_changed"]
    assert not torch.equal(out["capaware_main"], out["vanilla_main"])
    # ... and the MTP heads compute exactly what the model without the package computes on that input.
    for mine, megatrons in zip(out["capaware_mtp_logits"], out["vanilla_mtp_on_capaware_inputs"]):
        assert torch.isfinite(mine).all()
        assert torch.equal(mine, megatrons)
