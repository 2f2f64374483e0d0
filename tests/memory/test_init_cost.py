"""The init in the memory tool (lora_dist/memory/init_cost.py): statistics bytes against the
layer-by-layer sum written out from the Llama-2 shapes, the 13B/70B LoRA-DA plans at 2x8 next to
the training states, the epoch fraction, the budget error, and the weight-only inits."""
import json

import pytest

from lora_dist.memory import cli
from lora_dist.memory.activations import MemoryConfigError, TrainSpec, load_preset
from lora_dist.memory.budget import plan_memory
from lora_dist.memory.init_cost import InitSpec, Rates, init_cost
from lora_dist.memory.states import Cluster, GiB, ZeroConfig

# (hidden, ffn, k/v d_out, layers) of Llama-2 (scale.md)
SHAPES = {"llama2-13b": (5120, 13824, 5120, 40), "llama2-70b": (8192, 28672, 1024, 80)}


def lora_da_stats_bytes(h, f, kv, layers):
    """float64 LoRA-DA statistics, written out: per module g (d_out×d_in) and diag G (d_out); per input
    group Σxᵀx (d_in×d_in) and Σx (d_in): groups q/k/v (h), o (h), gate/up (h), down (f)."""
    mods = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]  # (d_out, d_in): q k v o gate up down
    g_and_diag = sum(o * i + o for o, i in mods)
    moments = 3 * (h * h + h) + (f * f + f)
    return 8 * layers * (g_and_diag + moments)


@pytest.fixture(scope="module")
def plans():
    """Training-step plans as the sbatch scripts train (r=8, 1024 tokens, checkpointing): 13B and 70B
    on 2x8 A800-80GB, and 70B on 4x8 (the same activation profile)."""
    spec = TrainSpec(mode="lora", r=8, seq_len=1024, checkpointing=True)
    out = {}
    for preset in ("llama2-13b", "llama2-70b"):
        cfg = load_preset(preset)
        out[preset, "2x8"] = cfg, plan_memory(cfg, spec, Cluster.parse("2x8"), ZeroConfig(stage=3))
    cfg, p = out["llama2-70b", "2x8"]
    out["llama2-70b", "4x8"] = cfg, plan_memory(cfg, spec, Cluster.parse("4x8"), ZeroConfig(stage=3),
                                                profile=p.profile, params=p.params)
    return out


def _init(plans, preset, cluster="2x8", epoch_samples=100_000, **kw):
    cfg, mplan = plans[preset, cluster]
    return init_cost(mplan, cfg, InitSpec("lora_da", samples=256, seq_len=1024, r=8, **kw),
                     epoch_samples=epoch_samples)


def test_cli_json_has_init(plans, capsys):
    assert cli.main(["--preset", "llama2-70b", "--cluster", "2x8", "--r", "8", "--seq-len", "1024", "--checkpointing",
                     "--init", "lora_da", "--init-samples", "256", "--json"]) == 0
    init = json.loads(capsys.readouterr().out)["init"]
    assert init == json.loads(json.dumps(_init(plans, "llama2-70b").to_dict()))
    for k in ("peak_bytes", "passes", "stats_bytes_total", "stats_bytes_max_rank", "wire_bytes_per_rank",
              "seconds", "fraction_of_epoch", "assumptions"):
        assert k in init


@pytest.mark.parametrize("preset", ["llama2-13b", "llama2-70b"])
def test_lora_da_fits_next_to_training_states(plans, preset):
    mplan = plans[preset, "2x8"][1]
    init = _init(plans, preset).to_dict()
    assert init["stats_bytes_total"] == lora_da_stats_bytes(*SHAPES[preset])
    assert init["fits"] and mplan.states.gpu_total + init["peak_bytes"] <= 80 * GiB - 2 * GiB  # 2 GiB reserve
    # sharded: a rank never holds more than its share of one pass (+ the largest unit, from LPT)
    assert init["stats_bytes_max_rank"] <= init["stats_bytes_total"] / 16 / init["passes"] + 8 * GiB
    assert init["peak_bytes"] <= init["budget_bytes"] + init["calibration_act_peak_bytes"]


