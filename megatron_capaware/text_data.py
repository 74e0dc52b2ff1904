"""Held-out text -> token windows -> per-rank batches for evaluation and calibration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Union

import torch


class TokenizerError(ValueError):
    """No usable tokenizer for a checkpoint."""


@dataclass
class TextTokenizer:
    """A checkpoint's tokenizer: ``tokenizers.Tokenizer`` or a ``transformers`` one."""

    backend: Any
    kind: str  # "tokenizers" or "transformers"

    def encode(self, text: str) -> List[int]:
        if self.kind == "tokenizers":
            return self.backend.encode(text).ids
        return self.backend(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: List[int]) -> str:
        return self.backend.decode(ids)

    @property
    def vocab_size(self) -> int:
        if self.kind == "tokenizers":
            return self.backend.get_vocab_size()
        return len(self.backend)


def load_tokenizer(path: Union[str, Path]) -> TextTokenizer:
    """Load the tokenizer of a checkpoint (its root, its ``tokenizer/`` folder or a file).

    ``tokenizer.json`` (Hugging Face ``tokenizers``) is read directly; any other
    Hugging Face tokenizer folder through ``transformers.AutoTokenizer``.

    Raises:
        TokenizerError: nothing loadable there; says where it looked.
    """
    path = Path(path)
    candidates = [path] if path.is_file() else [path / "tokenizer" / "tokenizer.json", path / "tokenizer.json"]
    for candidate in candidates:
        if candidate.is_file():
            from tokenizers import Tokenizer

            return TextTokenizer(Tokenizer.from_file(str(candidate)), "tokenizers")
    folders = [path / "tokenizer", path] if path.is_dir() else []
    for folder in folders:
        if folder.is_dir() and any(folder.glob("tokenizer*")):
            try:
                from transformers import AutoTokenizer

                return TextTokenizer(AutoTokenizer.from_pretrained(str(folder)), "transformers")
            except Exception as err:  # report what transformers said
                raise TokenizerError(f"cannot load the tokenizer in {folder}: {err}") from err
    raise TokenizerError(
        f"no tokenizer found for {path}: expected tokenizer/tokenizer.json (Hugging Face tokenizers) "
        "or a Hugging Face tokenizer folder; pass --tokenizer"
    )


def token_windows(token_ids: List[int], seq_len: int, max_tokens: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len + 1`` tokens (inputs + next-token labels).

    Returns:
        ``[N, seq_len + 1]`` int64; each window predicts ``seq_len`` tokens.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    ids = torch.tensor(token_ids, dtype=torch.int64)
    count = (ids.numel() - 1) // seq_len
    if max_tokens is not None:
        count = min(count, max(max_tokens // seq_len, 0))
    if count <= 0:
        return torch.zeros((0, seq_len + 1), dtype=torch.int64)
    idx = torch.arange(count).unsqueeze(1) * seq_len + torch.arange(seq_len + 1).unsqueeze(0)
    return ids[idx]


def rank_batches(
    windows: torch.Tensor, sequences_per_rank: int, dp_size: int, dp_rank: int
) -> Iterator[torch.Tensor]:
    """This data-parallel rank's batches ``[B, seq_len + 1]``, full batches only.

    Every rank yields the same number of batches (MoE layers issue collectives,
    so all ranks must run the same number of forwards); a trailing partial
    global batch is left out.
    """
    per_step = sequences_per_rank * dp_size
    steps = windows.shape[0] // per_step
    for step in range(steps):
        start = step * per_step + dp_rank * sequences_per_rank
        yield windows[start:start + sequences_per_rank]


def num_batches(num_windows: int, sequences_per_rank: int, dp_size: int) -> int:
    return num_windows // (sequences_per_rank * dp_size)
