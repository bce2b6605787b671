"""torchrun integration: one process when RANK is absent, otherwise one process per device.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; ``init_distributed`` reads them,
picks nccl on CUDA and gloo on CPU, and returns where this process runs. Every side effect (files, logs,
TensorBoard, progress bars) is guarded by ``DistInfo.is_main``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


_CONTROL_GROUP = None  # the gloo group of any_rank beside an nccl default group (None: the default group)


class DeviceError(ValueError):
    """The requested device, or the number of processes per device, does not exist on this machine."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    local_world_size: int = 1  # processes on this node (torchrun's LOCAL_WORLD_SIZE): they share its CPU cores

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda:<local_rank> when CUDA is available, else cpu; ``cuda`` -> cuda:<local_rank>."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name} was requested but torch.cuda.is_available() is False on this "
                               "machine; use --device cpu")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if name != "cpu":
        raise DeviceError(f"--device {name!r} is not understood; expected auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Joins the torchrun process group if RANK is set (nccl on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ:
        return DistInfo(rank=0, local_rank=0, world_size=1, device=resolve_device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ["WORLD_SIZE"])
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    target = resolve_device(device, local_rank)
    if target.type == "cuda":
        # Checked before the process group: NCCL with two processes on one GPU hangs or fails deep inside.
        # Every process checks the node's process count, so they all stop, not only the ones without a GPU.
        visible = torch.cuda.device_count()
        if max(per_node, local_rank + 1) > visible:
            raise DeviceError(f"torchrun started {per_node} processes on this node but {visible} CUDA device(s) "
                              f"are visible (one process per GPU); use --nproc-per-node {visible} or fewer, or "
                              "--device cpu to run the processes on the CPU (gloo)")
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=target if target.type == "cuda" else None)
    global _CONTROL_GROUP
    # The per-step stop/save agreement runs on CPU tensors over gloo, also beside nccl: reading an nccl result on
    # the host would synchronise the GPU at every step.
    _CONTROL_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=target, local_world_size=per_node)


def cleanup_distributed() -> None:
    """Leaves the process group if one was joined (a no-op in a single process); call once, at the end."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over ranks (identity in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over all ranks (the flags themselves in a single process): how ranks agree to do something
    together (stop, save) that one of them decided, so that none waits alone in a collective."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flags
    values = torch.tensor(flags, dtype=torch.int32)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return tuple(bool(v) for v in values.tolist())


def same_on_every_rank(value: int) -> bool:
    """Whether every rank holds the same integer (True in a single process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return True
    values = torch.tensor([value, -value], dtype=torch.int64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return int(values[0]) == -int(values[1])


def parameters_match_across_ranks(module: torch.nn.Module) -> bool:
    """True when every rank holds the same parameters (per-tensor float64 sums compared exactly).

    DDP keeps replicas equal by averaging gradients; this is the end-of-run check that it did.
    BatchNorm running statistics are buffers, updated locally after the last broadcast, and are not compared.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return True
    sums = torch.stack([p.detach().double().sum() for p in module.parameters()])
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums.contiguous())
    return all(torch.equal(gathered[0], other) for other in gathered[1:])
