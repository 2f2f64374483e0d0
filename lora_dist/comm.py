"""How bytes move: every collective lora_dist uses (engine, export, training job), each a no-op at
world size 1 or when torch.distributed is not initialized.

Every tensor collective counts the bytes this rank sends (`Comm.sent`), so the report can compare
the reduce-to-owner design with an all-reduce of the same statistics. Scalars travel on the
backend's device (CUDA for NCCL, which accepts no CPU tensors; CPU for gloo).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from .errors import DistributedError
from .zero import full_numel, full_shape, is_partitioned


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _ring_allreduce_bytes(nbytes: int, world: int) -> int:
    """Bytes each rank sends in a ring all-reduce: reduce-scatter then all-gather, (w−1)/w each."""
    return 2 * (world - 1) * nbytes // world


def release_shm_buffers() -> Optional[str]:
    """Unlink this rank's DeepSpeed CPU shared-memory all-reduce buffer from /dev/shm; returns its
    path if one was removed. Collective: every rank calls it after deepspeed.init_distributed.

    DeepSpeed 0.19.8's CPU backend creates /dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}
    (67 MB a rank) and never unlinks it, so every multi-rank CPU launch leaves them in RAM-backed
    tmpfs after it exits (hundreds of launches fill the machine). Once every rank has mapped every
    buffer (init_distributed returns only then; the barrier makes sure all ranks have), unlinking
    only removes the name: the mappings stay valid and the memory is freed when the last rank exits.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "gloo":
        return None
    import os
    path = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    dist.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    return path


