"""The patches for Megatron-LM's scripts (patches/*.patch).

Every patch names, in its header, the Megatron-LM tag it is written against.
With ``MEGATRON_LM_DIR`` pointing at a Megatron-LM clone that has that tag
(a work tree or a bare clone; whatever is checked out), each patch must apply
(``git apply --check``) to its script as it is at the tag, and the patched
script must compile. Without ``MEGATRON_LM_DIR``, or without the tag, those
checks are skipped, saying so.
"""

from __future__ import annotations

import os
import py_compile
import re
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional

import pytest

from megatron_capaware import megatron_lm
from tests.megatron_training_support import ROOT

PATCHES = sorted((ROOT / "patches").glob("*.patch"))
SCRIPTS = {
    "tools/run_text_generation_server.py",
    "examples/inference/gpt/gpt_static_inference.py",
}


def patch_tag(patch: Path) -> str:
    match = re.search(r"^Megatron-LM tag: (\S+)", patch.read_text(), re.M)
    assert match, f"{patch.name} does not name its Megatron-LM tag ('Megatron-LM tag: ...')"
    return match.group(1)


def patched_files(patch: Path) -> List[str]:
    return re.findall(r"^\+\+\+ b/(\S+)", patch.read_text(), re.M)


def test_the_two_scripts_have_a_patch_naming_its_tag() -> None:
    assert {f for p in PATCHES for f in patched_files(p)} == SCRIPTS
    for patch in PATCHES:
        tag = patch_tag(patch)
        assert tag in patch.name, f"{patch.name}: name it after its tag {tag}"
        assert len(patched_files(patch)) == 1
        # The patch calls only what megatron_lm provides.
        added = "\n".join(l[1:] for l in patch.read_text().splitlines() if l.startswith("+") and not l.startswith("+++"))
        for name in re.findall(r"from megatron_capaware\.megatron_lm import (.+)", added):
            for item in re.split(r",\s*", name):
                assert hasattr(megatron_lm, item.split(" as ")[0].strip()), item
    readme = (ROOT / "patches" / "README.md").read_text()
    for patch in PATCHES:
        assert patch.name in readme and patch_tag(patch) in readme


def _git(args: List[str], cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=str(cwd) if cwd else None, capture_output=True, text=True)


@pytest.fixture(scope="module")
def megatron_lm_dir() -> Path:
    value = os.environ.get("MEGATRON_LM_DIR")
    if not value:
        pytest.skip("MEGATRON_LM_DIR is not set: point it at a Megatron-LM checkout "
                    "(git clone https://github.com/NVIDIA/Megatron-LM) to check the patches apply")
    path = Path(value)
    if not path.exists():
        pytest.fail(f"MEGATRON_LM_DIR={value} does not exist")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    return path


@pytest.mark.parametrize("patch", PATCHES, ids=[p.name for p in PATCHES])
def test_patch_applies_to_its_megatron_lm_tag(patch: Path, megatron_lm_dir: Path, tmp_path: Path) -> None:
    tag = patch_tag(patch)
    (script,) = patched_files(patch)
    has_tag = _git(["-C", str(megatron_lm_dir), "rev-parse", "--verify", "--quiet", f"{tag}^{{commit}}"])
    tree = tmp_path / "megatron-lm"
    target = tree / script
    target.parent.mkdir(parents=True)
    if has_tag.returncode != 0:
        pytest.skip(f"MEGATRON_LM_DIR={megatron_lm_dir} has no tag {tag} (a shallow clone or another "
                    "fork?): run git fetch --tags there")
    shown = _git(["-C", str(megatron_lm_dir), "show", f"{tag}:{script}"])
    assert shown.returncode == 0, f"{script} is not in Megatron-LM at {tag}: {shown.stderr}"
    target.write_text(shown.stdout)
    check = _git(["apply", "--check", "-v", str(patch)], cwd=tree)
    assert check.returncode == 0, f"{patch.name} does not apply to {script} at {tag}:\n{check.stderr}"
    applied = _git(["apply", str(patch)], cwd=tree)
    assert applied.returncode == 0, applied.stderr
    text = target.read_text()
    assert "with_capaware_args(" in text and "install_from_args(" in text and "report_from_args(" in text
    py_compile.compile(str(target), doraise=True)
