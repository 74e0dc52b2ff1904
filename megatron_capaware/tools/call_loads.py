"""Per-call top-k expert loads and loss of a text, recorded in one process (``capaware-plan``, the shift benchmark).

Top-k expert loads do not depend on the EP size or the placement (the
router decides per token), so one recording at EP 1 gives every EP size's
loads exactly: the global loads of a forward call at EP ``W`` with ``b``
sequences per rank are the sum of ``W`` consecutive recorded batches of
``b`` sequences (the data-parallel ranks take consecutive windows, see
:func:`~megatron_capaware.tools.text_data.rank_batches`). Placement does not
change a top-k model's output, so the recorded loss is that of every layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from megatron_capaware.registry import TOPK


@dataclass
class CallRecord:
    """One text's recorded calls.

    Attributes:
        layers: ``[L]`` MoE layer numbers.
        loads: ``[C, L, E]`` int64 top-k expert loads of each call (batch).
        nll: ``[C]`` summed next-token NLL of each call (nats).
        tokens: ``[C]`` predicted tokens of each call.
        sequences: sequences per call.
    """

    layers: List[int]
    loads: torch.Tensor
    nll: torch.Tensor
    tokens: torch.Tensor
    sequences: int

    def to_dict(self) -> Dict[str, object]:
        return {"layers": self.layers, "loads": self.loads.tolist(), "nll": self.nll.tolist(),
                "tokens": self.tokens.tolist(), "sequences": self.sequences}

    @classmethod
    def from_dict(cls, data: Dict[str, object]) -> "CallRecord":
        return cls(list(data["layers"]), torch.tensor(data["loads"], dtype=torch.int64),  # type: ignore[arg-type]
                   torch.tensor(data["nll"], dtype=torch.float64), torch.tensor(data["tokens"], dtype=torch.int64),
                   int(data["sequences"]))  # type: ignore[arg-type]

    def grouped(self, per_call: int) -> "CallRecord":
        """Calls of ``per_call`` consecutive recorded calls summed (a trailing partial group is dropped)."""
        if per_call < 1:
            raise ValueError(f"per_call must be >= 1, got {per_call}")
        count = self.loads.shape[0] // per_call
        cut = count * per_call
        loads = self.loads[:cut].view(count, per_call, *self.loads.shape[1:]).sum(1)
        return CallRecord(self.layers, loads, self.nll[:cut].view(count, per_call).sum(1),
                          self.tokens[:cut].view(count, per_call).sum(1), self.sequences * per_call)


def record_calls(options: "object") -> CallRecord:
    """Run top-k over ``options.text`` (an :class:`~megatron_capaware.tools.evaluate.EvalOptions` with
    EP = TP = 1, one process) batch by batch; each batch of ``options.sequences_per_rank`` sequences is one call.
    """
    from megatron_capaware.adapters import collect_stats, install_capaware_routers
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.tools.evaluate import _loss_and_correct, close_session, open_session

    session = open_session(options)  # type: ignore[arg-type]
    try:
        if session.dp_size != 1:
            raise ValueError("record_calls runs in one process (EP 1): top-k loads do not depend on the EP size")
        model, device = session.model, session.device
        install_capaware_routers(model, CapawareConfig(TOPK))
        per_call: List[torch.Tensor] = []
        nll: List[float] = []
        tokens: List[int] = []
        layers: List[int] = []
        with torch.no_grad():
            for batch in session.batches:
                for stats in collect_stats(model).values():
                    stats.reset()
                batch = batch.to(device)
                ids, labels = batch[:, :-1], batch[:, 1:]
                position = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
                logits = model(ids, position, attention_mask=None)
                batch_nll, _ = _loss_and_correct(logits, labels)
                stats = collect_stats(model)
                layers = sorted(stats)
                per_call.append(torch.stack([stats[n].global_loads[-1].to(torch.int64).cpu() for n in layers]))
                nll.append(float(batch_nll))
                tokens.append(int(labels.numel()))
    finally:
        close_session(session)
    return CallRecord(layers, torch.stack(per_call), torch.tensor(nll, dtype=torch.float64),
                      torch.tensor(tokens, dtype=torch.int64), int(options.sequences_per_rank))  # type: ignore[attr-defined]
