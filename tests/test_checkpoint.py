"""Checkpoint save / load across expert-parallel sizes, and its error messages.

A tiny random MoE is saved at EP=2 (two gloo processes) and loaded at EP=1,
2 and 4; every load must give the saver's logits. The multi-process parts
run ``tests/helpers/_ckpt_worker.py`` under torchrun so that this pytest process
never initialises torch.distributed or Megatron's groups.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_capaware.models import checkpoint
from tests.helpers.megatron_training_support import subprocess_env

WORKER = Path(__file__).parent / "helpers" / "_ckpt_worker.py"


def run_worker(nproc: int, *args: str, timeout: float = 150) -> None:
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise AssertionError(f"worker failed ({' '.join(args)}), exit {proc.returncode}:\n{tail}")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random MoE checkpoint saved at EP=2, and the saver's logits."""
    root = tmp_path_factory.mktemp("ckpt")
    ckpt = root / "tiny-moe"
    saved = root / "saved.pt"
    run_worker(2, "save", "--dir", str(ckpt), "--out", str(saved))
    return ckpt, torch.load(saved)


def test_layout_written(tiny_ckpt):
    ckpt, _ = tiny_ckpt
    assert (ckpt / checkpoint.TRACKER_FILE).read_text().strip() == "release"
    assert (ckpt / checkpoint.RELEASE_DIR / "metadata.json").is_file()
    args = checkpoint.load_model_args(ckpt)
    assert args.num_moe_experts == 4 and args.moe_router_topk == 2
    assert checkpoint.checkpoint_weights_dir(ckpt) == ckpt / checkpoint.RELEASE_DIR


@pytest.mark.multirank
@pytest.mark.parametrize("ep", [1, 2, 4])
def test_load_at_expert_parallel_sizes(tiny_ckpt, tmp_path, ep):
    ckpt, saved = tiny_ckpt
    out = tmp_path / f"ep{ep}.pt"
    run_worker(ep, "load", "--dir", str(ckpt), "--out", str(str(out)))
    got = torch.load(out)
    assert got["ep"] == ep
    assert got["logits"].shape == saved["logits"].shape
    diff = (got["logits"] - saved["logits"]).abs().max().item()
    assert diff <= 1e-5, f"EP={ep}: logits differ from the saver's (EP=2) by {diff}"
    assert math.isclose(got["loss"], saved["loss"], rel_tol=0, abs_tol=1e-6)


@pytest.mark.multirank
def test_mismatched_architecture_is_a_clear_error(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt
    out = tmp_path / "mismatch.json"
    run_worker(1, "mismatch", "--dir", str(ckpt), "--out", str(out))
    result = json.loads(out.read_text())
    assert result["args"] is not None, "loading into a model with other args did not fail"
    assert "num_moe_experts" in result["args"] and "different architecture" in result["args"]
    assert result["shapes"] is not None, "loading weights of other shapes did not fail"
    assert "cannot load" in result["shapes"] and "shape mismatch" in result["shapes"]
    assert "Traceback" not in result["shapes"]


def test_missing_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.checkpoint_weights_dir(missing)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_model(missing)


def test_missing_model_description_is_a_clear_error(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt
    import shutil

    copy = tmp_path / "no-args"
    shutil.copytree(ckpt, copy)
    (copy / checkpoint.MODEL_ARGS_FILE).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="capaware_model.json is missing"):
        checkpoint.load_model(copy)
    with pytest.raises(checkpoint.CheckpointError, match="capaware_model.json is missing"):
        checkpoint.load_model_args(copy)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="not a Megatron dist checkpoint"):
        checkpoint.checkpoint_weights_dir(tmp_path)
    (tmp_path / checkpoint.TRACKER_FILE).write_text("release\n")
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.checkpoint_weights_dir(tmp_path)


def test_bundled_reference_model_smoke(tmp_path):
    """The bundled model loads at EP=1 and its held-out loss on a short slice is sane."""
    from megatron_capaware.models import reference_models

    try:
        bundle = reference_models.reference_model_dir()
    except FileNotFoundError:
        pytest.skip("no bundled reference model in this checkout")
    recorded = reference_models.provenance()["results"]["heldout_bf16"]["loss"]
    out = tmp_path / "bundle.json"
    run_worker(1, "bundle", "--dir", str(bundle), "--out", str(out), "--windows", "8")
    got = json.loads(out.read_text())
    assert got["vocab"] == got["tokenizer_vocab"]
    assert math.isfinite(got["loss"])
    # A slice differs from the whole text; anything near a random model (ln V) fails.
    assert got["loss"] < 2 * recorded, (got, recorded)
    assert got["loss"] < 0.8 * math.log(got["vocab"]), got
