"""Issue 6: activation and model-state accounting (lora_dist.memory, launch/memory_bench.py)."""
import importlib.util
import json
import os
import time

import pytest
import torch
import torch.nn as nn

from lora_dist.memory import (MODES, Cluster, MemoryConfigError, ParamStats, SavedActivationTracker,
                              TrainSpec, ZeroConfig, account_activations, activation_profile,
                              compare_cpu_many, count_params, load_preset, model_states, plan_memory,
                              simulate_step)
from lora_dist.memory.cli import main as cli_main
from lora_dist.memory.states import GiB

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    spec = importlib.util.spec_from_file_location("memory_bench", os.path.join(REPO, "launch", "memory_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _layers(config, n):
    c = type(config).from_dict(config.to_dict())
    c.num_hidden_layers = n
    return c


# --------------------------------------------------------------------------------------------------
# The independent reference: a dense back-of-envelope formula for a Hugging Face Llama forward with
# flash-attention SDPA, written from the model code (not from lora_dist.memory).
# --------------------------------------------------------------------------------------------------

def dense_saved_bytes(cfg, mode, b, s, e, ckpt, r=16):
    """Bytes saved for backward; e = bytes per element of the training dtype; all 7 projections adapted.

    per layer (T = b·s tokens; full FT adds what the weight gradients need):
      RMSNorm ×2   fp32 input T·h·4 + rsqrt T·4          (+ normalized bf16/fp32 x T·h·e for the weight)
      attention    q, out T·h·e each; k, v T·kv·d·e each; log-sum-exp T·heads·4   (+ q/k/v input T·h·e)
      MLP          gate out, silu out, up out 3·T·f·e        (+ gate/up input T·h·e + down input T·f·e)
      LoRA         inputs of A not already saved: T·h·e (q/k/v) + T·h·e (gate/up) + T·f·e (down)
                   (o_proj's input is the SDPA output, already saved) + x·Aᵀ 7·T·r·e
      LoRA-FA      x·Aᵀ only: 7·T·r·e
    once: cos, sin 2·s·d·e; final norm; loss: fp32 log-softmax T·V·4 + shifted labels + 4 bytes
      (full FT: + lm_head input T·h·e + input ids T·8). Shifted labels: T·8, or (s+1)·8 when b = 1
      (a view of the padded labels, not a copy).
    checkpointing: per layer only its input T·h·e; once cos, sin and position_ids s·8.
    """
    h, f, L, nh = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads
    kv, V = cfg.num_key_value_heads, cfg.vocab_size
    d = getattr(cfg, "head_dim", None) or h // nh
    T = b * s
    full = mode == "full"
    norm = T * h * 4 + T * 4 + (T * h * e if full else 0)
    loss = T * V * 4 + ((s + 1) * 8 if b == 1 else T * 8) + 4
    tail = norm + loss + ((T * h * e + T * 8) if full else 0)
    if ckpt:
        return L * T * h * e + 2 * s * d * e + s * 8 + tail
    attn = 2 * T * h * e + 2 * T * kv * d * e + T * nh * 4 + (T * h * e if full else 0)
    mlp = 3 * T * f * e + ((T * h * e + T * f * e) if full else 0)
    layer = 2 * norm + attn + mlp
    if mode == "lora":
        layer += 2 * T * h * e + T * f * e + 7 * T * r * e
    elif mode == "lora_fa":
        layer += 7 * T * r * e
    return L * layer + 2 * s * d * e + tail


def dense_params(cfg, mode, r=16):
    """(total, trainable) parameters of a Llama, plus LoRA / LoRA-FA factors on all 7 projections."""
    h, f, L, nh = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads
    kv, V = cfg.num_key_value_heads, cfg.vocab_size
    d = getattr(cfg, "head_dim", None) or h // nh
    base = 2 * V * h + L * (2 * h * nh * d + 2 * h * kv * d + 3 * h * f + 2 * h) + h
    if mode == "full":
        return base, base
    A = L * r * (5 * h + nh * d + f)                       # inputs: q,k,v,gate,up: h; o: nh·d; down: f
    B = L * r * (nh * d + 2 * kv * d + h + 2 * f + h)      # outputs: q: nh·d; k,v: kv·d; o: h; gate,up: f; down: h
    return base + A + B, (A + B if mode == "lora" else B)


def dense_persistent(cfg, mode, r=16, threshold=100_000):
    """Parameters ZeRO-3 does not shard (<= threshold elements): the RMSNorm weights and, for
    LoRA / LoRA-FA, the adapter factors that are that small."""
    h, f, L, nh = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads
    kv = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or h // nh
    sizes = [h] * (2 * L + 1)
    if mode != "full":
        per_layer = [r * h] * 5 + [r * nh * d, r * f] + [nh * d * r, kv * d * r, kv * d * r, h * r, f * r, f * r, h * r]
        sizes += per_layer * L
    return sum(n for n in sizes if n <= threshold)


# --------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,published", [("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320),
                                            ("llama2-70b", 68_976_648_192)])
