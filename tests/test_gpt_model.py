"""A GPT MoE (megatron-core GPTModel) with capaware routers, at EP=2 on gloo."""

from __future__ import annotations

import pytest
import torch

from megatron_capaware._compat.launcher import run_distributed
from tests.helpers.mp_workers import gpt_worker

pytestmark = pytest.mark.multirank

ROUTERS = [
    dict(router_type="topk"),
    dict(router_type="capacity-drop", gamma=1.0),
    dict(router_type="capacity-reroute", gamma=1.0, reroute_rounds=2),
    dict(router_type="expanded-drop", gamma=1.0),
    dict(router_type="laser", laser_eps_high=0.8, laser_t_fix=0.3, laser_pool=4),
]


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_gpt_moe_with_swapped_routers_at_ep2(tmp_path, dispatcher: str) -> None:
    spec = dict(ep=2, dispatcher=dispatcher, ckpt=str(tmp_path / "ckpt"), routers=ROUTERS)
    results = run_distributed(gpt_worker, 2, spec, timeout_s=420)
    for rank, out in enumerate(results):
        vanilla = out["vanilla"]
        assert torch.equal(out["topk"], vanilla), f"rank {rank}: topk adapter changed the logits"
        for key, logits in out.items():
            if isinstance(logits, torch.Tensor):
                assert torch.isfinite(logits).all(), key
        for cfg in ("capacity-drop(gamma=1)", "capacity-reroute(gamma=1,rounds=2)", "expanded-drop(gamma=1)"):
            assert not torch.equal(out[cfg], vanilla), f"{cfg} had no effect at gamma=1"
            assert out[cfg + ":layers"] == [1, 2]
        # Same state-dict keys: every checkpoint loads unchanged, both ways.
        assert out["state_keys_vanilla"] == out["state_keys_capaware"]
        assert out["spec_built_router_types"] == ["CapawareRouter"]
        assert torch.equal(out["spec_built"], out["capacity-drop(gamma=1)"])
        assert torch.equal(out["roundtrip"], vanilla)


def test_checkpoint_loads_across_norm_key_spellings(tmp_path) -> None:
    """A local-spec checkpoint loads into a model with TE-style (separate) norm keys."""
    from tests.helpers.mp_workers import te_style_keys_worker

    out = run_distributed(te_style_keys_worker, 1, str(tmp_path / "ckpt"), timeout_s=300)[0]
    assert any("pre_mlp_layernorm.weight" in k for k in out["te_style_keys"]), "test must use the other spelling"
    assert out["same_logits"]
