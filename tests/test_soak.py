"""Short soak: 200 forwards at EP=2 under every router do not grow memory.

``scripts/soak_eval.py`` runs a tiny GPT MoE on two gloo ranks, switching the
router every 20 forwards (reinstalling, as an evaluation sweep does) through
decode- and prefill-shaped batches, sampling each rank's RSS. After warm-up
the growth must stay under a generous 50 MB (figures of long runs:
docs/reliability.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multirank
ROOT = Path(__file__).resolve().parents[1]


def test_short_soak_does_not_grow_memory(tmp_path) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "soak_eval.py"), "--ep", "2", "--forwards", "200",
           "--warmup", "60", "--switch-every", "20", "--reset-every", "100", "--sample-s", "0.5",
           "--max-growth-mb", "50", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for rank in report["ranks"]:
        assert rank["forwards"] == 200
        assert rank["growth_after_warmup_mb"] < 50, rank
    assert proc.returncode == 0, proc.stdout[-2000:]
