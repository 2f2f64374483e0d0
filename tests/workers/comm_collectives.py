"""2-rank worker for tests/test_comm.py: every Comm collective once, with its byte counters; each
rank writes what it saw to <out>/rank<r>.json and the parent test checks it against hand values."""
import argparse
import gc
import json
import os

import deepspeed
import torch
import torch.distributed as dist

from lora_dist.comm import Comm, release_shm_buffers
from lora_dist.errors import ConfigError, DistributedError
from lora_dist.zero import is_partitioned, read_full

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--local_rank", type=int, default=0)
args = p.parse_args()

deepspeed.init_distributed(dist_backend="gloo")
release_shm_buffers()
rank = dist.get_rank()
comm = Comm()
res = {"on": comm.on, "rank": comm.rank, "world": comm.world, "device": str(comm.device)}


def delta(fn):
    """fn's result and the change of the three counters it caused on this rank."""
    before = (comm.sent, comm.reduce_sent, comm.allreduce_equivalent)
    out = fn()
    after = (comm.sent, comm.reduce_sent, comm.allreduce_equivalent)
    return out, [a - b for a, b in zip(after, before)]


res["sum_scalars"] = delta(lambda: comm.sum_scalars([rank + 1.0, 0.25 * rank]))
res["sum"] = comm.sum(rank + 0.5)
res["mean"] = comm.mean(float(rank))
res["max_int"] = comm.max_int(7 * rank + 1)
res["all_gather_object"] = comm.all_gather_object({"r": rank})
t = torch.full((3,), float(rank))
res["broadcast"] = delta(lambda: comm.broadcast(t, src=1).tolist())
res["broadcast_object"] = comm.broadcast_object({"from": rank}, src=1)
held = {"a": torch.arange(4, dtype=torch.float64).view(2, 2), "b": torch.full((3,), 7.0)} if rank == 1 else None
res["broadcast_tensors"] = delta(lambda: {k: v.tolist() for k, v in comm.broadcast_tensors(
    held, {"a": (2, 2), "b": (3,)}, torch.float32, "cpu", src=1).items()})
comm.barrier()

try:
    comm.raise_if_any("bad on 1" if rank == 1 else None, ConfigError)
except ConfigError as e:
    res["raise_if_any"] = str(e)
comm.raise_if_any(None)  # nobody has a message: nobody raises
try:
    comm.raise_from_rank0(f"rank {rank} says no")
except DistributedError as e:
    res["raise_from_rank0"] = str(e)
comm.raise_from_rank0(None if rank == 0 else "ignored: only rank 0 decides")

x = torch.arange(4, dtype=torch.float64) * (rank + 1)
res["reduce_to"] = delta(lambda: (lambda r: None if r is None else r.tolist())(comm.reduce_to(x, dst=1)))

# a ZeRO-3-partitioned parameter: 35 elements, 18 per rank with one element of padding
DS = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
with deepspeed.zero.Init(config_dict_or_path=DS):
    lin = torch.nn.Linear(7, 5)
w = lin.weight
res["partitioned"] = [is_partitioned(w), list(w.shape), w.ds_tensor.numel()]
full = read_full([w])[0]  # DeepSpeed's own all-gather: the reference
got, moved = delta(lambda: comm.gather_full(w, dst=1))
res["gather_full"] = [None if got is None else torch.equal(got, full), moved]
value = torch.arange(35, dtype=torch.float64).view(5, 7)  # float64 in: cast once to the shard dtype
_, moved = delta(lambda: comm.scatter_full(w, value if rank == 0 else None, src=0))
res["scatter_full"] = [torch.equal(read_full([w])[0], value.float()), w.ds_tensor.tolist(), moved]

# an unpartitioned parameter: every rank holds all of it
q = torch.nn.Parameter(torch.full((2, 3), float(rank)))
got, moved = delta(lambda: comm.gather_full(q, dst=0))
res["gather_plain"] = [None if got is None else got.tolist(), moved]
_, moved = delta(lambda: comm.scatter_full(q, torch.ones(2, 3, dtype=torch.float64) * 5 if rank == 1 else None, src=1))
res["scatter_plain"] = [q.tolist(), moved]
res["totals"] = [comm.sent, comm.reduce_sent, comm.allreduce_equivalent]

os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
    json.dump(res, f)
# Tear down in order: the ZeRO-3 parameters first, then the group. Left to interpreter exit, the
# teardown sometimes aborted a rank under load ("terminate called without an active exception").
del lin, w, q
gc.collect()
dist.barrier()
dist.destroy_process_group()
