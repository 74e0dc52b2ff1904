"""Glue to megatron.training: checkpoint-derived flags, tokenizer, errors without it."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path

import pytest
import torch

from megatron_capaware import megatron_lm
from megatron_capaware.models.builder import MoEModelArgs
from megatron_capaware._compat.launcher import run_distributed
from tests.helpers.cli_workers import EOT, TEXT, make_tiny_checkpoint, train_tokenizer
from tests.helpers.megatron_training_support import HAVE_MEGATRON_TRAINING, needs_megatron_training, run_cli


def write_model_args(root: Path, **changes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    fields = dict(num_layers=4, hidden_size=128, num_attention_heads=8, num_moe_experts=16, moe_router_topk=4,
                  moe_ffn_hidden_size=64, vocab_size=1000, max_sequence_length=256)
    fields.update(changes)
    MoEModelArgs(**fields).save(root / "capaware_model.json")
    return root


def test_checkpoint_defaults_map_the_architecture_onto_megatron_flags(tmp_path) -> None:
    root = write_model_args(tmp_path / "a", num_query_groups=2, kv_channels=16, moe_layer_freq=[0, 1, 1, 1],
                            ffn_hidden_size=512, share_embeddings_and_output_weights=False,
                            moe_shared_expert_intermediate_size=64, layernorm_epsilon=1e-6, rotary_base=500000.0)
    d = megatron_lm.checkpoint_defaults(str(root))
    assert d["num_layers"] == 4 and d["hidden_size"] == 128 and d["num_attention_heads"] == 8
    assert d["num_experts"] == 16 and d["moe_router_topk"] == 4 and d["moe_ffn_hidden_size"] == 64
    assert d["ffn_hidden_size"] == 512 and d["padded_vocab_size"] == 1000
    assert d["max_position_embeddings"] == 256 and d["seq_length"] == 256
    assert d["group_query_attention"] is True and d["num_query_groups"] == 2 and d["kv_channels"] == 16
    assert d["moe_layer_freq"] == [0, 1, 1, 1] and d["moe_shared_expert_intermediate_size"] == 64
    assert d["untie_embeddings_and_output_weights"] is True and d["swiglu"] is True
    assert d["normalization"] == "RMSNorm" and d["norm_epsilon"] == 1e-6 and d["rotary_base"] == 500000
    assert d["add_bias_linear"] is False and d["position_embedding_type"] == "rope"
    assert "bf16" not in d  # no weights to read a dtype from
    plain = megatron_lm.checkpoint_defaults(str(write_model_args(tmp_path / "b", gated_linear_unit=False,
                                                                  activation="gelu")))
    assert plain["swiglu"] is False and plain["ffn_hidden_size"] == 64 and "num_query_groups" not in plain
    with pytest.raises(ValueError, match="no Megatron-LM flag"):
        megatron_lm.checkpoint_defaults(str(write_model_args(tmp_path / "c", activation="relu")))


def test_checkpoint_defaults_become_parser_defaults_the_command_line_overrides(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--swiglu", action="store_true")
    applied = megatron_lm.set_parser_defaults(parser, megatron_lm.checkpoint_defaults(str(write_model_args(tmp_path))))
    assert set(applied) == {"num_layers", "swiglu"}  # unknown destinations are left out
    assert parser.parse_args([]).num_layers == 4
    assert parser.parse_args(["--num-layers", "2"]).num_layers == 2
    assert "--num-layers 4" in megatron_lm.describe_defaults(applied) and "--swiglu" in megatron_lm.describe_defaults(applied)


def test_peek_flag() -> None:
    argv = ["--load", "a", "--x", "--load=b", "--loader", "c"]
    assert megatron_lm.peek_flag(argv, "--load") == "b"
    assert megatron_lm.peek_flag(["--load", "a"], "--load") == "a"
    assert megatron_lm.peek_flag(["--x"], "--load") is None


def test_tokenizer_has_megatrons_interface(tmp_path) -> None:
    train_tokenizer(tmp_path / "tok")
    tok = megatron_lm.CapawareTokenizer.from_file(tmp_path / "tok")
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert tok.vocab_size == raw.get_vocab_size()
    assert tok.eod == raw.token_to_id(EOT) and tok.eos == tok.eod and tok.bos is None
    ids = tok.tokenize(TEXT[0])
    assert ids == raw.encode(TEXT[0]).ids and tok.detokenize(ids) == TEXT[0]
    assert tok.detokenize(ids + [tok.eod]) == TEXT[0]  # special tokens skipped
    offsets = tok.offsets(ids, TEXT[0])
    assert offsets[0] == 0 and offsets == sorted(offsets) and len(offsets) == len(ids)
    pieces = [TEXT[0][a:b] for a, b in zip(offsets, offsets[1:] + [len(TEXT[0])])]
    assert "".join(pieces) == TEXT[0]
    with pytest.raises(FileNotFoundError):
        megatron_lm.CapawareTokenizer.from_file(tmp_path / "missing")


def test_the_checkpoint_tokenizer_is_used_only_when_none_is_named(tmp_path) -> None:
    root = write_model_args(tmp_path / "ckpt")
    train_tokenizer(root / "tokenizer")
    ns = argparse.Namespace
    assert megatron_lm.checkpoint_tokenizer_for(ns(load=str(root), tokenizer_type=None, tokenizer_model=None)) == (
        root / "tokenizer" / "tokenizer.json")
    assert megatron_lm.checkpoint_tokenizer_for(ns(load=str(root), tokenizer_type="GPT2BPETokenizer",
                                                   tokenizer_model=None)) is None
    assert megatron_lm.checkpoint_tokenizer_for(ns(load=str(root), tokenizer_type=None, tokenizer_model="x")) is None
    assert megatron_lm.checkpoint_tokenizer_for(ns(load=str(tmp_path), tokenizer_type=None, tokenizer_model=None)) is None
    # The hook Megatron's build_tokenizer goes through.
    seen = []
    build = megatron_lm.tokenizer._tokenizer_builder(lambda args: seen.append(args) or "megatron's")
    args = ns(load=str(root), tokenizer_type=None, tokenizer_model=None, padded_vocab_size=None, rank=1)
    assert isinstance(build(args), megatron_lm.CapawareTokenizer) and args.padded_vocab_size > 0 and not seen
    assert build(ns(load=None, tokenizer_type="X", tokenizer_model=None)) == "megatron's"


def test_replace_function_rebinds_imported_names() -> None:
    holder = types.ModuleType("capaware_test_holder")
    user = types.ModuleType("capaware_test_user")

    def original():
        return 1

    holder.fn = original
    user.fn = original  # as "from holder import fn" leaves it
    sys.modules[holder.__name__], sys.modules[user.__name__] = holder, user
    try:
        back = megatron_lm.replace_function(holder, "fn", lambda: 2)
        assert back is original and holder.fn() == 2 and user.fn() == 2
    finally:
        del sys.modules[holder.__name__], sys.modules[user.__name__]


def test_python_compat_provides_typing_override() -> None:
    megatron_lm.ensure_python_compat()

    @typing.override
    def method():
        return 3

    assert method() == 3


def test_bf16_weights_are_detected(tmp_path) -> None:
    root = tmp_path / "bf16"
    run_distributed(make_tiny_checkpoint, 1, {"ckpt": str(root), "bf16": True}, timeout_s=240)
    assert megatron_lm.checkpoint_dtype(str(root)) == torch.bfloat16
    defaults = megatron_lm.checkpoint_defaults(str(root))
    assert defaults["bf16"] is True and "fp16" not in defaults
    assert megatron_lm.checkpoint_dtype(str(tmp_path / "nothing")) is None


# --------------------------------------------------------------------------- with / without megatron.training


@pytest.mark.skipif(HAVE_MEGATRON_TRAINING, reason="megatron.training is importable here (0.19.2): "
                    "this checks the message of an install without it (0.16.1)")
@pytest.mark.parametrize("command", [
    ["-m", "megatron_capaware.generate", "--prompts", "x"],
    ["-m", "megatron_capaware.launch", "examples/megatron_style_static_inference.py", "--moe-router-type", "laser"],
])
def test_without_megatron_training_the_clis_say_how_to_get_it(command) -> None:
    result = run_cli([sys.executable, *command], timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "megatron.training is not importable" in result.stderr
    assert "megatron-core==0.19.2" in result.stderr and "is installed" in result.stderr
    with pytest.raises(megatron_lm.MegatronTrainingUnavailable, match="megatron-core 0.19.2 wheel"):
        megatron_lm.import_megatron_training()


class TestWithMegatronTraining:
    pytestmark = needs_megatron_training

    def test_import_and_prebuilt_dataset_helpers(self) -> None:
        training = megatron_lm.import_megatron_training()
        assert training.__name__ == "megatron.training"
        from megatron.core.datasets import utils

        if not (Path(utils.__file__).parent / "Makefile").exists():
            assert getattr(utils.compile_helpers, "capaware_prebuilt", False)
            utils.compile_helpers()  # a no-op, not `make`
        assert megatron_lm.megatron_training_available() == (True, "")

    def test_megatron_parser_takes_the_checkpoint_defaults(self, tmp_path, monkeypatch) -> None:
        megatron_lm.import_megatron_training()
        from megatron.training.arguments import parse_args

        root = write_model_args(tmp_path / "ckpt", num_query_groups=4)
        monkeypatch.setattr(sys, "argv", ["x", "--load", str(root), "--hidden-size", "256",
                                          "--moe-router-type", "laser"])
        args = parse_args(extra_args_provider=megatron_lm.extra_args_provider(None))
        assert (args.num_layers, args.num_experts, args.moe_router_topk, args.padded_vocab_size) == (4, 16, 4, 1000)
        assert args.hidden_size == 256  # the command line wins
        assert args.swiglu and args.group_query_attention and args.num_query_groups == 4
        assert args.moe_router_type == "laser" and args.moe_router_dtype == "fp32"
        if not torch.cuda.is_available():
            assert args.distributed_backend == "gloo" and args.transformer_impl == "local"


def test_help_with_megatron_style_bare_percent_signs_prints() -> None:
    """Megatron 0.19 / main have help strings with a lone '%': --help must still print."""
    import argparse

    from megatron_capaware.megatron_lm.checkpoint_flags import escape_help_percents

    parser = argparse.ArgumentParser()
    parser.add_argument("--factor", default=1.1, help="buffer size factor (1.1 = 10% more, i.e. 110%)")
    parser.add_argument("--ok", default=3, help="default %(default)s, 100%% sure")
    with pytest.raises((ValueError, TypeError)):  # what argparse raises on a lone %
        parser.format_help()
    text = escape_help_percents(parser).format_help()
    assert "10% more, i.e. 110%)" in text and "default 3, 100% sure" in text


# --------------------------------------------------------------------------- Megatron-LM script glue


def test_the_server_gets_inference_max_sequence_length() -> None:
    """Megatron-LM's server reads args.inference_max_sequence_length; its parser sets
    inference_max_seq_length (a Megatron-LM bug): the parse-time check adds the alias."""
    from megatron_capaware.megatron_lm.arguments import add_capaware_args, add_megatron_lm_aliases

    parser = argparse.ArgumentParser()
    parser.add_argument("--inference-max-seq-length", type=int, default=2560, dest="inference_max_seq_length")
    add_capaware_args(parser)
    args = parser.parse_args(["--inference-max-seq-length", "96"])
    assert args.inference_max_sequence_length == 96
    # A Megatron-LM that defines the name itself is left alone; no dest, no alias.
    ns = argparse.Namespace(inference_max_seq_length=5, inference_max_sequence_length=7)
    assert add_megatron_lm_aliases(ns).inference_max_sequence_length == 7
    assert not hasattr(add_megatron_lm_aliases(argparse.Namespace()), "inference_max_sequence_length")


needs_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-ins are inert with CUDA")


@needs_cpu
def test_cuda_memory_statistics_read_zero_on_cpu() -> None:
    from megatron_capaware.megatron_lm.cpu_support import ZeroCudaMemoryStats, _zero_cuda_memory_statistics

    stats = ZeroCudaMemoryStats()
    assert stats["allocated_bytes.all.peak"] == 0 and stats["reserved_bytes.all.peak"] == 0
    with pytest.raises(KeyError):
        stats[3]
    saved = {n: getattr(torch.cuda, n) for n in ("memory_stats", "reset_peak_memory_stats", "max_memory_allocated",
                                                 "max_memory_reserved", "memory_allocated", "memory_reserved")}
    try:
        _zero_cuda_memory_statistics()
        assert torch.cuda.memory_stats()["allocated_bytes.all.peak"] == 0
        assert torch.cuda.max_memory_allocated() == 0 and torch.cuda.reset_peak_memory_stats() is None
    finally:
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)


TRITON_USER = '''
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner
from triton.runtime.cache import FileCacheManager
from triton.language.extra import libdevice
from packaging import version

HAVE_TRITON = tl.constexpr(version.parse(triton.__version__) >= version.parse("2.0.0"))

class Cache(FileCacheManager):
    pass

@triton.autotune(configs=[triton.Config({"BLOCK": 8}, num_warps=4)], key=["n"])
@triton.jit
def kernel(x_ptr, n, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], dtype=tl.float32))

@triton.heuristics({"EVEN": lambda args: True})
@triton.jit
def other(x_ptr):
    pass
'''


@needs_cpu
def test_the_triton_stand_in_imports_megatron_style_modules_and_refuses_launches(tmp_path, monkeypatch) -> None:
    import importlib
    import importlib.util

    import megatron_capaware  # noqa: F401  (installs the stand-in)

    triton = importlib.import_module("triton")
    if not getattr(triton, "capaware_cpu_stand_in", False):
        pytest.skip("a real triton is installed here")
    (tmp_path / "triton_user_mod.py").write_text(TRITON_USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("triton_user_mod")
    assert not mod.HAVE_TRITON  # version gates turn the Triton paths off
    assert issubclass(mod.Cache, mod.FileCacheManager) and mod.Cache(1, a=2)
    for kernel in (mod.kernel, mod.other):
        with pytest.raises(RuntimeError, match="cannot run: this CPU machine has no triton"):
            kernel[(1,)](None, 4)
        with pytest.raises(RuntimeError, match="no triton and no GPU"):
            kernel(None)