def test_fraction_of_epoch(plans):
    init = _init(plans, "llama2-70b").to_dict()
    h, f, kv, L = SHAPES["llama2-70b"]
    lora = 8 * L * ((h + h) + 2 * (h + kv) + (h + h) + 3 * (h + f))  # r=8 A and B of q k v o gate up down
    P = 68_976_648_192 + lora
    epoch = 6 * P * 100_000 * 1024 / (16 * 312e12 * 0.40)  # checkpointed LoRA step: 6·P per token
    assert init["epoch_seconds"] == pytest.approx(epoch, rel=1e-9)
    assert init["seconds"] == pytest.approx(sum(init["seconds_parts"].values()))
    assert init["fraction_of_epoch"] == pytest.approx(init["seconds"] / epoch)
    assert 0.005 < init["fraction_of_epoch"] < 0.1       # minutes against hours
    # the calibration passes alone: 6·P·256·1024 per pass at the same rate
    assert init["seconds_parts"]["calibration"] == pytest.approx(init["passes"] * epoch * 256 / 100_000)
    fast = _init(plans, "llama2-70b", hook_dtype="bfloat16").to_dict()
    assert fast["seconds_parts"]["hooks"] == pytest.approx(init["seconds_parts"]["hooks"] * 19.5 / 312)
    half = _init(plans, "llama2-70b", epoch_samples=200_000).to_dict()
    assert half["fraction_of_epoch"] == pytest.approx(init["fraction_of_epoch"] / 2)


@pytest.fixture(scope="module")
def plan70(plans):
    return plans["llama2-70b", "4x8"]


def test_wire_bytes_70b_script(plan70):
    """4x8, 256 samples of 1024 tokens, micro-batch 1: 8 micro-steps per rank; each unit's bf16 rows
    x and δ (+ a float64 weight and a bool mask per token) go to its owner (issue 11: ~180 GB)."""
    cfg, mplan = plan70
    ic = init_cost(mplan, cfg, InitSpec("lora_da", samples=256, seq_len=1024, r=8))
    h, f, kv, L = SHAPES["llama2-70b"]
    rows = (h + h + kv + kv) + (h + h) + (h + f + f) + (f + h)       # per layer: qkv, o, gate/up, down units
    per_rank = 8 * 1024 * L * (2 * rows + 4 * 9)                      # what each rank's rows weigh
    plan = ic.plan
    for p in range(plan.n_passes):
        assert sum(plan.wire_sent[p]) == sum(plan.wire_recv[p])
    sent = [sum(p[r] for p in plan.wire_sent) for r in range(32)]
    assert sum(sent) == 31 * per_rank                                 # all but one's own units
    assert ic.summary["wire_bytes_per_rank"] == max(sent) <= per_rank
    assert 175e9 < per_rank < 185e9


def test_budget_error_names_unit(plan70):
    cfg, mplan = plan70
    spec = InitSpec("lora_da", samples=256, seq_len=1024, r=8)
    with pytest.raises(MemoryConfigError, match=r"unit 'model\.layers\.\d+\.mlp\.down_proj': it needs \d+ B"):
        init_cost(mplan, cfg, spec, budget=10 * GiB)
    # a smaller budget needs more passes, each within it
    a = init_cost(mplan, cfg, spec, budget=60 * GiB).plan
    b = init_cost(mplan, cfg, spec, budget=35 * GiB).plan
    assert b.n_passes > a.n_passes and b.max_peak() <= 35 * GiB and a.max_peak() <= 60 * GiB


@pytest.mark.parametrize("method", ["pissa", "olora", "lora_xs"])
def test_weight_only_inits_have_no_passes(plan70, method):
    cfg, mplan = plan70
    kind_r = 8
    s = init_cost(mplan, cfg, InitSpec(method, samples=256, seq_len=1024, r=kind_r)).summary
    assert s["passes"] == 0 and s["stats_bytes_total"] == 0 and s["wire_bytes_per_rank"] == 0
    assert s["seconds_parts"]["calibration"] == 0 and s["seconds_parts"]["hooks"] == 0
    h, f = 8192, 28672
    assert s["peak_bytes"] >= 8 * f * h   # at least one gathered gate/down W in float64


def test_bad_init_inputs(plan70):
    cfg, mplan = plan70
    with pytest.raises(MemoryConfigError, match="--init-samples"):
        init_cost(mplan, cfg, InitSpec("lora_da", samples=0, seq_len=1024))
    with pytest.raises(MemoryConfigError, match="--init-hook-dtype"):
        init_cost(mplan, cfg, InitSpec("lora_da", samples=8, seq_len=1024, hook_dtype="fp8"))
    with pytest.raises(MemoryConfigError, match="--epoch-samples"):
        init_cost(mplan, cfg, InitSpec("lora_da", samples=8, seq_len=1024), epoch_samples=0)
    assert Rates().gemm_tflops["float64"] == 19.5


def test_text_output_states_the_plan(plans, capsys):
    ic = _init(plans, "llama2-70b")
    cli._print_init(ic)
    out = capsys.readouterr().out
    s = ic.summary
    assert f"{s['passes']} pass(es)" in out and "fits" in out and "float64" in out
    assert f"{100 * s['fraction_of_epoch']:.2f}% of an epoch of 100000 samples" in out
