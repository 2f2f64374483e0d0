"""The calibration set the invariance tests share: 48 variable-length samples, deterministic
(about 900 positions: A_in of every layer is well-conditioned)."""
import torch


def calibration_samples(n=48, seed=0, min_len=14, spread=11, step=5, prompt_mod=3, no_loss=(), vocab=128):
    """(input_ids, labels) pairs: sample i has min_len + (i·step) mod spread tokens, its first
    2 + i mod prompt_mod labelled -100 (a prompt), and none with loss if i is in `no_loss`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = min_len + (i * step) % spread
        ids = torch.randint(1, vocab, (t,), generator=g)
        labels = ids.clone()
        labels[: 2 + i % prompt_mod] = -100
        if i in no_loss:
            labels[:] = -100
        out.append((ids, labels))
    return out


def make_batches(smp, micro):
    """Right-padded micro-batches of (input_ids, labels) samples, by the library's own collator."""
    from lora_dist.job.data import collate
    return [collate([{"input_ids": i, "labels": l} for i, l in smp[s:s + micro]], pad_id=0)
            for s in range(0, len(smp), micro)]


METHODS = {"lora_da": dict(kind="lora", init="lora_da", init_options={"n_train": 1000}),
           # damping 1e-4 (not 1e-6): with the full Fisher, the fp32 forward's rounding, which changes with
           # the micro-batching, moves these factors by 1.2e-5 between micro-batches 3 and 1 in ONE process
           # at 1e-6 (1.5e-6 at 1e-4): above the 1e-5 the invariance tests ask of the engine
           "lora_da_fa": dict(kind="lora_fa", init="lora_da",
                              init_options={"n_train": 1000, "fisher": "full", "damping": 1e-4}),
           "pissa": dict(kind="lora", init="pissa")}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def uneven_shard(smp, rank, world):
    """Rank r's contiguous share, proportional to r + 1 (48 samples on 3 ranks: 8, 16, 24)."""
    total = world * (world + 1) // 2
    bounds = [len(smp) * k * (k + 1) // 2 // total for k in range(world + 1)]
    return smp[bounds[rank]:bounds[rank + 1]]


def lora_da_stats_bytes(h, f, layers, kv=None):
    """LoRA-DA (fisher diag) float64 statistics written out from the shapes, per unit of one layer:
    Σxᵀx and Σx per input group, g and diag G per module. Returns (all layers, largest unit)."""
    kv = kv or h
    units = {"qkv": (h * h + h) + (h * h + 2 * kv * h) + (h + 2 * kv),
             "o": (h * h + h) + h * h + h,
             "gate_up": (h * h + h) + 2 * f * h + 2 * f,
             "down": (f * f + f) + h * f + h}
    return 8 * layers * sum(units.values()), 8 * max(units.values())


def ACCEPTANCE_SAMPLES():
    """Issue 11's acceptance set: 64 samples of 24–39 tokens from a 1,024-token vocabulary, about
    2,000 positions, more than the largest d_in (688) and than distinct tokens, so every A_in
    (layer 0's too) is full rank and LoRA-DA's Ω is well-posed."""
    return calibration_samples(64, seed=3, min_len=24, spread=16, step=7, vocab=1024)


# LoRA-DA for the acceptance: damping 1e-2 keeps Ω's r smallest eigenvectors well separated, so the
# fp32 forward's rounding (which changes with the batching: 3.6e-5 between micro-batches 3 and 2 at
# the default 1e-6 on this model, 1.2e-6 at 1e-2) stays below the 1e-5 the test asks of the engine.
ACCEPTANCE_INIT = dict(kind="lora", init="lora_da", init_options={"n_train": 1000, "damping": 1e-2})
