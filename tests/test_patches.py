"""The patches for Megatron-LM's scripts (patches/*.patch).

Every patch names, in its header, the Megatron-LM tag (or, for main, the
commit) it is written against. With ``MEGATRON_LM_DIR`` pointing at a
Megatron-LM clone that has that ref (a work tree or a bare clone; whatever is
checked out), each patch must apply (``git apply --check``) to its script as
it is at the ref, and the patched script must compile; import megatron-capaware
before any Megatron module (its Python 3.11 ``typing.override`` stand-in);
``tests/test_megatron_lm_scripts.py`` runs them. Without ``MEGATRON_LM_DIR``, or
without the ref, those checks are skipped, saying so.
"""

from __future__ import annotations

import py_compile
import re
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional

import pytest

from megatron_capaware import megatron_lm
from tests.helpers.megatron_training_support import ROOT, megatron_lm_checkout

PATCHES = sorted((ROOT / "patches").glob("*.patch"))
SCRIPTS = {
    # The dynamic path (MegatronLLM / MegatronAsyncLLM), what Megatron recommends:
    "examples/inference/offline_inference.py",
    "examples/inference/launch_inference_server.py",
    # The static path (deprecated by Megatron; Megatron-LM PR #4880 deletes both files):
    "tools/run_text_generation_server.py",
    "examples/inference/advanced/gpt_static_inference.py",
}
#: The Megatron-LM refs the patches target: each script has one patch per ref.
REFS = {"core_v0.19.0", "d98e8a64dd"}


def patch_tag(patch: Path) -> str:
    """The tag or commit in the patch header (``Megatron-LM tag: X`` / ``Megatron-LM commit: X``)."""
    match = re.search(r"^Megatron-LM (?:tag|commit): (\S+)", patch.read_text(), re.M)
    assert match, f"{patch.name} does not name its Megatron-LM tag or commit ('Megatron-LM tag: ...')"
    return match.group(1)


def patched_files(patch: Path) -> List[str]:
    return re.findall(r"^\+\+\+ b/(\S+)", patch.read_text(), re.M)


def test_each_script_has_a_patch_per_ref_naming_it() -> None:
    assert {f for p in PATCHES for f in patched_files(p)} == SCRIPTS
    assert {(f, patch_tag(p)) for p in PATCHES for f in patched_files(p)} == {
        (f, r) for f in SCRIPTS for r in REFS}, "one patch per script and Megatron-LM ref"
    for patch in PATCHES:
        tag = patch_tag(patch)
        assert tag in patch.name, f"{patch.name}: name it after its tag {tag}"
        assert len(patched_files(patch)) == 1
        # The patch calls only what megatron_lm provides.
        added = "\n".join(l[1:] for l in patch.read_text().splitlines() if l.startswith("+") and not l.startswith("+++"))
        for name in re.findall(r"from megatron_capaware\.megatron_lm import (.+)", added):
            for item in re.split(r",\s*", name):
                assert hasattr(megatron_lm, item.split(" as ")[0].strip()), item
        imports_first(patch)
    readme = (ROOT / "patches" / "README.md").read_text()
    for patch in PATCHES:
        assert patch.name in readme and patch_tag(patch) in readme


def imports_first(patch: Path) -> None:
    """The patch's megatron_capaware import comes before the script's first Megatron import."""
    text = patch.read_text()
    first_hunk = text[text.index("\n@@"):].split("\n@@")[1]
    lines = [l[1:] for l in first_hunk.splitlines()[1:] if l[:1] in (" ", "+")]
    ours = next(i for i, l in enumerate(lines) if l.startswith("from megatron_capaware"))
    megatron = [i for i, l in enumerate(lines) if re.match(r"(from|import) megatron\b", l)]
    assert not megatron or ours < min(megatron), (
        f"{patch.name}: import megatron_capaware before Megatron (its typing.override shim)")


def _git(args: List[str], cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=str(cwd) if cwd else None, capture_output=True, text=True)


@pytest.fixture(scope="module")
def megatron_lm_dir() -> Path:
    path = megatron_lm_checkout("check the patches apply")
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
    original = shown.stdout.splitlines()
    first_megatron = next(i for i, l in enumerate(original) if re.match(r"(from|import) megatron\b", l))
    check = _git(["apply", "--check", "-v", str(patch)], cwd=tree)
    assert check.returncode == 0, f"{patch.name} does not apply to {script} at {tag}:\n{check.stderr}"
    applied = _git(["apply", str(patch)], cwd=tree)
    assert applied.returncode == 0, applied.stderr
    text = target.read_text()
    assert "with_capaware_args(" in text and "install_from_args(" in text and "report_from_args(" in text
    patched = text.splitlines()
    ours = next(i for i, l in enumerate(patched) if l.startswith("from megatron_capaware"))
    assert ours < next(i for i, l in enumerate(patched) if re.match(r"(from|import) megatron\b", l)), (
        f"{patch.name}: megatron_capaware is imported after Megatron (line {first_megatron + 1} at {tag})")
    py_compile.compile(str(target), doraise=True)
