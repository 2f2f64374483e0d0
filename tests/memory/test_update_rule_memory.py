"""Issue 12: the memory tool accounts for the update rules (`--update-rule`, docs/update_rules.md).

The expected bytes are written out here from the preset's shapes and an LPT split of the layers
over ranks (largest d_out·d_in first, onto the least-loaded rank, ties to the lower rank and the
lower name), independently of lora_dist.update_rules / lora_dist.engine.plan.
"""
import json

import pytest

from lora_dist.memory.cli import main as cli_main

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _shapes(cfg, targets):
    h, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    leaf = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    out = []
    for i in range(cfg["num_hidden_layers"]):
        for t in targets:
            part = "self_attn" if t in PROJ[:4] else "mlp"
            out.append((f"model.layers.{i}.{part}.{t}", *leaf[t]))
    return out


def _lpt_moment_bytes(shapes, world, itemsize):
    load, per_rank, largest = [0] * world, [0] * world, 0
    for name, o, i in sorted(shapes, key=lambda s: (-s[1] * s[2], s[0])):
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += o * i
        per_rank[r] += 2 * o * i * itemsize
        largest = max(largest, o * i)
    return per_rank, 3 * 4 * largest


def _run(capsys, argv):
    assert cli_main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("preset,cluster,targets,dtype,itemsize", [
    ("llama2-7b", "1x8", PROJ, "float32", 4),
    ("tiny-llama", "1x3", ["q_proj", "v_proj", "down_proj"], "bfloat16", 2),
])
def test_lora_pro_moments_added_as_owner_plan_splits_them(capsys, preset, cluster, targets, dtype, itemsize):
    from lora_dist.memory import load_preset
    cfg = load_preset(preset).to_dict()
    world = int(cluster.split("x")[0]) * int(cluster.split("x")[1])
    base = ["--preset", preset, "--cluster", cluster, "--checkpointing", "--target-modules", ",".join(targets)]
    plain = _run(capsys, base)
    pro = _run(capsys, base + ["--update-rule", "lora_pro", "--lora-pro-moments-dtype", dtype])
    per_rank, transient = _lpt_moment_bytes(_shapes(cfg, targets), world, itemsize)
    assert sum(per_rank) == pro["update_rule"]["moment_bytes_total"]
    assert pro["gpu_components"]["lora_pro_moments"] == max(per_rank) == pro["update_rule"]["moment_bytes_per_rank"]
    assert pro["update_rule"]["step_transient_bytes"] == transient
    # the inner step is SGD: Adam's states go; everything else is as for plain LoRA
    assert pro["gpu_components"]["optimizer"] == 0 < plain["gpu_components"]["optimizer"]
    rest = {k: v for k, v in pro["gpu_components"].items() if k not in ("optimizer", "lora_pro_moments")}
    assert rest == {k: v for k, v in plain["gpu_components"].items() if k != "optimizer"}
    assert pro["gpu_states_bytes"] == (plain["gpu_states_bytes"] - plain["gpu_components"]["optimizer"]
                                       + max(per_rank))
    # the step temporaries live after backward: the peak takes the larger of them and the activations
    assert pro["peak_bytes"] == (pro["gpu_states_bytes"] + pro["gpu_buffers_bytes"]
                                 + max(pro["act_peak_bytes"], transient))
    light = _run(capsys, base + ["--update-rule", "lora_pro", "--lora-pro-moments", "none"])
    assert light["gpu_components"] == plain["gpu_components"] and light["peak_bytes"] == plain["peak_bytes"]


def test_lora_fa_projection_is_r_by_r_per_layer(capsys):
    base = ["--preset", "llama2-13b", "--mode", "lora_fa", "--cluster", "2x8", "--r", "8"]
    plain = _run(capsys, base)
    fa = _run(capsys, base + ["--update-rule", "lora_fa"])
    assert fa["gpu_components"]["lora_fa_projection"] == 40 * 7 * 8 * 8 * 8  # layers · targets · r² · float64
    assert fa["peak_bytes"] - plain["peak_bytes"] == 40 * 7 * 8 * 8 * 8


def test_update_rule_text_output(capsys):
    assert cli_main(["--preset", "tiny-llama", "--update-rule", "lora_pro", "--cluster", "1x2"]) == 0
    out = capsys.readouterr().out
    assert "lora_pro_moments" in out and "full-size moments" in out and "inner step is SGD" in out


@pytest.mark.parametrize("argv,needle", [
    (["--update-rule", "lora_fa"], "--update-rule lora_fa needs --mode lora_fa"),
    (["--update-rule", "lora_pro", "--mode", "lora_fa"], "--update-rule lora_pro needs --mode lora"),
    (["--lora-pro-moments", "none"], "--lora-pro-moments applies to --update-rule lora_pro"),
    (["--update-rule", "dora"], "invalid choice"),
])
def test_update_rule_errors(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        cli_main(["--preset", "tiny-llama"] + argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
