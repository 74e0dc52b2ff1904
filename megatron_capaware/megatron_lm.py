"""Glue between megatron-capaware and Megatron-LM's ``megatron.training``.

Used by :mod:`megatron_capaware.launch` (any Megatron-LM script, unchanged)
and :mod:`megatron_capaware.generate` (the inference entry point). It holds:

* :func:`import_megatron_training`: imports ``megatron.training`` or raises
  :class:`MegatronTrainingUnavailable` saying how to get it (the default
  install, megatron-core 0.16.1, does not ship it; 0.19.2 does). megatron-core
  0.19.2 declares Python >= 3.12 and uses ``typing.override``; on 3.11 an
  equivalent is installed first.
* :func:`enable_cpu_support`: what ``megatron.training`` needs on a machine
  without CUDA (no-op with CUDA): the package's CPU shims, ``.cuda()`` kept on
  the CPU, ``initialize_megatron`` allowed without CUDA, Megatron's model
  parallel groups and RNG tracker set up (Megatron skips both when it sees no
  GPU), and CPU-safe defaults for Megatron flags (gloo, local layers, no
  fused kernels).
* :func:`checkpoint_defaults`: Megatron flag defaults derived from a
  megatron-capaware checkpoint's ``capaware_model.json`` (the architecture)
  and its weights' dtype, so ``--load CKPT`` is enough. Those checkpoints
  carry no ``args`` in their common state, so Megatron's
  ``--use-checkpoint-args`` cannot supply them.
* :class:`CapawareTokenizer`: the Hugging Face ``tokenizers`` BPE shipped in a
  checkpoint's ``tokenizer/tokenizer.json``, with the interface Megatron's
  text generation controller uses.
* :func:`gpt_model_provider`: a Megatron-LM style model provider for the
  GPT MoE models these checkpoints hold.
* :func:`report_stats`: per-layer load statistics, printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from megatron_capaware.checkpoint import MODEL_ARGS_FILE, TOKENIZER_DIR, checkpoint_weights_dir
from megatron_capaware.cpu_shims import apply_cpu_shims, cuda_available, redirect_cuda_tensors_to_cpu

STATS_FORMAT = "capaware-load-stats/1"

INSTALL_HINT = (
    "megatron.training ships in the megatron-core 0.19.2 wheel (not in 0.16.1, the default "
    "install): pip install --no-deps --ignore-requires-python megatron-core==0.19.2 ; or put a "
    "Megatron-LM checkout first on PYTHONPATH"
)


class MegatronTrainingUnavailable(ImportError):
    """``megatron.training`` cannot be imported; the message says how to get it."""


# --------------------------------------------------------------------------- import


def ensure_python_compat() -> None:
    """Give Python < 3.12 the ``typing.override`` that megatron-core 0.19 imports.

    It is the same no-op decorator as Python 3.12's (it only marks the function).
    """
    if hasattr(typing, "override"):
        return

    def override(method: Any) -> Any:
        try:
            method.__override__ = True
        except (AttributeError, TypeError):
            pass
        return method

    typing.override = override  # type: ignore[attr-defined]


def import_megatron_training() -> Any:
    """Import ``megatron.training`` (and the modules used here) or explain why not.

    Raises:
        MegatronTrainingUnavailable: with the installed megatron-core version and the fix.
    """
    ensure_python_compat()
    import megatron_capaware  # noqa: F401  (stubs triton before megatron.core on CPU)

    try:
        import megatron.training  # noqa: F401
        import megatron.training.arguments  # noqa: F401
        import megatron.training.checkpointing  # noqa: F401
        import megatron.training.initialize  # noqa: F401
    except ImportError as err:
        try:
            import megatron.core

            have = f"megatron-core {megatron.core.__version__} is installed"
        except Exception:  # pragma: no cover - megatron-core is a dependency
            have = "megatron-core is not importable"
        raise MegatronTrainingUnavailable(
            f"megatron.training is not importable ({type(err).__name__}: {err}); {have}. "
            f"{INSTALL_HINT}"
        ) from err
    _use_prebuilt_dataset_helpers()
    return megatron.training


def _use_prebuilt_dataset_helpers() -> None:
    """Skip ``make`` of the dataset helpers when the wheel already ships them built.

    ``initialize_megatron`` runs ``make -C megatron/core/datasets``; the
    megatron-core wheel ships the compiled ``helpers_cpp`` module but no
    Makefile, so ``make`` fails and Megatron exits. A Megatron-LM checkout
    (which has the Makefile) is left alone.
    """
    import importlib.util

    from megatron.core.datasets import utils as dataset_utils

    folder = Path(dataset_utils.__file__).parent
    if (folder / "Makefile").exists() or getattr(dataset_utils.compile_helpers, "capaware_prebuilt", False):
        return
    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is None:
        return  # nothing prebuilt: let Megatron report its own error

    def compile_helpers() -> None:
        """megatron-capaware: the wheel's prebuilt helpers_cpp is used (no Makefile to run)."""

    compile_helpers.capaware_prebuilt = True  # type: ignore[attr-defined]
    dataset_utils.compile_helpers = compile_helpers