def test_presets_have_llama2_shapes(name, published):
    cfg = load_preset(name)
    assert cfg.vocab_size == 32000
    stats = count_params(cfg, TrainSpec(mode="full"))
    assert stats.total == published == dense_params(cfg, "full")[0]
    for mode in ("lora", "lora_fa"):
        st = count_params(cfg, TrainSpec(mode=mode, r=16))
        assert (st.total, st.trainable) == dense_params(cfg, mode, r=16)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(MemoryConfigError) as e:
        load_preset("llama2-8b")
    assert "'llama2-8b'" in str(e.value) and "llama2-70b" in str(e.value)


# --------------------------------------------------------------------------------------------------
# the tracker itself
# --------------------------------------------------------------------------------------------------

class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        out = self.lin(x)                      # saves x (not a parameter) and the weight (excluded)
        tmp = out.exp()                        # saves tmp, but the graph is dropped by detach below
        scale = tmp.sum().detach()
        return (out.sin() + out.t().t().cos()) * scale   # sin, cos save `out` (once); mul saves scale


def test_tracker_counts_storages_once_excludes_params_and_released():
    m = _Toy()
    x = torch.randn(4, 8, requires_grad=True)
    with SavedActivationTracker(m) as tr:
        y = m(x)
    # x (4·8·4 bytes) + out (4·8·4, saved by sin and by cos through a view) + scale (4); not tmp,
    # whose graph was dropped inside the forward, and not the weight
    assert tr.report.total_bytes == 128 + 128 + 4
    assert tr.report.num_storages == 3
    y.sum().backward()                        # the saved tensors unpack correctly
    assert x.grad is not None and m.lin.weight.grad is not None


# --------------------------------------------------------------------------------------------------
# acceptance: predicted (meta) == measured (real tensors), every mode, tiny and small Llama
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny-llama", "small-llama"])
@pytest.mark.parametrize("dtype,ckpt", [("bfloat16", False), ("float32", True)])
def test_predicted_saved_bytes_equal_measured_every_mode(preset, dtype, ckpt):
    cfg = _layers(load_preset(preset), 2)
    for mode in MODES:
        spec = TrainSpec(mode=mode, batch_size=2, seq_len=16, dtype=dtype, checkpointing=ckpt, r=8)
        pred = account_activations(cfg, spec, "meta")
        meas = account_activations(cfg, spec, "cpu")
        assert pred.device == "meta" and meas.device == "cpu"
        assert pred.total_bytes == meas.total_bytes, (mode, pred.by_category, meas.by_category)
        assert pred.by_category == meas.by_category
        if mode in ("full", "frozen", "lora", "lora_fa"):
            e = 2 if dtype == "bfloat16" else 4
            assert meas.total_bytes == dense_saved_bytes(cfg, mode, 2, 16, e, ckpt, r=8), mode


def test_breakdown_categories():
    cfg = load_preset("tiny-llama")
    rep = account_activations(cfg, TrainSpec(mode="lora", batch_size=2, seq_len=16, r=4), "meta")
    c = rep.by_category
    assert all(c[k] > 0 for k in ("attention", "mlp", "norm", "adapters", "logits_loss"))
    assert sum(c.values()) == rep.total_bytes
    full = account_activations(cfg, TrainSpec(mode="full", batch_size=2, seq_len=16), "meta").by_category
    assert full["adapters"] == 0 and full["embedding"] == 2 * 16 * 8   # input ids, for the embedding grad
    ck = account_activations(cfg, TrainSpec(mode="lora", batch_size=2, seq_len=16, checkpointing=True), "meta")
    assert ck.by_category["checkpoint"] > 0 and ck.by_category["attention"] == ck.by_category["adapters"] == 0


# --------------------------------------------------------------------------------------------------
# acceptance: LoRA-FA within 1 % of the frozen base; what LoRA adds is stated and checked
# --------------------------------------------------------------------------------------------------

