"""FSDP2's all-gather and reduce-scatter on gloo (CPU), two ways.

FSDP runs one all-gather per block in the forward, another in the backward, and one reduce-scatter per block
of gradients. gloo's own all_gather_into_tensor and reduce_scatter_tensor move a block's bytes 2-5x slower
than its broadcast and send/recv (bench/RESULTS.md, "Data parallelism"), and when the processes share a
host all of it is loopback TCP: every byte goes through the kernel's socket buffers, on the cores that also
compute. So:

  shared memory  processes on one host exchange a collective's bytes through a small mapping in /dev/shm
                 (each writes its own slots, one barrier, each reads the others'); gloo carries the barrier.
  gloo           across hosts: one broadcast per rank (all-gather) and direct send/recv (reduce-scatter).

`fsdp_collectives(group)` picks the first that works for every rank of the group. Each collective is
synchronous, as FSDP2 calls them on CPU (it has no streams there); an async_op call gets a completed Work.
"""
from __future__ import annotations

import os
import secrets

import torch
import torch.distributed as torch_dist

SHM_FOLDER = "/dev/shm"
SHM_BYTES = 16 * 2**20  # the whole mapping, shared by the ranks: what each one adds to its resident set
_CHANNELS: dict[tuple, "SharedMemoryChannel"] = {}  # group's ranks -> its channel (one per process group)


def fsdp_collectives(group) -> tuple[object, object]:
    """(all_gather, reduce_scatter) for FSDP2's set_custom_all_gather / set_custom_reduce_scatter on `group`.
    Collective: every rank of the group calls it, and all of them get the same kind."""
    ranks = tuple(torch_dist.get_process_group_ranks(group))
    if ranks not in _CHANNELS:
        _CHANNELS[ranks] = SharedMemoryChannel.open(group)
    channel = _CHANNELS[ranks]
    if channel is None:
        return GlooAllGather(), GlooReduceScatter()
    return SharedMemoryAllGather(channel), SharedMemoryReduceScatter(channel)