def megatron_training_available() -> Tuple[bool, str]:
    """``(True, "")`` when ``megatron.training`` imports, else ``(False, reason)``."""
    try:
        import_megatron_training()
    except MegatronTrainingUnavailable as err:
        return False, str(err)
    return True, ""


# --------------------------------------------------------------------------- patching


def replace_function(module: Any, name: str, new: Callable[..., Any]) -> Callable[..., Any]:
    """Set ``module.name = new`` and rebind every loaded module's reference to the old one.

    Scripts and Megatron modules import functions by name (``from
    megatron.training.checkpointing import load_checkpoint``); those imported
    before this call are rebound too, later imports get ``new``.

    Returns:
        The original function.
    """
    original = getattr(module, name)
    setattr(module, name, new)
    for other in list(sys.modules.values()):
        namespace = getattr(other, "__dict__", None)
        if not isinstance(namespace, dict) or other is module:
            continue
        for key, value in list(namespace.items()):
            if value is original:
                try:
                    setattr(other, key, new)
                except (AttributeError, TypeError):
                    pass
    return original


def is_rank0() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def print_rank0(*values: Any) -> None:
    if is_rank0():
        print(*values, flush=True)


# --------------------------------------------------------------------------- CPU

#: Megatron flag defaults on a machine without CUDA: gloo, Megatron's local
#: (non-Transformer-Engine) layers, and no fused CUDA kernels. Flags given on
#: the command line still win.
CPU_MEGATRON_DEFAULTS: Dict[str, Any] = {
    "distributed_backend": "gloo",
    "transformer_impl": "local",
    "bias_dropout_fusion": False,
    "bias_gelu_fusion": False,
    "bias_swiglu_fusion": False,
    "masked_softmax_fusion": False,
    "apply_rope_fusion": False,
    "gradient_accumulation_fusion": False,
    "no_persist_layer_norm": True,
}

_CPU_SUPPORT = False


def enable_cpu_support() -> bool:
    """Let ``megatron.training`` run on a machine without CUDA (no-op with CUDA).

    Returns:
        True when active (now or earlier), False on a CUDA machine.
    """
    global _CPU_SUPPORT
    if cuda_available():
        return False
    if _CPU_SUPPORT:
        return True
    import_megatron_training()
    apply_cpu_shims()
    redirect_cuda_tensors_to_cpu()
    _redirect_cuda_device_arguments()
    import megatron.training.initialize as initialize

    original_init = initialize.initialize_megatron

    def initialize_megatron(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_no_cuda"] = True
        return original_init(*args, **kwargs)

    replace_function(initialize, "initialize_megatron", initialize_megatron)

    original_distributed = initialize._initialize_distributed

    def _initialize_distributed(*args: Any, **kwargs: Any) -> Any:
        _default_rendezvous_env()
        result = original_distributed(*args, **kwargs)
        if not kwargs.get("skip_model_parallel_init", False):
            _init_model_parallel_from_args()
        return result

    initialize._initialize_distributed = _initialize_distributed

    original_seed = initialize._set_random_seed

    def _set_random_seed(seed_: int, data_parallel_random_init: bool = False, *args: Any, **kwargs: Any) -> Any:
        result = original_seed(seed_, data_parallel_random_init, *args, **kwargs)
        # Megatron seeds its model-parallel RNG tracker only when it sees a GPU.
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        if parallel_state.model_parallel_is_initialized():
            seed = seed_ + 100 * parallel_state.get_pipeline_model_parallel_rank()
            if data_parallel_random_init:
                seed += 10 * parallel_state.get_data_parallel_rank()
            model_parallel_cuda_manual_seed(seed)
        return result

    initialize._set_random_seed = _set_random_seed
    _CPU_SUPPORT = True
    return True


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaDeviceToCpu(torch.overrides.TorchFunctionMode):
    """Turns ``device="cuda"`` (and ``tensor.to("cuda")``) into the CPU.

    ``megatron.training`` (checkpoint metadata, the inference controller)
    allocates with ``device="cuda"``; on a machine without CUDA those calls
    would raise. Active only where :func:`enable_cpu_support` is.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and any(_is_cuda_device(a) for a in args[1:]):
            args = tuple("cpu" if i and _is_cuda_device(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


_DEVICE_MODE: Optional[_CudaDeviceToCpu] = None


def _redirect_cuda_device_arguments() -> None:
    global _DEVICE_MODE
    if _DEVICE_MODE is None:
        _DEVICE_MODE = _CudaDeviceToCpu()
        _DEVICE_MODE.__enter__()  # stays pushed for the life of the process


def _default_rendezvous_env() -> None:
    """A single process started without torchrun gets a one-rank rendezvous."""
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return
    from megatron_capaware.testing import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")


def _init_model_parallel_from_args() -> None:
    """Megatron's model-parallel groups, as ``_initialize_distributed`` makes them with a GPU."""
    from megatron.core import parallel_state
    from megatron.training import get_args

    if parallel_state.model_parallel_is_initialized():
        return
    args = get_args()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
        order="tp-cp-ep-dp-pp" if not getattr(args, "use_tp_pp_dp_mapping", False) else "tp-cp-ep-pp-dp",
    )


