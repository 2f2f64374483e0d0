"""Start torch.distributed the way the job was launched: deepspeed / torchrun (RANK set), mpirun
(MPI environment, discovered by DeepSpeed through mpi4py), or plain `python` (a world of one)."""
from __future__ import annotations

import os
import socket
from typing import Callable, TypeVar

from ..comm import Comm, release_shm_buffers
from ..errors import DistributedError, LoraDistError

T = TypeVar("T")

RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def launched_by() -> str:
    if "RANK" in os.environ:
        return "launcher"
    if any(v in os.environ for v in MPI_VARS):
        return "mpi"
    return "single"


def init_distributed() -> str:
    """Initialize the process group; returns how the job was launched."""
    import deepspeed
    how = launched_by()
    if how == "single":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
    elif how == "mpi":
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            raise DistributedError("this job was started by mpirun, but mpi4py is not installed: "
                             "pip install 'lora_dist[mpi]' (and an MPI runtime)") from None
    # DeepSpeed's MPI discovery sets MASTER_PORT to its argument (default 29500): pass ours through
    deepspeed.init_distributed(distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    release_shm_buffers()  # CPU runs: DeepSpeed would leave 67 MB a rank in /dev/shm after exit
    return how


def shutdown() -> None:
    """Destroy the default process group if one is up. A gloo group keeps threads running until it
    is destroyed; a rank that exits with them alive (e.g. `sys.exit(2)` after a bad input) can abort
    in C++ ("terminate called without an active exception", exit -6) instead of exiting with 2."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch_rank() -> int:
    """This process's global rank as the launcher set it (0 for a plain `python` run); usable
    before, after, or without torch.distributed."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in RANK_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def collectively(comm: Comm, fn: Callable[[], T]) -> T:
    """Run `fn` on every rank; if it raised a LoraDistError on any rank, every rank raises the first
    one (lowest rank), so no rank is left waiting in a later collective for one that stopped."""
    try:
        result, message = fn(), None
    except LoraDistError as e:
        result, message = None, str(e)
    comm.raise_if_any(message, LoraDistError)
    return result
