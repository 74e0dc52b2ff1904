"""Peak extra memory of a placement on each EP rank (issue 22, item 6).

A GPT MoE (``--layers`` MoE layers of ``--experts`` SequentialMLP experts,
``--hidden`` x ``--ffn`` with a gated linear unit, fp32: 3 x hidden x ffn x 4
bytes per expert; the defaults give 48 MiB of expert weights per layer) is
built at EP ``--ep`` on gloo processes, the routers installed, and then each
rank measures, around each placement step:

* ``tracked``: the peak of the bytes held by tensors *allocated during the
  step* (a ``TorchDispatchMode`` sees every ATen op's outputs; an output
  whose storage is none of the op's inputs' is a new allocation, counted
  until its storage is freed, which ``StorageWeakRef`` tells). This is the
  exact allocator-level figure on CPU (``tracemalloc`` does not see torch's
  allocations), and what ``torch.cuda.max_memory_allocated`` would report on a GPU.
* ``rss``: the rise of the process's resident-set high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs`` before the step) over
  the resident set before it: a cross-check that sees everything (also
  gloo's buffers and Python objects). glibc keeps freed heap memory resident
  and moves its mmap threshold up as large blocks are freed, so the ranks run
  with a fixed ``MALLOC_MMAP_THRESHOLD_`` (``--malloc-mmap-threshold``):
  large buffers are then mapped and unmapped and the RSS follows the live bytes.
* ``kept``: the expert weights the step added for good (a plan with replicas
  grows the model: ``R / W`` experts per layer per rank); they count in the
  peak but are not transient.

Steps: ``apply`` (a plan that moves every expert to the other rank and
shuffles them, every layer), ``remove`` (back to the logical layout), and
``apply-replicas`` (a plan with ``--ep`` redundant slots: a slot count change).
The figures are printed and written to ``--json``; they do not depend on
this package's version beyond ``install_capaware_routers`` / ``apply_placement``
/ ``remove_placement``, so the same module measures an older tree
(``PYTHONPATH=<old tree>``).

Example::

    python scripts/placement_memory.py --json docs/results/placement_memory/after.json
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MIB = 2 ** 20


class AllocationTracker(TorchDispatchMode):
    """Current and peak bytes of the CPU tensor storages allocated inside the mode (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.live: Dict[int, Any] = {}
        self.current = 0
        self.peak = 0

    def _purge(self) -> None:
        for ptr, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[ptr]
                self.current -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs or {}))
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        self._purge()
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or ptr in inputs or ptr in self.live:
                continue
            self.live[ptr] = (self._ref(storage), size)
            self.current += size
            self.peak = max(self.peak, self.current)
        return out


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(step: Any) -> Dict[str, float]:
    """Run ``step()``; returns its peak extra memory in MiB (``tracked`` and ``rss``, see the module doc)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current resident set
    rss_before = _status("VmRSS")
    with AllocationTracker() as tracker:
        step()
    rss_peak = _status("VmHWM")
    return {"tracked_mib": tracker.peak / MIB, "rss_mib": (rss_peak - rss_before) / MIB}


def _plans(layers: List[int], experts: int, ep: int, seed: int) -> Dict[str, Any]:
    from megatron_capaware.placement.plan_file import PlacementPlan
    from megatron_capaware.placement.planner import LayerPlacement

    per = experts // ep
    g = torch.Generator().manual_seed(seed)
    model = {"moe_layer_numbers": layers, "num_moe_experts": experts, "moe_router_topk": 2}

    def moved(layer: int) -> List[int]:  # every expert to the next rank, shuffled within each rank
        rolled = [(e + per) % experts for e in range(experts)]
        out: List[int] = []
        for r in range(ep):
            block = rolled[r * per:(r + 1) * per]
            out += [block[i] for i in torch.randperm(per, generator=g).tolist()]
        return out

    def replicated(layer: int) -> List[int]:  # the moved layout plus one replica per rank of another rank's expert
        base = moved(layer)
        out = []
        for r in range(ep):
            block = base[r * per:(r + 1) * per]
            out += block + [base[((r + 1) % ep) * per]]
        return out

    return {
        "apply": PlacementPlan(model=model, ep=ep, redundant=0, provenance={"bench": "placement_memory"},
                               layers={n: LayerPlacement(moved(n), ep, 0.0, 0.0) for n in layers}),
        "apply-replicas": PlacementPlan(model=model, ep=ep, redundant=ep, provenance={"bench": "placement_memory"},
                                        layers={n: LayerPlacement(replicated(n), ep, 0.0, 0.0) for n in layers}),
    }


def _formula(plans: Dict[str, Any], layers: List[int], experts: int, ep: int, expert_bytes: int
             ) -> Optional[Dict[str, float]]:
    """This rank's bound per step (``placement.moves.transient_rows`` x expert bytes, max over layers), in MiB.

    None on a tree without ``placement/moves.py`` (the old placement).
    """
    try:
        from megatron_capaware.placement.moves import layer_moves, transient_rows
    except ImportError:
        return None
    rank = torch.distributed.get_rank()
    logical = list(range(experts))
    steps = {"apply": (logical, plans["apply"]), "remove": (None, plans["apply"]),
             "apply-replicas": (logical, plans["apply-replicas"])}
    out = {}
    for name, (now, plan) in steps.items():
        rows = 0
        for n in layers:
            a, b = (now, plan.layers[n].slots) if now is not None else (plan.layers[n].slots, logical)
            rows = max(rows, transient_rows(layer_moves(a, b, ep, rank), in_place=True))
        out[name] = rows * expert_bytes / MIB
    return out


def memory_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One rank: build the model, install the routers, measure each placement step (module level: picklable)."""
    from megatron_capaware import parallel
    from megatron_capaware.adapters import apply_placement, install_capaware_routers, remove_placement
    from megatron_capaware.config import CapawareConfig
    from megatron_capaware.models.builder import MoEModelArgs, build_gpt_model, build_transformer_config
    from megatron_capaware.registry import TOPK

    ep = spec["ep"]
    parallel.init_model_parallel(parallel.ParallelSizes(expert_parallel=ep))
    parallel.set_seed(3)
    args = MoEModelArgs(num_layers=spec["layers"], hidden_size=spec["hidden"], num_attention_heads=8,
                        num_moe_experts=spec["experts"], moe_router_topk=2, moe_ffn_hidden_size=spec["ffn"],
                        vocab_size=64, max_sequence_length=16)
    config = build_transformer_config(args, expert_parallel=ep)
    model = build_gpt_model(args, config)
    install_capaware_routers(model, CapawareConfig(router_type=TOPK))
    expert_keys = [k for k, v in model.state_dict().items() if ".experts." in k and torch.is_tensor(v)]
    before = {k: model.state_dict()[k].clone() for k in expert_keys}
    local_bytes = sum(v.numel() * v.element_size() for v in before.values()) // spec["layers"]
    plans = _plans(list(range(1, spec["layers"] + 1)), spec["experts"], ep, spec["seed"])
    out: Dict[str, Any] = {"rank": torch.distributed.get_rank(), "layer_local_expert_mib": local_bytes / MIB,
                           "steps": {}}
    out["formula_mib"] = _formula(plans, list(range(1, spec["layers"] + 1)), spec["experts"], ep,
                                  local_bytes // (spec["experts"] // ep))
    def expert_mib() -> float:  # the model's local expert weights now (replicas add some)
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n) / MIB

    def step(name: str, fn: Any) -> None:
        start = expert_mib()
        out["steps"][name] = measure(fn)
        out["steps"][name]["kept_mib"] = expert_mib() - start  # new weights that stay (replicas), not transient

    with torch.no_grad():
        step("apply", lambda: apply_placement(model, plans["apply"]))
        step("remove", lambda: remove_placement(model))
        state = model.state_dict()
        out["restored_bit_equal"] = all(torch.equal(state[k], before[k]) for k in expert_keys)
        del state
        step("apply-replicas", lambda: apply_placement(model, plans["apply-replicas"]))
        remove_placement(model)
        state = model.state_dict()
        out["restored_bit_equal_after_replicas"] = all(torch.equal(state[k], before[k]) for k in expert_keys)
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="MoE layers L")
    parser.add_argument("--experts", type=int, default=8, help="experts per layer E")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size")
    parser.add_argument("--ffn", type=int, default=1024, help="expert FFN size (gated: fc1 is 2 x ffn)")
    parser.add_argument("--ep", type=int, default=2, help="EP ranks (gloo processes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                        help="glibc's MALLOC_MMAP_THRESHOLD_ for the ranks (a fixed threshold: large buffers are "
                        "mapped and unmapped, so the RSS high-water follows the live bytes; 0: glibc's default)")
    parser.add_argument("--label", default="", help="a name for this tree in the output (e.g. before / after)")
    parser.add_argument("--json", default=None, help="write the figures here")
    return parser.parse_args(argv)


