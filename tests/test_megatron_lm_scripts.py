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

The dynamic path (what Megatron recommends; Megatron-LM at ``core_v0.19.0``),
on the bundled model (real text, so a routing change shows in it) with its
bundled placement plan ``placement-ep2-r2.json``:

* ``examples/inference/offline_inference.py`` (``MegatronLLM``) through the
  launcher: under ``--moe-router-type topk`` (installed, stats on) the text of
  every prompt equals the launcher's run with no capaware flag (Megatron's own
  router), at EP 1 and at EP 2 with the plan; capacity-drop at gamma 1 changes
  it (the comparison sees routing); at EP 2 (``torchrun``, ``--use-coordinator``)
  with capacity-drop and the plan it runs to the end with the load report;
* the same script with ``patches/`` applied (``python SCRIPT``), at both refs:
  the launcher's text and per-layer stats;
* ``examples/inference/advanced/gpt_dynamic_inference.py`` at EP 2 with a
  router and the plan;
* ``examples/inference/launch_inference_server.py`` at EP 2 with a router and
  the plan: an OpenAI-compatible ``POST /v1/completions`` round trip on
  localhost, then SIGINT to the ranks: every rank exits 0 and the load report
  is written.

Without ``MEGATRON_LM_DIR``, the ref, or Megatron-LM's own requirements for
these scripts (``pybind11`` for its dataset helpers, ``simpy`` for the
example's request builder, ``flask`` / ``flask_restful`` for the static server,
``quart`` / ``hypercorn`` for the dynamic one) the tests skip, saying which.
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
import urllib.error
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



# -- the dynamic path: offline_inference.py, gpt_dynamic_inference.py, launch_inference_server.py --------------

DYNAMIC_REF = "core_v0.19.0"
OFFLINE = "examples/inference/offline_inference.py"
DYNAMIC = "examples/inference/advanced/gpt_dynamic_inference.py"
SERVE = "examples/inference/launch_inference_server.py"
DYNAMIC_PROMPTS = ["ROMEO:", "KING:", "First Citizen:"]
DYNAMIC_TOKENS = 16
#: A KV cache sized for the bundled model on CPU (Megatron-LM's default is a 40 GB buffer).
ENGINE = ["--micro-batch-size", "1", "--inference-dynamic-batching-buffer-size-gb", "0.05",
          "--inference-dynamic-batching-block-size", "16", "--inference-dynamic-batching-max-requests", "4"]
#: EP 2 on the dynamic engine: each rank steps its own requests, so the token counts differ across
#: ranks; Megatron-LM's default allgather dispatcher needs equal ones (gloo refuses; NCCL would too).
EP2 = ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]


def _bundled() -> Path:
    from megatron_capaware.models.reference_models import reference_model_dir

    return reference_model_dir()


def _plan() -> str:
    return str(_bundled() / "placement-ep2-r2.json")


def _torchrun(n: int) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]


def _texts(stdout: str) -> Dict[str, str]:
    """``{prompt: generated text}`` from the scripts' "Unique prompts + outputs" block (rank 0)."""
    pairs = re.findall(r"^\d+/\d+\[n \d+, l \d+\] (.*)\n\s+>>>> \[n \d+, \d+ tokens, hash \w+\] ?(.*)$", stdout, re.M)
    assert pairs, f"no prompt/output block in:\n{stdout[-3000:]}"
    return dict(pairs)


def _need_dynamic(trees) -> Path:
    _need_modules("pybind11", "simpy")
    return trees(DYNAMIC_REF)


_OFFLINE: Dict[str, subprocess.CompletedProcess] = {}


def _offline(key: str, tree: Path, flags: List[str], ep: int = 1) -> subprocess.CompletedProcess:
    """offline_inference.py through the launcher (cached per ``key``)."""
    if key not in _OFFLINE:
        head = [sys.executable] if ep == 1 else [*_torchrun(ep)]
        extra = [] if ep == 1 else [*EP2, "--use-coordinator"]  # MegatronLLM needs the coordinator at EP > 1
        _OFFLINE[key] = _run([*head, "-m", "megatron_capaware.launch", OFFLINE, "--load", str(_bundled()), *ENGINE,
                              "--prompts", *DYNAMIC_PROMPTS, "--num-tokens-to-generate", str(DYNAMIC_TOKENS),
                              *extra, *flags], tree, timeout=400)
    return _OFFLINE[key]


def _check_dynamic_stats(path: Path, router: str, ep: int) -> dict:
    stats = json.loads(path.read_text())
    assert stats["format"] == "capaware-load-stats/1" and stats["router"] == router
    assert stats["expert_parallel"] == ep and stats["world_size"] == ep
    assert set(stats["layers"]) == {"1", "2", "3", "4"}
    assert all(layer["calls"] > 0 for layer in stats["layers"].values())
    return stats


