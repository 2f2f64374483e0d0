"""Every adapter kind's forward and merge against a dense float64 formula written here."""
import pytest
import torch
import torch.nn as nn

import lora_dist as ld
from conftest import perturb_trainable
from lora_dist.adapters import adapter_modules

KINDS = ["lora", "lora_fa", "dora", "vera", "tied_lora"]


class Two(nn.Module):
    """Two layers of the same type (for tying) plus a differently shaped one."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(12, 10), "up": nn.Linear(10, 12, bias=False)})
                                     for _ in range(2)])

    def forward(self, x):
        for b in self.blocks:
            x = b["up"](torch.tanh(b["q"](x)))
        return x


def dense_delta(m):
    """ΔW from the formulas of methods.md, float64."""
    d = {k: v.detach().double() for k, v in m.adapter_params().items()}
    s = m.scaling
    if m.kind in ("lora", "lora_fa"):
        return s * d["lora_B"] @ d["lora_A"]
    if m.kind == "tied_lora":
        return s * torch.diag(d["tied_v"]) @ d["lora_B"] @ torch.diag(d["tied_u"]) @ d["lora_A"]
    if m.kind == "vera":
        A = m.vera_A.double()[:, : m.in_features]
        B = m.vera_B.double()[: m.out_features]
        return torch.diag(d["vera_lambda_b"]) @ B @ torch.diag(d["vera_lambda_d"]) @ A
    if m.kind == "lora_xs":
        return s * d["lora_B"] @ d["lora_R"] @ d["lora_A"]
    if m.kind == "dora":
        W = m.weight.double()
        V = W + s * d["lora_B"] @ d["lora_A"]
        return (d["lora_magnitude"] / V.norm(dim=1))[:, None] * V - W
    raise AssertionError(m.kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_matches_dense_formula(kind, rslora):
    torch.manual_seed(0)
    model = Two().double()
    ld.inject_adapters(model, ld.AdapterConfig(kind=kind, r=3, alpha=5, use_rslora=rslora,
                                               target_modules=["q", "up"]))
    perturb_trainable(model, scale=0.3)
    x = torch.randn(4, 12, dtype=torch.float64)
    for name, m in adapter_modules(model):
        xin = torch.randn(5, m.in_features, dtype=torch.float64)
        expect = xin @ (m.weight.double() + dense_delta(m)).T + (m.bias.double() if m.bias is not None else 0)
        torch.testing.assert_close(m(xin), expect, rtol=1e-10, atol=1e-10)
        s = 5 / (3 ** 0.5 if rslora else 3)
        if kind != "vera":
            assert m.scaling == pytest.approx(s)
    out = model(x)
    ld.merge_adapters(model)
    torch.testing.assert_close(model(x), out, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_sets(kind):
    model = Two()
    ld.inject_adapters(model, ld.AdapterConfig(kind=kind, r=2, target_modules=["q", "up"]))
    train = {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad}
    expect = {"lora": {"lora_A", "lora_B"}, "lora_fa": {"lora_B"},
              "dora": {"lora_A", "lora_B", "lora_magnitude"}, "vera": {"vera_lambda_b", "vera_lambda_d"},
              "tied_lora": {"lora_A", "lora_B", "tied_u", "tied_v"}}[kind]
    assert train == expect
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(("weight", "bias"))
                   and "lora" not in n)


def test_tied_lora_shares_one_pair_per_module_type():
    model = Two()
    ld.inject_adapters(model, ld.AdapterConfig(kind="tied_lora", r=2, target_modules=["q", "up"],
                                               tied_trainable="Bv"))
    q0, q1 = model.blocks[0]["q"], model.blocks[1]["q"]
    assert q0.lora_A is q1.lora_A and q0.lora_B is q1.lora_B
    assert q0.tied_u is not q1.tied_u
    assert q0.lora_A is not model.blocks[0]["up"].lora_A
    assert not q0.lora_A.requires_grad and q0.lora_B.requires_grad and q0.tied_v.requires_grad
    assert not q0.tied_u.requires_grad


def test_vera_shares_frozen_projections_sliced_per_layer():
    model = Two()
    ld.inject_adapters(model, ld.AdapterConfig(kind="vera", r=4, target_modules=["q", "up"]))
    q, up = model.blocks[0]["q"], model.blocks[1]["up"]
    assert q.vera_A.data_ptr() == up.vera_A.data_ptr()
    assert q.vera_A.shape == (4, 12) and q.vera_B.shape == (12, 4)
    assert torch.all(q.vera_lambda_b == 0) and torch.allclose(q.vera_lambda_d, torch.full((4,), 0.1))


def test_lora_init_is_seeded_by_module_name_and_B_zero():
    a, b = Two(), Two()
    cfg = ld.AdapterConfig(kind="lora", r=2, target_modules=["q"], seed=5)
    ld.inject_adapters(a, cfg)
    ld.inject_adapters(b, ld.AdapterConfig(kind="lora", r=2, target_modules=["q"], seed=5))
    assert torch.equal(a.blocks[0]["q"].lora_A, b.blocks[0]["q"].lora_A)
    assert not torch.equal(a.blocks[0]["q"].lora_A, a.blocks[1]["q"].lora_A)
    assert torch.all(a.blocks[0]["q"].lora_B == 0)
    bound = 1 / 12 ** 0.5  # Kaiming-uniform(a=√5) on fan_in = 12
    assert a.blocks[0]["q"].lora_A.abs().max() <= bound


def test_dropout_only_on_adapter_path():
    torch.manual_seed(0)
    model = Two()
    ld.inject_adapters(model, ld.AdapterConfig(kind="lora", r=2, dropout=0.5, target_modules=["q"]))
    m = model.blocks[0]["q"]
    x = torch.randn(3, 12)
    m.train()
    with torch.no_grad():
        m.lora_B.zero_()
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, m.weight, m.bias))  # B=0: base path exact
    m.eval()
    perturb_trainable(model, scale=0.3)
    expect = x.double() @ (m.weight.double() + dense_delta(m)).T + m.bias.double()
    torch.testing.assert_close(m(x).double(), expect, rtol=1e-5, atol=1e-5)


def test_adapter_dtype_fp32_next_to_bf16_base():
    model = Two().to(torch.bfloat16)
    ld.inject_adapters(model, ld.AdapterConfig(kind="lora", r=2, target_modules=["q"], adapter_dtype="float32"))
    m = model.blocks[0]["q"]
    assert m.lora_A.dtype == torch.float32 and m.weight.dtype == torch.bfloat16
    y = m(torch.randn(2, 12, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    model2 = Two().to(torch.bfloat16)
    ld.inject_adapters(model2, ld.AdapterConfig(kind="lora", r=2, target_modules=["q"]))
    assert model2.blocks[0]["q"].lora_A.dtype == torch.bfloat16  # default: the training precision


def test_full_finetuning_kind_none():
    model = Two()
    for p in model.parameters():
        p.requires_grad_(False)
    assert ld.inject_adapters(model, ld.AdapterConfig(kind="none", target_modules="all-linear")) == []
    assert all(p.requires_grad for p in model.parameters())


def test_pending_init_refuses_to_train():
    model = Two()
    ld.inject_adapters(model, ld.AdapterConfig(kind="lora", init="pissa", r=2, target_modules=["q"]))
    model.train()
    with pytest.raises(RuntimeError, match="initialize_adapters"):
        model(torch.randn(2, 12))
