"""Importing ``megatron.training`` on the supported Pythons, and small patching helpers.

megatron-core 0.19.2 declares Python >= 3.12 and uses ``typing.override``; on 3.11
:func:`ensure_python_compat` installs an equivalent first. The default install
(megatron-core 0.16.1) does not ship ``megatron.training``:
:func:`import_megatron_training` says how to get it.
"""

from __future__ import annotations

from megatron_capaware.errors import MegatronTrainingUnavailable  # noqa: F401 (defined there; re-exported)

import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Tuple

import torch

INSTALL_HINT = (
    "megatron.training ships in the megatron-core 0.19.2 wheel (not in 0.16.1, the default "
    "install): pip install --no-deps --ignore-requires-python megatron-core==0.19.2 ; or put a "
    "Megatron-LM checkout first on PYTHONPATH"
)



def ensure_python_compat() -> None:
    """Give Python < 3.12 the ``typing.override`` that megatron-core 0.19 imports.

    It is the same no-op decorator as Python 3.12's (it only marks the function).
    """
    if hasattr(typing, "override"):
        return

    def override(method: Any) -> Any:
        try:
            method.__override__ = True
        except (AttributeError, TypeError):
            pass
        return method

    typing.override = override  # type: ignore[attr-defined]


def import_megatron_training() -> Any:
    """Import ``megatron.training`` (and the modules used here) or explain why not.

    Raises:
        MegatronTrainingUnavailable: with the installed megatron-core version and the fix.
    """
    ensure_python_compat()
    import megatron_capaware  # noqa: F401  (stubs triton before megatron.core on CPU)

    try:
        import megatron.training  # noqa: F401
        import megatron.training.arguments  # noqa: F401
        import megatron.training.checkpointing  # noqa: F401
        import megatron.training.initialize  # noqa: F401
    except ImportError as err:
        try:
            import megatron.core

            have = f"megatron-core {megatron.core.__version__} is installed"
        except Exception:  # pragma: no cover - megatron-core is a dependency
            have = "megatron-core is not importable"
        raise MegatronTrainingUnavailable(
            f"megatron.training is not importable ({type(err).__name__}: {err}); {have}. "
            f"{INSTALL_HINT}"
        ) from err
    _use_prebuilt_dataset_helpers()
    return megatron.training


def _use_prebuilt_dataset_helpers() -> None:
    """Skip ``make`` of the dataset helpers when the wheel already ships them built.

    ``initialize_megatron`` runs ``make -C megatron/core/datasets``; the
    megatron-core wheel ships the compiled ``helpers_cpp`` module but no
    Makefile, so ``make`` fails and Megatron exits. A Megatron-LM checkout
    (which has the Makefile) is left alone.
    """
    import importlib.util

    from megatron.core.datasets import utils as dataset_utils

    folder = Path(dataset_utils.__file__).parent
    if (folder / "Makefile").exists() or getattr(dataset_utils.compile_helpers, "capaware_prebuilt", False):
        return
    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is None:
        return  # nothing prebuilt: let Megatron report its own error

    def compile_helpers() -> None:
        """megatron-capaware: the wheel's prebuilt helpers_cpp is used (no Makefile to run)."""

    compile_helpers.capaware_prebuilt = True  # type: ignore[attr-defined]
    dataset_utils.compile_helpers = compile_helpers


def megatron_training_available() -> Tuple[bool, str]:
    """``(True, "")`` when ``megatron.training`` imports, else ``(False, reason)``."""
    try:
        import_megatron_training()
    except MegatronTrainingUnavailable as err:
        return False, str(err)
    return True, ""


# --------------------------------------------------------------------------- patching


def replace_function(module: Any, name: str, new: Callable[..., Any]) -> Callable[..., Any]:
    """Set ``module.name = new`` and rebind every loaded module's reference to the old one.

    Scripts and Megatron modules import functions by name (``from
    megatron.training.checkpointing import load_checkpoint``); those imported
    before this call are rebound too, later imports get ``new``.

    Returns:
        The original function.
    """
    original = getattr(module, name)
    setattr(module, name, new)
    for other in list(sys.modules.values()):
        namespace = getattr(other, "__dict__", None)
        if not isinstance(namespace, dict) or other is module:
            continue
        for key, value in list(namespace.items()):
            if value is original:
                try:
                    setattr(other, key, new)
                except (AttributeError, TypeError):
                    pass
    return original


def is_rank0() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def print_rank0(*values: Any) -> None:
    if is_rank0():
        print(*values, flush=True)
