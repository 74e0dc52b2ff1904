"""Run a function on several local gloo ranks and collect what each returns.

Used by the tools (evaluation, calibration, benchmarks) and the tests to run real multi-process expert
parallelism on one machine. Every run is bounded: ranks get a collective
timeout, and the parent kills them all when the whole run exceeds its limit,
reporting which ranks did not finish (a hang is a failure, never a wait).
"""

from __future__ import annotations

import io
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.multiprocessing as mp

from megatron_capaware.errors import CapawareError


class DistributedRunError(RuntimeError):
    """A rank raised, died, or the run exceeded its time limit."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
    env: Dict[str, str],
) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    try:
        import torch

        from megatron_capaware._compat.cpu_shims import apply_cpu_shims

        apply_cpu_shims()  # the ranks' explicit switch (no-op with CUDA)
        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
        out = fn(*args)
        # Bytes, not tensors: a tensor in a torch queue is a shared-memory handle
        # that dies with this process before the parent reads it.
        buffer = io.BytesIO()
        torch.save(out, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException as err:  # report everything, including SystemExit
        if isinstance(err, CapawareError):
            # The user's mistake: the parent re-raises it as one line (cli.run_cli).
            results.put((rank, "user-error", pickle.dumps(err)))
        else:
            results.put((rank, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None  # reported through the queue above
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    collective_timeout_s: float = 120.0,
    threads_per_rank: int = 1,
    extra_env: Optional[Dict[str, str]] = None,
) -> List[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; returns their results by rank.

    ``fn`` must be a module-level function (it is pickled by reference) and
    should call :func:`megatron_capaware.parallel.init_model_parallel` itself.

    Raises:
        DistributedRunError: with every failing rank's traceback, or the list
            of ranks still running when ``timeout_s`` passed.
        A user-input error (:class:`~megatron_capaware.errors.CapawareError`)
        raised on a rank: re-raised here, the lowest such rank's, its message
        naming the rank.
    """
    env = {
        "OMP_NUM_THREADS": str(threads_per_rank),
        "CAPAWARE_COLLECTIVE_TIMEOUT_S": str(collective_timeout_s),
        "PYTHONWARNINGS": "ignore",
    }
    if not torch.cuda.is_available():  # Megatron's jit_fuser (torch.compile) costs ~17 s a process on a CPU
        env["TORCHDYNAMO_DISABLE"] = "1"
    env.update(extra_env or {})
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, env), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    outputs: Dict[int, Any] = {}
    errors: Dict[int, str] = {}
    user_errors: Dict[int, BaseException] = {}
    while len(outputs) + len(errors) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            rank, status, payload = results.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outputs and r not in errors]
            for r in dead:
                if procs[r].exitcode not in (0, None):
                    errors.setdefault(r, f"rank {r} died with exit code {procs[r].exitcode}")
            continue
        if status == "ok":
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        elif status == "user-error":
            user_errors[rank] = pickle.loads(payload)
            errors[rank] = f"{type(user_errors[rank]).__name__}: {user_errors[rank]}"
        else:
            errors[rank] = payload
        if errors:
            # Give the others a moment to report their own errors, then stop.
            deadline = min(deadline, time.monotonic() + 15.0)
    for p in procs:
        p.join(timeout=5.0)
    stuck = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5.0)
    if user_errors:  # a mistake in the input outranks what it made the other ranks fail on
        first = min(user_errors)
        err = user_errors[first]
        err.args = (f"{err} (rank {first})",) + tuple(err.args[1:])
        raise err
    if errors:
        text = "\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items()))
        raise DistributedRunError(f"{len(errors)} of {world_size} ranks failed:\n{text}")
    if len(outputs) < world_size:
        missing = sorted(set(range(world_size)) - set(outputs))
        raise DistributedRunError(
            f"ranks {missing} did not finish within {timeout_s:.0f} s (killed: {stuck})"
        )
    return [outputs[r] for r in range(world_size)]
