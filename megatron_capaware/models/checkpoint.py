"""Save and load Megatron MoE checkpoints with Megatron's dist checkpointing.

Layout (the one Megatron-LM's ``megatron.training.checkpointing`` writes and
reads, so its ``load_checkpoint`` accepts these files too)::

    CKPT/latest_checkpointed_iteration.txt   "release"
    CKPT/release/                            torch_dist files: {"model": ..., "checkpoint_version": 3.0}
    CKPT/capaware_model.json                 MoEModelArgs: what is needed to rebuild the model
    CKPT/tokenizer/                          optional: tokenizer files shipped with the model

The weights are sharded by Megatron's ``sharded_state_dict``, so one checkpoint
loads at any tensor / expert parallel size that divides the model's sizes.
The routers of this package add no parameters, so a vanilla checkpoint loads
into a capaware model and back unchanged.
"""

from __future__ import annotations

from megatron_capaware.errors import CheckpointError  # noqa: F401 (defined there; re-exported)

from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from megatron_capaware.models.builder import MoEModelArgs
from megatron_capaware.policies.collectives import barrier

MODEL_ARGS_FILE = "capaware_model.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE_DIR = "release"
TOKENIZER_DIR = "tokenizer"



def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and not hasattr(model, "sharded_state_dict"):
        model = model.module
    return model


def checkpoint_weights_dir(ckpt_dir: Union[str, Path]) -> Path:
    """The directory holding the dist-checkpoint files of ``ckpt_dir``.

    Accepts a Megatron-LM checkpoint root (with its tracker file) or the
    weights directory itself.

    Raises:
        CheckpointError: when neither layout is found.
    """
    root = Path(ckpt_dir)
    if not root.exists():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    tracker = root / TRACKER_FILE
    if tracker.exists():
        tag = tracker.read_text().strip()
        sub = RELEASE_DIR if tag == "release" else f"iter_{int(tag):07d}"
        weights = root / sub
        if not weights.is_dir():
            raise CheckpointError(f"{tracker} names '{tag}' but {weights} does not exist")
        return weights
    if (root / "metadata.json").exists():
        return root
    raise CheckpointError(
        f"{root} is not a Megatron dist checkpoint: expected {TRACKER_FILE} or metadata.json"
    )


def is_capaware_checkpoint(path: Optional[str]) -> bool:
    """Whether ``path`` is a checkpoint root holding ``capaware_model.json``."""
    return bool(path) and (Path(path) / MODEL_ARGS_FILE).is_file()


def checkpoint_tokenizer_file(ckpt_dir: Optional[str]) -> Optional[Path]:
    """``CKPT/tokenizer/tokenizer.json`` when it exists."""
    if not ckpt_dir:
        return None
    path = Path(ckpt_dir) / TOKENIZER_DIR / "tokenizer.json"
    return path if path.is_file() else None


def load_model_args(ckpt_dir: Union[str, Path]) -> MoEModelArgs:
    """Read the :class:`MoEModelArgs` saved beside a checkpoint."""
    if not Path(ckpt_dir).exists():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    path = Path(ckpt_dir) / MODEL_ARGS_FILE
    if not path.exists():
        raise CheckpointError(
            f"{path} is missing: this checkpoint has no model description. Checkpoints made "
            "by megatron-capaware (training script, capaware-convert) include it; for "
            "another Megatron checkpoint write one with MoEModelArgs(...).save(path)"
        )
    try:
        return MoEModelArgs.load(path)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from err


def save_checkpoint(
    model: torch.nn.Module,
    ckpt_dir: Union[str, Path],
    args: MoEModelArgs,
    *,
    tokenizer_dir: Optional[Union[str, Path]] = None,
    iteration: int = 0,
) -> Path:
    """Save ``model`` (all ranks call this) in Megatron-LM's release layout.

    A model whose experts are placed (``--capaware-placement``) is saved in
    Megatron's logical layout: the checkpoint loads into any model.

    Returns:
        The checkpoint root.
    """
    from megatron.core import dist_checkpointing

    root = Path(ckpt_dir)
    weights = root / RELEASE_DIR
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        weights.mkdir(parents=True, exist_ok=True)
    barrier()
    from megatron_capaware.adapters.placement import logical_layout

    with logical_layout(_unwrap(model)):  # a placed model saves Megatron's logical layout
        state = {
            "model": _unwrap(model).sharded_state_dict(),
            "checkpoint_version": 3.0,
            "iteration": iteration,
        }
        dist_checkpointing.save(state, str(weights))
    if rank == 0:
        (root / TRACKER_FILE).write_text("release\n")
        args.save(root / MODEL_ARGS_FILE)
        if tokenizer_dir is not None:
            import shutil

            shutil.copytree(tokenizer_dir, root / TOKENIZER_DIR, dirs_exist_ok=True)
    barrier()
    return root


