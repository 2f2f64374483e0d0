"""lora_dist.job.ds_config and the shipped ds_configs/*.json (a slow test runs each through DeepSpeed)."""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lora_dist.errors import ConfigError
from lora_dist.job.ds_config import (
    DeepSpeedConfigError,
    auto_keys,
    first_moving_lr,
    fill_auto,
    load_ds_config,
    prepare_ds_config,
    resolve_batch_sizes,
    validate_ds_config,
    warmup_steps_from_ratio,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
FLAGS = dict(train_batch_size=32, micro_batch_size=2, lr=2e-4, weight_decay=0.01, betas=(0.9, 0.95), eps=1e-8,
             warmup_steps=3, total_steps=100, bf16=True, gradient_clipping=1.0, hidden_size=64)


def test_shipped_configs_present():
    assert [p.name for p in CONFIGS] == ["zero2.json", "zero3.json", "zero3_offload.json"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_cpu_runnable_and_auto(path):
    cfg = load_ds_config(path)
    assert cfg["optimizer"]["type"] == "AdamW"
    assert cfg["optimizer"]["params"]["torch_adam"] is True  # torch.optim.AdamW: nothing to compile
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16.enabled", "optimizer.params.lr", "optimizer.params.weight_decay",
                "optimizer.params.betas", "scheduler.params.total_num_steps", "scheduler.params.warmup_num_steps"):
        assert key in auto_keys(cfg), key
    assert cfg["scheduler"]["type"] == "WarmupCosineLR"
    stage = cfg["zero_optimization"]["stage"]
    assert stage == (2 if path.name == "zero2.json" else 3)
    if path.name == "zero3_offload.json":
        assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    filled = prepare_ds_config(path, world_size=8, **FLAGS)
    assert auto_keys(filled) == []
    assert (filled["train_batch_size"], filled["train_micro_batch_size_per_gpu"],
            filled["gradient_accumulation_steps"]) == (32, 2, 2)
    assert filled["optimizer"]["params"] == {"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.01,
                                             "torch_adam": True}
    assert filled["scheduler"]["params"]["total_num_steps"] == 100
    assert filled["scheduler"]["params"]["warmup_num_steps"] == 3
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["gradient_clipping"] == 1.0
    assert filled["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    if stage == 3:
        assert filled["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
        assert filled["zero_optimization"]["stage3_param_persistence_threshold"] == 640


def _base():
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                     "warmup_num_steps": "auto"}},
    }


