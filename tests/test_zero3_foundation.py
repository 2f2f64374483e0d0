"""2-rank ZeRO-3 (real deepspeed launcher, gloo): inject into zero.Init, train, merge, save, PEFT parity."""
import peft  # a declared test dependency: a missing one fails the module, never skips it
import pytest
import torch

from launch_utils import read_report, run_ranks

KINDS = ["lora", "lora_fa", "dora", "vera", "tied_lora"]


@pytest.mark.slow
def test_zero3_two_ranks_every_kind(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    run_ranks("zero3_foundation.py", ["--model", tiny_llama_dir, "--out", str(out), "--kinds", ",".join(KINDS)])
    report = read_report(str(out / "report.json"))
    from transformers import AutoModelForCausalLM
    for kind in KINDS:
        r = report[kind]
        assert r["zero_init_shape"] == [0] and r["ds_shape"] == [64, 64], kind
        assert r["n_adapted"] == 14
        assert r["adapters_partitioned"] and r["trainable_in_optimizer"], kind
        assert r["frozen_in_optimizer"] == 0 and r["n_optimizer_numel"] == r["n_trainable"], kind
        assert r["losses"][-1] < r["losses"][0], (kind, r["losses"])
        assert r["frozen_max_change"] == 0.0, kind
        assert r["merge_changed_weight"] > 0 and r["merge_logit_diff"] <= 1e-5, kind
        assert r["refusals"] == [True, True] and r["refused_dir"] == ["metrics.jsonl"], kind
        exp = torch.load(str(out / kind / "expected.pt"))
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        pm = peft.PeftModel.from_pretrained(base, str(out / kind)).eval()
        with torch.no_grad():
            got = pm(input_ids=exp["input_ids"]).logits
        assert (got - exp["logits"]).abs().max().item() <= 1e-5, kind