def load_weights(
    model: torch.nn.Module,
    ckpt_dir: Union[str, Path],
    args: Optional[MoEModelArgs] = None,
    *,
    strict: bool = True,
) -> None:
    """Load a checkpoint's weights into an already-built ``model`` (all ranks).

    Args:
        model: built for ``args`` at any parallel layout.
        ckpt_dir: checkpoint root or weights directory.
        args: the architecture ``model`` was built from; compared with the
            checkpoint's own description when both exist.
        strict: require every model tensor to be in the checkpoint.

    Raises:
        CheckpointError: architecture mismatch, missing tensors, wrong shapes.
    """
    from megatron.core import dist_checkpointing

    root = Path(ckpt_dir)
    weights = checkpoint_weights_dir(root)
    if args is not None and (root / MODEL_ARGS_FILE).exists():
        saved = load_model_args(root)
        diffs = {
            k: (v, getattr(args, k))
            for k, v in saved.to_dict().items()
            if k != "extra" and getattr(args, k) != v
        }
        if diffs:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diffs.items())
            raise CheckpointError(
                f"checkpoint {root} was saved for a different architecture ({lines}); build the "
                f"model from {root / MODEL_ARGS_FILE} instead"
            )
    inner = _unwrap(model)
    sharded = {"model": inner.sharded_state_dict()}
    try:
        align_keys_with_checkpoint(sharded, weights)
        state = dist_checkpointing.load(sharded, str(weights), strict=_strictness(strict))
    except _LOAD_ERRORS as err:  # Megatron and torch raise several types; name the checkpoint
        hint = ""
        if args is None or not (root / MODEL_ARGS_FILE).exists():
            hint = (f"; the model was probably built for another architecture, and {root} has no "
                    f"{MODEL_ARGS_FILE} to say which (write one with MoEModelArgs(...).save())")
        raise CheckpointError(f"cannot load {weights} into this model: {_load_error_text(err)}{hint}") from err
    model_state = state["model"]
    result = inner.load_state_dict(model_state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if strict and missing:
        raise CheckpointError(f"checkpoint {weights} lacks tensors the model needs: {missing[:8]}")


# Megatron saves fused-norm weights under two names depending on the layer spec:
# the local spec maps every layer's norms to Transformer Engine's fused names,
# but the TE spec keeps an MoE layer's pre-MLP norm as a separate module. A
# checkpoint written with one spec would then miss keys for the other.
KEY_ALIASES = (
    ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"),
    ("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
)


def align_keys_with_checkpoint(sharded: Any, weights_dir: Union[str, Path]) -> int:
    """Rename the model's sharded tensors to the checkpoint's spelling of known aliases.

    Returns:
        How many keys were renamed (0 when model and checkpoint already agree).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    available = set(dist_checkpointing.load_tensors_metadata(str(weights_dir)).keys())
    renamed = 0
    for item in nested_values(sharded):
        if not isinstance(item, ShardedTensor) or item.key in available:
            continue
        for a, b in KEY_ALIASES:
            for old, new in ((a, b), (b, a)):
                alternative = item.key.replace(old, new)
                if old in item.key and alternative in available:
                    item.key = alternative
                    renamed += 1
                    break
            else:
                continue
            break
    return renamed


def _checkpoint_exception() -> tuple:
    try:  # torch's CheckpointException derives from BaseException, not Exception
        from torch.distributed.checkpoint.api import CheckpointException

        return (CheckpointException,)
    except ImportError:  # pragma: no cover - older torch
        return ()


_LOAD_ERRORS = (Exception, *_checkpoint_exception())


def _load_error_text(err: BaseException) -> str:
    """The root cause of a failed load, without torch's per-rank tracebacks."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (exc, _) = next(iter(failures.items()))
        return f"{type(exc).__name__}: {exc} (rank {rank})"
    return f"{type(err).__name__}: {err}"


def _strictness(strict: bool) -> Any:
    from megatron.core.dist_checkpointing.validation import StrictHandling

    return StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_UNEXPECTED


def load_model(
    ckpt_dir: Union[str, Path],
    *,
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    expert_tensor_parallel: int = 1,
    dispatcher: str = "alltoall",
    params_dtype: torch.dtype = torch.float32,
    router: Any = None,
    use_te: Optional[bool] = None,
    grouped_gemm: bool = False,
    **config_overrides: Any,
) -> "tuple[torch.nn.Module, MoEModelArgs]":
    """Build the model a checkpoint describes and load its weights.

    Megatron's model-parallel groups must already be initialised with the
    same sizes (see :func:`megatron_capaware.parallel.init_model_parallel`).
    ``config_overrides`` go to ``TransformerConfig`` (e.g. ``cuda_graph_impl="local"``).

    Returns:
        ``(model, args)``, the model in eval mode.
    """
    from megatron_capaware.models.builder import build_gpt_model, build_transformer_config

    args = load_model_args(ckpt_dir)
    config = build_transformer_config(
        args,
        tensor_parallel=tensor_parallel,
        expert_parallel=expert_parallel,
        expert_tensor_parallel=expert_tensor_parallel,
        dispatcher=dispatcher,
        params_dtype=params_dtype,
        grouped_gemm=grouped_gemm,
        **config_overrides,
    )
    model = build_gpt_model(args, config, use_te=use_te, router=router)
    load_weights(model, ckpt_dir, args)
    return model, args
