"""launch/train.py with each update rule (issue 12), single process on CPU with tiny settings:
the held-out loss goes down, the exported adapter loads in stock PEFT and reproduces the job's
held-out loss, LoRA-Pro resumes onto the same trajectory, bad combinations are one error line each."""
import json
import os
import shutil
import subprocess
import sys

import peft
import pytest
import torch

from launch_utils import REPO, _env
from lora_dist.job import data
from lora_dist.job.demo import METAMATH_TINY
from lora_dist.job.evaluate import eval_loss

TRAIN = os.path.join(REPO, "launch", "train.py")
EVAL_SIZE, SEQ = 16, 64


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first 80 rows of the embedded math set: tokenizing 3000 rows would dominate a 6-step run."""
    path = tmp_path_factory.mktemp("data") / "math80.jsonl"
    rows = data.load_records(METAMATH_TINY)
    path.write_text("".join(json.dumps(dict(rows[i])) + "\n" for i in range(80)))
    return str(path)


def _tiny(data_path, out_dir, *extra):
    return [sys.executable, TRAIN, "--data", data_path, "--output_dir", str(out_dir), "--max_steps", "6",
            "--batch_size", "4", "--micro_batch_size", "2", "--save_every", "3", "--eval_every", "100",
            "--eval_size", str(EVAL_SIZE), "--eval_generate", "0", "--max_seq_len", str(SEQ), "--lr", "5e-3",
            "--warmup_ratio", "0", "--init", "kaiming", *extra]


def _run(cmd, code=0):
    p = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == code, (p.stdout + p.stderr)[-5000:]
    return p.stdout + p.stderr


def _metrics(d):
    with open(os.path.join(d, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _learned_and_loads_in_peft(d, data_path, rule):
    """The held-out loss fell, the adapter records the rule, and stock PEFT on the base model
    recomputes the job's final held-out loss (same split, same tokenization)."""
    from transformers import AutoModelForCausalLM

    m = _metrics(d)
    final = json.load(open(os.path.join(d, "final.json")))
    assert final["step"] == 6 and final["eval_loss"] < m[0]["eval_loss"] - 1e-2, (m[0], final)
    adapter = os.path.join(d, "adapter")
    ours = json.load(open(os.path.join(adapter, "lora_dist_config.json")))["config"]
    assert ours["update_rule"] == rule, ours
    base_dir = json.load(open(os.path.join(adapter, "adapter_config.json")))["base_model_name_or_path"]
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    tok = data.load_tokenizer(base_dir)
    _, eval_rec = data.train_eval_split(data.load_records(data_path), EVAL_SIZE, seed=0)
    eval_ds, _ = data.build_dataset(eval_rec, tok, template="metamath", max_seq_len=SEQ)
    assert eval_loss(pm, eval_ds, tok.pad_token_id, 2, torch.device("cpu"))["eval_loss"] == \
        pytest.approx(final["eval_loss"], abs=1e-4)
    return m, ours


def test_lora_fa_projected(small_data, tmp_path):
    d = tmp_path / "fa"
    _run(_tiny(small_data, d, "--adapter", "lora_fa", "--update_rule", "lora_fa"))
    _learned_and_loads_in_peft(str(d), small_data, "lora_fa")


def test_lora_pro_light(small_data, tmp_path):
    d = tmp_path / "light"
    _run(_tiny(small_data, d, "--adapter", "lora", "--update_rule", "lora_pro",
               "--update_options", '{"moments": "none"}'))
    _, ours = _learned_and_loads_in_peft(str(d), small_data, "lora_pro")
    assert ours["update_options"] == {"moments": "none"}
    assert not any(f.startswith("lora_pro_rank") for f in os.listdir(d / "checkpoints" / "step3"))


