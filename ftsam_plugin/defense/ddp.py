"""Device selection and `torchrun` (DistributedDataParallel) plumbing for the defenses."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ftsam_plugin.errors import FtsamError

__all__ = ["DistInfo", "resolve_device", "setup_distributed", "barrier", "all_reduce_sum", "all_gather_objects",
           "broadcast_buffers", "no_sync", "unwrap"]


@dataclass
class DistInfo:
    """Process-group facts; `world_size == 1` means a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False
    device: torch.device = torch.device("cpu")  # where collectives run (this process's device)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name, local_rank: int = 0) -> torch.device:
    """`torch.device` for a --device value; FtsamError naming the fix when it does not exist here.

    'cuda' under torchrun means cuda:<LOCAL_RANK>; an explicit 'cuda:N' there is refused (every process would
    take GPU N). Device lists ('cuda:0,1', BackdoorBench's DataParallel) are refused: use torchrun.
    """
    text = str(name or "cpu").strip()
    if "," in text:
        raise FtsamError(f"device list '{text}' (DataParallel) is not supported; launch "
                         f"`torchrun --nproc_per_node N -m ftsam_plugin.defense.ftsam ... --device cuda`")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise FtsamError(f"unknown device '{text}'; use --device cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise FtsamError(f"--device {text} under torchrun would put every process on GPU {device.index}; "
                             f"under torchrun pass --device cuda (each process takes cuda:LOCAL_RANK)")
        if not torch.cuda.is_available():
            raise FtsamError(f"device '{text}' requested but no CUDA GPU is available; pass --device cpu")
        count = torch.cuda.device_count()
        index = device.index if device.index is not None else local_rank
        if index >= count:
            raise FtsamError(f"device 'cuda:{index}' does not exist ({count} GPU(s) visible); pass --device cuda:0 "
                             f"or --device cpu")
        device = torch.device("cuda", index)
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise FtsamError("device 'mps' requested but MPS is not available; pass --device cpu")
    return device


def setup_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE/RANK/LOCAL_RANK); no-op for one process.

    Backend: "cpu:gloo,cuda:nccl" on CUDA (nccl for GPU tensors, gloo for any CPU tensor a collective gets),
    gloo on CPU. A group that already exists (e.g. made by a test) is reused.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    if not dist.is_available():
        raise FtsamError("WORLD_SIZE > 1 but torch.distributed is not available; run without torchrun")
    created = False
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        created = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())), initialized_here=created,
                    device=device)


def barrier(info: DistInfo) -> None:
    if info.is_distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (identity for one process).

    The reduction runs on `info.device` (nccl on CUDA, gloo on CPU), so callers may pass small CPU tensors.
    """
    if info.is_distributed:
        work = tensor.to(info.device)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        if work is not tensor:
            tensor.copy_(work)
    return tensor


def all_gather_objects(obj, info: DistInfo) -> list:
    """`[obj of rank 0, obj of rank 1, ...]` on every rank (`[obj]` for one process); a collective."""
    if not info.is_distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj, weights_only=True)  # torch.load(weights_only=True): no pickled code
    return out


def broadcast_buffers(model, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank; DDP only syncs them at a synced forward."""
    if info.is_distributed:
        for buf in unwrap(model).buffers():
            dist.broadcast(buf.data, src=0)


def no_sync(model):
    """DDP's `no_sync()` (skip the gradient all-reduce) or a null context for a plain module."""
    return model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) else contextlib.nullcontext()


def unwrap(model):
    """The module inside DDP (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
