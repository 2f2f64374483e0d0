"""The HF route (lora_dist.hf, launch/train_hf.py, the README snippet) on 2 CPU ranks under ZeRO-3.

One launch (tests/workers/hf_route.py) runs every Trainer; this process checks its files against
computations made here: a direct initialize_adapters call, stock PEFT, a float64 SVD of W0.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from launch_utils import run_ranks

DATA = dict(max_seq_len=64, overlength="truncate")  # as COMMON in the worker (launch/train.py's defaults else)
LR, WARMUP_RATIO, SEED = 2e-3, 0.03, 0


@pytest.fixture(scope="module")
def route(tmp_path_factory):
    from lora_dist.job.demo import resolve_model
    model_dir = str(resolve_model("tiny-llama"))
    out = str(tmp_path_factory.mktemp("hf_route"))
    run_ranks("hf_route.py", [out, model_dir], nproc=2, timeout=900)
    return out, model_dir


def _log(d):
    with open(os.path.join(d, "log_history.json")) as f:
        return [e for e in json.load(f) if "loss" in e]


def _peft_logits(model_dir, adapter_dir, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _train_set(model_dir):
    from lora_dist.job import data
    from lora_dist.job.demo import METAMATH_TINY
    tok = data.load_tokenizer(model_dir)
    train, _ = data.train_eval_split(data.load_records(METAMATH_TINY), 8, seed=SEED)
    ds, _ = data.build_dataset(train, tok, template="auto", **DATA)
    return ds, tok.pad_token_id


@pytest.mark.slow
def test_lora_da_trains_exports_and_matches_a_direct_init(route):
    out, model_dir = route
    d = os.path.join(out, "da")
    losses = [e["loss"] for e in _log(d)]
    assert [e["step"] for e in _log(d)] == [1, 2, 3, 4, 5]
    assert losses[-1] < losses[0] - 0.05, losses

    # the final adapter in stock PEFT reproduces the trained (ZeRO-3) model's logits
    ref = torch.load(os.path.join(d, "logits.pt"))
    got = _peft_logits(model_dir, os.path.join(d, "adapter"), ref["input_ids"])
    assert torch.allclose(got, ref["logits"], atol=1e-5, rtol=0), (got - ref["logits"]).abs().max()
    assert os.path.isfile(os.path.join(d, "checkpoint-3", "adapter", "adapter_model.safetensors"))

    # N and the LR the callback took from the Trainer: the training-set size, and the first positive
    # LR of DeepSpeed's WarmupCosineLR (warmup ceil(0.03·5) = 1 step, which DeepSpeed raises to 2)
    rec = json.load(open(os.path.join(d, "lora_dist_init.json")))
    train, pad = _train_set(model_dir)
    assert rec["n_train"] == len(train) and rec["samples"] == 16 and rec["world"] == 2
    assert rec["lr"] == pytest.approx(LR / 2, rel=1e-12)
    assert rec["lr"] == pytest.approx(next(e["learning_rate"] for e in _log(d) if e["learning_rate"] > 0))

    # the same init, called directly: one process, no ZeRO, another micro-batch size
    import lora_dist as ld
    from lora_dist.job import data
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = ld.AdapterConfig(kind="lora", init="lora_da", r=4, alpha=8.0, init_samples=16, seed=SEED,
                              target_modules=["q_proj", "v_proj", "down_proj"])
    ld.inject_adapters(model, config)
    calib = train.select(data.calibration_indices(len(train), 16, seed=SEED))
    batches = [data.collate([calib[i] for i in range(s, min(s + 5, len(calib)))], pad_id=pad)
               for s in range(0, len(calib), 5)]
    ld.initialize_adapters(model, config, batches, n_train=len(train), lr=LR / 2, progress=False)
    saved = load_file(os.path.join(d, "adapter_init", "lora_dist_adapter.safetensors"))
    n = 0
    for name, m in ld.adapter_modules(model):
        for k, p in m.adapter_params().items():
            assert torch.allclose(p.detach(), saved[f"{name}.{k}"], atol=1e-5, rtol=0), (name, k)
            n += 1
    assert n == 2 * 3 * model.config.num_hidden_layers
    assert all(v.abs().sum() > 0 for k, v in saved.items() if k.endswith("lora_B"))  # LoRA-DA: B ≠ 0


@pytest.mark.slow
def test_pissa_exports_the_rank_2r_conversion_against_w0(route):
    out, model_dir = route
    d = os.path.join(out, "pissa")
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = json.load(open(os.path.join(d, "adapter", "adapter_config.json")))
    assert cfg["r"] == 8 and cfg["lora_alpha"] == pytest.approx(2.0 * 8)  # s = 8/4 = 2 at rank 2r = 8
    peft = load_file(os.path.join(d, "adapter", "adapter_model.safetensors"))
    init = load_file(os.path.join(d, "adapter_init", "lora_dist_adapter.safetensors"))
    final = load_file(os.path.join(d, "adapter", "lora_dist_adapter.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        W0 = base.get_submodule(name).weight.double()
        A0, B0 = init[f"{name}.lora_A"].double(), init[f"{name}.lora_B"].double()
        # PiSSA: s·B0·A0 is W0's best rank-4 approximation (float64 SVD here)
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        assert torch.allclose(2.0 * B0 @ A0, (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-5)
        A, B = final[f"{name}.lora_A"].double(), final[f"{name}.lora_B"].double()
        key = f"base_model.model.{name}"
        pA, pB = peft[f"{key}.lora_A.weight"].double(), peft[f"{key}.lora_B.weight"].double()
        assert torch.equal(pA, torch.cat([A, A0])) and torch.equal(pB, torch.cat([B, -B0], dim=1))
    ref = torch.load(os.path.join(d, "logits.pt"))
    got = _peft_logits(model_dir, os.path.join(d, "adapter"), ref["input_ids"])
    assert torch.allclose(got, ref["logits"], atol=1e-5, rtol=0), (got - ref["logits"]).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("resumed", ["pissa_resume", "pissa_nofrozen"])
def test_resume_from_a_trainer_checkpoint_continues_the_same_run(route, resumed):
    """pissa_resume: DeepSpeed restores the rewritten W from its frozen fragments; pissa_nofrozen: the
    checkpoint has none, so the callback rewrites W from the saved B0, A0. Both continue the run."""
    out, _ = route
    ref, res = _log(os.path.join(out, "pissa")), _log(os.path.join(out, resumed))
    assert [e["step"] for e in res] == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's state
    for a, b in zip(ref, res):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], abs=1e-15)
    # no second init ran: the resumed run wrote no init record of its own
    assert not os.path.exists(os.path.join(out, resumed, "lora_dist_init.json"))
    A = load_file(os.path.join(out, "pissa", "adapter", "lora_dist_adapter.safetensors"))
    B = load_file(os.path.join(out, resumed, "adapter", "lora_dist_adapter.safetensors"))
    assert A.keys() == B.keys() and all(torch.allclose(A[k], B[k], atol=1e-6, rtol=0) for k in A)
    if resumed == "pissa_resume":
        a = torch.load(os.path.join(out, "pissa", "logits.pt"))["logits"]
        b = torch.load(os.path.join(out, resumed, "logits.pt"))["logits"]
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_lora_fa_rule_projects_the_gradient_deepspeed_reduces(route):
    """LoRA-FA's g̃_B = s⁻²·g_B·(AAᵀ+δI)⁻¹ acts inside backward, so DeepSpeed's reduced gradient on
    the HF route is the projection of the gradient of the same loss on the trained model."""
    import lora_dist as ld
    from transformers import AutoModelForCausalLM
    out, model_dir = route
    saved = torch.load(os.path.join(out, "fa", "grads.pt"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ld.load_adapter(model, os.path.join(out, "fa", "adapter"))  # the trained state, plain torch
    model.train()
    model(**saved["batch"]).loss.backward()
    s = 8.0 / 4
    for name, m in ld.adapter_modules(model):
        A, g = m.lora_A.detach().double(), m.lora_B.grad.double()
        want = g @ torch.linalg.inv(A @ A.T + 1e-8 * torch.eye(4, dtype=torch.float64)) / s ** 2
        got = saved["grads"][name].double()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max()), (name, (got - want).abs().max())
        assert (got - g).norm() > 0.5 * g.norm()  # and it is not the raw gradient


@pytest.mark.slow
def test_loraplus_groups_reach_deepspeed_or_training_is_refused(route):
    """With LoraDistTrainerMixin and no "optimizer" section, DeepSpeed's ZeRO-3 optimizer holds the
    LoRA+ groups (A at lr, every B at 4·lr) and WarmupCosineLR scales from those per-group LRs; with
    an "optimizer" section the callback refuses to train."""
    import lora_dist as ld
    from transformers import AutoModelForCausalLM
    out, model_dir = route
    rec = json.load(open(os.path.join(out, "loraplus", "groups.json")))
    assert [g["name"] for g in rec["groups"]] == ["lora_A", "lora_B"]
    assert [g["lr"] for g in rec["groups"]] == pytest.approx([LR, 4 * LR], rel=1e-12)
    assert rec["scheduler_base_lrs"] == pytest.approx([LR, 4 * LR], rel=1e-12)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ld.inject_adapters(model, ld.AdapterConfig(kind="lora", r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]))
    numel = {k: sum(p.numel() for n, p in model.named_parameters() if n.endswith(k)) for k in ("lora_A", "lora_B")}
    for g in rec["groups"]:  # each rank's flat fp32 partition of the group, summed over the 2 ranks
        assert numel[g["name"]] <= sum(g["partition_numel"]) < numel[g["name"]] + 2 * 64, (g, numel)
    refused = open(os.path.join(out, "loraplus_refused", "error.txt")).read()
    assert "loraplus_lr_ratio=4.0 did not reach" in refused and '"optimizer" section' in refused


@pytest.mark.slow
def test_readme_snippet_runs_as_written(route):
    out, model_dir = route
    adapter = os.path.join(out, "snippet", "out", "adapter")
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert cfg["r"] == 8 and cfg["peft_type"] == "LORA"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    bs = [p for n, p in pm.named_parameters() if "lora_B" in n]
    assert len(bs) == 7 * pm.config.num_hidden_layers  # all-linear: 7 projections per layer
    assert all(p.abs().sum() > 0 for p in bs)  # LoRA-DA's B is not zero
    assert os.path.isfile(os.path.join(out, "snippet", "out", "checkpoint-3", "adapter", "adapter_model.safetensors"))


# ---- one process, no launch -----------------------------------------------------------------------

def test_prepare_model_refuses_what_cannot_work_on_this_route():
    import lora_dist as ld
    from lora_dist.errors import ConfigError
    from lora_dist.hf import LoraDistCallback, prepare_model
    from conftest import tiny_llama
    cfg = ld.AdapterConfig(target_modules=["q_proj"], kind="lora", update_rule="lora_pro", init="kaiming")
    with pytest.raises(ConfigError, match="update_rule='lora_pro'"):
        prepare_model(tiny_llama(), cfg)
    with pytest.raises(ConfigError, match="update_rule='lora_pro'"):
        LoraDistCallback(cfg)
    with pytest.raises(ConfigError, match="kind='none'"):
        prepare_model(tiny_llama(), ld.AdapterConfig(kind="none"))
    with pytest.raises(ConfigError, match="needs calibration"):
        LoraDistCallback(ld.AdapterConfig(kind="lora", init="lora_da"))
    with pytest.raises(ConfigError, match="n_train"):
        LoraDistCallback(ld.AdapterConfig(kind="lora"), n_train=0)

    # a ZeRO-3 config is alive (as after TrainingArguments(deepspeed=...)) but the model was loaded whole
    from transformers.integrations import HfDeepSpeedConfig
    whole = tiny_llama()  # built before the config: no zero.Init
    keep = HfDeepSpeedConfig({"train_batch_size": 1, "zero_optimization": {"stage": 3}})  # noqa: F841
    try:
        with pytest.raises(ConfigError, match="before from_pretrained"):
            prepare_model(whole, ld.AdapterConfig(kind="lora", target_modules=["q_proj"]))
    finally:
        del keep
    names = prepare_model(tiny_llama(), ld.AdapterConfig(kind="lora", target_modules=["q_proj"]))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def _state(sched, opt):
    return {k: v for k, v in vars(sched).items() if k != "optimizer"}, [g["lr"] for g in opt.param_groups]


def test_first_step_lr_reads_the_built_scheduler_and_leaves_it_untouched():
    from deepspeed.runtime.lr_schedules import WarmupCosineLR
    from transformers import get_linear_schedule_with_warmup
    from lora_dist.errors import ConfigError
    from lora_dist.hf import first_step_lr
    p = torch.nn.Parameter(torch.zeros(3))
    # HF's linear warm-up: step k uses lr·k/W, so the first step that moves the weights uses lr/W
    opt = torch.optim.AdamW([p], lr=2e-3)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=4, num_training_steps=10)
    before = _state(sched, opt)
    assert first_step_lr(sched, 10) == pytest.approx(2e-3 / 4, rel=1e-12)
    assert _state(sched, opt) == before
    # DeepSpeed's WarmupCosineLR (linear): iteration -1 and 0 give 0, iteration 1 gives lr/W
    opt = torch.optim.AdamW([p], lr=3e-3)
    sched = WarmupCosineLR(opt, total_num_steps=10, warmup_num_steps=3, warmup_type="linear", warmup_min_ratio=0.0)
    before = _state(sched, opt)
    assert first_step_lr(sched, 10) == pytest.approx(3e-3 / 3, rel=1e-12)
    assert _state(sched, opt) == before
    with pytest.raises(ConfigError, match="0 for all 2 steps"):
        first_step_lr(sched, 2)
    assert _state(sched, opt) == before


def test_calibration_batches_from_samples_or_a_loader():
    from torch.utils.data import DataLoader
    from lora_dist.hf import calibration_batches
    from lora_dist.job.data import collate
    from calib_data import calibration_samples
    samples = [{"input_ids": i, "labels": l} for i, l in calibration_samples(7)]
    got = calibration_batches(samples, 3, pad_id=0)  # one process: every sample, in order, 3 at a time
    want = [collate(samples[s:s + 3], pad_id=0) for s in (0, 3, 6)]
    assert len(got) == 3 and all(torch.equal(g[k], w[k]) for g, w in zip(got, want) for k in w)
    loader = DataLoader(samples, batch_size=2, collate_fn=lambda b: collate(b, pad_id=0))
    assert [b["input_ids"].shape[0] for b in calibration_batches(loader, 99, pad_id=0)] == [2, 2, 2, 1]
    # a loader already sharded by a DistributedSampler (here rank 1 of 2) is taken whole
    from torch.utils.data import DistributedSampler
    sharded = DataLoader(samples, batch_size=2, collate_fn=lambda b: collate(b, pad_id=0),
                         sampler=DistributedSampler(samples, num_replicas=2, rank=1, shuffle=False))
    got = calibration_batches(sharded, 99, pad_id=0)
    assert torch.equal(got[0]["input_ids"], collate([samples[1], samples[3]], pad_id=0)["input_ids"])
    assert len(got) == 2
