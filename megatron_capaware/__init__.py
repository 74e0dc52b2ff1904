"""megatron-capaware: capacity-aware and load-aware MoE routing for Megatron-Core inference.

The routing policies (:mod:`megatron_capaware.policies`) are pure torch and
import no Megatron; the Megatron adapters live in :mod:`megatron_capaware.adapters`.
"""

__version__ = "0.1.0"