def run(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Measure on ``--ep`` spawned ranks; returns (and prints, and writes to ``--json``) the figures."""
    from megatron_capaware._compat.launcher import run_distributed

    args = parse_args(argv)
    spec = {k: getattr(args, k) for k in ("layers", "experts", "hidden", "ffn", "ep", "seed")}
    if args.malloc_mmap_threshold:  # read by glibc when the spawned ranks start
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    ranks = run_distributed(memory_worker, args.ep, spec, timeout_s=900, collective_timeout_s=600)
    layer = ranks[0]["layer_local_expert_mib"]
    result = {"label": args.label, "spec": spec, "layer_local_expert_mib": layer,
              "model_local_expert_mib": layer * args.layers, "ranks": ranks}
    print(f"{args.label or 'placement'}: {args.layers} MoE layers, {args.experts} experts, EP {args.ep}; "
          f"local expert weights {layer:.1f} MiB per layer, {layer * args.layers:.1f} MiB per rank")
    for rank in ranks:
        for name, step in rank["steps"].items():
            bound = (rank["formula_mib"] or {}).get(name)
            formula = f", formula {bound:6.1f} MiB" if bound is not None else ""
            print(f"  rank {rank['rank']} {name:15s} peak extra: tracked {step['tracked_mib']:7.1f} MiB "
                  f"({step['tracked_mib'] / layer:.2f} x layer), RSS high-water {step['rss_mib']:7.1f} MiB "
                  f"({step['rss_mib'] / layer:.2f} x layer){formula}, kept (replica weights) {step['kept_mib']:.1f} MiB")
        print(f"  rank {rank['rank']} weights bit-equal after remove_placement: {rank['restored_bit_equal']}, "
              f"after the replicated plan: {rank['restored_bit_equal_after_replicas']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return result


def main(argv: Optional[List[str]] = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