def _lora_fa_checks(cfg, b, s, r, device, dtype="bfloat16"):
    e = 2 if dtype == "bfloat16" else 4
    run = {m: account_activations(cfg, TrainSpec(mode=m, batch_size=b, seq_len=s, r=r, dtype=dtype), device)
           for m in ("frozen", "lora_fa", "lora")}
    L, T, h, f = cfg.num_hidden_layers, b * s, cfg.hidden_size, cfg.intermediate_size
    fro, fa, lo = run["frozen"], run["lora_fa"], run["lora"]
    narrow = L * 7 * T * r * e                                       # x·Aᵀ kept for B's gradient
    assert fa.total_bytes - fro.total_bytes == narrow == fa.by_category["adapters"]
    assert abs(fa.total_bytes - fro.total_bytes) <= 0.01 * fro.total_bytes
    # LoRA adds the inputs of A not already saved by the frozen base (q/k/v input, gate/up input,
    # down_proj input; o_proj's input is the SDPA output) plus the same narrow intermediates.
    assert lo.adapter_input_bytes == L * T * (2 * h + f) * e
    assert lo.total_bytes - fro.total_bytes == lo.adapter_input_bytes + narrow
    assert lo.adapter_other_bytes == narrow
    return fro, fa, lo


def test_lora_fa_within_one_percent_of_frozen_real_tensors():
    _lora_fa_checks(_layers(load_preset("small-llama"), 2), 2, 64, 8, "cpu")


@pytest.mark.parametrize("preset", ["llama2-13b", "llama2-70b"])
def test_lora_fa_within_one_percent_of_frozen_meta(preset):
    cfg = _layers(load_preset(preset), 2)    # per-layer terms; the full depth is checked below
    fro, fa, lo = _lora_fa_checks(cfg, 1, 1024, 16, "meta")
    assert (fa.total_bytes - fro.total_bytes) / fro.total_bytes < 0.002


# --------------------------------------------------------------------------------------------------
# acceptance: predicted peak within 10 % of the measured peak on CPU (fresh process per run)
# --------------------------------------------------------------------------------------------------

def test_predicted_peak_within_10_percent_of_measured():
    # Llama-2's vocabulary on a 2-layer tiny Llama: a few hundred MiB at little compute. Both runs
    # share one child process (baseline RSS re-taken before each); the bench uses one per run.
    base = load_preset("tiny-llama")
    cfg = type(base).from_dict(dict(base.to_dict(), vocab_size=32000, num_hidden_layers=2))
    specs = [TrainSpec(mode="full", batch_size=2, seq_len=64, dtype="float32"),
             TrainSpec(mode="lora_fa", batch_size=4, seq_len=256, dtype="float32", checkpointing=True)]
    for c in compare_cpu_many(cfg, specs, threads=2, fresh=False):
        assert c.saved_exact
        assert c.measured_peak > c.predicted_params           # the measurement saw the model
        assert abs(c.peak_error) <= 0.10, (c.spec, c.predicted_peak, c.measured_peak)


def test_simulated_step_on_cpu_matches_meta():
    """The live-tensor replay sees the same storages on real tensors as on the meta device."""
    cfg = _layers(load_preset("tiny-llama"), 2)
    spec = TrainSpec(mode="lora", batch_size=2, seq_len=32, dtype="float32", r=4)
    a, b = simulate_step(cfg, spec, "cpu"), simulate_step(cfg, spec, "meta")
    assert (a.params, a.peak_fwd_bwd, a.peak_step) == (b.params, b.peak_fwd_bwd, b.peak_step)
    assert a.peak_step > a.params + a.saved.total_bytes > a.params


# --------------------------------------------------------------------------------------------------
# fast path: depth/batch extrapolation is exact
# --------------------------------------------------------------------------------------------------

def test_extrapolated_profile_equals_full_depth():
    cfg = load_preset("tiny-llama")    # 4 layers: the fast path replays 1, 2 and 3 of them
    for spec in (TrainSpec(mode="lora", seq_len=32), TrainSpec(mode="full", seq_len=32, checkpointing=True)):
        fast = activation_profile(cfg, spec)
        full = activation_profile(cfg, spec, full_depth=True)
        assert (fast.method, full.method) == ("extrapolated", "full-depth")
        for b in (1, 2, 5):
            assert fast.saved(b) == full.saved(b) and fast.act_peak(b) == full.act_peak(b)
        direct = simulate_step(cfg, spec.replace(batch_size=5), "meta", drop_grads=True)
        assert direct.saved.total_bytes == fast.saved(5) and direct.act_peak == fast.act_peak(5)


# --------------------------------------------------------------------------------------------------
# acceptance: 13B and 70B tables in under a minute, agreeing with the dense formulas
# --------------------------------------------------------------------------------------------------

