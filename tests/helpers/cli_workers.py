"""Tiny checkpoints and reference computations for the command-line tests (picklable)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import torch

from megatron_capaware import parallel

TEXT = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "My lord, the king is coming to the castle tonight.",
    "Hello world, the quick brown fox jumps over the lazy dog.",
]
EOT = "<|endoftext|>"

TINY_MODEL = dict(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=8, moe_router_topk=2,
    moe_ffn_hidden_size=32, max_sequence_length=128,
)


def train_tokenizer(folder: Path) -> int:
    """A byte-level BPE like the reference models' (``<|endoftext|>`` special); returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, min_frequency=1, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TEXT * 10, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer.get_vocab_size()


def make_tiny_checkpoint(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Save a tiny GPT MoE in Megatron-LM's release layout, with its tokenizer (one rank)."""
    from megatron_capaware.models.checkpoint import save_checkpoint
    from megatron_capaware.models.builder import MoEModelArgs, build_gpt_model, build_transformer_config

    root = Path(spec["ckpt"])
    tok_dir = root.parent / (root.name + "-tokenizer")
    vocab = train_tokenizer(tok_dir)
    parallel.init_model_parallel(parallel.ParallelSizes())
    parallel.set_seed(spec.get("seed", 11))
    # A few padding rows past the tokenizer, as Megatron pads vocabularies.
    args = MoEModelArgs(vocab_size=vocab + 12, **TINY_MODEL)
    dtype = torch.bfloat16 if spec.get("bf16") else torch.float32
    model = build_gpt_model(args, build_transformer_config(args, params_dtype=dtype), use_te=False)
    with torch.no_grad():  # a router that prefers some experts: loads are uneven, capacity bites
        for layer in model.decoder.layers:
            router = layer.mlp.router
            router.weight.mul_(4.0)
    save_checkpoint(model, root, args, tokenizer_dir=tok_dir)
    parallel.destroy()
    return {"vocab": vocab, "model_vocab": args.vocab_size}


def reference_greedy(spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Greedy continuation of each prompt by full recompute with the package's own loader."""
    from megatron_capaware.models.checkpoint import load_model
    from megatron_capaware.megatron_lm import CapawareTokenizer

    parallel.init_model_parallel(parallel.ParallelSizes())
    parallel.set_seed(1)
    model, _ = load_model(spec["ckpt"], use_te=False)
    tokenizer = CapawareTokenizer.from_file(Path(spec["ckpt"]) / "tokenizer")
    out = []
    with torch.no_grad():
        for prompt in spec["prompts"]:
            ids = tokenizer.tokenize(prompt)
            generated, log_probs = [], []
            for _ in range(spec["tokens"]):
                tokens = torch.tensor([ids + generated])
                position = torch.arange(tokens.shape[1]).unsqueeze(0)
                logits = model(tokens, position, attention_mask=None)[0, -1].float()
                logp = torch.log_softmax(logits, dim=-1)
                nxt = int(torch.argmax(logits))
                generated.append(nxt)
                log_probs.append(float(logp[nxt]))
            out.append({"prompt": prompt, "generated_tokens": generated, "generated_log_probs": log_probs,
                        "generated_text": tokenizer.detokenize(generated)})
    parallel.destroy()
    return out


def spec_built_layer_numbers(_: Dict[str, Any]) -> Dict[str, Any]:
    """Stats keys and router layer numbers of a GPT model built with capaware specs."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_capaware.adapters import capaware_spec, collect_stats
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.models.builder import MoEModelArgs, build_transformer_config

    parallel.init_model_parallel(parallel.ParallelSizes())
    parallel.set_seed(1)
    args = MoEModelArgs(vocab_size=64, **TINY_MODEL)
    config = build_transformer_config(args)
    spec = capaware_spec(get_gpt_decoder_block_spec(config, use_transformer_engine=False),
                         CapawareConfig("capacity-drop"))
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=32,
                     position_embedding_type="rope").eval()
    out = {"stats": sorted(collect_stats(model)),
           "routers": [int(layer.mlp.router.layer_number) for layer in model.decoder.layers]}
    parallel.destroy()
    return out