def set_parser_defaults(parser: argparse.ArgumentParser, defaults: Dict[str, Any]) -> Dict[str, Any]:
    """``parser.set_defaults`` for the destinations this parser knows; returns those set."""
    known = {action.dest for action in parser._actions}
    applied = {k: v for k, v in defaults.items() if k in known}
    parser.set_defaults(**applied)
    return applied


# --------------------------------------------------------------------------- checkpoints


def is_capaware_checkpoint(path: Optional[str]) -> bool:
    """Whether ``path`` is a checkpoint root holding ``capaware_model.json``."""
    return bool(path) and (Path(path) / MODEL_ARGS_FILE).is_file()


def peek_flag(argv: List[str], name: str) -> Optional[str]:
    """The value of ``--name VALUE`` / ``--name=VALUE`` in ``argv`` (last wins), else None."""
    value = None
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(name + "="):
            value = token.split("=", 1)[1]
    return value


def checkpoint_dtype(ckpt_dir: str) -> Optional[torch.dtype]:
    """The dtype of most weight matrices in a dist checkpoint (None if unreadable)."""
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(checkpoint_weights_dir(ckpt_dir))).read_metadata()
    except Exception:
        return None
    counts: Dict[torch.dtype, int] = {}
    for meta in metadata.state_dict_metadata.values():
        properties = getattr(meta, "properties", None)
        size = getattr(meta, "size", None)
        if properties is None or size is None or len(size) < 2:
            continue
        counts[properties.dtype] = counts.get(properties.dtype, 0) + 1
    return max(counts, key=counts.get) if counts else None


def checkpoint_defaults(ckpt_dir: str) -> Dict[str, Any]:
    """Megatron argument defaults (by ``dest``) describing a capaware checkpoint's model.

    From ``capaware_model.json``: the architecture flags (``--num-layers``,
    ``--hidden-size``, ``--num-experts``, ``--moe-router-topk``, ...,
    ``--padded-vocab-size`` = the model's vocabulary); from the weights:
    ``--bf16`` / ``--fp16``. Megatron's ``--use-checkpoint-args`` cannot do
    this: these checkpoints store no ``args``.

    Raises:
        megatron_capaware.checkpoint.CheckpointError: no or malformed ``capaware_model.json``.
        ValueError: an architecture Megatron-LM's flags cannot express.
    """
    from megatron_capaware.checkpoint import load_model_args

    a = load_model_args(ckpt_dir)
    if a.gated_linear_unit and a.activation != "silu":
        raise ValueError(
            f"{ckpt_dir}: a gated {a.activation} MLP has no Megatron-LM flag (only --swiglu, gated silu)"
        )
    if not a.gated_linear_unit and a.activation not in ("gelu",):
        raise ValueError(f"{ckpt_dir}: a non-gated {a.activation} MLP has no Megatron-LM flag")
    out: Dict[str, Any] = dict(
        num_layers=a.num_layers,
        hidden_size=a.hidden_size,
        num_attention_heads=a.num_attention_heads,
        num_experts=a.num_moe_experts,
        moe_router_topk=a.moe_router_topk,
        moe_ffn_hidden_size=a.moe_ffn_hidden_size,
        ffn_hidden_size=a.ffn_hidden_size or a.moe_ffn_hidden_size,
        padded_vocab_size=a.vocab_size,
        max_position_embeddings=a.max_sequence_length,
        seq_length=a.max_sequence_length,
        moe_layer_freq=a.moe_layer_freq,
        moe_shared_expert_intermediate_size=a.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=a.moe_shared_expert_gate,
        moe_router_score_function=a.moe_router_score_function,
        moe_router_pre_softmax=a.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=a.moe_router_topk_scaling_factor,
        moe_router_dtype="fp32",
        normalization=a.normalization,
        norm_epsilon=a.layernorm_epsilon,
        swiglu=bool(a.gated_linear_unit),
        add_bias_linear=a.add_bias_linear,
        add_qkv_bias=a.add_qkv_bias,
        qk_layernorm=a.qk_layernorm,
        position_embedding_type=a.position_embedding_type,
        rotary_base=int(a.rotary_base),
        rotary_percent=a.rotary_percent,
        untie_embeddings_and_output_weights=not a.share_embeddings_and_output_weights,
    )
    if a.num_query_groups is not None and a.num_query_groups != a.num_attention_heads:
        out.update(group_query_attention=True, num_query_groups=a.num_query_groups)
    if a.kv_channels is not None:
        out["kv_channels"] = a.kv_channels
    dtype = checkpoint_dtype(ckpt_dir)
    if dtype == torch.bfloat16:
        out["bf16"] = True
    elif dtype == torch.float16:
        out["fp16"] = True
    return out


