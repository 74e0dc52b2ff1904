"""Bundled reference MoE models and their evaluation texts.

Each model is a directory in Megatron-LM's release layout, loadable at any
expert-parallel size that divides its expert count::

    <name>/latest_checkpointed_iteration.txt   "release"
    <name>/release/                            Megatron dist-checkpoint files (bf16)
    <name>/capaware_model.json                 the architecture (MoEModelArgs)
    <name>/tokenizer/tokenizer.json            its byte-level BPE tokenizer
    <name>/provenance.json, PROVENANCE.md      corpus, commands, seeds, figures

``data/heldout.txt`` (evaluation) and ``data/calibration.txt`` (calibration,
e.g. for LASER thresholds) are whole works that no bundled model saw in
training. They were made, and the models trained, by
``scripts/prepare_corpus.py`` and ``scripts/train_reference.py``; see
``docs/reference_model.md``.

Example (Megatron's model-parallel groups initialised first)::

    from megatron_capaware.models import checkpoint, reference_models
    model, args = checkpoint.load_model(
        reference_models.reference_model_dir(), expert_parallel=2,
        params_dtype=torch.bfloat16)
    tok = reference_models.load_tokenizer()
    ids = tok.encode(reference_models.HELDOUT_TEXT.read_text()).ids

Every function taking ``name`` resolves a bundled model by its directory name
(:func:`available_models`); ``None`` is :data:`DEFAULT_MODEL`, the first
model (Mixtral-style, 8 experts top-2). ``shakespeare-moe-fine-64x8`` is the
fine-grained one (DeepSeek-V2 style: 64 experts top-8 and a shared expert).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REFERENCE_MODELS_ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = "shakespeare-moe-8x2"

REFERENCE_MODEL_DIR = REFERENCE_MODELS_ROOT / DEFAULT_MODEL
DATA_DIR = REFERENCE_MODELS_ROOT / "data"
HELDOUT_TEXT = DATA_DIR / "heldout.txt"
CALIBRATION_TEXT = DATA_DIR / "calibration.txt"

MODEL_ARGS_FILE = "capaware_model.json"
PROVENANCE_FILE = "provenance.json"

__all__ = [
    "CALIBRATION_TEXT",
    "DATA_DIR",
    "DEFAULT_MODEL",
    "HELDOUT_TEXT",
    "REFERENCE_MODELS_ROOT",
    "REFERENCE_MODEL_DIR",
    "available_models",
    "load_tokenizer",
    "provenance",
    "reference_model_dir",
    "tokenizer_path",
]


def available_models() -> List[str]:
    """Names of the bundled models (directories holding a ``capaware_model.json``)."""
    return sorted(
        p.name for p in REFERENCE_MODELS_ROOT.iterdir() if p.is_dir() and (p / MODEL_ARGS_FILE).is_file()
    )


def reference_model_dir(name: Optional[str] = None) -> Path:
    """Checkpoint root of the bundled model ``name`` (default: :data:`DEFAULT_MODEL`).

    Raises:
        FileNotFoundError: no such bundled model; the message lists those there are.
    """
    name = name or DEFAULT_MODEL
    path = REFERENCE_MODELS_ROOT / name
    if not (path / MODEL_ARGS_FILE).is_file():
        raise FileNotFoundError(
            f"no bundled reference model {name!r} under {REFERENCE_MODELS_ROOT}; "
            f"available: {available_models() or 'none'}"
        )
    return path


def checkpoint_and_text(
    checkpoint: Optional[Path], text: Optional[Path], default_text: Path, model: Optional[str] = None
) -> Tuple[Path, Path]:
    """``(checkpoint, text)`` as given, the bundled model ``model`` (default
    :data:`DEFAULT_MODEL`) and ``default_text`` where None. Every bundled model
    shares the held-out and calibration texts."""
    if checkpoint is not None and model is not None:
        from megatron_capaware._compat.cli import UserInputError

        raise UserInputError("give --checkpoint (a path) or --model (a bundled model's name), not both")
    return (checkpoint or reference_model_dir(model), text or default_text)


def tokenizer_path(name: Optional[str] = None) -> Path:
    """The ``tokenizer.json`` shipped with a bundled model."""
    return reference_model_dir(name) / "tokenizer" / "tokenizer.json"


def load_tokenizer(name: Optional[str] = None) -> Any:
    """The model's tokenizer as a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_path(name)))


def provenance(name: Optional[str] = None) -> Dict[str, Any]:
    """The model's provenance record (corpus, commands, seeds, measured figures)."""
    return json.loads((reference_model_dir(name) / PROVENANCE_FILE).read_text())
