"""The one-GPU check script plans without a GPU and runs its CPU stand-in end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.megatron_training_support import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_the_plan(tmp_path) -> None:
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = record["plan"]["steps"]
    assert set(steps) == {"nccl", "routers", "experts", "placement", "router_time", "main_job", "dynamic_engine"}
    assert len(steps["router_time"]["shapes_T_E_k"]) == 12 and record["steps"] == {}
    engine = steps["dynamic_engine"]
    assert engine["configs"][:2] == ["megatron", "topk"] and len(engine["configs"]) == 8, engine
    assert "cuda_graph_impl=local" in engine["model"] and "num_cuda_graphs" in engine["cuda_graphs"]
    assert "does not fail the check" in engine["skipped_when"]


def _megatron_llm_importable() -> bool:
    return (importlib.util.find_spec("megatron") is not None
            and importlib.util.find_spec("megatron.core.inference.apis") is not None)


def _dynamic_engine_step(tmp_path: Path) -> "tuple[subprocess.CompletedProcess, dict]":
    result = subprocess.run([sys.executable, "-m", "megatron_capaware.tools.gpu_check", "--device", "cpu",
                             "--steps", "dynamic_engine", "--out", str(tmp_path)], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    return result, record


@pytest.mark.dynamic_engine
@pytest.mark.skipif(not _megatron_llm_importable(), reason="needs megatron-core >= 0.19 (megatron.core.inference.apis)")
def test_dynamic_engine_step_on_cpu(tmp_path) -> None:
    """``--device cpu`` runs the step (graphs off): Megatron's router, then each router installed,
    in ``MegatronLLM``; topk's text is Megatron's, every configuration generated."""
    result, record = _dynamic_engine_step(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(record["steps"]) == {"dynamic_engine"}
    step = record["steps"]["dynamic_engine"]
    assert step["ok"] and step["topk_equals_megatron"] and not step["cuda_graphs"], step
    configs = step["configs"]
    assert len(configs) == 8 and all(row["generated"] for row in configs.values()), configs
    assert configs["topk"]["text_sha256_16"] == configs["megatron"]["text_sha256_16"]
    for label, row in configs.items():
        assert row["graph_replays"] == 0 and row["graph_steps"] == 0 and row["graph_replays_note"] == "graphs need CUDA"
        assert row["eager_steps"] == row["steps"] > 0, (label, row)
        if label != "megatron":  # the per-phase statistics of the installed routers
            assert set(row["phases"]) == {"prefill", "decode"}, (label, row["phases"])
    # gamma = 1 drops on prefill (the policy's phase by default) and changes the text: the check can fail
    drop = configs["capacity-drop:gamma=1"]
    assert drop["phases"]["prefill"]["dropped"] > 0 and drop["phases"]["decode"]["dropped"] == 0


@pytest.mark.skipif(_megatron_llm_importable(), reason="megatron-core >= 0.19 is installed: the step runs")
def test_dynamic_engine_step_skipped_before_0_19(tmp_path) -> None:
    """On megatron-core < 0.19 the step reports skipped with the version and what to install, and the
    check still exits 0."""
    result, record = _dynamic_engine_step(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    step = record["steps"]["dynamic_engine"]
    assert step["skipped"] and "megatron-core>=0.19.2" in step["reason"], step
    import megatron.core

    assert f"megatron-core {megatron.core.__version__} is installed" in step["reason"]


@pytest.mark.multirank
def test_cpu_stand_in_runs_every_step(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "megatron_capaware.tools.gpu_check", "--device", "cpu",
                             "--out", str(tmp_path)], cwd=ROOT, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result.returncode == 0, result.stdout + result.stderr
    assert record["steps"]["nccl"]["backend"] == "gloo" and record["steps"]["nccl"]["ok"]
    routers = record["steps"]["routers"]["routers"]
    assert len(routers) == 6 and all(row["ok"] for row in routers.values()), routers
    assert routers["topk"]["equals_vanilla"] is True
    # On the CPU the policies run eagerly (CPU path, TORCHDYNAMO_DISABLE): the report says no region compiled.
    laser_rows = [row for label, row in routers.items() if label.startswith("laser")]
    assert laser_rows and all(row["compiled_regions"] == 0 for row in laser_rows), laser_rows
    assert record["steps"]["experts"]["class"] == "SequentialMLP"
    placement = record["steps"]["placement"]
    assert placement["ok"] and placement["restored_equal"] and placement["max_abs_diff"] <= 1e-5, placement
    assert len(record["steps"]["router_time"]["rows"]) == 2


def test_without_a_gpu_it_says_so() -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = subprocess.run([sys.executable, "-m", "megatron_capaware.tools.gpu_check"], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no CUDA device is visible" in result.stderr, result.stderr


def _engine_record(**overrides: object) -> dict:
    """A dynamic_engine record as a CUDA run writes it (graphs on), before the verdict."""
    from megatron_capaware.tools.bench.dynamic_engine import ENGINE_ROUTERS, MEGATRON

    row = {"generated": True, "tokens": [[1, 2, 3]], "graph_replays": 28, "synchronize_ok": True, "syncs": 9}
    configs = {label: dict(row) for label in [MEGATRON, *ENGINE_ROUTERS]}
    for label, changes in overrides.items():
        configs[label.replace("_", "-")].update(changes)  # type: ignore[call-overload]
    return {"cuda_graphs": True, "configs": configs}


def test_dynamic_engine_verdict_fails_on_what_it_checks() -> None:
    """The step's verdict: topk's tokens == Megatron's, every configuration generated, and with graphs
    replays > 0 and a passing synchronize for every configuration; extra syncs are reported, not judged."""
    from megatron_capaware.tools.bench.dynamic_engine import verdict

    good = verdict(_engine_record())
    assert good["ok"] and good["topk_equals_megatron"]
    assert verdict(_engine_record(laser={"syncs": 12}))["configs"]["laser"]["syncs_minus_megatron"] == 3
    assert verdict(_engine_record(laser={"syncs": 12}))["ok"]
    assert not verdict(_engine_record(topk={"tokens": [[1, 2, 4]]}))["ok"]
    assert not verdict(_engine_record(laser={"generated": False}))["ok"]
    assert not verdict(_engine_record(laser={"graph_replays": 0}))["ok"]
    assert not verdict(_engine_record(megatron={"synchronize_ok": False}))["ok"]
    no_graphs = _engine_record(laser={"graph_replays": 0})
    no_graphs["cuda_graphs"] = False  # the CPU run: replays 0 by construction, the text alone decides
    assert verdict(no_graphs)["ok"]


@pytest.mark.skipif(not _megatron_llm_importable(), reason="needs megatron-core >= 0.19 (megatron.core.inference.apis)")
def test_dynamic_engine_graph_settings_are_megatrons() -> None:
    """The CUDA run's InferenceConfig takes the graph knobs megatron-core 0.19.2 defines."""
    from megatron_capaware.tools.bench.dynamic_engine import inference_config

    cfg = inference_config(True)
    assert (cfg.num_cuda_graphs, cfg.cuda_graph_max_tokens, cfg.cuda_graph_mixed_prefill_count) == (4, 64, 4)
    assert cfg.use_cuda_graphs_for_non_decode_steps and inference_config(False).num_cuda_graphs is None
