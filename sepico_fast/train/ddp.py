"""Distributed data parallel training, torchrun-compatible.

``torchrun --nproc_per_node=N -m sepico_fast.train ...`` sets RANK / WORLD_SIZE /
LOCAL_RANK; the process group uses NCCL on CUDA and gloo on the CPU.

Why gradients are averaged by hand instead of through ``DistributedDataParallel``'s
reducer: the SePiCo step runs three forward/backward passes through different parts
of the student (backbone + decode + projection heads, backbone + projection head,
backbone + decode head) and accumulates them into one optimizer step. DDP's reducer is
built around one forward per backward (its bucket hooks fire per backward, and
parameters unused in the synchronised pass are not reduced reliably with
``no_sync`` accumulation). One flat all-reduce of the accumulated gradients after the
three passes (``step.allreduce_grads``) is equivalent, communicates exactly once per
step, and keeps the model's ``extract/decode/project`` API. Parameters start identical
(broadcast from rank 0), so the student and the EMA teacher stay identical on every
rank; class statistics are merged across ranks inside ``ClassStats.update``.

Every collective (NCCL or gloo) fails after ``--ddp-timeout`` seconds instead of waiting
forever for a stalled rank: the failing rank exits non-zero, torchrun stops the others
(and, with ``--max-restarts``, restarts the job, which ``--resume auto`` continues).
A small gloo group (``control_group``) carries host-side flags such as "a rank got SIGTERM".
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: object = None
    control_group: object = None  # gloo: host-side flags (stop requests), no device sync

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str, timeout_s: float = 900) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op without it);
    collectives fail after ``timeout_s`` seconds."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    timeout = datetime.timedelta(seconds=float(timeout_s))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    control = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return DistInfo(rank, world, local_rank, dist.group.WORLD, control)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
