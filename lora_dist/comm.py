"""How bytes move: the few collectives the engine uses, each a no-op at world size 1.

Every call counts the bytes this rank sends (`Comm.sent`), so the report can compare the
reduce-to-owner design with an all-reduce of the same statistics.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from .zero import full_numel, full_shape, is_partitioned


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    def __init__(self):
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self.sent = 0                  # bytes this rank sent, all collectives
        self.reduce_sent = 0           # of which: reducing statistics to their owners
        self.allreduce_equivalent = 0  # bytes a ring all-reduce of the same reductions would send

    def barrier(self):
        if self.on:
            dist.barrier()

    def sum_scalars(self, values: List[float]) -> List[float]:
        """All-reduce a few float64 scalars (counts, normalizers)."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.on:
            dist.all_reduce(t)
            self.sent += 2 * _nbytes(t)
        return t.tolist()

    def max_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        if self.on:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all_gather_object(self, obj) -> list:
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def raise_if_any(self, message, exc=RuntimeError) -> None:
        """Collective error: if any rank has a message, every rank raises the first one.

        A rank that raised alone would leave the others waiting in the next collective forever."""
        messages = [m for m in self.all_gather_object(message) if m]
        if messages:
            raise exc(messages[0])

    def reduce_to(self, t: torch.Tensor, dst: int) -> Optional[torch.Tensor]:
        """Sum `t` over ranks onto `dst`; returns the sum on dst, None elsewhere (t is then garbage)."""
        nb = _nbytes(t)
        self.allreduce_equivalent += 2 * (self.world - 1) * nb // self.world
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

