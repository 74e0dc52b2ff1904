"""Megatron-LM's own inference scripts, run to the end on CPU (needs a Megatron-LM clone).

With ``MEGATRON_LM_DIR`` pointing at a Megatron-LM clone (a work tree or a bare
clone) that has the refs the patches target (``core_v0.19.0`` and main at
``d98e8a64dd``), each test extracts the tree at the ref (``git archive``) and
runs, on the tests' tiny checkpoint:

* ``python -m megatron_capaware.launch examples/inference/advanced/gpt_static_inference.py``:
  generation, the script's own last line (``torch.cuda.memory_stats()``), the
  load report and ``--capaware-stats-output``;
* the same at EP = 2 (``torchrun --nproc-per-node 2``): the same greedy text;
* the same script with ``patches/`` applied (``python SCRIPT``): the same
  generation and the same stats JSON as the launcher;
* ``tools/run_text_generation_server.py`` through the launcher on localhost:
  a ``PUT /api`` gets the launcher's greedy text back; SIGINT ends the serving
  loop and the load report is written.

Without ``MEGATRON_LM_DIR``, the ref, or Megatron-LM's own requirements for
these scripts (``pybind11`` for its dataset helpers, ``simpy`` for the
example's request builder, ``flask`` / ``flask_restful`` for the server) the
tests skip, saying which.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from megatron_capaware._compat.launcher import free_port, run_distributed
from tests.helpers.cli_workers import make_tiny_checkpoint
from tests.helpers.megatron_training_support import ROOT, megatron_lm_checkout, needs_megatron_training, subprocess_env
from tests.test_patches import PATCHES, REFS, patch_tag, patched_files

pytestmark = needs_megatron_training

STATIC = "examples/inference/advanced/gpt_static_inference.py"
SERVER = "tools/run_text_generation_server.py"
PROMPT = "To be, or not to be"
TOKENS = 8
ROUTER = ["--moe-router-type", "capacity-drop", "--capaware-gamma", "1.0"]


def _need_modules(*names: str) -> None:
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        pytest.skip(f"Megatron-LM's script needs {', '.join(missing)} (pip install "
                    f"{' '.join(m.replace('_', '-') for m in missing)})")


@pytest.fixture(scope="module")
def megatron_lm_dir() -> Path:
    return megatron_lm_checkout("run its scripts")


_TREES: Dict[str, Path] = {}


@pytest.fixture(scope="module")
def trees(megatron_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``tree(ref)``: Megatron-LM's megatron/, examples/ and tools/ at ``ref`` (extracted once)."""

    def tree(ref: str) -> Path:
        if ref not in _TREES:
            has = subprocess.run(["git", "-C", str(megatron_lm_dir), "rev-parse", "--verify", "--quiet",
                                  f"{ref}^{{commit}}"], capture_output=True, text=True)
            if has.returncode != 0:
                pytest.skip(f"MEGATRON_LM_DIR={megatron_lm_dir} has no {ref} (git fetch --tags there)")
            dest = tmp_path_factory.mktemp(f"megatron-lm-{ref}")
            archive = subprocess.Popen(["git", "-C", str(megatron_lm_dir), "archive", ref, "megatron",
                                        "examples", "tools"], stdout=subprocess.PIPE)
            subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
            assert archive.wait() == 0, f"git archive {ref} failed"
            _TREES[ref] = dest
        return _TREES[ref]

    return tree


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scripts") / "tiny"
    run_distributed(make_tiny_checkpoint, 1, {"ckpt": str(root)}, timeout_s=240)
    return root


def _env(tree: Path) -> Dict[str, str]:
    # The checkout's megatron/ first (its megatron.inference, megatron.post_training), then this repo.
    return subprocess_env({"PYTHONPATH": os.pathsep.join([str(tree), str(ROOT)])})