def test_13b_70b_tables_fast_and_match_dense_formula():
    bench = _bench()
    args = bench.parse_args(["--models", "llama2-13b,llama2-70b"])
    models, clusters, _ = bench._validate(args)
    t0 = time.time()
    rows, curves, timings, _ = bench.build_table(models, clusters, args)
    elapsed = time.time() - t0
    assert elapsed < 60, timings
    assert len(rows) == 2 * 3 * 2 * 2 * 2
    method = {"full FT": "full", "LoRA": "lora", "LoRA-FA": "lora_fa"}
    for row in rows:
        cfg = load_preset(row["model"])
        m, ckpt = method[row["method"]], row["checkpointing"] == "on"
        for b, key in ((1, "act_b1_gib"), (32, "act_b32_gib")):
            assert row[key] * GiB == dense_saved_bytes(cfg, m, b, 1024, 2, ckpt), (row, b)
        P, Pt = dense_params(cfg, m)
        nodes, gpn = (int(x) for x in row["cluster"].split()[0].split("x"))
        N = nodes * gpn
        # every parameter 2 B (bf16), sharded, except the small ones ZeRO-3 keeps whole on each rank;
        # trainable ones also 2 B gradient + 4 B master + 8 B Adam, sharded
        Pp = dense_persistent(cfg, m)
        sharded = (2 * (P - Pp) + 14 * Pt) / N
        if "offload" in row["zero"]:
            assert row["states_gib"] * GiB == 2 * Pp
            assert row["host_gib_per_node"] * GiB == pytest.approx(gpn * sharded, rel=1e-6)
        else:
            assert row["states_gib"] * GiB == pytest.approx(sharded + 2 * Pp, rel=1e-6)
            assert row["host_gib_per_node"] == 0
        # the per-GPU peak is at least states + buffers + saved activations, and b = 1 fits or not
        assert row["peak_b1_gib"] >= row["states_gib"] + row["buffers_gib"] + row["act_b1_gib"]
        assert (row["max_micro_batch"] == 0) == (row["peak_b1_gib"] > 78.0)
    # what LoRA-FA buys against offload, 70B on 1x8 without checkpointing: the frozen-base activations
    by = {(r["model"], r["cluster"], r["method"], r["zero"], r["checkpointing"]): r for r in rows}
    k = ("llama2-70b", "1x8 A800-80GB")
    assert by[k + ("full FT", "ZeRO-3", "on")]["max_micro_batch"] == 0          # 128 GiB of states
    assert by[k + ("LoRA-FA", "ZeRO-3", "off")]["act_b1_gib"] < 0.8 * by[k + ("LoRA", "ZeRO-3", "off")]["act_b1_gib"]


# --------------------------------------------------------------------------------------------------
# model states
# --------------------------------------------------------------------------------------------------

def test_model_state_formulas():
    st = ParamStats(total=1000, trainable=100, largest_module=300, largest_trainable_module=50,
                    sizes=[(900, False), (100, True)])
    cl = Cluster(nodes=1, gpus_per_node=4)
    kw = dict(reduce_bucket_size=10, prefetch_bucket_size=0, param_persistence_threshold=0)
    z3 = model_states(st, cl, ZeroConfig(stage=3, **kw))
    assert z3.gpu == {"params": 500, "params_persistent": 0, "buffer_gather": 600, "grads": 50,
                      "master": 100, "optimizer": 200, "buffer_reduce": 20}
    assert z3.host == {} and z3.gpu_states == 850 and z3.gpu_buffers == 620
    off = model_states(st, cl, ZeroConfig.offloaded(stage=3, **kw))
    assert off.host == {"params": 500, "grads": 50, "master": 100, "optimizer": 200}
    assert off.host_per_node == 4 * 850 and off.gpu_states == 0
    z2 = model_states(st, Cluster(nodes=2, gpus_per_node=2), ZeroConfig(stage=2, **kw))
    assert z2.gpu["params"] == 2000 and z2.gpu["grads"] == 50 and "buffer_gather" not in z2.gpu
    z2o = model_states(st, cl, ZeroConfig.offloaded(stage=2, **kw))
    assert z2o.gpu["params"] == 2000 and z2o.host == {"grads": 50, "master": 100, "optimizer": 200}
    pers = model_states(st, cl, ZeroConfig(stage=3, **dict(kw, param_persistence_threshold=100)))
    assert pers.gpu["params"] == 450 and pers.gpu["params_persistent"] == 200
    frozen = ParamStats(total=1000, trainable=0, largest_module=300, largest_trainable_module=0, sizes=[(1000, False)])
    assert model_states(frozen, cl, ZeroConfig(stage=3, **kw)).gpu_states == 500   # 2 bytes each, sharded