class Comm:
    """The collectives of the default process group; `on` is False at world size 1, and every
    method then returns its input (a sum over one rank, a broadcast from oneself)."""

    def __init__(self):
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self.sent = 0                  # bytes this rank sent, all collectives
        self.reduce_sent = 0           # of which: reducing statistics to their owners
        self.allreduce_equivalent = 0  # bytes a ring all-reduce of the same reductions would send
        nccl = self.on and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def barrier(self):
        if self.on:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process groups this Comm created (gather_rows'): a gloo group keeps its
        threads until destroyed, and threads still alive at interpreter exit abort the process
        ("terminate called without an active exception"). Idempotent; the Comm stays usable, and
        gather_rows makes a new group if called again."""
        group = getattr(self, "_rows_group", None)
        self._rows_group = None
        if group is not None and dist.is_initialized():
            dist.destroy_process_group(group)

    def sum_scalars(self, values: List[float]) -> List[float]:
        """All-reduce a few float64 scalars (counts, normalizers): Σ_ranks values[i] for each i."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.on:
            dist.all_reduce(t)
            self.sent += _ring_allreduce_bytes(_nbytes(t), self.world)
        return t.tolist()

    def sum(self, value: float) -> float:
        """Σ_ranks value."""
        return self.sum_scalars([value])[0]

    def mean(self, value: float) -> float:
        """(1/world)·Σ_ranks value, e.g. a loss averaged over data-parallel ranks."""
        return self.sum(value) / self.world

    def max_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        if self.on:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all_gather_object(self, obj) -> list:
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def raise_if_any(self, message, exc=DistributedError) -> None:
        """Collective error: if any rank has a message, every rank raises the first one.

        A rank that raised alone would leave the others waiting in the next collective forever."""
        messages = [m for m in self.all_gather_object(message) if m]
        if messages:
            raise exc(messages[0])

    def raise_from_rank0(self, message, exc=DistributedError) -> None:
        """Collective decision: rank 0's message (others' are ignored) is raised on every rank.

        For checks of shared state (an output directory on a shared file system) that ranks could
        see differently if each looked itself, e.g. while another node is already writing."""
        message = self.broadcast_object(message if self.rank == 0 else None, src=0)
        if message:
            raise exc(message)

    def reduce_to(self, t: torch.Tensor, dst: int) -> Optional[torch.Tensor]:
        """Sum `t` over ranks onto `dst`; returns the sum on dst, None elsewhere (t is then garbage)."""
        nb = _nbytes(t)
        self.allreduce_equivalent += _ring_allreduce_bytes(nb, self.world)
        if not self.on:
            return t
        dist.reduce(t, dst=dst)
        if self.rank != dst:
            # a tree/ring reduce moves about one copy per rank
            self.sent += nb
            self.reduce_sent += nb
            return None
        return t

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        if self.on:
            dist.broadcast(t, src=src)
            if self.rank == src:
                self.sent += _nbytes(t) * (self.world - 1)
        return t

    def broadcast_tensors(self, values: Optional[dict], shapes: dict, dtype: torch.dtype, device,
                          src: int) -> dict:
        """Named tensors held by `src` (`values`, ignored elsewhere) on every rank, in `shapes` order."""
        out = {}
        for key, shape in shapes.items():
            t = (values[key].to(device=device, dtype=dtype).contiguous() if self.rank == src
                 else torch.empty(shape, dtype=dtype, device=device))
            out[key] = self.broadcast(t, src)
        return out

    def gather_rows(self, t: torch.Tensor, rows: int, dst: int) -> Optional[List[torch.Tensor]]:
        """Every rank's 2-D `t` (at most `rows` rows, zero-padded to `rows`) on `dst`, in rank order;
        None elsewhere. Runs on a process group of its own, so it can be called from autograd hooks
        between the collectives DeepSpeed issues there. Counts the padded bytes each rank sends."""
        if not self.on:
            return [t]
        if getattr(self, "_rows_group", None) is None:
            self._rows_group = dist.new_group()
        buf = t
        if t.shape[0] != rows:
            buf = torch.zeros((rows,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
            buf[: t.shape[0]] = t
        parts = [torch.empty_like(buf) for _ in range(self.world)] if self.rank == dst else None
        dist.gather(buf, parts, dst=dst, group=self._rows_group)
        if self.rank != dst:
            self.sent += _nbytes(buf)
            self.reduce_sent += _nbytes(buf)
        return parts

    def broadcast_object(self, obj, src: int):
        if not self.on:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    # -- ZeRO-3 shards ---------------------------------------------------------------------------
    def gather_full(self, p: torch.Tensor, dst: int) -> Optional[torch.Tensor]:
        """The full value of parameter `p` on rank `dst` alone (None elsewhere).

        Partitioned: each rank's `ds_tensor` is an equal, zero-padded slice of the flat parameter;
        `gather` them to dst and trim. Unpartitioned: every rank already has it.
        """
        if not is_partitioned(p):
            return p.detach() if (not self.on or self.rank == dst) else None
        shard = p.ds_tensor.detach()
        if not self.on:
            return shard[: full_numel(p)].view(full_shape(p))
        parts = [torch.empty_like(shard) for _ in range(self.world)] if self.rank == dst else None
        dist.gather(shard, parts, dst=dst)
        if self.rank != dst:
            self.sent += _nbytes(shard)
            return None
        return torch.cat(parts)[: full_numel(p)].view(full_shape(p))

    def scatter_full(self, p: torch.Tensor, value: Optional[torch.Tensor], src: int) -> None:
        """Write a full value held by `src` into parameter `p` (its shards, or every replica)."""
        if not is_partitioned(p):
            if self.on:
                buf = value.to(p.dtype).contiguous() if self.rank == src else torch.empty_like(p.data)
                self.broadcast(buf, src)
            else:
                buf = value.to(p.dtype)
            with torch.no_grad():
                p.data.copy_(buf.view_as(p))
            return
        shard = p.ds_tensor
        n = shard.numel()
        if self.rank == src:
            flat = value.reshape(-1).to(device=shard.device, dtype=shard.dtype)
            padded = torch.zeros(n * self.world, dtype=shard.dtype, device=shard.device)
            padded[: flat.numel()] = flat
            chunks = list(padded.chunk(self.world))
        else:
            chunks = None
        if not self.on:
            with torch.no_grad():
                shard.copy_(chunks[0])
            return
        out = torch.empty_like(shard)
        dist.scatter(out, chunks, src=src)
        if self.rank == src:
            self.sent += n * (self.world - 1) * shard.element_size()
        with torch.no_grad():
            shard.copy_(out)

