from __future__ import annotations

import pytest

from megatron_capaware.testing import run_distributed


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Paths of a tiny MoE checkpoint (with tokenizer) and its texts, made once per session."""
    from tests.tiny_model import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-moe")
    return run_distributed(make_tiny_checkpoint, 1, str(root), timeout_s=300)[0]