@pytest.fixture(scope="module")
def dyn_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Outputs of the cached dynamic-path runs (shared by the tests that compare with them)."""
    return tmp_path_factory.mktemp("dynamic")


def _offline_drop_ep1(tree: Path, dyn_out: Path, ref: str = DYNAMIC_REF) -> subprocess.CompletedProcess:
    """capacity-drop at EP 1 through the launcher, from the tree at ``ref`` (its stats in ``dyn_out``)."""
    return _offline(f"drop-ep1-{ref}", tree, [*ROUTER, "--capaware-stats-output", str(dyn_out / f"drop-ep1-{ref}.json")])


@pytest.mark.dynamic_engine
def test_offline_inference_topk_text_equals_megatron_without_the_package(trees, tmp_path, dyn_out) -> None:
    tree = _need_dynamic(trees)
    megatron = _texts(_offline("megatron", tree, []).stdout)  # no capaware flag: nothing is swapped
    assert set(megatron) == set(DYNAMIC_PROMPTS) and all(megatron.values())
    out = tmp_path / "topk.json"
    topk = _offline("topk", tree, ["--moe-router-type", "topk", "--capaware-stats-output", str(out)])
    assert "megatron-capaware load stats: router topk, EP=1, 4 MoE layers" in topk.stdout
    assert _texts(topk.stdout) == megatron
    _check_dynamic_stats(out, "topk", 1)
    # The comparison sees routing: capacity at gamma 1 changes some continuation.
    dropped = _offline_drop_ep1(tree, dyn_out)
    assert _texts(dropped.stdout) != megatron


@pytest.mark.dynamic_engine
@pytest.mark.parametrize("ref", sorted(REFS))
def test_patched_offline_inference_matches_the_launcher(ref, trees, dyn_out, tmp_path) -> None:
    """patches/*-offline_inference.patch at each ref: the launcher's text and per-layer stats (EP 1)."""
    (patch,) = [p for p in PATCHES if OFFLINE in patched_files(p) and patch_tag(p) == ref]
    _need_modules("pybind11", "simpy")
    tree = trees(ref)
    # The scripts are the same at both refs, the megatron/core they run is not: compare at the same ref.
    launched = _offline_drop_ep1(tree, dyn_out, ref)
    script = tree / OFFLINE
    original = script.read_text()
    try:
        applied = subprocess.run(["git", "apply", str(patch)], cwd=str(tree), capture_output=True, text=True)
        assert applied.returncode == 0, applied.stderr
        out = tmp_path / "patched.json"
        result = _run([sys.executable, OFFLINE, "--load", str(_bundled()), *ENGINE, "--prompts", *DYNAMIC_PROMPTS,
                       "--num-tokens-to-generate", str(DYNAMIC_TOKENS), *ROUTER, "--capaware-stats-output",
                       str(out)], tree, timeout=400)
    finally:
        script.write_text(original)
    assert "megatron-capaware: routing with capacity-drop(gamma=1) in 4 MoE layers" in result.stdout
    assert _texts(result.stdout) == _texts(launched.stdout)
    patched = _check_dynamic_stats(out, "capacity-drop(gamma=1)", 1)
    launched_stats = _check_dynamic_stats(dyn_out / f"drop-ep1-{ref}.json", "capacity-drop(gamma=1)", 1)
    assert patched["layers"] == launched_stats["layers"]


@pytest.mark.multirank
@pytest.mark.dynamic_engine
def test_offline_inference_topk_at_ep2_with_the_plan_equals_megatron(trees, tmp_path) -> None:
    tree = _need_dynamic(trees)
    out = tmp_path / "topk-ep2.json"
    placed = _offline("topk-ep2-plan", tree, ["--moe-router-type", "topk", "--capaware-placement", _plan(),
                                              "--capaware-stats-output", str(out)], ep=2)
    assert "megatron-capaware load stats: router topk, EP=2, 4 MoE layers" in placed.stdout
    assert _texts(placed.stdout) == _texts(_offline("megatron", tree, []).stdout)
    _check_dynamic_stats(out, "topk", 2)


@pytest.mark.multirank
@pytest.mark.dynamic_engine
def test_offline_inference_at_ep2_with_a_router_and_a_plan(trees, tmp_path) -> None:
    tree = _need_dynamic(trees)
    out = tmp_path / "offline-ep2.json"
    result = _offline("drop-ep2-plan", tree, [*ROUTER, "--capaware-placement", _plan(),
                                              "--capaware-stats-output", str(out)], ep=2)
    texts = _texts(result.stdout)
    assert set(texts) == set(DYNAMIC_PROMPTS) and all(texts.values())
    assert re.search(r"… steps: \d+ … capture --", result.stdout), result.stdout[-2000:]  # the script's last line
    assert "megatron-capaware load stats: router capacity-drop(gamma=1), EP=2, 4 MoE layers" in result.stdout
    stats = _check_dynamic_stats(out, "capacity-drop(gamma=1)", 2)
    assert stats["aggregate"]["dropped_frac"] > 0


@pytest.mark.multirank
@pytest.mark.dynamic_engine
def test_gpt_dynamic_inference_at_ep2_with_a_router_and_a_plan(trees, tmp_path) -> None:
    tree = _need_dynamic(trees)
    out = tmp_path / "dynamic-ep2.json"
    result = _run([*_torchrun(2), "-m", "megatron_capaware.launch", DYNAMIC, "--load", str(_bundled()), *ENGINE,
                   "--prompts", *DYNAMIC_PROMPTS, "--num-tokens-to-generate", str(DYNAMIC_TOKENS), *EP2, *ROUTER,
                   "--capaware-placement", _plan(), "--capaware-stats-output", str(out)], tree, timeout=400)
    texts = _texts(result.stdout)
    assert set(texts) == set(DYNAMIC_PROMPTS) and all(texts.values())
    assert re.search(r"… steps: \d+ … capture --", result.stdout), result.stdout[-2000:]
    assert "megatron-capaware load stats: router capacity-drop(gamma=1), EP=2, 4 MoE layers" in result.stdout
    _check_dynamic_stats(out, "capacity-drop(gamma=1)", 2)


def _post_completion(port: int, prompt: str, tokens: int, timeout: float = 120) -> dict:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "top_k": 1}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.mark.multirank
@pytest.mark.dynamic_engine
def test_inference_server_completions_round_trip_at_ep2_with_a_router_and_a_plan(trees, tmp_path) -> None:
    tree = _need_dynamic(trees)
    _need_modules("quart", "hypercorn")
    psutil = pytest.importorskip("psutil")
    port, out = free_port(), tmp_path / "serve.json"
    log = (tmp_path / "serve.log").open("w+")
    server = subprocess.Popen(
        [*_torchrun(2), "-m", "megatron_capaware.launch", SERVE, "--load", str(_bundled()), *ENGINE, *EP2, *ROUTER,
         "--capaware-placement", _plan(), "--host", "127.0.0.1", "--port", str(port), "--frontend-replicas", "1",
         "--capaware-stats-output", str(out)],
        cwd=str(tree), env=_env(tree), stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, reply = time.monotonic() + 300, None
        while reply is None:
            assert server.poll() is None, f"the server exited ({server.returncode}):\n{_tail(log)}"
            assert time.monotonic() < deadline, f"the server did not listen in 300 s:\n{_tail(log)}"
            try:
                reply = _post_completion(port, DYNAMIC_PROMPTS[0], DYNAMIC_TOKENS, timeout=300)
            except urllib.error.URLError as err:
                if not isinstance(err.reason, ConnectionRefusedError):
                    raise AssertionError(f"the request failed ({err.reason}):\n{_tail(log)}") from err
                time.sleep(1)  # not listening yet
            except ConnectionError:
                time.sleep(1)
            except TimeoutError as err:  # listening, but no completion: the engine side is stuck
                raise AssertionError(f"no completion in 300 s:\n{_tail(log)}") from err
        (choice,) = reply["choices"]
        assert choice["finish_reason"] == "length" and choice["text"], reply
        assert reply["usage"]["completion_tokens"] == DYNAMIC_TOKENS
        # Ctrl-C to the ranks (as a terminal sends it): each leaves serve(), shuts its engine down and
        # reports; torchrun then sees every worker exit 0.
        workers = [c for c in psutil.Process(server.pid).children()
                   if "megatron_capaware.launch" in " ".join(c.cmdline())]
        assert len(workers) == 2, [c.cmdline() for c in workers]
        for worker in workers:
            worker.send_signal(signal.SIGINT)
        assert server.wait(timeout=180) == 0, _tail(log)
    finally:
        if server.poll() is None:
            for child in psutil.Process(server.pid).children(recursive=True):
                child.kill()
            server.kill()
            server.wait()
    output = _tail(log)
    assert "megatron-capaware: routing with capacity-drop(gamma=1)" in output, output
    assert "megatron-capaware load stats: router capacity-drop(gamma=1), EP=2, 4 MoE layers" in output, output
    _check_dynamic_stats(out, "capacity-drop(gamma=1)", 2)
