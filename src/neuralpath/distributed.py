"""torch.distributed plumbing for ``torchrun``: nccl on CUDA, gloo on CPU; nothing home-made.

``torchrun --nproc_per_node N -m neuralpath train ...`` (or ``kernel npk|ntk ... --out FILE.npy``) sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous variables; :func:`init` starts the process group from them. Outside
torchrun (no WORLD_SIZE, or WORLD_SIZE=1) everything runs in one process and these helpers are no-ops.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_type: str = "cpu"):
    """Initialise the process group when launched by torchrun; returns (rank, world_size, local_rank)."""
    if launched() and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return rank(), world(), int(os.environ.get("LOCAL_RANK", "0"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier():
    if active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
