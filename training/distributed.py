"""Data-parallel training under the standard launchers (`torchrun`, `accelerate launch`):
one process per device, found from the environment they set (WORLD_SIZE, RANK, LOCAL_RANK).

Why not DistributedDataParallel's wrapper: AnglE's ESE and Matryoshka terms reach the model
through more than one forward (hidden states, pooling), and DDP only syncs what goes through
its own `forward`. The gradients are averaged instead, once per optimizer step, in one flat
buffer — the same arithmetic as DDP (its overlap with the backward pass aside), and exactly
a single process's gradient accumulation over the ranks' micro-batches.

`--fsdp` shards instead (`shard`), for models whose weights, gradients and AdamW state do
not fit one device. The engine is PyTorch's own FSDP2 (`fully_shard`), not DeepSpeed ZeRO-3:
it ships with torch (no extra package or compiled ops), shards per parameter as DTensors
that keep their names (so LoRA's frozen/trainable mix, our checkpoints and the rank-0 model
files work unchanged), runs on gloo (tested on this CPU) as on NCCL, and is what
`accelerate`'s FSDP plugin (fsdp_version 2) drives; ZeRO-3 would take over the optimizer and
the loop. Its hooks sit on each module's forward, and every path here (forward, ESE's
hidden states, encode) goes through the backbone's, which is the root unit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


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


def shard(backbone: nn.Module, world: World, device: torch.device) -> tuple[int, int]:
    """FSDP2 over every process: each transformer block (the model's `_no_split_modules`
    classes, as accelerate's auto-wrap picks them) is a unit, gathered for its own forward
    and backward and freed after; the backbone holds the rest (embeddings, final norm).
    Gradients are reduce-scattered (averaged) in backward, AdamW's state is per shard.
    The shards go to `device` (this process's GPU, or the CPU under gloo).
    Returns (values this rank holds, values in the model)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    kinds = set(getattr(backbone, "_no_split_modules", None) or ())
    for module in [m for m in backbone.modules() if type(m).__name__ in kinds]:
        fully_shard(module, mesh=mesh)
    fully_shard(backbone, mesh=mesh)
    params = list(backbone.parameters())
    return sum(p.to_local().numel() for p in params), sum(p.numel() for p in params)


def _full() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's whole state dict on rank 0's CPU ({} on the others); every rank
    must call it (it gathers)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full())


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state of a sharded model, whole, keyed by parameter name, on rank 0
    ({} elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=_full())


def load_full_states(model: nn.Module, opt: torch.optim.Optimizer,
                     weights: dict[str, torch.Tensor], optim: dict[str, Any]) -> list[str]:
    """Scatter whole (unsharded) weights — a subset is fine — and optimizer state into a
    sharded model, each rank keeping its shard. Returns the keys `model` does not have."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    result = set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, opt, optim, options=options)
    return list(result.unexpected_keys)


def gather_objects(value: Any, world: World) -> list[Any]:
    """Every rank's picklable `value`, in rank order, on every rank."""
    if not world.active:
        return [value]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def from_rank0(value: float, world: World) -> float:
    """Rank 0's `value` on every rank (so all ranks take the same branch after it)."""
    if not world.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return float(box[0])