def test_fill_auto_does_not_mutate_and_fills_warmup_lr():
    cfg = _base()
    before = copy.deepcopy(cfg)
    out = fill_auto(cfg, world_size=2, train_batch_size=8, lr=1e-3, weight_decay=0.0, warmup_steps=0)
    assert cfg == before
    assert out["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 1}
    assert (out["train_batch_size"], out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) \
        == (8, 4, 1)


@pytest.mark.parametrize("tbs,mbs,gas,world,expected", [
    (32, 2, None, 8, (32, 2, 2)),
    (32, None, 4, 8, (32, 1, 4)),
    (None, 2, 3, 4, (24, 2, 3)),
    (32, None, None, 16, (32, 2, 1)),
    (None, None, None, 3, (3, 1, 1)),
    (32, 4, 1, 8, (32, 4, 1)),
])
def test_resolve_batch_sizes(tbs, mbs, gas, world, expected):
    assert resolve_batch_sizes(tbs, mbs, gas, world) == expected


def test_batch_not_divisible_by_world_says_what_to_change():
    with pytest.raises(DeepSpeedConfigError) as err:
        resolve_batch_sizes(32, None, None, 3, source="ds_configs/x.json")
    msg = str(err.value)
    assert "train_batch_size 32 in ds_configs/x.json cannot be split evenly over world size 3" in msg
    assert "30 or 33" in msg and "1, 2, 4, 8, 16, 32" in msg


def test_micro_batch_not_dividing_says_what_to_change():
    with pytest.raises(DeepSpeedConfigError, match=r"train_micro_batch_size_per_gpu 3 does not divide the per-GPU "
                                                    r"batch 4 \(train_batch_size 32 / world size 8\): set it to one "
                                                    r"of 1, 2, 4"):
        resolve_batch_sizes(32, 3, None, 8)


def test_all_three_inconsistent_says_what_to_change():
    cfg = dict(_base(), train_batch_size=32, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    with pytest.raises(DeepSpeedConfigError) as err:
        fill_auto(cfg, world_size=8, lr=1e-3, weight_decay=0.0, warmup_steps=1)
    msg = str(err.value)
    assert "train_batch_size 32 != train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 1 x world size 8 = 16" \
        in msg
    assert "set gradient_accumulation_steps to 2" in msg


@pytest.mark.parametrize("batch, micro, world, suggested", [(3, 8, 2, "16"), (24, 8, 2, "16 or 32"), (6, 4, 2, "8")])
def test_batch_size_3_names_the_flags_and_suggests_a_value_that_works(batch, micro, world, suggested):
    """`--batch_size 3` used to blame the ds_config (which says "auto") and suggest 4, which then failed
    on the micro-batch of 8. The message names the flags, and every value it suggests is accepted."""
    shipped = load_ds_config(REPO / "ds_configs" / "zero3.json")
    kw = dict(world_size=world, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, warmup_steps=1,
              total_steps=10, hidden_size=64, bf16=False, gradient_clipping=1.0)
    with pytest.raises(ConfigError) as err:
        fill_auto(shipped, train_batch_size=batch, micro_batch_size=micro, source="zero3.json", **kw)
    msg = str(err.value)
    assert msg.startswith(f"--batch_size {batch} is not a multiple of --micro_batch_size {micro} x {world} rank(s)")
    assert "zero3.json" not in msg and f"use --batch_size {suggested}" in msg
    for value in suggested.split(" or "):
        cfg = fill_auto(shipped, train_batch_size=int(value), micro_batch_size=micro, **kw)
        assert cfg["train_batch_size"] == int(value) and cfg["train_micro_batch_size_per_gpu"] == micro
    if batch % world == 0:  # or keep the batch and change the micro-batch: each suggested one works too
        micros = msg.split("--micro_batch_size ")[-1].split(" (")[0].split(", ")
        for m in micros:
            fill_auto(shipped, train_batch_size=batch, micro_batch_size=int(m), **kw)


def test_config_values_disagreeing_with_flags_are_all_listed():
    cfg = _base()
    cfg["optimizer"]["params"]["lr"] = 1e-4
    cfg["train_micro_batch_size_per_gpu"] = 4
    with pytest.raises(DeepSpeedConfigError) as err:
        fill_auto(cfg, world_size=1, micro_batch_size=2, lr=2e-4, weight_decay=0.0, warmup_steps=1)
    assert "train_micro_batch_size_per_gpu is 4 in the config but micro_batch_size" in str(err.value)
    cfg["train_micro_batch_size_per_gpu"] = 2
    with pytest.raises(DeepSpeedConfigError) as err:
        fill_auto(cfg, world_size=1, micro_batch_size=2, lr=2e-4, weight_decay=0.0, warmup_steps=1)
    assert "optimizer.params.lr is 0.0001 in the config but lr (--lr) is 0.0002" in str(err.value)
    assert "scheduler.params.warmup_max_lr" not in str(err.value)  # still "auto": filled, not a mismatch
    same = fill_auto(cfg, world_size=1, micro_batch_size=2, lr=1e-4, weight_decay=0.0, warmup_steps=1)
    assert same["optimizer"]["params"]["lr"] == 1e-4


def test_auto_without_a_value_names_key_and_flag():
    with pytest.raises(DeepSpeedConfigError, match=r'optimizer\.params\.lr is "auto" but no lr \(--lr\) was given'):
        fill_auto(_base(), world_size=1, weight_decay=0.0, warmup_steps=1)
    cfg = dict(_base(), zero_optimization={"stage": 3, "reduce_bucket_size": "auto"})
    with pytest.raises(DeepSpeedConfigError, match=r"zero_optimization\.reduce_bucket_size.*hidden_size"):
        fill_auto(cfg, world_size=1, lr=1e-3, weight_decay=0.0, warmup_steps=1)


def test_unfillable_auto_is_named():
    cfg = dict(_base(), zero_optimization={"stage": 3, "sub_group_size": "auto"})
    with pytest.raises(DeepSpeedConfigError, match=r"cannot fill \"auto\" for zero_optimization\.sub_group_size"):
        fill_auto(cfg, world_size=1, lr=1e-3, weight_decay=0.0, warmup_steps=1)


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "train_batch_size": 32,\n  "gradient_clipping": 1.0,\n}\n')
    with pytest.raises(DeepSpeedConfigError) as err:
        load_ds_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:4:1: invalid JSON")
    assert "trailing comma" in msg

    path.write_text('{\n  // ZeRO-3\n  "zero_optimization": {"stage": 3}\n}\n')
    with pytest.raises(DeepSpeedConfigError, match=r"bad\.json:2:3: invalid JSON.*no comments"):
        load_ds_config(path)

    path.write_text('{"train_batch_size": 8, "train_batch_size": 16}')
    with pytest.raises(DeepSpeedConfigError, match=r"bad\.json: duplicate key 'train_batch_size'"):
        load_ds_config(path)

    with pytest.raises(DeepSpeedConfigError, match="does not exist"):
        load_ds_config(tmp_path / "missing.json")


@pytest.mark.parametrize("cfg,match", [
    ([], "must be a JSON object"),
    ({"zero_optimization": {"stage": 4}}, r"zero_optimization\.stage .*must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}}, r"offload_param\.device .*'gpu'"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, r"offload_param .*needs .*stage 3"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}, "nvme_path"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both true"),
    ({"train_batch_size": 0}, "train_batch_size .*positive integer"),
    ({"scheduler": {"type": "Cosine"}}, r"scheduler\.type .*'Cosine'.*WarmupCosineLR"),
    ({"optimizer": {"params": {}}}, r"optimizer\.type .*must be a string"),
])
def test_validation_errors(cfg, match):
    with pytest.raises(DeepSpeedConfigError, match=match):
        validate_ds_config(cfg, source="cfg.json")


def test_warmup_steps_from_ratio():
    assert warmup_steps_from_ratio(1000, 0.03) == 30
    assert warmup_steps_from_ratio(10, 0.03) == 1
    assert warmup_steps_from_ratio(10, 0.0) == 0
    with pytest.raises(ValueError):
        warmup_steps_from_ratio(10, 3)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_shipped_configs_train_under_deepspeed_on_cpu(tmp_path):
    """One process (world size 1) trains a tiny Llama a few steps under each shipped config."""
    # PATH is left as it is: DeepSpeed JIT-builds its CPU comm op with the first `ninja` on PATH, and
    # tests that saw different ninja versions would keep rebuilding it (minutes each) for one another.
    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "tests" / "dist_world_check.py"), "--out", str(tmp_path)]
    for path in CONFIGS:
        cmd += ["--ds_config", str(path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["world_size"] == 1
    runs = result["ds"]
    assert len(runs) == 3
    for path, run in runs.items():
        name = Path(path).name
        assert run["optimizer"] == "AdamW", name
        assert (run["train_batch_size"], run["micro_batch"], run["grad_accum"]) == (4, 1, 4), name
        assert run["zero_stage"] == (2 if name == "zero2.json" else 3), name
        assert run["offload_optimizer"] == run["offload_param"] == (name == "zero3_offload.json"), name
        assert run["losses"][-1] < run["losses"][0] - 0.05, (name, run["losses"])
        assert max(run["lrs"]) <= 1e-3 + 1e-12 and run["lrs"][-1] < max(run["lrs"]), (name, run["lrs"])
    # the same seeded model, data and optimizer: every ZeRO stage must reach the same weights
    sums = [run["q_checksums"][0] for run in runs.values()]
    assert max(sums) - min(sums) < 1e-4, sums


@pytest.fixture(scope="module")
def world_of_one():
    """torch.distributed over gloo with one rank, as `python script.py` under the job gets it (once
    per module: DeepSpeed keeps groups it made, so a second init in one process would not work)."""
    import deepspeed
    import deepspeed.comm.comm as ds_comm
    with pytest.MonkeyPatch.context() as mp:
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(_free_port())).items():
            mp.setenv(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        ds_comm.destroy_process_group()  # also drops DeepSpeed's cached groups (torch's would leave them stale)
        ds_comm.cdb = None  # let a later module start its own group


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_first_moving_lr_is_read_from_the_built_scheduler(world_of_one, warmup):
    """LoRA-SB's η is the LR of the first step that moves the weights. DeepSpeed's WarmupCosineLR
    clamps warm-up to >= 2 steps, so for a 1-step (or 0-step) warm-up it is lr/2, not lr/1."""
    import deepspeed
    import torch
    lr = 1e-2
    cfg = fill_auto(load_ds_config(REPO / "ds_configs" / "zero2.json"), world_size=1, train_batch_size=2,
                    micro_batch_size=2, lr=lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, total_steps=8,
                    warmup_steps=warmup, bf16=False, gradient_clipping=1.0, hidden_size=4)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    engine, _, _, sched = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    start = sched.last_batch_iteration
    eta = first_moving_lr(engine)
    assert sched.last_batch_iteration == start and engine.get_lr()[0] == 0.0  # probed, not stepped
    assert eta == pytest.approx(lr / max(2, warmup))
    x, y = torch.randn(2, 4), torch.randn(2, 1)
    for _ in range(8):  # train: the first step that changes the weights runs at LR η
        before, step_lr = model.weight.detach().clone(), engine.get_lr()[0]
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        if not torch.equal(before, model.weight.detach()):
            break
    assert step_lr == pytest.approx(eta, rel=1e-12)
