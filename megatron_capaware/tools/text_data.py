"""Held-out text -> token windows -> per-rank batches for evaluation and calibration."""

from __future__ import annotations

from megatron_capaware.errors import TokenizerError  # noqa: F401 (defined there; re-exported)

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import torch



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

    def vocab(self) -> Dict[str, int]:
        """Token string -> id."""
        return dict(self.backend.get_vocab())


def check_tokenizer(
    tokenizer: TextTokenizer,
    model_vocab_size: int,
    checkpoint: Union[str, Path],
    tokenizer_path: Optional[Union[str, Path]] = None,
) -> None:
    """Refuse a tokenizer that cannot be the model's.

    Its vocabulary must fit the model's, and a tokenizer given explicitly
    (``--tokenizer``) must map tokens to the same ids as the tokenizer shipped
    with the checkpoint, when one is: another tokenizer feeds the model ids
    it was never trained on and the quality figures mean nothing, silently.

    Raises:
        TokenizerError: naming the mismatch and the fix.
    """
    if tokenizer.vocab_size > model_vocab_size:
        raise TokenizerError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
            f"{model_vocab_size}: wrong tokenizer for this checkpoint; omit --tokenizer to use the "
            "checkpoint's own"
        )
    if tokenizer_path is None:
        return
    try:
        own = load_tokenizer(checkpoint)
    except TokenizerError:
        return  # the checkpoint ships none: nothing to compare with
    theirs, mine = own.vocab(), tokenizer.vocab()
    if theirs == mine:
        return
    tokens = set(theirs) | set(mine)
    differing = sum(1 for token in tokens if theirs.get(token) != mine.get(token))
    raise TokenizerError(
        f"the tokenizer {tokenizer_path} is not the one shipped with the checkpoint ({checkpoint}): "
        f"{differing} of {len(tokens)} tokens are missing from one or have other ids ({len(mine)} vs "
        f"{len(theirs)} tokens). The model would read ids it was not trained on; omit --tokenizer "
        "to use the checkpoint's own, or pass the tokenizer the model was trained with"
    )


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
