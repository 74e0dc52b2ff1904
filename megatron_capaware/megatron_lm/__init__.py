"""Glue between megatron-capaware and Megatron-LM's ``megatron.training``.

Used by :mod:`megatron_capaware.megatron_lm.launch` (any Megatron-LM script,
unchanged; ``python -m megatron_capaware.launch``) and
:mod:`megatron_capaware.megatron_lm.generate` (``capaware-generate``). One
module per concern:

* :mod:`.compat`: :func:`import_megatron_training` (or an error saying how
  to get it) and the Python 3.11 ``typing.override`` shim; patching helpers.
* :mod:`.cpu_support`: :func:`enable_cpu_support`, what ``megatron.training``
  needs without CUDA, and :func:`enable_dynamic_engine`, what the dynamic
  engine needs too (no-ops with CUDA).
* :mod:`.checkpoint_flags`: Megatron flag defaults from a capaware
  checkpoint (:func:`checkpoint_defaults`) and :func:`extra_args_provider`.
* :mod:`.tokenizer`: :class:`CapawareTokenizer`, the checkpoint's tokenizer
  with Megatron's interface.
* :mod:`.provider`: :func:`gpt_model_provider` for ``get_model``.
* :mod:`.reports`: :func:`install_from_args` / :func:`report_from_args` for
  scripts, and the load report.
* :mod:`.arguments`: the ``--moe-router-type`` / ``--capaware-*`` flags.

The names below are re-exported because Megatron-LM scripts patched with
``patches/`` import them from here.
"""

# First: megatron-core >= 0.19 imports ``typing.override`` (Python >= 3.12). A
# script that imports this package before Megatron (the patches do) gets the
# Python 3.11 stand-in in time, and on CPU the triton stand-in (package import).
# This glue is an entry point (the patched Megatron-LM scripts import it before Megatron), so it
# switches on what Megatron needs on this machine itself; the library (megatron_capaware) does not.
from megatron_capaware._compat.cpu_shims import stub_missing_triton_on_cpu as _stub_missing_triton_on_cpu
from megatron_capaware.megatron_lm.compat import ensure_python_compat as _ensure_python_compat

_ensure_python_compat()
_stub_missing_triton_on_cpu()

from megatron_capaware.megatron_lm.checkpoint_flags import (  # noqa: E402
    checkpoint_defaults,
    checkpoint_dtype,
    describe_defaults,
    extra_args_provider,
    peek_flag,
    set_parser_defaults,
)
from megatron_capaware.megatron_lm.compat import (  # noqa: E402
    INSTALL_HINT,
    MegatronTrainingUnavailable,
    ensure_python_compat,
    import_megatron_training,
    is_rank0,
    megatron_training_available,
    print_rank0,
    replace_function,
)
from megatron_capaware.megatron_lm.cpu_support import CPU_MEGATRON_DEFAULTS, enable_cpu_support, enable_dynamic_engine
from megatron_capaware.megatron_lm.provider import gpt_model_provider
from megatron_capaware.megatron_lm.reports import (
    STATS_FORMAT,
    format_stats,
    install_from_args,
    report_from_args,
    report_stats,
    summarize,
)
from megatron_capaware.megatron_lm.tokenizer import CapawareTokenizer, checkpoint_tokenizer_for, install_tokenizer_hook
from megatron_capaware.models.checkpoint import checkpoint_tokenizer_file, is_capaware_checkpoint

__all__ = [
    "CPU_MEGATRON_DEFAULTS",
    "CapawareTokenizer",
    "INSTALL_HINT",
    "MegatronTrainingUnavailable",
    "STATS_FORMAT",
    "checkpoint_defaults",
    "checkpoint_dtype",
    "checkpoint_tokenizer_file",
    "checkpoint_tokenizer_for",
    "describe_defaults",
    "enable_cpu_support",
    "enable_dynamic_engine",
    "ensure_python_compat",
    "extra_args_provider",
    "format_stats",
    "gpt_model_provider",
    "import_megatron_training",
    "install_from_args",
    "install_tokenizer_hook",
    "is_capaware_checkpoint",
    "is_rank0",
    "megatron_training_available",
    "peek_flag",
    "print_rank0",
    "replace_function",
    "report_from_args",
    "report_stats",
    "set_parser_defaults",
    "summarize",
]
