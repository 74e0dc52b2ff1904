"""The tokenizer a capaware checkpoint ships, with Megatron's text-tokenizer interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

from megatron_capaware.megatron_lm.compat import replace_function
from megatron_capaware.models.checkpoint import checkpoint_tokenizer_file, is_capaware_checkpoint


EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[EOS]")
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]")


class CapawareTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` with Megatron's text-tokenizer interface.

    What Megatron's ``TextGenerationController`` and text generation server
    use: ``tokenize``, ``detokenize``, ``offsets``, ``vocab_size``, ``eod``,
    ``bos``, ``pad``. ``eod`` is the first of :data:`EOD_CANDIDATES` the
    vocabulary holds (the reference models use ``<|endoftext|>``).
    """

    def __init__(self, tokenizer: Any, path: Optional[str] = None) -> None:
        self._tokenizer = tokenizer
        self.path = path
        self.eod = self._first_id(EOD_CANDIDATES)
        self.bos = self._first_id(BOS_CANDIDATES)
        self.library = "tokenizers"

    @classmethod
    def from_file(cls, path: Any) -> "CapawareTokenizer":
        """Load ``tokenizer.json`` (or a directory holding it)."""
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        return cls(Tokenizer.from_file(str(path)), str(path))

    def _first_id(self, names: Iterable[str]) -> Optional[int]:
        for name in names:
            token_id = self._tokenizer.token_to_id(name)
            if token_id is not None:
                return int(token_id)
        return None

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def vocab(self) -> Dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {v: k for k, v in self.vocab.items()}

    @property
    def eos(self) -> Optional[int]:
        return self.eod

    @property
    def eos_id(self) -> Optional[int]:
        return self.eod

    @property
    def pad(self) -> Optional[int]:
        return self.eod

    @property
    def additional_special_tokens_ids(self) -> List[int]:
        return []

    def tokenize(self, text: str) -> List[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def detokenize(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def offsets(self, ids: List[int], text: str) -> List[int]:
        """Character offset in ``text`` where each token's text starts."""
        starts, length = [], 0
        for i in range(len(ids)):
            starts.append(min(length, len(text)))
            length = len(self.detokenize(ids[: i + 1], skip_special_tokens=False))
        return starts

    def __repr__(self) -> str:
        return f"CapawareTokenizer({self.path!r}, vocab={self.vocab_size}, eod={self.eod})"


def checkpoint_tokenizer_for(args: Any) -> Optional[Path]:
    """The tokenizer Megatron should use from the checkpoint, if the flags name none.

    Only when no ``--tokenizer-type`` and no ``--tokenizer-model`` is given and
    ``--load`` is a capaware checkpoint shipping ``tokenizer/tokenizer.json``.
    """
    if getattr(args, "tokenizer_type", None) or getattr(args, "tokenizer_model", None):
        return None
    load = getattr(args, "load", None)
    if not is_capaware_checkpoint(load):
        return None
    return checkpoint_tokenizer_file(load)


_TOKENIZER_HOOK = False


def install_tokenizer_hook() -> None:
    """Make Megatron's ``build_tokenizer`` use a capaware checkpoint's own tokenizer.

    Applies when the command line names no tokenizer (see
    :func:`checkpoint_tokenizer_for`); otherwise Megatron's own is built.
    """
    global _TOKENIZER_HOOK
    if _TOKENIZER_HOOK:
        return
    import importlib

    for module_name in (
        "megatron.core.tokenizers.utils.build_tokenizer",  # megatron-core >= 0.15
        "megatron.training.tokenizer.tokenizer",  # older Megatron-LM checkouts
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        original = getattr(module, "build_tokenizer", None)
        if original is None:
            continue
        replace_function(module, "build_tokenizer", _tokenizer_builder(original))
    _TOKENIZER_HOOK = True


def _tokenizer_builder(original: Callable[..., Any]) -> Callable[..., Any]:
    def build_tokenizer(args: Any, *rest: Any, **kwargs: Any) -> Any:
        path = checkpoint_tokenizer_for(args)
        if path is None:
            return original(args, *rest, **kwargs)
        tokenizer = CapawareTokenizer.from_file(path)
        if getattr(args, "padded_vocab_size", None) is None:
            args.padded_vocab_size = tokenizer.vocab_size
        if getattr(args, "rank", 0) == 0:
            print(f"megatron-capaware: using the checkpoint's tokenizer {path} "
                  f"({tokenizer.vocab_size} tokens, eod={tokenizer.eod})", flush=True)
        return tokenizer

    build_tokenizer.capaware_original = original  # type: ignore[attr-defined]
    return build_tokenizer
