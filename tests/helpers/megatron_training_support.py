"""Shared pieces of the tests that need ``megatron.training`` (megatron-core 0.19.2).

``needs_megatron_training`` marks a test ``megatron_training`` and skips it,
with the reason, where ``megatron.training`` is not importable (the default
install, megatron-core 0.16.1, does not ship it).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=1)
def megatron_training_status():
    from megatron_capaware.megatron_lm import megatron_training_available

    return megatron_training_available()


def _skip_reason() -> str:
    ok, reason = megatron_training_status()
    return "" if ok else reason


HAVE_MEGATRON_TRAINING = megatron_training_status()[0]

needs_megatron_training = [
    pytest.mark.megatron_training,
    pytest.mark.skipif(not HAVE_MEGATRON_TRAINING, reason=_skip_reason() or "n/a"),
]


def subprocess_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment of the CLI subprocesses: quiet, bounded, this checkout first on the path."""
    env = dict(os.environ)
    env.update(
        TORCHDYNAMO_DISABLE="1",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        PYTHONUNBUFFERED="1",
        CAPAWARE_COLLECTIVE_TIMEOUT_S="120",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    # The CLIs decide where to run; a torchrun of the parent must not leak in.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def run_cli(args: List[str], *, timeout: float = 240, env: Optional[Dict[str, str]] = None,
            cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run a command (list) and capture its output; a hang fails the test."""
    return subprocess.run(
        args, cwd=str(cwd or ROOT), env=subprocess_env(env), capture_output=True, text=True,
        timeout=timeout,
    )


def torchrun() -> List[str]:
    """``torchrun`` of this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run"]


def megatron_lm_checkout(purpose: str) -> Path:
    """``$MEGATRON_LM_DIR`` (a Megatron-LM clone), or skip saying what it is needed for."""
    value = os.environ.get("MEGATRON_LM_DIR")
    if not value:
        pytest.skip("MEGATRON_LM_DIR is not set: point it at a Megatron-LM clone "
                    f"(git clone https://github.com/NVIDIA/Megatron-LM) to {purpose}")
    path = Path(value)
    if not path.exists():
        pytest.fail(f"MEGATRON_LM_DIR={value} does not exist")
    return path
