"""ONE run of the benchmark, through the library's own path, in this process on one thread:

    model = task.load_model()                       the pretrained base
    inject_adapters(model, cfg)                     wraps the targets, freezes the rest
    initialize_adapters(model, cfg, calibration)    the data-aware / SVD init (timed, peak measured)
    attach_update_rule / LoRAPro / param_groups     LoRA-FA's projection, LoRA-Pro, LoRA+
    `steps` AdamW steps (LoRA-Pro: its SGD inner step), linear warm-up then cosine to 0
    task.evaluate on val and test at 1/4, 1/2, 3/4 and all of the steps

Measured, not estimated: init seconds (inject + initialize_adapters) and training seconds (the
steps alone, evaluation excluded); the init's peak live memory above the loaded model, and the
training's over its first 3 steps (the optimizer state appears in step 1), both with the
engine's own `LivePeak` (glibc's bytes in use, sampled every 0.5 ms).
"""
from __future__ import annotations

import contextlib
import math
import time
from types import SimpleNamespace

import torch

EVAL_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
WARMUP = 0.05
N_CALIB = 256
PEAK_STEPS = 3
_NO_PEAK = SimpleNamespace(rise=0)  # steps after PEAK_STEPS are not sampled


def schedule(steps: int):
    """Multiplier of the base LR at optimizer step t (1-based): linear warm-up over 5% of the steps,
    then cosine to 0. LambdaLR applies it to every group alike, so LoRA+'s ratio is kept."""
    warm = max(1, round(WARMUP * steps))

    def f(t: int) -> float:
        if t <= warm:
            return t / warm
        return 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, steps - warm)))
    return f


def _adapt(task, method, seed: int, lr_first: float):
    """Model with the method's adapters, initialized; returns (model, cfg, init seconds, init peak)."""
    import lora_dist as ld
    from lora_dist.engine.footprint import LivePeak

    model = task.load_model()
    cfg = method.adapter_config(task.target_modules, seed, N_CALIB)
    calib = task.calibration(N_CALIB) if cfg.needs_initialize else None
    with LivePeak(torch.device("cpu")) as peak:
        t0 = time.perf_counter()
        ld.inject_adapters(model, cfg)
        for p in task.trainable_extra(model):
            p.requires_grad_(True)
        if cfg.needs_initialize:
            ld.initialize_adapters(model, cfg, calib, n_train=getattr(task, "n_train", None), lr=lr_first,
                                      progress=False)
        init_s = time.perf_counter() - t0
    return model, cfg, init_s, peak.rise


def _optimizer(model, cfg, lr: float):
    """(optimizer, LoRAPro or None): the rule's hooks are installed on the model."""
    from lora_dist import update_rules as ur
    groups = ur.param_groups(model, cfg, lr)
    if cfg.update_rule == "lora_pro" and cfg.update_option("moments") == "full":
        return ur.inner_optimizer(groups), ur.LoRAPro(model)
    if cfg.update_rule != "plain":
        ur.attach_update_rule(model)
    for g in groups:
        g.pop("name", None), g.pop("lr_ratio", None)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0), None


def _evaluate(task, model, step: int) -> dict:
    model.eval()
    v, t = task.evaluate(model, "val"), task.evaluate(model, "test")
    model.train()
    return {"step": step, "val_loss": v["loss"], "val_metric": v["metric"],
            "test_loss": t["loss"], "test_metric": t["metric"]}


def _train(task, model, opt, pro, steps: int, batch: int, seed: int, evaluate: bool = True) -> dict:
    """The training loop; returns timings, the training peak, the eval points and the loss curve."""
    from lora_dist.engine.footprint import LivePeak

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps))
    at = {max(1, round(f * steps)) for f in getattr(task, "eval_fractions", EVAL_FRACTIONS)}
    out = {"train_s": 0.0, "eval_s": 0.0, "train_peak_bytes": 0, "evals": [], "train_loss": [], "diverged": False}
    model.train()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        with LivePeak(torch.device("cpu")) if step <= PEAK_STEPS else contextlib.nullcontext(_NO_PEAK) as peak:
            loss = task.loss(model, task.train_batch(step, seed, batch))
            loss.backward()
            if pro is not None:
                pro.adjust_gradients()
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        out["train_s"] += time.perf_counter() - t0
        out["train_peak_bytes"] = max(out["train_peak_bytes"], peak.rise)
        value = loss.item()
        out["train_loss"].append(round(value, 5))
        if not math.isfinite(value):
            out["diverged"] = True
            break
        if evaluate and step in at:
            t0 = time.perf_counter()
            out["evals"].append(_evaluate(task, model, step))
            out["eval_s"] += time.perf_counter() - t0
    return out


def run_one(task, method, lr: float, seed: int, steps: int, batch: int, evaluate: bool = True) -> dict:
    """The whole run; a JSON-ready row."""
    torch.manual_seed(seed)
    lr_first = lr * schedule(steps)(1)
    model, cfg, init_s, init_peak = _adapt(task, method, seed, lr_first)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt, pro = _optimizer(model, cfg, lr)
    res = _train(task, model, opt, pro, steps, batch, seed, evaluate)
    return {"task": task.name, "method": method.name, "lr": lr, "seed": seed, "steps": steps, "batch": batch,
            "trainable": trainable, "init_s": init_s, "init_peak_bytes": init_peak, **res}
