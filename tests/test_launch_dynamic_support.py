"""What the launcher turns on for Megatron-LM's dynamic-path scripts, piece by piece (no Megatron-LM needed).

Each check runs in a fresh interpreter: the pieces change process-wide state
(torch factories, ``multiprocessing``'s spawn preparation) that must not leak
into the test process. ``tests/test_megatron_lm_scripts.py`` runs the scripts
themselves when ``MEGATRON_LM_DIR`` is set.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: Each check starts an interpreter that imports torch (and Megatron): seconds each, not the fast tier.
slow = pytest.mark.slow


def _python(code: str, tmp_path: Path, name: str = "script.py") -> subprocess.CompletedProcess:
    script = tmp_path / name
    script.write_text(textwrap.dedent(code))
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=180)


@slow
def test_spawned_children_start_from_spawn_main_and_still_find_the_scripts_names(tmp_path) -> None:
    """A process target defined in the launched script unpickles in the child, whose main is spawn_main."""
    result = _python("""
        import multiprocessing as mp
        import sys

        MARK = "defined in the script"

        def target(queue):
            main = sys.modules["__main__"]
            import typing
            queue.put((main.__spec__.name if main.__spec__ else None, main.MARK, hasattr(typing, "override")))

        if __name__ == "__main__":
            from megatron_capaware.megatron_lm.spawn_main import spawn_children_through_this_module

            spawn_children_through_this_module()
            spawn_children_through_this_module()  # idempotent
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            child = ctx.Process(target=target, args=(queue,))
            child.start()
            print(queue.get(timeout=120))
            child.join(timeout=60)
            print("exitcode", child.exitcode)
        """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "('megatron_capaware.megatron_lm.spawn_main', 'defined in the script', True)" in result.stdout, result.stdout
    assert "exitcode 0" in result.stdout


def test_spawn_main_imported_normally_does_nothing() -> None:
    import multiprocessing.spawn as spawn

    before = spawn.get_preparation_data
    import megatron_capaware.megatron_lm.spawn_main as spawn_main

    assert spawn.get_preparation_data is before
    assert spawn_main.MODULE == "megatron_capaware.megatron_lm.spawn_main"


@slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the pinned-memory stand-in is CPU only")
def test_pinning_is_dropped_except_inside_pinning_as_torch_does(tmp_path) -> None:
    """The launcher's dynamic-engine support drops pinning; StaticInferenceEngine is built with torch's own."""
    result = _python("""
        import torch
        from megatron_capaware._compat.cpu_shims import enable_dynamic_engine_on_cpu
        from megatron_capaware._compat.dynamic_engine_cpu import pinning_as_torch_does

        try:
            torch.empty(4, pin_memory=True)
            print("pinned before: no error")
        except RuntimeError:
            print("pinned before: error")
        assert enable_dynamic_engine_on_cpu()
        t = torch.zeros(4, pin_memory=True)
        print("unpinned:", t.sum().item(), t.is_pinned(), torch.ones(2).pin_memory().is_pinned())
        for make in (lambda: torch.empty(4, pin_memory=True), lambda: torch.ones(2).pin_memory()):
            with pinning_as_torch_does():
                try:
                    make()
                    print("inside: no error")
                except RuntimeError:
                    print("inside: error")
        print("after:", torch.empty(4, pin_memory=True).shape[0])
        """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # Whatever this torch build does with a pinning request, the scope gives exactly that back.
    before = "error" if "pinned before: error" in out else "no error"
    assert "unpinned: 0.0 False False" in out, out
    assert out.count(f"inside: {before}") == 2, out
    assert "after: 4" in out


@slow
def test_legacy_cuda_tensor_types_build_cpu_tensors_under_cpu_support(tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU only")
    pytest.importorskip("megatron.training", reason="needs megatron.training (megatron-core 0.19.2)")
    result = _python("""
        import torch
        from megatron_capaware.megatron_lm.cpu_support import enable_cpu_support

        assert enable_cpu_support()
        t = torch.cuda.LongTensor([7, 8])
        print(t.dtype, t.device, t.tolist())
        """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.int64 cpu [7, 8]" in result.stdout


@slow
def test_cpu_context_takes_the_nccl_dispatchers_buffers(tmp_path) -> None:
    """NVLS (symmetric memory) cannot exist without CUDA: the context built on CPU is told 'nccl'."""
    if torch.cuda.is_available():
        pytest.skip("CPU only")
    pytest.importorskip("megatron.core.inference.contexts.dynamic_context",
                        reason="needs megatron-core >= 0.19 (the dynamic context)")
    result = _python("""
        import types
        from megatron_capaware._compat.cpu_shims import enable_dynamic_engine_on_cpu, stub_missing_triton_on_cpu

        stub_missing_triton_on_cpu()  # megatron.core imports triton
        from megatron.core.inference.contexts import dynamic_context

        seen = []

        def fake_init(self, model_config, *args, **kwargs):
            seen.append(model_config.inference_moe_token_dispatcher_type)
        dynamic_context.DynamicInferenceContext.__init__ = fake_init
        assert enable_dynamic_engine_on_cpu()
        config = types.SimpleNamespace(inference_moe_token_dispatcher_type="nvls")
        dynamic_context.DynamicInferenceContext(config, None)
        config2 = types.SimpleNamespace(inference_moe_token_dispatcher_type="nccl")
        dynamic_context.DynamicInferenceContext(config2, None)
        print(seen, config.inference_moe_token_dispatcher_type)
        """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "['nccl', 'nccl'] nccl" in result.stdout
