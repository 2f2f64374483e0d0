"""The MiniLM-L6 encoder task of the quality benchmark (launch/quality/encoder.py), on the real
pretrained weights, quick mode."""
import math
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from launch.quality import encoder as enc  # noqa: E402
from launch.quality.encoder import EncoderTask  # noqa: E402
from lora_dist.config import AdapterConfig  # noqa: E402
from lora_dist.inject import inject_adapters  # noqa: E402


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return EncoderTask(str(tmp_path_factory.mktemp("minilm_cache")), quick=True)


def _rows(t: torch.Tensor) -> set:
    return {tuple(r) for r in t.tolist()}


def test_splits_disjoint_balanced_and_sized(task):
    sp = task.splits
    for split, n in enc.SIZES[True].items():
        assert sp[split]["input_ids"].shape[0] == n
        assert sp[split]["input_ids"].shape[1] <= 24
        counts = torch.bincount(sp[split]["labels"], minlength=enc.N_CLASSES)
        assert counts.tolist() == [n // enc.N_CLASSES] * enc.N_CLASSES
    tr, va, te = (_rows(sp[s]["input_ids"]) for s in ("train", "val", "test"))
    assert len(tr) == sp["train"]["input_ids"].shape[0]  # no repeats inside a split either
    assert not tr & va and not tr & te and not va & te


def test_labels_follow_the_rule(task):
    """Decode every val sentence and recompute its label independently."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(enc.model_dir())
    adj = {w: k for k, g in enumerate(enc.ADJ_GROUPS) for w in g}
    noun = {w: k for k, g in enumerate(enc.NOUN_GROUPS) for w in g}
    assert len(adj) == len(enc.ADJECTIVES) and len(noun) == len(enc.NOUNS)
    v = task.splits["val"]
    passive = 0
    for ids, y in zip(v["input_ids"], v["labels"].tolist()):
        words = tok.decode(ids, skip_special_tokens=True).split()
        a = [w for w in words if w in adj]
        n = [w for w in words if w in noun]
        assert len(a) == 2 and len(n) == 2, words
        agent = 1 if "by" in words else 0  # passive: the agent follows "by"
        passive += agent
        assert y == 2 * noun[n[agent]] + adj[a[agent]], words
    assert 0.35 < passive / len(v["labels"]) < 0.65  # both voices occur


def test_train_batch_deterministic_in_seed_and_step(task, tmp_path):
    again = EncoderTask(str(tmp_path), quick=True)  # rebuilt from scratch: same data, same order
    n = task.splits["train"]["labels"].shape[0]
    for step in (0, 7, n // 32 + 3):  # the last one is in the second epoch
        a, b = task.train_batch(step, 1, 32), again.train_batch(step, 1, 32)
        assert set(a) == {"input_ids", "attention_mask", "labels"}
        for k in a:
            assert torch.equal(a[k], b[k])
    assert not torch.equal(task.train_batch(3, 1, 32)["input_ids"], task.train_batch(3, 2, 32)["input_ids"])
    assert not torch.equal(task.train_batch(3, 1, 32)["input_ids"], task.train_batch(4, 1, 32)["input_ids"])
    # one epoch visits every train sample exactly once
    ep = torch.cat([task.train_batch(s, 5, 32)["input_ids"] for s in range(n // 32)])
    assert _rows(ep) == _rows(task.splits["train"]["input_ids"])


def test_calibration_has_no_labels_and_comes_from_train(task):
    cal = task.calibration(80)
    assert [b["input_ids"].shape[0] for b in cal] == [32, 32, 16]
    assert all(set(b) == {"input_ids", "attention_mask"} for b in cal)
    assert _rows(torch.cat([b["input_ids"] for b in cal])) <= _rows(task.splits["train"]["input_ids"])


def test_untrained_is_chance_then_lora_and_head_learn(task):
    torch.manual_seed(0)
    model = task.load_model()
    other = task.load_model()
    assert torch.equal(model.classifier.weight, other.classifier.weight)  # a fixed head
    del other
    n_val = task.splits["val"]["labels"].shape[0]
    p = 1.0 / enc.N_CLASSES
    band = 4 * math.sqrt(p * (1 - p) / n_val)
    before = task.evaluate(model, "val")
    assert abs(before["metric"] - p) < band, before
    assert abs(before["loss"] - math.log(enc.N_CLASSES)) < 0.1, before

    cfg = AdapterConfig(kind="lora", init="kaiming", r=8, alpha=16, target_modules=task.target_modules)
    targets = inject_adapters(model, cfg)
    assert len(targets) == 4 * 6 and not any("classifier" in t for t in targets)
    head = task.trainable_extra(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.requires_grad for p in head) and len(trainable) == 2 * len(targets) + 2
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(trainable, lr=2e-3, weight_decay=0.0)
    for step in range(30):
        loss = task.loss(model, task.train_batch(step, 0, 32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = task.evaluate(model, "val")
    assert after["loss"] < before["loss"] - 5e-3, (before, after)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(float(m.lora_B.detach().abs().max()) > 0 for m in model.modules() if hasattr(m, "lora_B"))


def test_methods_are_the_registry_minus_gradient_inits(task):
    from launch.quality.methods import METHODS
    assert set(task.methods) <= set(METHODS)
    for name in ("full", "lora_kaiming", "pissa", "milora", "olora", "eva", "corda", "fa_eva_proj",
                 "lora_pro", "loraplus", "dora", "vera", "tied_tl6", "rslora", "lora_xs_r8"):
        assert name in task.methods, name
    for name in ("lora_ga", "lora_one", "lora_da", "lora_da_no_bias", "fa_lora_da", "lora_sb_r8"):
        assert name not in task.methods and name in METHODS, name


def test_forward_only_init_runs_and_gradient_init_is_refused(task):
    """EVA (input moments only) initializes the encoder's adapters from the label-free calibration;
    LoRA-GA needs the causal-LM loss's token labels, which a classification batch does not have."""
    from lora_dist.engine.initialize import initialize_adapters
    from lora_dist.errors import ConfigError
    model = task.load_model()
    cal = task.calibration(64)
    with torch.no_grad():  # reference: layer 0's query reads the embedding output; its covariance
        x = torch.cat([model.bert.embeddings(input_ids=b["input_ids"])[b["attention_mask"].bool()] for b in cal])
    x = x.double()
    cov = x.T @ x / len(x) - torch.outer(x.mean(0), x.mean(0))
    lam, Q = torch.linalg.eigh(cov)
    top = Q[:, -8:]  # EVA's A spans the top-8 principal directions of the layer input
    assert float(lam[-8] / lam[-9]) > 1.01  # a well-separated subspace, so the comparison is stable
    cfg = AdapterConfig(kind="lora", init="eva", r=8, alpha=16, target_modules=task.target_modules)
    inject_adapters(model, cfg)
    initialize_adapters(model, cfg, cal, n_train=task.n_train, progress=False)
    A = model.bert.encoder.layer[0].attention.self.query.lora_A.detach().double()
    assert torch.allclose(A @ A.T, torch.eye(8, dtype=A.dtype), atol=1e-4)
    assert abs(float(torch.linalg.norm(A @ top)) ** 2 - 8) < 1e-3  # the same 8-dim span
    ga = AdapterConfig(kind="lora", init="lora_ga", r=8, alpha=16, target_modules=task.target_modules)
    model = task.load_model()
    inject_adapters(model, ga)
    b = task.train_batch(0, 0, 8)
    with pytest.raises(ConfigError, match="labels"):
        initialize_adapters(model, ga, [b], n_train=task.n_train, progress=False)
