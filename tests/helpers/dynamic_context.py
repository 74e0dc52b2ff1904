"""A stand-in for what the routers read of megatron-core 0.19.2's ``DynamicInferenceContext``."""

from __future__ import annotations

import types
from typing import Optional

import torch


class FakeContext:
    """A dynamic step with ``prefill`` and ``decode`` real tokens, ``padded`` rows (default: all real),
    run as a CUDA graph when ``captured``."""

    def __init__(self, prefill: int, decode: int, padded: Optional[int] = None, captured: bool = False) -> None:
        self.active_token_count = prefill + decode
        self.num_decode_requests = decode
        self.num_speculative_tokens = 0
        self.padded_active_token_count = prefill + decode if padded is None else padded
        self.gpu_view = types.SimpleNamespace(real_token_count=torch.tensor([prefill + decode], dtype=torch.int32))
        self._captured = captured

    def is_static_batching(self) -> bool:
        return False

    def using_cuda_graph_this_step(self) -> bool:
        return self._captured
