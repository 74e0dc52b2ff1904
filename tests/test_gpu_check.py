"""The one-GPU check script plans without a GPU and runs its CPU stand-in end to end."""

from __future__ import annotations

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
    assert set(steps) == {"nccl", "routers", "experts", "placement", "router_time", "main_job"}
    assert len(steps["router_time"]["shapes_T_E_k"]) == 12 and record["steps"] == {}


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
