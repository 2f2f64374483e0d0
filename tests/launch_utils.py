"""Launch real DeepSpeed ranks on CPU (gloo) for the multi-rank tests."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(REPO, "tests", "workers")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    # DeepSpeed JIT-builds a comm op with the first `ninja` on PATH and rebuilds it when that changes:
    # append the venv's bin (for a venv-only ninja) rather than prepend it.
    env["PATH"] = env.get("PATH", "") + os.pathsep + os.path.dirname(sys.executable)
    return env


def _deepspeed_bin():
    return os.path.join(os.path.dirname(sys.executable), "deepspeed")


def _check(procs_outputs, what):
    bad = [(rc, out) for rc, out in procs_outputs if rc != 0]
    if bad:
        rc, out = bad[0]
        raise AssertionError(f"{what} failed with exit code {rc}; output tail:\n{out[-6000:]}")


def run_ranks(script: str, args: list, nproc: int = 2, timeout: int = 600) -> str:
    """`deepspeed --num_gpus N script args` on one node; returns the combined output."""
    cmd = [_deepspeed_bin(), "--num_gpus", str(nproc), "--master_port", str(free_port()),
           os.path.join(WORKERS, script), *args]
    p = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    _check([(p.returncode, out)], " ".join(cmd))
    return out


def run_two_nodes(script: str, args: list, timeout: int = 600, slots: int = 1) -> str:
    """Two "nodes" of `slots` ranks each on this machine: hostfile + `--no_ssh --node_rank {0,1}`."""
    tmp = tempfile.mkdtemp()
    hostfile = os.path.join(tmp, "hostfile")
    with open(hostfile, "w") as f:
        f.write(f"nodeA slots={slots}\nnodeB slots={slots}\n")
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cmd = [_deepspeed_bin(), "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", port, os.path.join(WORKERS, script), *args]
        log = open(os.path.join(tmp, f"node{node}.log"), "w+")
        procs.append((subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log))
    results = []
    for p, log in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            raise
        log.seek(0)
        results.append((p.returncode, log.read()))
    _check(results, f"two-node launch of {script}")
    return "\n".join(o for _, o in results)


def read_report(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
