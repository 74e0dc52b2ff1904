"""Hugging Face MoE checkpoints converted to Megatron match ``transformers`` exactly.

For every family a tiny random model built from ``transformers``' own config
classes is saved in Hugging Face format, converted with ``capaware-convert``,
loaded with ``checkpoint.load_model`` at EP=1, EP=2 and TP=2 on CPU (gloo), and
compared with the ``transformers`` forward of the same model in fp32:

- ``topk`` (vanilla routing): logits within ``LOGIT_ATOL`` = 1e-4 (observed ~1e-6);
- ``capacity-drop`` at gamma 0.5 (global scope: ``C`` over all ranks' tokens)
  against an independent capacity drop written into the ``transformers``
  model's gates (``tests/hf_workers.HFCapacityDrop``): perplexities within a
  relative ``PPL_RTOL`` = 1e-5 and logits within ``LOGIT_ATOL``, with drops
  actually happening and every expert's load at most ``C``.

Run with ``-s`` to see the measured figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_capaware._compat.launcher import run_distributed
from tests.helpers import hf_workers
from tests.helpers.hf_workers import GAMMA, perplexity

pytest.importorskip("transformers")

LOGIT_ATOL = 1e-4
PPL_RTOL = 1e-5

FAMILIES = ["mixtral", "qwen2_moe", "qwen1.5_moe", "olmoe", "deepseek", "deepseek_v2", "deepseek_v3"]
SIGMOID = {"deepseek_v3"}
# Sharded safetensors (with an index) for some; the CLI entry point for one.
SHARDED = {"mixtral": "40KB", "deepseek": "yes", "deepseek_v2": "60KB"}
VIA_CLI = {"olmoe", "qwen1.5_moe"}
# Converted in one process (TP=1/EP=1, the default use); the others at EP=2 under 2 ranks.
SINGLE_PROCESS = {"qwen1.5_moe", "deepseek_v3"}


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.multirank
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_matches_transformers(tmp_path: Path, family: str) -> None:
    hf_dir, ckpt = tmp_path / "hf", tmp_path / "megatron"
    model = hf_workers.build_hf(family, hf_dir, max_shard_size=SHARDED.get(family))
    if family in SHARDED:
        assert len(list(hf_dir.glob("*.safetensors"))) > 1, "expected a sharded checkpoint"
    ids = hf_workers.token_batch()
    ref = hf_workers.hf_reference(model, ids, GAMMA, family in SIGMOID)
    assert sum(ref["dropped"]) > 0, "gamma too large: the reference dropped nothing"

    spec = dict(hf=str(hf_dir), ckpt=str(ckpt), ids=ids, gamma=GAMMA, cli=family in VIA_CLI)
    if family in SINGLE_PROCESS:
        run_distributed(hf_workers.convert_alone, 1, spec, timeout_s=240)
    else:  # converted at EP=2: each rank reads and writes only its own experts
        spec["convert"] = True
    multi = run_distributed(hf_workers.run_layouts, 2, spec, timeout_s=300)
    ep1 = multi[0]["ep1"]
    ep2 = {key: torch.cat([multi[r]["ep2"][key] for r in range(2)]) for key in ("topk", "drop")}
    tp2 = multi[0]["tp2"]
    assert torch.equal(multi[0]["tp2"]["drop"], multi[1]["tp2"]["drop"]), "TP ranks disagree"
    assert torch.equal(multi[0]["ep1"]["drop"], multi[1]["ep1"]["drop"]), "EP=1 replicas disagree"

    ppl_ref = perplexity(ref["drop_logits"], ids)
    figures = {"family": family, "hf_dropped_fraction": sum(ref["dropped"]) / sum(ref["assignments"])}
    for name, run in (("ep1", ep1), ("ep2", ep2), ("tp2", tp2)):
        figures[f"{name}_topk_max_abs"] = _diff(run["topk"], ref["logits"])
        figures[f"{name}_drop_max_abs"] = _diff(run["drop"], ref["drop_logits"])
        ppl = perplexity(run["drop"], ids)
        figures[f"{name}_drop_ppl_rel"] = abs(ppl - ppl_ref) / ppl_ref
    figures["drop_effect_max_abs"] = _diff(ref["drop_logits"], ref["logits"])
    figures["ppl_topk"] = perplexity(ref["logits"], ids)
    figures["ppl_drop"] = ppl_ref
    print("\nHF-CONVERSION " + json.dumps(figures, sort_keys=True))

    for name in ("ep1", "ep2", "tp2"):
        assert figures[f"{name}_topk_max_abs"] < LOGIT_ATOL, (name, figures)
        assert figures[f"{name}_drop_max_abs"] < LOGIT_ATOL, (name, figures)
        assert figures[f"{name}_drop_ppl_rel"] < PPL_RTOL, (name, figures)
    # The drop changed the model far beyond the tolerance, and Megatron's global loads
    # never exceed C (= the reference's C).
    assert figures["drop_effect_max_abs"] > 100 * LOGIT_ATOL and figures["ppl_drop"] != figures["ppl_topk"]
    assert ep1["capacity"] == ref["capacity"] and multi[0]["ep2"]["capacity"] == ref["capacity"]
    for run in (ep1, multi[0]["ep2"], multi[1]["ep2"], tp2):
        assert all(load <= cap for load, cap in zip(run["max_load"], run["capacity"]))

    # What the evaluator needs is recorded, and the tokenizer ships with the checkpoint.
    saved = json.loads((ckpt / "capaware_model.json").read_text())
    expected_type = {"qwen1.5_moe": "qwen2_moe"}.get(family, family)
    assert saved["extra"]["hf_model_type"] == expected_type
    assert saved["extra"]["tokenizer"] == "hf" and saved["extra"]["tokenizer_dir"] == "tokenizer"
    assert (ckpt / "hf_config.json").exists()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer" / "tokenizer.json"))
    assert tok.encode("w5 w17 w95").ids == [5, 17, 95]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"))("w5 w17")["input_ids"][-2:] == [5, 17]


# --------------------------------------------------------------------------- errors (no Megatron needed)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf-mixtral")
    hf_workers.build_hf("mixtral", folder)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    data = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (folder / "config.json").write_text(json.dumps(data))


def _rewrite_tensors(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _convert_error(folder: Path, tmp_path: Path, **kwargs) -> str:
    from megatron_capaware.models.hf.convert import ConversionError, convert_checkpoint

    with pytest.raises(ConversionError) as info:
        convert_checkpoint(folder, tmp_path / "out", progress=False, **kwargs)
    return str(info.value)


def test_unknown_model_type(mixtral_dir: Path, tmp_path: Path) -> None:
    folder = _copy(mixtral_dir, tmp_path / "hf")
    _edit_config(folder, model_type="llama")
    message = _convert_error(folder, tmp_path)
    assert "unsupported model_type 'llama'" in message and "mixtral" in message


def test_missing_config_key(mixtral_dir: Path, tmp_path: Path) -> None:
    folder = _copy(mixtral_dir, tmp_path / "hf")
    _edit_config(folder, num_local_experts=None)
    assert "lacks required keys ['num_local_experts']" in _convert_error(folder, tmp_path)


def test_missing_tensor(mixtral_dir: Path, tmp_path: Path) -> None:
    folder = _copy(mixtral_dir, tmp_path / "hf")
    _rewrite_tensors(folder, lambda t: t.pop("model.layers.2.block_sparse_moe.experts.3.w2.weight"))
    message = _convert_error(folder, tmp_path)
    assert "missing" in message and "model.layers.2.block_sparse_moe.experts.3.w2.weight" in message


def test_shape_mismatch(mixtral_dir: Path, tmp_path: Path) -> None:
    folder = _copy(mixtral_dir, tmp_path / "hf")
    _edit_config(folder, intermediate_size=20)
    message = _convert_error(folder, tmp_path)
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight: file (24, 32) vs config (20, 32)" in message


def test_unexpected_tensor(mixtral_dir: Path, tmp_path: Path) -> None:
    folder = _copy(mixtral_dir, tmp_path / "hf")
    _rewrite_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(32)}))
    message = _convert_error(folder, tmp_path)
    assert "does not know" in message and "model.layers.0.self_attn.o_proj.bias" in message


def test_missing_shard_listed_in_index(mixtral_dir: Path, tmp_path: Path) -> None:
    folder = _copy(mixtral_dir, tmp_path / "hf")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}
    ))
    _rewrite_tensors(folder, lambda t: t.pop("lm_head.weight"))
    assert "model-00002-of-00002.safetensors" in _convert_error(folder, tmp_path)


def test_no_tokenizer_is_an_error_unless_asked(mixtral_dir: Path, tmp_path: Path) -> None:
    folder = _copy(mixtral_dir, tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    assert "no tokenizer" in _convert_error(folder, tmp_path)


def test_no_safetensors(mixtral_dir: Path, tmp_path: Path) -> None:
    folder = _copy(mixtral_dir, tmp_path / "hf")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert "no *.safetensors" in _convert_error(folder, tmp_path)


def test_refuses_to_overwrite(mixtral_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_text("x")
    assert "--force" in _convert_error(mixtral_dir, tmp_path)


@pytest.mark.parametrize("changes, needle", [
    ({"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 1}, "not convertible exactly"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope scaling 'linear'"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantized checkpoints (fp8)"),
])
def test_deepseek_options_not_expressible(changes, needle) -> None:
    from megatron_capaware.models.hf.convert import ConversionError, plan_conversion

    config = hf_workers.hf_config("deepseek_v2").to_dict()
    config.update(changes)
    with pytest.raises(ConversionError, match=None) as info:
        plan_conversion(config)
    assert needle in str(info.value)


def test_sigmoid_without_normalisation_is_refused() -> None:
    from megatron_capaware.models.hf.convert import ConversionError, plan_conversion

    config = hf_workers.hf_config("deepseek_v3").to_dict()
    config["norm_topk_prob"] = False
    with pytest.raises(ConversionError, match="always normalises"):
        plan_conversion(config)


def test_cli_reports_errors(mixtral_dir: Path, tmp_path: Path, capsys) -> None:
    from megatron_capaware.models.hf.convert import main

    folder = _copy(mixtral_dir, tmp_path / "hf")
    _edit_config(folder, model_type="gpt2")
    assert main([str(folder), str(tmp_path / "out"), "--quiet"]) == 2
    assert "capaware-convert: error: unsupported model_type 'gpt2'" in capsys.readouterr().err
    assert main([str(mixtral_dir), "--check-only"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["family"] == "mixtral" and printed["extra"]["hf_model_type"] == "mixtral"


def test_plans_map_routing_exactly() -> None:
    """The Megatron router settings each family's gate needs."""
    from megatron_capaware.models.hf.convert import plan_conversion

    def args(family):
        return plan_conversion(hf_workers.hf_config(family).to_dict()).args

    mixtral = args("mixtral")  # softmax over the top-k logits == renormalised top-k
    assert (mixtral.moe_router_pre_softmax, mixtral.moe_router_score_function) == (False, "softmax")
    assert args("qwen2_moe").moe_router_pre_softmax is False  # norm_topk_prob=True
    qwen15 = args("qwen1.5_moe")
    assert qwen15.moe_router_pre_softmax is True and qwen15.moe_shared_expert_gate  # norm_topk_prob=False
    assert args("qwen2_moe").moe_layer_freq == [1, 0, 1]
    olmoe = args("olmoe")
    assert olmoe.qk_layernorm and olmoe.qk_norm_scope == "all_heads" and olmoe.moe_router_pre_softmax
    v2 = args("deepseek_v2")
    assert v2.moe_router_pre_softmax and v2.moe_router_topk_scaling_factor == 1.5
    assert (v2.moe_router_num_groups, v2.moe_router_group_topk) == (4, 2) and v2.moe_layer_freq == [0, 1, 1]
    assert v2.mla["rope_type"] == "yarn" and v2.mla["q_lora_rank"] is None
    v3 = args("deepseek_v3")
    assert v3.moe_router_score_function == "sigmoid" and v3.moe_router_enable_expert_bias
    assert v3.moe_router_topk_scaling_factor == 2.5 and v3.moe_router_num_groups == 4
    v1 = plan_conversion(dict(hf_workers.DEEPSEEK_V1)).args
    assert v1.moe_router_pre_softmax and v1.moe_router_topk_scaling_factor is None and v1.mla is None
    assert v1.moe_shared_expert_intermediate_size == 2 * 16 and v1.moe_layer_freq == [0, 1, 1]


