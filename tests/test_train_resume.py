"""scripts/train_reference.py: a stopped run resumed from its last checkpoint is bit-for-bit the uninterrupted run.

A tiny fine-grained preset (``tiny-fine-test``: dense first layer, 16 experts
top-4, a shared expert, dropout on) trains for 8 steps at EP=2 on two gloo
processes, on a small corpus made here from the bundled tokenizer and texts.
Run A goes straight through. Run B saves every 3 steps and is halted at step
5 (as a killed run: steps 4 and 5 are lost), then ``--resume`` continues from
step 3. Every step's training loss (full precision), the learning rates and
the held-out evaluations must be identical, which needs the weights, AdamW's
state, the dropout RNG states and the data sampler's position to be restored.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.megatron_training_support import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_reference.py"

pytestmark = pytest.mark.multirank

HPARAMS = [
    "--preset", "tiny-fine-test", "--seq-len", "64", "--global-batch", "8", "--micro-batch", "2",
    "--steps", "8", "--warmup", "2", "--log-every", "1", "--eval-every", "4", "--eval-windows", "4",
    "--eval-batch", "4", "--ep", "2", "--save-every-s", "0",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron_capaware.models import reference_models

    try:
        tok = reference_models.load_tokenizer()
    except FileNotFoundError:
        pytest.skip("no bundled tokenizer in this checkout")
    root = tmp_path_factory.mktemp("corpus")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text(reference_models.tokenizer_path().read_text())
    train = reference_models.CALIBRATION_TEXT.read_text(encoding="utf-8")[:60000]
    held = reference_models.HELDOUT_TEXT.read_text(encoding="utf-8")[:8000]
    np.asarray(tok.encode(train).ids, dtype=np.uint16).tofile(root / "train.bin")
    np.asarray(tok.encode(held).ids, dtype=np.uint16).tofile(root / "heldout.bin")
    return root


def train(corpus: Path, work: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           "train", *HPARAMS, "--corpus-dir", str(corpus), "--work-dir", str(work), *extra]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"train failed, exit {proc.returncode}:\n{out[-4000:]}")
    return out


def state(work: Path) -> dict:
    return json.loads((work / "train_state.json").read_text())


def test_resume_is_bit_for_bit(corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(corpus, a)
    out = train(corpus, b, "--save-every-steps", "3", "--halt-at-step", "5")
    assert "halted at step 5" in out and not (b / "train_state.json").exists()
    assert json.loads((b / "resume" / "state.json").read_text())["step"] == 3
    out = train(corpus, b, "--save-every-steps", "3", "--resume")
    assert "resumed from" in out and "at step 3" in out

    sa, sb = state(a), state(b)
    assert sa["steps"] == sb["steps"] == 8
    assert len(sa["loss_trace"]) == 8
    # The losses move (training happens) and match exactly, step by step.
    assert sa["loss_trace"][0] != sa["loss_trace"][-1]
    assert sb["loss_trace"] == sa["loss_trace"]
    assert sb["lr_trace"] == sa["lr_trace"]
    evals = lambda s: [h for h in s["history"] if "eval_loss" in h]  # noqa: E731
    assert evals(sb) == evals(sa) and len(evals(sa)) == 2
    assert sb["resumes"] == 1 and [g["start_step"] for g in sb["segments"]] == [0, 3]
    assert sb["segments"][0]["end_step"] == 3 and sb["segments"][0]["last_heartbeat_step"] == 5


def test_resume_refuses_another_configuration(corpus, tmp_path):
    work = tmp_path / "w"
    train(corpus, work, "--save-every-steps", "2", "--halt-at-step", "3")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           "train", *HPARAMS, "--lr", "0.01", "--corpus-dir", str(corpus), "--work-dir", str(work), "--resume"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    assert "written by another configuration" in proc.stdout + proc.stderr


def test_resume_without_checkpoint_is_an_error(corpus, tmp_path):
    cmd = [sys.executable, str(SCRIPT), "train", *HPARAMS[:-4], "--ep", "1", "--save-every-s", "0",
           "--corpus-dir", str(corpus), "--work-dir", str(tmp_path / "none"), "--resume"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    assert "no training checkpoint" in proc.stdout + proc.stderr
