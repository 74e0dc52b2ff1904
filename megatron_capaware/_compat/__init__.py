"""Support code that is not about routing: the CPU shims for Megatron-Core
(:mod:`.cpu_shims`, no-ops with CUDA) and the local multi-process launcher
(:mod:`.launcher`) the tools use to run EP ranks on one machine."""
