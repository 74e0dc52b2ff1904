"""The README's commands are the ones CI runs; the package layout is as documented."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_block(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}.*?```bash\n(.*?)```", text, re.S | re.M)
    assert match, f"README has no '## {title}' section with a bash block"
    return match.group(1).strip()


def test_ci_runs_the_readme_install_and_test_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    for title in ("Install", "Test"):
        command = readme_block(title)
        assert command in ci, f"README's {title.lower()} command {command!r} is not what .ci/run runs"


def test_top_level_layout() -> None:
    for name in ("pyproject.toml", "megatron_capaware", "patches", "examples", "tests", "scripts", "README.md"):
        assert (ROOT / name).exists(), name