def test_loraplus_per_group_lr_under_a_flattening_type_scheduler(small_data, tmp_path):
    """WarmupDecayLR writes one absolute LR into every group; with "auto" the job gives each group its
    own (lr x ratio), so B's LR is 16 x A's at every step. Written by hand as one number, it is refused."""
    ds = json.load(open(os.path.join(REPO, "ds_configs", "zero3.json")))
    ds["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": "auto",
                                                           "warmup_num_steps": "auto", "total_num_steps": "auto"}}
    auto = tmp_path / "decay_auto.json"
    auto.write_text(json.dumps(ds))
    d = tmp_path / "plus"
    _run(_tiny(small_data, d, "--adapter", "lora", "--loraplus_lr_ratio", "16", "--ds_config", str(auto)))
    m, ours = _learned_and_loads_in_peft(str(d), small_data, "plain")
    assert ours["loraplus_lr_ratio"] == 16
    lrs = [r["lr_groups"] for r in m[1:]]
    assert len(lrs) == 6 and 0 < max(g["lora_A"] for g in lrs) <= 5e-3
    for g in lrs:
        assert g["lora_B"] == pytest.approx(16 * g["lora_A"], rel=1e-12, abs=0), g

    ds["scheduler"]["params"]["warmup_max_lr"] = 5e-3  # the same value as --lr, but one number for both groups
    fixed = tmp_path / "decay_fixed.json"
    fixed.write_text(json.dumps(ds))
    err = _run(_tiny(small_data, tmp_path / "flat", "--adapter", "lora", "--loraplus_lr_ratio", "16",
                     "--ds_config", str(fixed)), code=2)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"error: --loraplus_lr_ratio with --ds_config {fixed}: ") and \
        "warmup_max_lr" in lines[0] and "would undo loraplus_lr_ratio" in lines[0], lines


def test_lora_pro_full_resumes_onto_the_same_trajectory(small_data, tmp_path):
    """An uninterrupted 6-step LoRA-Pro run checkpoints at step 3; a copy of its output stopped
    there (nothing past step 3 kept) resumes with --resume: steps 4-6 and the final held-out loss
    agree to 1e-6, which needs the restored moments and t."""
    ref = tmp_path / "ref"
    out = _run(_tiny(small_data, ref, "--adapter", "lora", "--update_rule", "lora_pro"))
    assert "warning: update_rule lora_pro: the ds_config optimizer 'AdamW' is replaced by plain SGD" in out
    m, _ = _learned_and_loads_in_peft(str(ref), small_data, "lora_pro")
    state = torch.load(ref / "checkpoints" / "step3" / "lora_pro_rank0.pt", weights_only=True)
    assert state["t"] == 3 and len(state["M"]) == len(state["V"]) == 28  # one rank owns every layer

    stopped = tmp_path / "stopped"
    shutil.copytree(ref, stopped)
    shutil.rmtree(stopped / "adapter")
    os.remove(stopped / "final.json")
    (stopped / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in m[:4]))

    # bad combinations, all found before tokenizing, one line each: a rule the kind cannot take, a
    # rule flag contradicting the checkpoint's, a LoRA-Pro checkpoint without its moments
    broken = tmp_path / "broken"
    shutil.copytree(stopped, broken)
    os.remove(broken / "checkpoints" / "step3" / "lora_pro_rank0.pt")
    err = _run(_tiny(small_data, broken, "--resume", "--adapter", "lora_fa", "--update_rule", "lora_pro",
                     "--update_options", '{"moments": "none"}'), code=2)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 3 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("error: --adapter lora_fa --init kaiming --update_rule lora_pro --update_options "
                               "{'moments': 'none'}: AdapterConfig: update_rule='lora_pro' needs kind in ['lora']")
    assert lines[1] == ("error: --resume: the checkpoint's adapter config decides the adapter and its update rule; "
                        "drop or match --adapter 'lora_fa' (the checkpoint has 'lora'), "
                        "--update_options {'moments': 'none'} (the checkpoint has {})")
    assert lines[2].startswith("error: --resume: checkpoint 'step3' lacks LoRA-Pro's moments of rank(s) [0]")

    # the checkpoint's rule continues without any rule flag
    out = _run(_tiny(small_data, stopped, "--resume", "--adapter", "lora"))
    assert "resumed from step3" in out
    got = _metrics(str(stopped))
    assert [r["step"] for r in got] == list(range(7))
    for a, b in zip(got[4:], m[4:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and a["lr"] == pytest.approx(b["lr"], abs=1e-12), (a, b)
    assert abs(got[-1]["eval_loss"] - m[-1]["eval_loss"]) <= 1e-6
