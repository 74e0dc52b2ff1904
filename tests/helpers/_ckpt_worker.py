"""Worker for tests/test_checkpoint.py, run under torchrun (gloo, CPU).

Modes (all write a JSON / torch file named by --out on rank 0):

``save``      build a tiny random MoE at EP = world size, save it with
              checkpoint.save_checkpoint, and record its logits on a fixed batch.
``load``      load a checkpoint at EP = world size and record the logits.
``mismatch``  (1 process) load with the wrong architecture, and with a
              tampered capaware_model.json; record the errors.
``bundle``    (1 process) held-out loss of a bundled reference model on the
              first --windows windows.

Every rank evaluates its own slice of the batch (as expert-parallel inference
does); the logits are gathered to rank 0.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import argparse
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

TINY = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=2,
    num_moe_experts=4,
    moe_router_topk=2,
    moe_ffn_hidden_size=16,
    vocab_size=64,
    max_sequence_length=16,
)
# The fine-grained architecture of the second reference model, tiny: a dense
# first layer, 16 experts top-4 (2 per rank at EP=8), one shared expert,
# softmax over all experts without renormalising the top-k (DeepSeek-V2 style).
TINY_FINE = dict(
    TINY,
    num_moe_experts=16,
    moe_router_topk=4,
    moe_shared_expert_intermediate_size=24,
    moe_layer_freq=[0, 1],
    ffn_hidden_size=48,
    moe_router_pre_softmax=True,
)
ARCHS = {"tiny": TINY, "fine": TINY_FINE}
BATCH, SEQ = 8, 16


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def logits_on_fixed_batch(model) -> tuple:
    """(logits [BATCH, SEQ, V] gathered over ranks, mean cross entropy)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    x, y = fixed_batch()
    per = BATCH // world
    xs = x[rank * per : (rank + 1) * per]
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(xs)
    with torch.no_grad():
        local = model(xs, pos, None).float().contiguous()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    logits = torch.cat(parts, dim=0)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return logits, float(loss)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "load", "mismatch", "bundle"])
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--arch", choices=sorted(ARCHS), default="tiny", help="architecture that 'save' builds")
    a = p.parse_args()

    torch.set_num_threads(1)
    from megatron_capaware.models import checkpoint
    from megatron_capaware.models.builder import MoEModelArgs, build_gpt_model, build_transformer_config
    from megatron_capaware.parallel import ParallelSizes, destroy, init_model_parallel, set_seed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    init_model_parallel(ParallelSizes(expert_parallel=world))
    set_seed(1234)
    rank = dist.get_rank()
    out = Path(a.out)

    if a.mode == "save":
        args = MoEModelArgs(**ARCHS[a.arch])
        config = build_transformer_config(args, expert_parallel=world)
        model = build_gpt_model(args, config, use_te=False)
        checkpoint.save_checkpoint(model, a.dir, args)
        logits, loss = logits_on_fixed_batch(model)
        if rank == 0:
            torch.save({"logits": logits, "loss": loss, "ep": world}, out)

    elif a.mode == "load":
        model, _ = checkpoint.load_model(a.dir, expert_parallel=world)
        logits, loss = logits_on_fixed_batch(model)
        if rank == 0:
            torch.save({"logits": logits, "loss": loss, "ep": world}, out)

    elif a.mode == "mismatch":
        result = {}
        # 1. A model built for other args than the checkpoint's description.
        other = MoEModelArgs(**{**TINY, "num_moe_experts": 8})
        model = build_gpt_model(other, build_transformer_config(other), use_te=False)
        try:
            checkpoint.load_weights(model, a.dir, other)
            result["args"] = None
        except checkpoint.CheckpointError as err:
            result["args"] = str(err)
        # 2. A tampered description: the model is built as described, but the
        #    weights on disk have other shapes.
        tampered = Path(a.dir + "-tampered")
        if tampered.exists():
            shutil.rmtree(tampered)
        shutil.copytree(a.dir, tampered)
        spec = json.loads((tampered / checkpoint.MODEL_ARGS_FILE).read_text())
        spec["moe_ffn_hidden_size"] = 24
        (tampered / checkpoint.MODEL_ARGS_FILE).write_text(json.dumps(spec))
        try:
            checkpoint.load_model(tampered)
            result["shapes"] = None
        except checkpoint.CheckpointError as err:
            result["shapes"] = str(err)
        out.write_text(json.dumps(result))

    elif a.mode == "bundle":
        import numpy as np

        from megatron_capaware.models import reference_models

        model, margs = checkpoint.load_model(a.dir, params_dtype=torch.bfloat16)
        tok = reference_models.load_tokenizer(Path(a.dir).name)
        ids = tok.encode(reference_models.HELDOUT_TEXT.read_text(encoding="utf-8")).ids
        seq = margs.max_sequence_length
        n = min(a.windows, (len(ids) - 1) // seq)
        arr = np.asarray(ids[: n * seq + 1], dtype=np.int64)
        x = torch.from_numpy(arr[:-1].copy()).view(n, seq)
        y = torch.from_numpy(arr[1:].copy()).view(n, seq)
        pos = torch.arange(seq).unsqueeze(0).expand_as(x)
        with torch.no_grad():
            logits = model(x, pos, None).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        out.write_text(json.dumps({"loss": float(loss), "tokens": int(y.numel()),
                                   "vocab": margs.vocab_size, "tokenizer_vocab": tok.get_vocab_size()}))
    destroy()


if __name__ == "__main__":
    main()
