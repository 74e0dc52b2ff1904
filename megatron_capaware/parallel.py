"""Process-group set-up for Megatron runs: CPU (gloo) and GPU (nccl) alike.

Every collective this package issues runs in groups created here or by
Megatron with a finite timeout, so a rank that dies mid-forward ends the
others with an error instead of a hang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_capaware._compat.cpu_shims import apply_cpu_shims, cuda_available
from megatron_capaware._compat.launcher import free_port

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ParallelSizes:
    """Model-parallel layout of one run."""

    tensor_parallel: int = 1
    expert_parallel: int = 1
    expert_tensor_parallel: int = 1
    pipeline_parallel: int = 1

    def validate(self, world_size: int) -> None:
        """Raise ValueError if these sizes cannot tile ``world_size`` ranks."""
        for name in ("tensor_parallel", "expert_parallel", "expert_tensor_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pipeline_parallel != 1:
            raise ValueError("pipeline parallelism is not supported by megatron-capaware runs")
        if world_size % self.tensor_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor parallel size "
                f"{self.tensor_parallel}"
            )
        expert_ranks = self.expert_parallel * self.expert_tensor_parallel
        if world_size % expert_ranks:
            raise ValueError(
                f"world size {world_size} is not divisible by expert parallel x expert tensor "
                f"parallel = {self.expert_parallel} x {self.expert_tensor_parallel}; launch "
                f"a multiple of {expert_ranks} ranks"
            )


def collective_timeout(seconds: Optional[float] = None) -> datetime.timedelta:
    """Timeout for process groups: ``CAPAWARE_COLLECTIVE_TIMEOUT_S`` or the default."""
    if seconds is None:
        seconds = float(os.environ.get("CAPAWARE_COLLECTIVE_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    if seconds <= 0:
        raise ValueError(f"collective timeout must be > 0 seconds, got {seconds}")
    return datetime.timedelta(seconds=seconds)


def init_distributed(timeout_s: Optional[float] = None) -> None:
    """Initialise torch.distributed from the torchrun environment (idempotent).

    Uses nccl with CUDA, gloo without; a single process without torchrun
    variables gets a one-rank group on a free local port.
    """
    if dist.is_initialized():
        return
    if cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        apply_cpu_shims()
        backend = "gloo"
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ["RANK"] = "0"
        os.environ["WORLD_SIZE"] = "1"
        os.environ["LOCAL_RANK"] = "0"
    dist.init_process_group(backend=backend, timeout=collective_timeout(timeout_s))


def init_model_parallel(sizes: ParallelSizes, timeout_s: Optional[float] = None) -> None:
    """Initialise torch.distributed and Megatron's model-parallel groups.

    Raises:
        ValueError: if the sizes do not tile the world.
    """
    init_distributed(timeout_s)
    sizes.validate(dist.get_world_size())
    from megatron.core import parallel_state

    destroy_model_parallel()
    timeout = collective_timeout(timeout_s)
    before = set(_c10d_groups())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor_parallel,
        expert_model_parallel_size=sizes.expert_parallel,
        expert_tensor_parallel_size=sizes.expert_tensor_parallel,
        # Megatron builds timedelta(minutes=...): a float keeps sub-minute timeouts.
        distributed_timeout_minutes=timeout.total_seconds() / 60.0,
    )
    _MEGATRON_GROUPS.extend(g for g in _c10d_groups() if g not in before)


# Process groups created by Megatron's initialize_model_parallel. Its
# destroy_model_parallel only drops its references; the c10d groups (sockets,
# threads, buffers: ~1 MB and 17 groups per initialisation at EP=2 on gloo)
# live until the default group is destroyed, so a long-lived process that
# initialises model parallelism repeatedly grew without bound.
_MEGATRON_GROUPS: list = []


def _c10d_groups() -> list:
    world = getattr(dist.distributed_c10d, "_world", None)
    return list(getattr(world, "pg_map", {}).keys()) if world is not None else []


def destroy_model_parallel() -> None:
    """Tear down Megatron's model-parallel state and the process groups it created.

    The default process group stays (see :func:`destroy`).
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    while _MEGATRON_GROUPS:
        group = _MEGATRON_GROUPS.pop()
        if group in _c10d_groups():
            dist.destroy_process_group(group)


def set_seed(seed: int) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down Megatron's groups and the default process group."""
    destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