def _run(args: List[str], tree: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=str(tree), env=_env(tree), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _generated(stdout: str) -> str:
    match = re.search(r"^0/1 \[1\]\. " + re.escape(PROMPT) + r" \.\.\. (.*)$", stdout, re.M)
    assert match, f"no generation line in:\n{stdout[-3000:]}"
    return match.group(1)


def _check_stats(path: Path) -> dict:
    stats = json.loads(path.read_text())
    assert stats["format"] == "capaware-load-stats/1" and stats["router"] == "capacity-drop(gamma=1)"
    assert set(stats["layers"]) == {"1", "2"}
    assert all(layer["calls"] > 0 for layer in stats["layers"].values())
    return stats


def _static_args(ckpt: Path, out: Path) -> List[str]:
    return [STATIC, "--load", str(ckpt), *ROUTER, "--prompts", PROMPT, "--num-tokens-to-generate",
            str(TOKENS), "--capaware-stats-output", str(out)]


_LAUNCHED: Dict[str, tuple] = {}


def _launched_static(ref: str, trees, ckpt: Path, tmp_path: Path) -> tuple:
    if ref not in _LAUNCHED:
        _need_modules("pybind11", "simpy")
        tree = trees(ref)
        out = tmp_path / "launched.json"
        result = _run([sys.executable, "-m", "megatron_capaware.launch", *_static_args(ckpt, out)], tree)
        _LAUNCHED[ref] = (result, out)
    return _LAUNCHED[ref]


@pytest.mark.parametrize("ref", sorted(REFS))
def test_launcher_runs_gpt_static_inference_to_the_end(ref, trees, ckpt, tmp_path) -> None:
    result, out = _launched_static(ref, trees, ckpt, tmp_path)
    text = _generated(result.stdout)
    assert len(text.split()) > 0
    # The script's own last line (torch.cuda.memory_stats() on CPU: zero), then our report.
    assert re.search(r"^static \| cg 0 \| <user prompts> \| reqs 1 .* mem 0\.0/0\.0", result.stdout, re.M), (
        result.stdout[-2000:])
    assert "megatron-capaware load stats: router capacity-drop(gamma=1), EP=1, 2 MoE layers" in result.stdout
    if not torch.cuda.is_available():  # the engine the routers ran in is said, not left to a filtered warning
        assert ("megatron-capaware: Megatron's StaticInferenceEngine runs the legacy static engine, not the "
                "dynamic one (it could not build it: pin_memory=True") in result.stdout
    stats = _check_stats(out)
    # One call per generated token (prefill, then TOKENS - 1 decode steps) in each layer.
    assert {layer["calls"] for layer in stats["layers"].values()} == {TOKENS}


@pytest.mark.multirank
@pytest.mark.parametrize("ref", sorted(REFS))
def test_launcher_runs_gpt_static_inference_at_ep2(ref, trees, ckpt, tmp_path) -> None:
    _need_modules("pybind11", "simpy")
    tree = trees(ref)
    out = tmp_path / "ep2.json"
    result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "megatron_capaware.launch", *_static_args(ckpt, out), "--expert-model-parallel-size", "2"],
                  tree, timeout=400)
    launched, _ = _launched_static(ref, trees, ckpt, tmp_path)
    assert _generated(result.stdout) == _generated(launched.stdout)  # greedy: EP does not change the text
    assert "megatron-capaware load stats: router capacity-drop(gamma=1), EP=2, 2 MoE layers" in result.stdout
    stats = _check_stats(out)
    assert stats["expert_parallel"] == 2 and stats["world_size"] == 2
    assert {layer["calls"] for layer in stats["layers"].values()} == {TOKENS}


@pytest.mark.parametrize("patch", [p for p in PATCHES if STATIC in patched_files(p)],
                         ids=lambda p: p.name)
def test_patched_gpt_static_inference_matches_the_launcher(patch, trees, ckpt, tmp_path) -> None:
    ref = patch_tag(patch)
    launched, launched_out = _launched_static(ref, trees, ckpt, tmp_path)
    tree = trees(ref)
    script = tree / STATIC
    original = script.read_text()
    try:
        applied = subprocess.run(["git", "apply", str(patch)], cwd=str(tree), capture_output=True, text=True)
        assert applied.returncode == 0, applied.stderr
        out = tmp_path / "patched.json"
        result = _run([sys.executable, *_static_args(ckpt, out)], tree)
    finally:
        script.write_text(original)
    assert "megatron-capaware: routing with capacity-drop(gamma=1) in 2 MoE layers" in result.stdout
    assert _generated(result.stdout) == _generated(launched.stdout)
    patched, launched_stats = _check_stats(out), _check_stats(launched_out)
    assert patched["layers"] == launched_stats["layers"]


def _put(port: int, payload: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api", data=json.dumps(payload).encode(),
                                     method="PUT", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("ref", sorted(REFS))
def test_server_through_the_launcher_answers_a_put_on_cpu(ref, trees, ckpt, tmp_path) -> None:
    _need_modules("pybind11", "flask", "flask_restful")
    tree = trees(ref)
    port, out = free_port(), tmp_path / "server.json"
    log = (tmp_path / "server.log").open("w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "megatron_capaware.launch", SERVER, "--load", str(ckpt), "--micro-batch-size", "1",
         *ROUTER, "--port", str(port), "--capaware-stats-output", str(out)],
        cwd=str(tree), env=_env(tree), stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, reply = time.monotonic() + 240, None
        while reply is None:
            assert server.poll() is None, f"the server exited ({server.returncode}):\n{_tail(log)}"
            assert time.monotonic() < deadline, f"the server did not answer in 240 s:\n{_tail(log)}"
            try:
                reply = _put(port, {"prompts": [PROMPT], "tokens_to_generate": TOKENS, "top_k": 1})
            except OSError:  # not listening yet
                time.sleep(1)
        (text,) = reply["text"]
        assert text.startswith(PROMPT) and len(reply["tokens"][0]) > TOKENS
        server.send_signal(signal.SIGINT)  # werkzeug stops serving; the script leaves its loop
        assert server.wait(timeout=120) == 0, _tail(log)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    output = _tail(log)
    assert "megatron-capaware: routing with capacity-drop(gamma=1)" in output, output
    assert "megatron-capaware load stats: router capacity-drop(gamma=1), EP=1, 2 MoE layers" in output, output
    _check_stats(out)
    if _need_static_reference():  # greedy: the same continuation as the static script's
        launched, _ = _launched_static(ref, trees, ckpt, tmp_path)
        assert text == PROMPT + _generated(launched.stdout)


def _need_static_reference() -> bool:
    return all(importlib.util.find_spec(n) is not None for n in ("pybind11", "simpy"))


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-6000:]
