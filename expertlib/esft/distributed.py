"""Data-parallel ESFT over several processes with torch.distributed (torchrun / accelerate launch).

    torchrun --nproc-per-node 4 -m expertlib.cli.main train ./base math.jsonl --task math --batch-size 4
    accelerate launch --num-processes 4 -m expertlib.cli.main train ./base math.jsonl --task math

Every process holds the whole model (frozen base + trained slots) on its own GPU (`LOCAL_RANK`)
or on the CPU (gloo backend), and takes its share of each step's global batch: `--batch-size`
sequences per process, so a step sees `batch_size x world_size x grad_accum` sequences, the
same ones a single process sees with `--batch-size batch_size x world_size`. Each process
divides its summed token loss by the token count of the *global* batch, and the gradients of
the trained tensors are summed over processes with one all-reduce per step: the update equals
single-process training on the combined batch (up to float summation order). The optimizer
then runs identically everywhere, so the trained tensors stay equal without broadcasting them.
Rank 0 writes checkpoints and the patch.

The frozen base is never all-reduced (it has no gradients). A base too large for one GPU is
spread over the GPUs of one process with accelerate's device_map (`--device-map auto`) instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun/accelerate)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's contiguous part of a global batch of `world_size` equal parts."""
        per = len(items) // self.world_size
        return items[self.rank * per : (self.rank + 1) * per]


def launched() -> bool:
    """Whether the environment of a torchrun / accelerate launch is present."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device | None = None) -> DistContext:
    """Join the process group when launched with several processes (nccl on CUDA, else gloo)."""
    if not launched():
        return DistContext()
    if not dist.is_initialized():
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)  # NCCL's communicator and barrier use the current device
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return context()


def context() -> DistContext:
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


@torch.no_grad()
def all_reduce_gradients(params: list[nn.Parameter]) -> None:
    """Sum the gradients of `params` over all processes (one flat buffer per device and dtype)."""
    ctx = context()
    if not ctx.enabled:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.grad.device, p.grad.dtype), []).append(p)
    for group in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def all_reduce_sum(value: float, device: torch.device | None = None) -> float:
    """A float summed over all processes (the step's loss for the log)."""
    ctx = context()
    if not ctx.enabled:
        return value
    if device is None and dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def barrier() -> None:
    if context().enabled:
        dist.barrier()
