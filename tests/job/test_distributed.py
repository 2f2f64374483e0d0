"""lora_dist.job.distributed: how the job was launched, its rank before torch.distributed starts,
and errors that every rank raises together."""
import sys

import pytest

from lora_dist.comm import Comm
from lora_dist.errors import ConfigError, DistributedError, LoraDistError
from lora_dist.job.distributed import collectively, init_distributed, launch_rank, launched_by

LAUNCH_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK",
               "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


@pytest.fixture
def clean_env(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env, how, rank", [
    ({}, "single", 0),
    ({"RANK": "3"}, "launcher", 3),                                      # deepspeed / torchrun
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2"}, "mpi", 2),  # Open MPI
    ({"PMI_SIZE": "2", "PMI_RANK": "1"}, "mpi", 1),                       # MPICH
])
def test_launched_by_and_launch_rank(clean_env, env, how, rank):
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert launched_by() == how and launch_rank() == rank


def test_mpirun_without_mpi4py_is_a_distributed_error_not_system_exit(clean_env):
    clean_env.setenv("PMI_SIZE", "2")
    clean_env.setitem(sys.modules, "mpi4py", None)  # `import mpi4py` now raises ImportError
    with pytest.raises(DistributedError, match=r"started by mpirun, but mpi4py is not installed.*lora_dist\[mpi\]"):
        init_distributed()


def test_collectively_returns_the_value_or_raises_the_message():
    comm = Comm()  # no process group: a world of one
    assert collectively(comm, lambda: 42) == 42

    def bad():
        raise ConfigError("--r must be positive, got 0")
    with pytest.raises(LoraDistError, match=r"^--r must be positive, got 0$"):
        collectively(comm, bad)
    with pytest.raises(KeyError):  # not an input error: a bug, left to show its traceback
        collectively(comm, lambda: {}["x"])