def test_max_micro_batch_is_the_boundary():
    cfg = load_preset("tiny-llama")
    spec = TrainSpec(mode="lora", seq_len=256, r=8)
    small = Cluster(nodes=1, gpus_per_node=2, gpu_memory_gib=0.25)
    plan = plan_memory(cfg, spec, small, ZeroConfig(stage=3, reduce_bucket_size=1000), reserve_gib=0.0)
    mb = plan.max_micro_batch
    assert 1 <= mb < 32
    assert plan.fits(mb) and not plan.fits(mb + 1)
    assert plan.peak(mb) == plan.states.gpu_total + plan.profile.act_peak(mb)


def test_cluster_and_size_errors():
    with pytest.raises(MemoryConfigError, match="nodes"):
        Cluster(nodes=0)
    with pytest.raises(MemoryConfigError, match="not a multiple of 8"):
        Cluster.from_total(12, 8)
    with pytest.raises(MemoryConfigError, match="NODESxGPUS"):
        Cluster.parse("2by8")
    with pytest.raises(MemoryConfigError, match="stage 3"):
        ZeroConfig(stage=2, offload_param=True)
    with pytest.raises(MemoryConfigError, match="seq_len"):
        TrainSpec(seq_len=-5)
    with pytest.raises(MemoryConfigError, match="unknown mode"):
        TrainSpec(mode="qlora")


# --------------------------------------------------------------------------------------------------
# the CLIs
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["--preset", "llama2-8b"], "unknown preset 'llama2-8b'"),
    (["--preset", "tiny-llama", "--nodes", "0"], "nodes must be an integer >= 1, got 0"),
    (["--preset", "tiny-llama", "--gpus", "12", "--gpus-per-node", "8"], "not a multiple of 8"),
    (["--preset", "tiny-llama", "--cluster", "2x-8"], "gpus_per_node must be an integer >= 1, got -8"),
    (["--preset", "tiny-llama", "--batch-size", "-2"], "batch_size must be an integer >= 1, got -2"),
    (["--preset", "tiny-llama", "--seq-len", "0"], "seq_len must be an integer >= 1, got 0"),
    (["--preset", "tiny-llama", "--gpu-mem-gib", "-80"], "gpu_memory_gib must be > 0"),
    (["--preset", "tiny-llama", "--zero-stage", "2", "--offload-param"], "needs ZeRO stage 3"),
])
def test_memory_cli_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_memory_cli_accounts_one_configuration(capsys):
    assert cli_main(["--preset", "tiny-llama", "--mode", "lora_fa", "--seq-len", "64", "--cluster", "2x8",
                     "--offload", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["world_size"] == 16 and out["mode"] == "lora_fa" and out["fits"]
    assert out["host_per_node_bytes"] > 0 and out["max_micro_batch"] == 32
    assert cli_main(["--preset", "tiny-llama", "--mode", "lora", "--seq-len", "64"]) == 0
    text = capsys.readouterr().out
    assert "adapters" in text and "largest micro-batch" in text and "adapter inputs" in text


@pytest.mark.parametrize("argv,needle", [
    (["--models", "llama2-7b,llama2-8b"], "unknown preset 'llama2-8b'"),
    (["--clusters", "0x8"], "nodes must be an integer >= 1, got 0"),
    (["--clusters", "2x8,3"], "not of the form"),
    (["--max-batch", "-1"], "--max-batch must be >= 1"),
    (["--reserve-gib", "-1"], "--reserve-gib must be >= 0"),
    (["--gpu-only", "--gpu-runs", "llama2-7b:4"], "--gpu-runs entry 'llama2-7b:4' is not PRESET:BATCH:SEQ"),
    (["--gpu-only", "--gpu-runs", "llama3:1:8"], "--gpu-runs: unknown preset 'llama3'"),
    (["--gpu-only", "--gpu-runs", "tiny-llama:0:8"], "batch and sequence length must be >= 1"),
])
def test_bench_cli_errors(argv, needle, capsys, tmp_path):
    assert _bench().main(argv + ["--out-dir", str(tmp_path)]) == 2
    assert needle in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_bench_gpu_only(tmp_path):
    """--gpu-only writes memory_gpu.md: without CUDA, a note saying what was not measured; with
    CUDA, the three measured rows of the requested run."""
    import torch
    assert _bench().main(["--gpu-only", "--gpu-runs", "tiny-llama:1:8", "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "memory_gpu.md").read_text()
    if torch.cuda.is_available():
        assert "tiny-llama, bf16, micro-batch 1 × 8" in text
        assert all(row in text for row in ("| LoRA |", "| LoRA-FA |", "| LoRA ZeRO-3 + offload |"))
    else:
        assert "No GPU is available here" in text and "run_cuda_step" in text
