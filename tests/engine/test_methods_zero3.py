"""Every initialization under real ZeRO-3: one 2-rank launch and one 2-"node" launch of the same worker
(tests/workers/methods_zero3.py). Each compares the factors and rewritten base weights with a
single-process run on all calibration batches (≤ 1e-5 relative, fp32 model, float64 statistics),
checks the output at init, that training afterwards lowers the loss with the optimizer starting from
the init, and that stock PEFT reproduces the logits of the saved adapter (≤ 1e-5)."""
import importlib.util
import os

import peft  # a declared test dependency: a missing one fails, never skips
import pytest
import torch

import lora_dist as ld
from launch_utils import WORKERS, read_report, run_ranks, run_two_nodes
from lora_dist.adapters import adapter_modules
from lora_dist.engine.methods import METHODS

_spec = importlib.util.spec_from_file_location("methods_zero3", os.path.join(WORKERS, "methods_zero3.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)


@pytest.fixture(scope="module")
def single_process(tiny_llama_dir):
    """label -> {module: {lora_A, lora_B, (lora_R), weight}} from one process fed every batch."""
    from transformers import AutoModelForCausalLM
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for label in W.CASES:
            cfg = W.config_for(label)
            model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
            ld.inject_adapters(model, cfg)
            ld.initialize_adapters(model, cfg, W.calibration_batches(), n_train=W.N_TRAIN, lr=W.LR,
                                   stats_dtype=torch.float64, progress=False)
            keys = ["lora_A", "lora_B"] + (["lora_R"] if cfg.kind == "lora_xs" else [])
            out[label] = {n_: {**{k: getattr(m, k).detach().clone() for k in keys}, "weight": m.weight.detach().clone()}
                          for n_, m in adapter_modules(model)}
    finally:
        torch.set_num_threads(n)
    return out


def _check_launch(out, single, tiny_llama_dir, world):
    from transformers import AutoModelForCausalLM
    report = read_report(str(out / "report.json"))
    assert report["world"] == world and set(report["cases"]) == set(W.CASES)
    saved = torch.load(str(out / "calibration.pt"))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(saved, W.calibration_batches()))
    worst = {}
    for label, res in report["cases"].items():
        init, kind, _, _ = W.CASES[label]
        assert res["partitioned"], label
        data = torch.load(str(out / f"{label}.pt"))
        # 1. the same factors and base weights as one process on all batches
        err = 0.0
        for n, ref in single[label].items():
            got = data["factors"][n]
            for k, v in ref.items():
                scale = v.abs().max().item()
                if scale == 0:
                    assert got[k].abs().max().item() == 0, (label, n, k)
                    continue
                err = max(err, (got[k] - v).abs().max().item() / scale)
        worst[label] = err
        assert err <= 1e-5, (label, err)
        if init in METHODS:
            assert res["owners"] == list(range(world)), (label, res["owners"])  # every rank solved layers
        # 2. output at init: unchanged for the inits that rewrite W or start with B = 0
        if init in METHODS and METHODS[init].writes_weight or init in ("kaiming", "gaussian", "eva"):
            assert res["init_logit_change"] <= 1e-5, (label, res["init_logit_change"])
        # 3. training afterwards: loss goes down, and the optimizer's fp32 master held the init (AdamW
        #    moves an entry by about lr per step; a master that missed the init would jump to it)
        losses = res["losses"]
        assert losses[-1] < losses[0] and all(b < a + 1e-6 for a, b in zip(losses, losses[1:])), (label, losses)
        assert res["max_step_change_over_lr"] <= 1.5 * W.STEPS, (label, res["max_step_change_over_lr"])
        # 4. stock PEFT reproduces the trained adapter's logits on the original base model
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        pm = peft.PeftModel.from_pretrained(base, str(out / label)).eval()
        with torch.no_grad():
            got = pm(input_ids=data["input_ids"]).logits
        assert (got - data["logits"]).abs().max().item() <= 1e-5, label
    print(f"world {world}: worst relative difference to single process per case: "
          + ", ".join(f"{k}={v:.1e}" for k, v in worst.items()))


@pytest.mark.slow
def test_every_method_on_two_zero3_ranks(tmp_path, tiny_llama_dir, single_process):
    out = tmp_path / "out"
    run_ranks("methods_zero3.py", ["--model", tiny_llama_dir, "--out", str(out)], timeout=900)
    _check_launch(out, single_process, tiny_llama_dir, world=2)


@pytest.mark.slow
def test_every_method_on_two_nodes(tmp_path, tiny_llama_dir, single_process):
    out = tmp_path / "out"
    run_two_nodes("methods_zero3.py", ["--model", tiny_llama_dir, "--out", str(out)], timeout=900)
    _check_launch(out, single_process, tiny_llama_dir, world=2)
