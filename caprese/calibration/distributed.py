"""torchrun support for calibration: join the process group, who am I, meet, gather, sum.

Every helper is a no-op in a single process, so the stages call them unconditionally. Layer-wise training splits
layers over ranks (layerwise.owned_layers) and gathers timings; end-to-end training sums gradients (plain data
parallelism); rank 0 writes the artifact after a barrier.
"""

from __future__ import annotations

import os

import torch


def _joined() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """(rank, world). With WORLD_SIZE > 1 in the environment (torchrun), join the process group (gloo on CPU,
    nccl on CUDA) unless already joined. Returns (0, 1) otherwise."""
    import torch.distributed as dist

    if _joined():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    import torch.distributed as dist

    if _joined():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device(device: str) -> str:
    """Under torchrun a bare "cuda" means this process's GPU, cuda:LOCAL_RANK."""
    if str(device) == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return str(device)


def barrier() -> None:
    import torch.distributed as dist

    if _joined() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order ([obj] in one process)."""
    import torch.distributed as dist

    if not _joined() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks, in place; returns it."""
    import torch.distributed as dist

    if _joined() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t
