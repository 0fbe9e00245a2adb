"""torch.distributed set-up: one process per device, launched by torchrun (env RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). Without those variables everything runs as a single process with rank 0."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this context called init_process_group, so close() destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def _in_place(self, collective, t: torch.Tensor, *args) -> torch.Tensor:
        """Run collective(t, *args) on t in place; t may sit off the process's device (nccl takes only CUDA
        tensors): it then goes through a copy there and back."""
        if t.device == self.device:
            collective(t, *args)
        else:
            on_device = t.to(self.device)
            collective(on_device, *args)
            t.copy_(on_device)
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        # ReduceOp.AVG exists only on NCCL; SUM works on gloo too.
        if self.enabled:
            self._in_place(dist.all_reduce, t, dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            self._in_place(dist.all_reduce, t, dist.ReduceOp.MAX)
        return t

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module, src: int = 0) -> torch.nn.Module:
        """Overwrite the module's parameters and buffers with rank src's, as DDP does when it wraps a model: the
        processes then start from the same weights even where each built or seeded its own."""
        if self.enabled:
            for t in [*module.parameters(), *module.buffers()]:
                self._in_place(dist.broadcast, t.data, src)
        return module

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (pickled between our own processes only)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        return torch.device(f"cuda:{local_rank}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for, but torch sees no CUDA device")
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA), or return a 1-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=resolve_device(device))
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world_size} but {var} is not set: launch with torchrun")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        owns = True
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, owns_group=owns)
