"""The fine-grained architecture (second reference model) across expert-parallel sizes.

A tiny random model with the features of ``shakespeare-moe-fine-64x8`` (a
dense first layer, 16 routed experts top-4, one shared expert, softmax over
all experts without renormalising the top-k) is saved at EP=2 and loaded at
EP=1, 2, 4 and 8 (two experts per rank): every load must give the saver's
logits and loss. ``tests/test_checkpoint.py`` covers the Mixtral-style
architecture the same way; this reuses its worker.

The bundled fine-grained model, when present, is loaded at EP=1 and its loss
on the first held-out windows checked against its provenance.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_capaware.models import checkpoint
from tests.test_checkpoint import run_worker

FINE_MODEL = "shakespeare-moe-fine-64x8"


@pytest.fixture(scope="module")
def fine_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt-fine")
    ckpt = root / "tiny-fine"
    saved = root / "saved.pt"
    run_worker(2, "save", "--arch", "fine", "--dir", str(ckpt), "--out", str(saved))
    return ckpt, torch.load(saved)


def test_fine_architecture_written(fine_ckpt):
    ckpt, _ = fine_ckpt
    args = checkpoint.load_model_args(ckpt)
    assert (args.num_moe_experts, args.moe_router_topk) == (16, 4)
    assert args.moe_shared_expert_intermediate_size == 24
    assert list(args.moe_layer_freq) == [0, 1]
    assert args.moe_router_pre_softmax is True


@pytest.mark.multirank
@pytest.mark.parametrize("ep", [1, 2, 4, 8])
def test_fine_load_at_expert_parallel_sizes(fine_ckpt, tmp_path, ep):
    ckpt, saved = fine_ckpt
    out = tmp_path / f"ep{ep}.pt"
    run_worker(ep, "load", "--dir", str(ckpt), "--out", str(out), timeout=300)
    got = torch.load(out)
    assert got["ep"] == ep
    assert got["logits"].shape == saved["logits"].shape
    diff = (got["logits"] - saved["logits"]).abs().max().item()
    assert diff <= 1e-5, f"EP={ep}: logits differ from the saver's (EP=2) by {diff}"
    assert math.isclose(got["loss"], saved["loss"], rel_tol=0, abs_tol=1e-6)


def test_bundled_fine_model_smoke(tmp_path):
    """The bundled fine-grained model loads at EP=1 and its held-out loss on a slice is sane."""
    from megatron_capaware.models import reference_models

    try:
        bundle = reference_models.reference_model_dir(FINE_MODEL)
    except FileNotFoundError:
        pytest.skip(f"{FINE_MODEL} is not bundled in this checkout")
    prov = reference_models.provenance(FINE_MODEL)
    recorded = prov["results"]["heldout_bf16"]["loss"]
    # The bundled verify step: the same held-out loss at every EP size it ran.
    by_ep = prov["results"]["heldout_by_expert_parallel_size"]
    assert {"1", "2", "4", "8"} <= set(by_ep), sorted(by_ep)
    assert len({v["loss"] for v in by_ep.values()}) == 1, by_ep
    out = tmp_path / "bundle.json"
    run_worker(1, "bundle", "--dir", str(bundle), "--out", str(out), "--windows", "8")
    got = json.loads(out.read_text())
    assert got["vocab"] == got["tokenizer_vocab"]
    assert math.isfinite(got["loss"])
    assert got["loss"] < 2 * recorded, (got, recorded)
    assert got["loss"] < 0.8 * math.log(got["vocab"]), got


def test_reference_models_resolve_by_name(tmp_path):
    from megatron_capaware.models import reference_models as rm

    default_ckpt, text = rm.checkpoint_and_text(None, None, rm.HELDOUT_TEXT)
    assert default_ckpt == rm.reference_model_dir() == rm.REFERENCE_MODELS_ROOT / rm.DEFAULT_MODEL
    assert text == rm.HELDOUT_TEXT
    for name in rm.available_models():
        ckpt, _ = rm.checkpoint_and_text(None, None, rm.HELDOUT_TEXT, model=name)
        assert ckpt == rm.reference_model_dir(name) and ckpt.name == name
        assert rm.tokenizer_path(name).is_file()
    assert rm.checkpoint_and_text(tmp_path, None, rm.HELDOUT_TEXT)[0] == tmp_path
    with pytest.raises(ValueError, match="not both"):
        rm.checkpoint_and_text(tmp_path, None, rm.HELDOUT_TEXT, model=rm.DEFAULT_MODEL)
    with pytest.raises(FileNotFoundError, match="available"):
        rm.reference_model_dir("no-such-model")
