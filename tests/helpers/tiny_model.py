"""A tiny MoE checkpoint with its tokenizer, made inside the tests (never the bundled model)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict

from megatron_capaware import parallel

WORDS = (
    "the king queen lord lady sword crown night day love death war peace heart blood soul fair "
    "foul sweet bitter castle forest storm sea star moon sun fire water earth honour name word"
).split()


def synthetic_text(lines: int, seed: int) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(5, 14)
        out.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
    return "\n".join(out) + "\n"


TINY_ARGS: Dict[str, Any] = dict(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=8, moe_router_topk=2,
    moe_ffn_hidden_size=32, max_sequence_length=128,
)


def make_tiny_checkpoint(root: str) -> Dict[str, str]:
    """Train a BPE tokenizer, build a tiny GPT MoE with random weights, save both (1 rank)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    from megatron_capaware.models.checkpoint import save_checkpoint
    from megatron_capaware.models.builder import MoEModelArgs, build_gpt_model, build_transformer_config

    root_path = Path(root)
    (root_path / "tok").mkdir(parents=True, exist_ok=True)
    train_text = synthetic_text(400, seed=1)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(train_text.splitlines(), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tokenizer.save(str(root_path / "tok" / "tokenizer.json"))
    (root_path / "heldout.txt").write_text(synthetic_text(300, seed=2))
    (root_path / "calibration.txt").write_text(synthetic_text(200, seed=3))
    parallel.init_model_parallel(parallel.ParallelSizes())
    parallel.set_seed(3)
    args = MoEModelArgs(vocab_size=tokenizer.get_vocab_size(), **TINY_ARGS)
    model = build_gpt_model(args, build_transformer_config(args))
    # A skewed gate: scale the router weights so some experts dominate, as trained gates do.
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.mul_(8.0)
    ckpt = root_path / "ckpt"
    save_checkpoint(model, ckpt, args, tokenizer_dir=root_path / "tok")
    parallel.destroy()
    return {"checkpoint": str(ckpt), "heldout": str(root_path / "heldout.txt"),
            "calibration": str(root_path / "calibration.txt")}
