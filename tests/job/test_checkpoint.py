"""Checkpoints of a real DeepSpeed ZeRO-3 engine (one rank, in process): a save, then more training
and random draws, then a load, restores the weights, the client state, and every RNG stream."""
import os
import random

import numpy as np
import pytest
import torch

import lora_dist as ld
from conftest import tiny_llama
from launch_utils import free_port
from lora_dist.errors import DistributedError
from lora_dist.job import checkpoint
from lora_dist.zero import read_full

DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True, "weight_decay": 0.0}},
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10 ** 6}


@pytest.fixture(scope="module")
def one_rank():
    """A 1-rank gloo group, torn down afterwards so later tests see no process group."""
    import deepspeed
    import deepspeed.comm.comm as ds_comm
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # what a launcher sets
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        ds_comm.destroy_process_group()  # drops DeepSpeed's cached groups too, for later modules
        ds_comm.cdb = None  # DeepSpeed's handle on the destroyed group: a later init must start afresh


def _engine():
    import deepspeed
    model = tiny_llama()
    ld.inject_adapters(model, ld.AdapterConfig(kind="lora", r=4, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, config=DS, model_parameters=trainable)
    return engine, trainable


def _step(engine, seed):
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(seed))
    engine.train()
    loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    engine.backward(loss)
    engine.step()


def _draws():
    out = {"torch": torch.rand(6), "numpy": np.random.rand(6), "gauss": np.random.randn(3),
           "python": [random.random() for _ in range(6)]}
    if torch.cuda.is_available():
        out["cuda"] = [torch.rand(6, device=f"cuda:{i}").cpu() for i in range(torch.cuda.device_count())]
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "cuda":
            assert all(torch.equal(x, y) for x, y in zip(a[k], b[k]))
        elif k == "python":
            assert a[k] == b[k]
        else:
            assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def test_save_advance_load_restores_weights_client_state_and_every_rng(one_rank, tmp_path):
    ckpt = str(tmp_path / "checkpoints")
    engine, trainable = _engine()
    _step(engine, 0)
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    np.random.randn()  # an odd count: numpy now holds a cached second gaussian, part of its state
    tag = checkpoint.save(engine, ckpt, 1, {"step": 1, "micro_pos": 3}, with_adapter=True)
    assert tag == "step1" and checkpoint.latest_tag(ckpt) == "step1"
    assert sorted(os.listdir(os.path.join(ckpt, tag, "adapter"))) == sorted(ld.export.OWN_FILES)
    saved = read_full(trainable)
    expected = _draws()
    _step(engine, 1)  # training moves the weights and draws dropout masks
    assert not all(torch.equal(a, b) for a, b in zip(read_full(trainable), saved))
    advanced = _draws()
    with pytest.raises(AssertionError):
        _same(advanced, expected)  # the streams really moved on
    client = checkpoint.load(engine, ckpt, tag)
    assert client["step"] == 1 and client["micro_pos"] == 3
    assert all(torch.equal(a, b) for a, b in zip(read_full(trainable), saved))
    _same(_draws(), expected)
    # a resumed run saving the same step again writes over its own checkpoint
    assert checkpoint.save(engine, ckpt, 1, {"step": 1}, with_adapter=True) == "step1"


def test_load_of_a_missing_rank_file_or_tag_is_named(one_rank, tmp_path):
    ckpt = str(tmp_path / "checkpoints")
    engine, _ = _engine()
    checkpoint.save(engine, ckpt, 2, {"step": 2}, with_adapter=False)
    os.remove(os.path.join(ckpt, "step2", "rng_rank0.pt"))
    with pytest.raises(DistributedError, match="'step2' .* has no rng_rank0.pt"):
        checkpoint.load(engine, ckpt, "step2")


def test_load_adapter_into_an_engine_writes_the_fp32_master(one_rank, tmp_path):
    """zero.write_params after deepspeed.initialize: the working copy and the optimizer's fp32
    master both hold the loaded values (the master's device is found without guessing)."""
    from deepspeed.utils import safe_get_full_fp32_param
    engine, trainable = _engine()
    _step(engine, 0)
    ld.save_adapter(engine, str(tmp_path / "a"))
    saved = read_full(trainable)
    _step(engine, 1)
    ld.load_adapter(engine, str(tmp_path / "a"))
    for p, v in zip(trainable, saved):
        assert torch.equal(read_full([p])[0], v)
        assert torch.equal(safe_get_full_fp32_param(p).cpu().reshape(v.shape), v.float())
