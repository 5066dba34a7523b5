"""Process-group setup for torchrun, and the few collectives the loop needs.

`torchrun --nproc_per_node=N -m lmforge pretrain ...` sets RANK/WORLD_SIZE/LOCAL_RANK; a plain
`lmforge pretrain` is world size 1 and never touches torch.distributed. nccl on CUDA, gloo on CPU,
so every parallel path runs in CI on a CPU with two processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def setup(device: str = "auto") -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_slices(t: torch.Tensor, slices: int) -> torch.Tensor:
    """In place, the sum over the `slices` distinct parts of the data of what each rank added for its own.

    The parts are the data-parallel slices, each cut into context-parallel parts of its sequences. Ranks
    that read the same part (the tensor-parallel ranks of one) all add it, so the sum over every rank is
    divided by how many share one."""
    all_reduce_sum(t)
    sharing = world_size() // slices
    return t.div_(sharing) if sharing > 1 else t


def all_gather_object(obj: object) -> list:
    if dist.is_available() and dist.is_initialized():
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
