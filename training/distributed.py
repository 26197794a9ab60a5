"""Data-parallel training under the standard launchers (`torchrun`, `accelerate launch`):
one process per device, found from the environment they set (WORLD_SIZE, RANK, LOCAL_RANK).

Why not DistributedDataParallel's wrapper: AnglE's ESE and Matryoshka terms reach the model
through more than one forward (hidden states, pooling), and DDP only syncs what goes through
its own `forward`. The gradients are averaged instead, once per optimizer step, in one flat
buffer — the same arithmetic as DDP (its overlap with the backward pass aside), and exactly
a single process's gradient accumulation over the ranks' micro-batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place: `rank` of `size` processes, `local_rank` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that saves, evaluates, logs and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group a launcher set up (gloo on CPU, nccl on CUDA); with a CUDA
    `device`, this process's own GPU (cuda:LOCAL_RANK). A single process: World()."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, size, local), device


def average_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    """Every rank's gradients → their mean, on every rank (one all-reduce)."""
    if not world.active:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def gather_rows(x: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's rows of `x` concatenated in rank order, differentiable (each rank's
    gradient flows back to the rank that computed the rows). Ranks may hold different
    numbers of rows (in-batch duplicate filtering)."""
    if not world.active:
        return x
    import torch.distributed.nn.functional as dnn

    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world.size)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    longest = int(max(c.item() for c in counts))
    padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))]) \
        if x.shape[0] < longest else x
    parts = dnn.all_gather(padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts, strict=True)])


def mean_over_ranks(value: float, world: World) -> float:
    if not world.active:
        return value
    on = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=on)
    dist.all_reduce(t)
    return float(t.item()) / world.size


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def teardown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