class _FsdpCollective:
    """What FSDP2's custom collectives share: plain buffers (allocate), and the reduce ops they implement."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def check_reduce_op(self, op):
        # FSDP2 reduce-scatters with SUM or AVG; PREMUL_SUM (set_gradient_divide_factor) is not implemented here.
        if op not in (torch_dist.ReduceOp.SUM, torch_dist.ReduceOp.AVG):
            raise NotImplementedError(f"{type(self).__name__}: op must be SUM or AVG, got {op}")


# ---------------------------------------------------------------------------------------------------------
# One host: shared memory

class SharedMemoryChannel:
    """Mailboxes in one mapping shared by the ranks of a group: two alternating sets (parities) of one region
    per rank, each region `world` slots of `slot_bytes`. A collective moves its bytes in pieces; per piece
    each rank writes into its own region of the next set, all meet at a barrier, then each reads the
    others' regions. Two sets make one barrier per piece enough: before a rank writes set s again, it has
    passed the barrier of the piece between, which the others reach only after they finished reading set s.
    Every rank must use the channel in the same order (as collectives are)."""

    def __init__(self, group, storage: torch.UntypedStorage, slot_bytes: int):
        self.group, self.world, self.rank = group, group.size(), group.rank()
        self.slot_bytes = slot_bytes
        self.boxes = torch.empty(0, dtype=torch.uint8).set_(storage)[: 2 * self.world ** 2 * slot_bytes].view(
            2, self.world, self.world * slot_bytes)
        self.pieces = 0

    @classmethod
    def open(cls, group, nbytes: int = SHM_BYTES) -> "SharedMemoryChannel | None":
        """The group's channel, or None (on every rank) where some rank cannot map the file rank 0 made: other
        hosts, another /dev/shm (containers), no /dev/shm. Collective."""
        world, rank = group.size(), group.rank()
        slot_bytes = nbytes // (2 * world * world) // 64 * 64  # 64-byte aligned: any dtype views its slots
        path = os.path.join(SHM_FOLDER, f"fastllm-collectives-{secrets.token_hex(8)}")
        token = secrets.token_bytes(16)
        if rank == 0:
            try:
                with open(path, "xb") as f:
                    f.truncate(2 * world * world * slot_bytes)
                    f.write(token)
            except OSError:
                path = None
        shared = [path, token]
        torch_dist.broadcast_object_list(shared, group=group, group_src=0)
        path, token = shared
        storage = None
        if path is not None and slot_bytes > 0:
            try:
                storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=2 * world * world * slot_bytes)
                if bytes(storage[: len(token)].tolist()) != token:  # a same-named file of another host
                    storage = None
            except (OSError, RuntimeError):
                storage = None
        mapped = [None] * world
        torch_dist.all_gather_object(mapped, storage is not None, group=group)
        if rank == 0 and path is not None:
            os.unlink(path)  # every rank mapped it (or gave up): nothing is left in /dev/shm, even after kill -9
        if not all(mapped):
            return None
        return cls(group, storage, slot_bytes)

    def next_set(self) -> torch.Tensor:
        """The mailboxes for the next piece: (world, world * slot_bytes) bytes, row r written only by rank r."""
        boxes = self.boxes[self.pieces % 2]
        self.pieces += 1
        return boxes

    def barrier(self):
        torch_dist.barrier(group=self.group)

    def check(self, group, name: str):
        if group is self.group:  # every call FSDP makes, on the group the channel was opened for
            return
        if tuple(torch_dist.get_process_group_ranks(group)) != tuple(torch_dist.get_process_group_ranks(self.group)):
            raise ValueError(f"{name}: called on a group of ranks {torch_dist.get_process_group_ranks(group)}, "
                             f"but its channel is for ranks {torch_dist.get_process_group_ranks(self.group)}")


def _as_bytes(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()} for shape {tuple(tensor.shape)}")
    return tensor.reshape(-1).view(torch.uint8)


class SharedMemoryAllGather(_FsdpCollective):
    """FSDP2 all-gather (rank i's shard into chunk i of the output) through a SharedMemoryChannel."""

    def __init__(self, channel: SharedMemoryChannel):
        self.channel = channel

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        channel = self.channel
        channel.check(group, type(self).__name__)
        world, rank = channel.world, channel.rank
        source = _as_bytes(input_tensor, "input_tensor")
        shard_bytes = source.numel()
        if output_tensor.numel() * output_tensor.element_size() != world * shard_bytes:
            raise ValueError(f"output_tensor must hold {world} x {shard_bytes} bytes, got "
                             f"{output_tensor.numel() * output_tensor.element_size()}")
        chunks = _as_bytes(output_tensor, "output_tensor").view(world, shard_bytes)
        piece = world * channel.slot_bytes
        for start in range(0, shard_bytes, piece):
            n = min(piece, shard_bytes - start)
            boxes = channel.next_set()
            boxes[rank, :n].copy_(source[start:start + n])
            channel.barrier()
            for src in range(world):
                if src != rank:
                    chunks[src, start:start + n].copy_(boxes[src, :n])
        if chunks[rank].data_ptr() != source.data_ptr():  # FSDP's input is already its chunk of the output
            chunks[rank].copy_(source)
        return completed_work(async_op)


class SharedMemoryReduceScatter(_FsdpCollective):
    """FSDP2 reduce-scatter (sum or average) through a SharedMemoryChannel: per piece each rank writes chunk
    j of its input into slot j of its region, then adds its own chunk and slot `rank` of every other region,
    in rank order (the same rounding whichever rank owns the chunk)."""

    def __init__(self, channel: SharedMemoryChannel):
        self.channel = channel

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.check_reduce_op(op)
        channel = self.channel
        channel.check(group, type(self).__name__)
        world, rank = channel.world, channel.rank
        if input_tensor.numel() != world * output_tensor.numel() or input_tensor.dtype != output_tensor.dtype:
            raise ValueError(f"input_tensor must be {world} x output_tensor ({output_tensor.numel()} "
                             f"{output_tensor.dtype}), got {input_tensor.numel()} {input_tensor.dtype}")
        _as_bytes(input_tensor, "input_tensor")
        chunk, dtype, itemsize = output_tensor.numel(), input_tensor.dtype, input_tensor.element_size()
        rows, out = input_tensor.reshape(world, chunk), output_tensor.reshape(-1)
        step = channel.slot_bytes // itemsize
        for start in range(0, chunk, step):
            n = min(step, chunk - start)
            boxes = channel.next_set().view(world, world, channel.slot_bytes)
            for dst in range(world):
                if dst != rank:
                    boxes[rank, dst, :n * itemsize].view(dtype).copy_(rows[dst, start:start + n])
            channel.barrier()
            total = out[start:start + n]
            for src in range(world):
                part = rows[rank, start:start + n] if src == rank else boxes[src, rank, :n * itemsize].view(dtype)
                total.copy_(part) if src == 0 else total.add_(part)
        if op == torch_dist.ReduceOp.AVG:
            output_tensor.div_(world)
        return completed_work(async_op)


# ---------------------------------------------------------------------------------------------------------
# Across hosts: gloo's broadcast and send/recv

class GlooAllGather(_FsdpCollective):
    """FSDP2 all-gather as one broadcast per rank (rank i's shard into chunk i of the output)."""

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        chunks = output_tensor.chunk(group.size())
        chunks[group.rank()].copy_(input_tensor)
        works = [torch_dist.broadcast(chunk, group=group, group_src=i, async_op=True) for i, chunk in enumerate(chunks)]
        for work in works:
            work.wait()
        return completed_work(async_op)


class GlooReduceScatter(_FsdpCollective):
    """FSDP2 reduce-scatter (sum or average) as direct send/recv: each rank sends chunk j of its input to rank
    j and adds what it receives into its own chunk. Synchronous: finishing it later in the backward
    (overlapped with the next blocks) kept every block's buffers alive meanwhile, +97 MiB per rank on the
    50M-parameter bench for no measurable speed."""

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.check_reduce_op(op)
        world, rank = group.size(), group.rank()
        chunks = input_tensor.chunk(world)
        received = torch.empty((world - 1, output_tensor.numel()), dtype=output_tensor.dtype,
                               device=output_tensor.device)
        others = [r for r in range(world) if r != rank]
        ops = [torch_dist.P2POp(torch_dist.isend, chunks[r], group=group, group_peer=r) for r in others]
        ops += [torch_dist.P2POp(torch_dist.irecv, buf, group=group, group_peer=r) for buf, r in zip(received, others)]
        for work in torch_dist.batch_isend_irecv(ops):
            work.wait()
        rows = list(received)
        rows.insert(rank, chunks[rank])  # summed in rank order: the same rounding whichever rank owns the chunk
        output_tensor.copy_(rows[0])
        for row in rows[1:]:
            output_tensor.add_(row)
        if op == torch_dist.ReduceOp.AVG:
            output_tensor.div_(world)
        return completed_work(async_op)


def completed_work(async_op: bool):
    """None (the collective finished synchronously), or a completed Work where the caller asked for one."""
    if not async_op:
        return None
    return torch._C._distributed_c10d._create_work_from_future(torch.futures.collect_all([]))