def test_old_model_args_files_still_load(tmp_path: Path) -> None:
    """capaware_model.json files written before the HF fields existed load with the old behaviour."""
    from megatron_capaware.models.builder import MoEModelArgs

    old = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=4, moe_router_topk=2,
               moe_ffn_hidden_size=16, vocab_size=64, max_sequence_length=64)
    (tmp_path / "capaware_model.json").write_text(json.dumps(old))
    args = MoEModelArgs.load(tmp_path / "capaware_model.json")
    assert args.mla is None and args.qk_norm_scope == "head" and args.moe_router_num_groups is None
    assert not args.moe_router_enable_expert_bias


HUB_CONFIGS = Path(__file__).parent / "data" / "hf_configs"


@pytest.mark.parametrize("name, expect", [
    ("Mixtral-8x7B-v0.1", dict(moe_router_pre_softmax=False, num_moe_experts=8, moe_router_topk=2)),
    ("Qwen1.5-MoE-A2.7B", dict(moe_router_pre_softmax=True, moe_shared_expert_gate=True,
                               moe_shared_expert_intermediate_size=5632, num_moe_experts=60)),
    ("OLMoE-1B-7B-0924", dict(moe_router_pre_softmax=True, qk_norm_scope="all_heads", moe_router_topk=8)),
    ("deepseek-moe-16b-base", dict(moe_router_pre_softmax=True, moe_shared_expert_intermediate_size=2816,
                                   moe_router_topk_scaling_factor=None, mla=None)),
    ("DeepSeek-V2-Lite", dict(moe_router_pre_softmax=True, moe_router_num_groups=None,
                              moe_shared_expert_intermediate_size=2816)),
    ("DeepSeek-V2", "group_limited_greedy ranks groups by their best expert"),
    ("DeepSeek-V3", "quantized checkpoints (fp8) are not supported; dequantize to bfloat16 first"),
])
def test_hub_configs(name: str, expect) -> None:
    """The published config.json files (v4 keys: rope_theta, rope_scaling, torch_dtype) plan as documented."""
    from megatron_capaware.models.hf.convert import ConversionError, plan_conversion

    config = json.loads((HUB_CONFIGS / f"{name}.json").read_text())
    if isinstance(expect, str):
        with pytest.raises(ConversionError) as info:
            plan_conversion(config)
        assert expect in str(info.value)
        return
    args = plan_conversion(config).args
    for key, value in expect.items():
        assert getattr(args, key) == value, key
    if name == "DeepSeek-V2-Lite":
        assert args.mla["rope_type"] == "yarn" and args.mla["rotary_scaling_factor"] == 40.0
        assert args.mla["mscale"] == args.mla["mscale_all_dim"] == 0.707 and args.moe_layer_freq[:2] == [0, 1]
    if name.startswith("deepseek-moe"):
        assert args.moe_layer_freq == [0] + [1] * 27


def test_dequantized_deepseek_v3_config_plans() -> None:
    from megatron_capaware.models.hf.convert import plan_conversion

    config = json.loads((HUB_CONFIGS / "DeepSeek-V3.json").read_text())
    config.pop("quantization_config")
    plan = plan_conversion(config)
    args = plan.args
    assert (args.moe_router_score_function, args.moe_router_enable_expert_bias) == ("sigmoid", True)
    assert (args.moe_router_num_groups, args.moe_router_group_topk) == (8, 4)
    assert args.moe_router_topk_scaling_factor == 2.5 and args.moe_layer_freq[:4] == [0, 0, 0, 1]
    # The multi-token-prediction layer 61 is skipped, not reported as unknown.
    assert any(pattern.search("model.layers.61.eh_proj.weight") for pattern, _ in plan.skip)
