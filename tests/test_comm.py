"""Comm, the one collective layer: every method at world size 1 (no process group: each returns its
input and moves no byte), and every collective at 2 real ranks in one launch, against hand values
(sums, max, broadcasts, errors raised on every rank, reduce/gather/scatter of a ZeRO-3-partitioned
parameter, and the byte counters)."""
import json

import pytest
import torch

from launch_utils import run_ranks
from lora_dist.comm import Comm
from lora_dist.errors import ConfigError, DistributedError


def test_world_one_without_process_group():
    import torch.distributed as dist
    assert not dist.is_initialized()
    c = Comm()
    assert (c.on, c.rank, c.world, c.device) == (False, 0, 1, torch.device("cpu"))
    c.barrier()
    assert c.sum_scalars([1.5, 2.0, -3.25]) == [1.5, 2.0, -3.25]
    assert c.sum(0.75) == 0.75 and c.mean(0.75) == 0.75 and c.max_int(-4) == -4
    obj = {"a": [1, 2]}
    assert c.all_gather_object(obj) == [obj] and c.broadcast_object(obj, src=0) is obj
    t = torch.arange(5.0)
    assert c.broadcast(t, src=0) is t and c.reduce_to(t, dst=0) is t
    got = c.broadcast_tensors({"w": torch.ones(2, 3, dtype=torch.float64)}, {"w": (2, 3)}, torch.float32, "cpu", 0)
    assert list(got) == ["w"] and got["w"].dtype == torch.float32 and torch.equal(got["w"], torch.ones(2, 3))
    c.raise_if_any(None)
    c.raise_if_any("")
    with pytest.raises(DistributedError, match="^boom$"):
        c.raise_if_any("boom")
    with pytest.raises(ConfigError, match="^bad path$"):
        c.raise_if_any("bad path", ConfigError)
    c.raise_from_rank0(None)
    with pytest.raises(ConfigError, match="^rank 0 refuses$"):
        c.raise_from_rank0("rank 0 refuses", ConfigError)
    p = torch.nn.Parameter(torch.randn(3, 4))
    assert torch.equal(c.gather_full(p, dst=0), p.detach())
    c.scatter_full(p, torch.arange(12, dtype=torch.float64).view(3, 4), src=0)
    assert p.dtype == torch.float32 and torch.equal(p.detach(), torch.arange(12.0).view(3, 4))
    assert (c.sent, c.reduce_sent, c.allreduce_equivalent) == (0, 0, 0)  # nothing moved


# Hand values for ranks 0 and 1. Byte counts: a ring all-reduce sends 2(w−1)/w of the tensor per
# rank (16 B of two float64 -> 16 B at w = 2); a broadcast's source sends (w−1) copies; a reduce's
# and a gather's non-root ranks send their tensor/shard once; a scatter's source sends (w−1) shards.
SHARD = 18  # ceil(35 / 2) elements of the 5x7 weight per rank
EXPECTED = [
    {"sum_scalars": [[3.0, 0.25], [16, 0, 0]], "broadcast": [[1.0] * 3, [0, 0, 0]],
     "reduce_to": [None, [32, 32, 32]], "gather_full": [None, [SHARD * 4, 0, 0]],
     "scatter_moved": [SHARD * 4, 0, 0], "shard": [float(i) for i in range(SHARD)],
     "gather_plain": [[[0.0] * 3] * 2, [0, 0, 0]], "scatter_plain_moved": [0, 0, 0],
     "totals": [16 + 8 + 8 + 32 + 72 + 72, 32, 32]},
    {"sum_scalars": [[3.0, 0.25], [16, 0, 0]], "broadcast": [[1.0] * 3, [12, 0, 0]],
     "reduce_to": [[0.0, 3.0, 6.0, 9.0], [0, 0, 32]], "gather_full": [True, [0, 0, 0]],
     "scatter_moved": [0, 0, 0], "shard": [float(i) for i in range(SHARD, 35)] + [0.0],
     "gather_plain": [None, [0, 0, 0]], "scatter_plain_moved": [24, 0, 0],
     "totals": [16 + 8 + 8 + 12 + 28 + 24, 0, 32]},
]


@pytest.mark.slow
def test_collectives_on_two_ranks(tmp_path):
    run_ranks("comm_collectives.py", ["--out", str(tmp_path)], nproc=2)
    for r, exp in enumerate(EXPECTED):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert (got["on"], got["rank"], got["world"], got["device"]) == (True, r, 2, "cpu")
        assert got["sum_scalars"] == exp["sum_scalars"]
        assert got["sum"] == 0.5 + 1.5 and got["mean"] == 0.5 and got["max_int"] == 8
        assert got["all_gather_object"] == [{"r": 0}, {"r": 1}]
        assert got["broadcast"] == exp["broadcast"] and got["broadcast_object"] == {"from": 1}
        assert got["broadcast_tensors"] == [{"a": [[0.0, 1.0], [2.0, 3.0]], "b": [7.0] * 3}, [28 * r, 0, 0]]
        assert got["raise_if_any"] == "bad on 1" and got["raise_from_rank0"] == "rank 0 says no"
        assert got["reduce_to"] == exp["reduce_to"]
        assert got["partitioned"] == [True, [0], SHARD]
        assert got["gather_full"] == exp["gather_full"]
        ok, shard, moved = got["scatter_full"]
        assert ok and shard == exp["shard"] and moved == exp["scatter_moved"]
        assert got["gather_plain"] == exp["gather_plain"]
        assert got["scatter_plain"] == [[[5.0] * 3] * 2, exp["scatter_plain_moved"]]
        assert got["totals"] == exp["totals"]
