"""The calibration set the invariance tests share: 48 variable-length samples, deterministic
(about 900 positions: A_in of every layer is well-conditioned)."""
import torch


def calibration_samples(n=48, seed=0, min_len=14, spread=11, step=5, prompt_mod=3, no_loss=()):
    """(input_ids, labels) pairs: sample i has min_len + (i·step) mod spread tokens, its first
    2 + i mod prompt_mod labelled -100 (a prompt), and none with loss if i is in `no_loss`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = min_len + (i * step) % spread
        ids = torch.randint(1, 128, (t,), generator=g)
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
           "lora_da_fa": dict(kind="lora_fa", init="lora_da", init_options={"n_train": 1000, "fisher": "full"}),
           "pissa": dict(kind="lora", init="pissa")}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
