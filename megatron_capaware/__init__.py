"""megatron-capaware: capacity-aware and load-aware MoE routing for Megatron-Core inference.

The routing policies (:mod:`megatron_capaware.policies`) are pure torch and
import no Megatron; the Megatron adapters live in :mod:`megatron_capaware.adapters`.
"""

from megatron_capaware._compat.cpu_shims import stub_missing_triton_on_cpu as _stub_missing_triton_on_cpu

# megatron-core 0.19 imports triton (GPU-only) at `import megatron.core`; on a
# CPU machine without triton a stand-in module must exist before that import.
_stub_missing_triton_on_cpu()

__version__ = "0.1.0"
