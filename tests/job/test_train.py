"""The training job end to end: real launches of launch/train.py on CPU (gloo)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from launch_utils import REPO, _env, free_port

TRAIN = os.path.join(REPO, "launch", "train.py")
SMALL = ["--ds_config", "ds_configs/zero3.json", "--max_steps", "8", "--batch_size", "8", "--micro_batch_size", "2",
         "--save_every", "3", "--eval_every", "4", "--eval_size", "16", "--eval_generate", "2", "--init_samples", "16",
         "--max_seq_len", "96"]


def _deepspeed(args, nproc=2, **kw):
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(nproc),
           "--master_port", str(free_port()), TRAIN, *args]
    return subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def _finish(p, timeout=900):
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-5000:]
    return out


def _metrics(d):
    with open(os.path.join(d, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_rank_zero3_run_kill9_resume_and_peft_export(tmp_path):
    ref_dir, kill_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
    out = _finish(_deepspeed([*SMALL, "--output_dir", ref_dir]))
    assert "initialize_adapters: lora_da" in out and "final: step 8" in out
    ref = _metrics(ref_dir)
    assert [r["step"] for r in ref] == list(range(1, 9))
    assert "eval_loss" in ref[3] and "eval_loss" in ref[7]

    # the adapter loads in stock PEFT as it stands (base_model_name_or_path names the base dir)
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    adapter = os.path.join(ref_dir, "adapter")
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    pm = peft.PeftModel.from_pretrained(base, adapter)
    assert sum(p.abs().sum().item() for n, p in pm.named_parameters() if "lora_B" in n) > 0

    # kill -9 after the step-3 checkpoint, then --resume: the same loss curve to 1e-6
    p = _deepspeed([*SMALL, "--output_dir", kill_dir], start_new_session=True)
    latest = os.path.join(kill_dir, "checkpoints", "latest")
    deadline = time.time() + 600
    while not (os.path.isfile(latest) and open(latest).read().strip() == "step3"):
        assert p.poll() is None, p.communicate()[0][-4000:]
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not os.path.isfile(os.path.join(kill_dir, "final.json"))
    # a save that died half-way (no `latest` update) must not be picked up
    os.makedirs(os.path.join(kill_dir, "checkpoints", "step99"), exist_ok=True)
    out = _finish(_deepspeed([*SMALL, "--output_dir", kill_dir, "--resume"]))
    assert "resumed from step" in out
    got = _metrics(kill_dir)
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(got, ref):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
        assert a["lr"] == pytest.approx(b["lr"], abs=1e-12)
    assert abs(got[-1]["eval_loss"] - ref[-1]["eval_loss"]) <= 1e-6


@pytest.mark.slow
def test_two_nodes_and_torchrun_full_finetuning(tmp_path):
    # two "nodes" of one rank each
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    port = str(free_port())
    d = str(tmp_path / "nodes")
    ds = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    procs = [subprocess.Popen([ds, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n), "--master_addr",
                               "127.0.0.1", "--master_port", port, TRAIN, *SMALL, "--max_steps", "3",
                               "--save_every", "100", "--output_dir", d],
                              env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    outs = [_finish(p) for p in procs]
    assert "2 rank(s)" in outs[0] and os.path.isfile(os.path.join(d, "adapter", "adapter_model.safetensors"))
    # torchrun, and the full-fine-tuning baseline under ZeRO-3 with the same script
    d2 = str(tmp_path / "torchrun")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), TRAIN, *SMALL, "--max_steps", "3", "--save_every", "2", "--adapter", "none",
                "--output_dir", d2]
    p = subprocess.run(torchrun, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    assert "0 adapted layers (none" in p.stdout + p.stderr
    m = _metrics(d2)
    assert len(m) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in m)
    assert os.path.isfile(os.path.join(d2, "checkpoints", "latest"))


def test_bad_inputs_fail_before_training(tmp_path):
    """Single process (no launcher): clear errors for bad flags, output dirs and configs."""
    env = _env()
    base = [sys.executable, TRAIN, "--max_steps", "1"]

    def run(*extra):
        return subprocess.run([*base, *extra], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() != 0:  # root can write anywhere: use a path under a file instead
        r = run("--output_dir", str(ro / "x"))
    else:
        blocker = tmp_path / "file"
        blocker.write_text("")
        r = run("--output_dir", str(blocker / "x"))
    assert r.returncode != 0 and "is not writable" in r.stderr
    r = run("--r", "0")
    assert r.returncode != 0 and "--r must be positive" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 3, "optimizer": {"type": "AdamW", "params": {"torch_adam": true}}}')
    r = run("--ds_config", str(bad), "--output_dir", str(tmp_path / "o"), "--batch_size", "4")
    assert r.returncode != 0 and "train_batch_size" in (r.stdout + r.stderr)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lrr: 0.1\n")
    r = run("--config", str(cfg))
    assert r.returncode != 0 and "unknown keys ['lrr']" in r.stderr
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


@pytest.mark.slow
def test_mpirun_path(tmp_path):
    """`mpirun -np 2 python launch/train.py`: ranks discovered through mpi4py."""
    pytest.importorskip("mpi4py")  # installed by the test extra (mpi4py + the mpich wheel)
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
    assert mpirun, "no mpirun: install the test extra (mpich) or an MPI runtime"
    d = str(tmp_path / "mpi")
    env = _env()
    env["MASTER_PORT"] = str(free_port())
    p = subprocess.run([mpirun, "-np", "2", sys.executable, TRAIN, *SMALL, "--max_steps", "2", "--save_every", "100",
                        "--init", "kaiming", "--output_dir", d], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    assert "2 rank(s)" in p.stdout and len(_metrics(d)) == 2
