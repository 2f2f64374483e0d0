"""The training job end to end: real launches of launch/train.py on CPU (gloo)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import mpi4py  # noqa: F401  (a declared test dependency: the mpirun test must not skip silently)
import peft
import pytest
import torch
from safetensors.torch import load_file

from launch_utils import REPO, _env, free_port
from lora_dist.job import data
from lora_dist.job.demo import METAMATH_TINY, resolve_model
from lora_dist.job.evaluate import eval_loss

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


def _final(d):
    with open(os.path.join(d, "final.json")) as f:
        return json.load(f)


def _same_start(got, ref, steps):
    """The held-out loss before training and the first `steps` step losses agree to 1e-6 (float noise)."""
    assert got[0]["step"] == ref[0]["step"] == 0
    assert abs(got[0]["eval_loss"] - ref[0]["eval_loss"]) <= 1e-6, (got[0], ref[0])
    for a, b in zip(got[1:steps + 1], ref[1:steps + 1]):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
    """The reference 2-rank ZeRO-3 run (LoRA-FA, LoRA-DA init, 8 steps) the other launches are compared with."""
    d = str(tmp_path_factory.mktemp("ref") / "run")
    out = _finish(_deepspeed([*SMALL, "--output_dir", d]))
    return d, out


def _peft_check(ref_dir):
    """Load the exported adapter in stock PEFT on the base model and recompute, in this process, the
    held-out loss and exact match the job reported (same eval split, same prompts, greedy)."""
    from transformers import AutoModelForCausalLM
    adapter = os.path.join(ref_dir, "adapter")
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    base_dir = cfg["base_model_name_or_path"]
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    tok = data.load_tokenizer(base_dir)
    _, eval_rec = data.train_eval_split(data.load_records(METAMATH_TINY), 16, seed=0)
    eval_ds, _ = data.build_dataset(eval_rec, tok, template="metamath", max_seq_len=96)
    loss = eval_loss(pm, eval_ds, tok.pad_token_id, 2, torch.device("cpu"))["eval_loss"]
    tmpl = data.get_template("metamath")
    hits, completions = 0, []
    for row in [eval_rec[i] for i in range(2)]:  # --eval_generate 2: the first two held-out rows
        enc = tok(tmpl.prompt(row), return_tensors="pt")
        with torch.no_grad():
            out = pm.generate(**enc, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
        completions.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        hits += data.exact_match(completions[-1], tmpl.reference(row))
    return loss, hits / 2, completions


@pytest.mark.slow
def test_two_rank_zero3_run_kill9_resume_and_peft_export(ref_run, tmp_path):
    ref_dir, out = ref_run
    kill_dir = str(tmp_path / "killed")
    assert "initialize_adapters: lora_da" in out and "final: step 8" in out
    ref, final = _metrics(ref_dir), _final(ref_dir)
    assert [r["step"] for r in ref] == list(range(0, 9))
    assert all("eval_loss" in ref[s] for s in (0, 4, 8)) and "eval_loss" not in ref[3]
    # it learned: the held-out loss after 8 steps is below the loss before training
    assert final["step"] == 8 and final["eval_loss"] < ref[0]["eval_loss"] - 1e-3, (final, ref[0])
    assert final["eval_loss"] == pytest.approx(ref[-1]["eval_loss"], abs=1e-9)  # same weights, same eval

    # LoRA-FA: A is frozen at its LoRA-DA init, B trains. Checkpoint step 3 vs the end: A identical, B moved.
    early = load_file(os.path.join(ref_dir, "checkpoints", "step3", "adapter", "adapter_model.safetensors"))
    end = load_file(os.path.join(ref_dir, "adapter", "adapter_model.safetensors"))
    assert early.keys() == end.keys() and len([k for k in end if "lora_A" in k]) == 28
    for k in end:
        if "lora_A" in k:
            assert torch.equal(early[k], end[k]), k
        else:
            assert "lora_B" in k and (early[k] - end[k]).abs().max() > 1e-6, k

    # the adapter loads in stock PEFT and reproduces the job's held-out loss and exact match
    loss, em, completions = _peft_check(ref_dir)
    assert loss == pytest.approx(final["eval_loss"], abs=1e-4)
    assert final["generated"] == 2 and 0.0 <= final["exact_match"] <= 1.0
    assert final["exact_match"] == em and final["example"] == completions[0]
    assert f"exact match {final['exact_match']:.3f} on 2 prompts" in out

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
    assert "resumed from step3" in out
    got = _metrics(kill_dir)
    assert [r["step"] for r in got] == list(range(0, 9))
    for a, b in zip(got, ref):
        assert abs(a.get("loss", 0) - b.get("loss", 0)) <= 1e-6, (a, b)
        assert a.get("lr", 0) == pytest.approx(b.get("lr", 0), abs=1e-12)
    assert abs(got[-1]["eval_loss"] - ref[-1]["eval_loss"]) <= 1e-6


@pytest.mark.slow
def test_two_nodes_and_torchrun_full_finetuning(ref_run, tmp_path):
    # two "nodes" of one rank each: the same world size as the reference, so the same run
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
    # 3 of 8 steps: the warm-up (2 steps, DeepSpeed's minimum) is the same, so are the first 3 losses
    _same_start(_metrics(d), _metrics(ref_run[0]), steps=3)

    # torchrun, and the full-fine-tuning baseline under ZeRO-3 with the same script, into a used
    # output dir with --overwrite_output_dir: the old run's files go, an unrelated file stays
    d2 = tmp_path / "torchrun"
    (d2 / "checkpoints").mkdir(parents=True)
    (d2 / "checkpoints" / "latest").write_text("step99")
    (d2 / "metrics.jsonl").write_text('{"step": 99, "loss": 0.0}\n')
    (d2 / "notes.txt").write_text("keep me")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), TRAIN, *SMALL, "--max_steps", "4", "--save_every", "3", "--adapter", "none",
                "--output_dir", str(d2), "--overwrite_output_dir"]
    p = subprocess.run(torchrun, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    assert "0 adapted layers (none" in p.stdout + p.stderr
    m = _metrics(str(d2))
    assert [r["step"] for r in m] == [0, 1, 2, 3, 4] and (d2 / "notes.txt").read_text() == "keep me"
    assert (d2 / "checkpoints" / "latest").read_text() == "step3"
    # full FT changed the base weights themselves and lowered the held-out loss
    assert _final(str(d2))["eval_loss"] < m[0]["eval_loss"] - 1e-3, m
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file as load_st
    # (steps 1 and 2 run at LR 0 in DeepSpeed's 2-step warm-up; step 3 is the first that moves W)
    trained = get_fp32_state_dict_from_zero_checkpoint(str(d2 / "checkpoints"), tag="step3")
    base = load_st(os.path.join(resolve_model("tiny-llama"), "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert trained[name].shape == base[name].shape and (trained[name] - base[name]).abs().max() > 1e-5


@pytest.mark.slow
def test_bad_inputs_on_two_ranks_print_one_line_each_from_rank_0(tmp_path):
    """A bad --data, a bad kind/init pair, a missing model directory, a used --output_dir and
    --batch_size 3, all in one 2-rank launch: each is one `error:` line, printed once (rank 0), no
    traceback, exit code 2."""
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text("{}\n")
    p = _deepspeed(["--data", str(tmp_path / "nope.jsonl"), "--adapter", "dora", "--init", "pissa",
                    "--model", str(tmp_path / "llama-7b"), "--output_dir", str(used), "--batch_size", "3"])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    expected = [
        f"error: --output_dir '{used}' holds a previous run (metrics.jsonl): pass --resume",
        "error: --adapter dora --init pissa: AdapterConfig: init='pissa' does not apply to kind='dora'",
        f"error: --data: dataset path '{tmp_path / 'nope.jsonl'}' does not exist",
        f"error: --model '{tmp_path / 'llama-7b'}' is neither a local model directory nor a buildable preset",
        "error: --batch_size 3 is not a multiple of --micro_batch_size 8 x 2 rank(s) = 16",
    ]
    lines = [line for line in out.splitlines() if "error: " in line]
    assert len(lines) == len(expected), out[-3000:]
    for e in expected:
        assert sum(line.startswith(e) or f"] {e}" in line for line in lines) == 1, (e, lines)
    assert (used / "metrics.jsonl").read_text() == "{}\n"  # the refused run touched nothing


def test_bad_inputs_fail_before_training(tmp_path):
    """Single process (no launcher): clear errors for bad flags, output dirs, configs and data; exit 2.
    Problems found by the same check pass are reported together, so one run shows several."""
    env = _env()
    base = [sys.executable, TRAIN, "--max_steps", "1"]

    def run(*extra):
        r = subprocess.run([*base, *extra], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        return r.stderr

    assert "error: --r must be positive" in run("--r", "0")  # flag parsing (unit-tested in test_args.py)
    # an output dir that cannot be written, a ds_config disagreeing with a flag, an empty data file
    if os.geteuid() != 0:  # root can write anywhere: use a path under a file instead
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "x"
    else:
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "x"
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 3, "optimizer": {"type": "AdamW", "params": {"torch_adam": true}}}')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = run("--output_dir", str(out), "--ds_config", str(bad), "--batch_size", "4", "--data", str(empty))
    assert "is not writable" in err and f"error: --data: dataset file {empty} is empty" in err
    assert "train_batch_size is 3 in the config but train_batch_size (--batch_size) is 4" in err
    # a run that did finish (or was killed) is neither overwritten silently nor resumed from nothing
    used = tmp_path / "used"
    (used / "adapter").mkdir(parents=True)
    assert "holds a previous run (adapter): pass --resume" in run("--output_dir", str(used))
    assert "--resume: no checkpoint in" in run("--output_dir", str(used), "--resume")
    # columns no template fits (found while tokenizing, after every check passed): the internal
    # _row column is not in the message
    odd = tmp_path / "odd.jsonl"
    odd.write_text("".join(json.dumps({"question": f"q{i}", "answer_text": "a"}) + "\n" for i in range(80)))
    err = run("--data", str(odd), "--output_dir", str(tmp_path / "t"))
    assert "error: dataset columns ['answer_text', 'question'] fit no prompt template" in err and "_row" not in err


@pytest.mark.slow
def test_mpirun_path(ref_run, tmp_path):
    """`mpirun -np 2 python launch/train.py`: ranks discovered through mpi4py; the same run as the
    deepspeed launcher's (same init, data order and loss reduction)."""
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
    assert mpirun, "no mpirun: install the test extra (mpich) or an MPI runtime"
    d = str(tmp_path / "mpi")
    env = _env()
    env["MASTER_PORT"] = str(free_port())
    p = subprocess.run([mpirun, "-np", "2", sys.executable, TRAIN, *SMALL, "--max_steps", "2", "--save_every", "100",
                        "--output_dir", d], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    assert "2 rank(s)" in p.stdout
    m = _metrics(d)
    assert [r["step"] for r in m] == [0, 1, 2]
    _same_start(m, _metrics(ref_run[0]), steps=2)