def checkpoint_tokenizer_file(ckpt_dir: Optional[str]) -> Optional[Path]:
    """``CKPT/tokenizer/tokenizer.json`` when it exists."""
    if not ckpt_dir:
        return None
    path = Path(ckpt_dir) / TOKENIZER_DIR / "tokenizer.json"
    return path if path.is_file() else None


def extra_args_provider(provider: Optional[Callable[[Any], Any]] = None) -> Callable[[Any], Any]:
    """Megatron ``extra_args_provider``: ``provider``'s flags, then megatron-capaware's.

    Besides :func:`megatron_capaware.arguments.add_capaware_args` it sets, as
    defaults that the command line still overrides: the CPU defaults
    (:data:`CPU_MEGATRON_DEFAULTS`, only without CUDA) and, when ``--load``
    names a megatron-capaware checkpoint, the model's flags
    (:func:`checkpoint_defaults`). It also lets Megatron build that
    checkpoint's tokenizer when no tokenizer flag is given
    (:func:`install_tokenizer_hook`) and, without CUDA, enables
    :func:`enable_cpu_support`.
    """
    from megatron_capaware.arguments import add_capaware_args

    def extra(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if provider is not None:
            parser = provider(parser)
        install_tokenizer_hook()
        if enable_cpu_support():
            set_parser_defaults(parser, CPU_MEGATRON_DEFAULTS)
        load = peek_flag(sys.argv[1:], "--load")
        if is_capaware_checkpoint(load):
            applied = set_parser_defaults(parser, checkpoint_defaults(load))
            print_rank0(
                f"megatron-capaware: model flags from {Path(load) / MODEL_ARGS_FILE}: "
                f"{describe_defaults(applied)}"
            )
        return add_capaware_args(parser)

    extra.capaware_wrapped = provider  # type: ignore[attr-defined]
    return extra


def describe_defaults(defaults: Dict[str, Any]) -> str:
    """``--num-layers 2 --swiglu ...`` for a log line."""
    parts = []
    for dest, value in defaults.items():
        name = "--" + dest.replace("_", "-")
        if value is True:
            parts.append(name)
        elif value is False or value is None:
            continue
        else:
            parts.append(f"{name} {value}")
    return " ".join(parts)


# --------------------------------------------------------------------------- tokenizer

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


# --------------------------------------------------------------------------- model


def gpt_model_provider(
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    config: Any = None,
    pg_collection: Any = None,
) -> torch.nn.Module:
    """Megatron-LM style model provider for ``megatron.training.get_model``: a GPT MoE.

    Builds ``GPTModel`` from Megatron's parsed arguments
    (``core_transformer_config_from_args``) with Megatron's own decoder block
    spec, Transformer Engine layers when ``--transformer-impl
    transformer_engine``, Megatron's local layers otherwise.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    if config is None:
        config = core_transformer_config_from_args(args)
    use_te = getattr(args, "transformer_impl", "local") == "transformer_engine"
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, vp_stage=vp_stage)
    kwargs: Dict[str, Any] = dict(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=False,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
    )
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    if pg_collection is not None:
        kwargs["pg_collection"] = pg_collection
    return GPTModel(**kwargs)


# --------------------------------------------------------------------------- scripts


def install_from_args(model: Any, args: Any = None) -> Optional[Dict[int, Any]]:
    """Swap the routers the parsed flags ask for into a built (and loaded) model.

    For Megatron-LM scripts (see ``patches/``): call after ``get_model`` /
    ``load_checkpoint``. ``model`` is a module or Megatron's list of model
    chunks. With ``--moe-router-type topk`` and no ``--capaware-stats-output``
    nothing is changed.

    Returns:
        ``{layer_number: LayerRoutingStats}``, or None when nothing was installed.
    """
    from megatron_capaware.adapters import install_capaware_routers
    from megatron_capaware.arguments import config_from_args, stats_requested

    if args is None:
        from megatron.training import get_args

        args = get_args()
    capaware = config_from_args(args)
    if capaware.router_type == "topk" and not stats_requested(args):
        return None
    chunks = model if isinstance(model, (list, tuple)) else [model]
    stats: Dict[int, Any] = {}
    for chunk in chunks:
        stats.update(install_capaware_routers(chunk, capaware))
    print_rank0(f"megatron-capaware: routing with {capaware.describe()} in {len(stats)} MoE layers")
    return stats


def report_from_args(stats: Optional[Dict[int, Any]], args: Any = None) -> Optional[Dict[str, Any]]:
    """Print (rank 0) and write ``--capaware-stats-output``; every rank calls it. No-op for None."""
    from megatron_capaware.arguments import config_from_args, stats_requested

    if not stats:
        return None
    if args is None:
        from megatron.training import get_args

        args = get_args()
    output = args.capaware_stats_output if stats_requested(args) else None
    return report_stats(stats, config_from_args(args), output)


# --------------------------------------------------------------------------- stats


def summarize(all_stats: Dict[int, Any]) -> Dict[str, Any]:
    """Per-layer and aggregate load figures over every recorded call (all ranks call this)."""
    from megatron_capaware import metrics
    from megatron_capaware.adapters import reduce_summaries

    per_layer = reduce_summaries(all_stats)
    return {"layers": per_layer, "aggregate": metrics.aggregate_layers(per_layer)}


def format_stats(summary: Dict[str, Any], title: str) -> str:
    """A per-layer table of :func:`summarize`'s result."""
    lines = [title]
    lines.append(
        f"{'layer':>5} {'calls':>6} {'I(max/mean)':>11} {'I_rank':>7} {'max load':>9} "
        f"{'dropped':>8} {'rerouted':>9} {'flexible':>9}"
    )
    for layer, s in sorted(summary["layers"].items()):
        lines.append(
            f"{layer:>5} {int(s.get('calls', 0)):>6} {s.get('imbalance', 0.0):>11.3f} "
            f"{s.get('rank_imbalance', 0.0):>7.3f} {s.get('max_load', 0.0):>9.1f} "
            f"{s.get('dropped_frac', 0.0):>8.2%} {s.get('rerouted_frac', 0.0):>9.2%} "
            f"{s.get('flexible_frac', 0.0):>9.2%}"
        )
    agg = summary["aggregate"]
    if agg:
        lines.append(
            f"  I_agg {agg['i_agg']:.3f}  rank I_agg {agg['rank_imbalance']:.3f}  "
            f"dropped {agg['dropped_frac']:.2%}  rerouted {agg['rerouted_frac']:.2%}"
        )
    return "\n".join(lines)


def report_stats(
    all_stats: Dict[int, Any],
    capaware: Any,
    output: Optional[str] = None,
    *,
    extra: Optional[Dict[str, Any]] = None,
    print_table: bool = True,
) -> Dict[str, Any]:
    """Reduce the per-layer stats over the ranks, print a table and write JSON on rank 0.

    Every rank must call this (one all-reduce per layer).

    Returns:
        The JSON-ready record.
    """
    summary = summarize(all_stats)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    ep = next(iter(all_stats.values())).ep_size if all_stats else 1
    record: Dict[str, Any] = {
        "format": STATS_FORMAT,
        "router": capaware.describe(),
        "config": capaware.to_dict(),
        "world_size": world,
        "expert_parallel": ep,
        "layers": {str(k): v for k, v in sorted(summary["layers"].items())},
        "aggregate": summary["aggregate"],
    }
    record.update(extra or {})
    if is_rank0():
        if print_table:
            title = (
                f"megatron-capaware load stats: router {capaware.describe()}, EP={ep}, "
                f"{len(all_stats)} MoE layers"
            )
            print(format_stats(summary, title), flush=True)
        if output:
            path = Path(output)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            print(f"megatron-capaware: load stats written to {path}", flush=True)
    return record
