"""Every update rule over 5 optimizer steps, on real DeepSpeed ranks or as one plain torch process.

Launched by tests/test_update_rules.py (2 ZeRO-3 ranks, 2 "nodes", 2 ZeRO-2 ranks); the same
`run_case` also runs in the test's own process without DeepSpeed (`--plain`), where one process
takes the whole global batch of 4 as two micro-batches of 2 (each rank takes 2 samples as one
micro-batch). The trajectories (every adapter tensor after each step) must agree to 1e-5.

Cases: plain LoRA (AdamW); LoRA-FA's projection in backward (AdamW); LoRA-Pro's full rule (SGD
inner step, moments on owner ranks); LoRA-Pro light (its autograd Function in backward, AdamW); LoRA+ at ratio 4 with SGD under a
WarmupCosineLR and a per-group WarmupDecayLR schedule, where the effective LR of each parameter,
−⟨Δθ, g⟩/⟨g, g⟩, is recorded at every step.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import lora_dist as ld  # noqa: E402
from lora_dist import update_rules as ur  # noqa: E402
from lora_dist.adapters import adapter_modules  # noqa: E402
from lora_dist.zero import read_full  # noqa: E402

STEPS, GLOBAL, MICRO, SEQ = 5, 4, 2, 10
TARGETS = ["q_proj", "v_proj", "up_proj"]
# name -> (kind, update_rule, update_options, loraplus ratio, inner optimizer, lr, scheduler)
CASES = {
    "plain": ("lora", "plain", {}, None, "adamw", 5e-3, None),
    "fa": ("lora_fa", "lora_fa", {}, None, "adamw", 5e-3, None),
    "pro": ("lora", "lora_pro", {}, None, "sgd", 5e-3, None),
    "pro_light": ("lora", "lora_pro", {"moments": "none"}, None, "adamw", 5e-3, None),
    "plus_cos": ("lora", "plain", {}, 4.0, "sgd", 2.0, "WarmupCosineLR"),
    "plus_decay": ("lora", "plain", {}, 4.0, "sgd", 2.0, "WarmupDecayLR"),
}
SCHEDULERS = {
    "WarmupCosineLR": {"total_num_steps": STEPS, "warmup_num_steps": 2, "warmup_min_ratio": 0.2,
                       "cos_min_ratio": 0.1},
    # the scalar our ds_config filling writes; per_group_scheduler turns it into per-group values
    "WarmupDecayLR": {"total_num_steps": STEPS + 1, "warmup_num_steps": 2, "warmup_min_lr": 0.2,
                      "warmup_max_lr": 2.0},
}


def global_batches():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 128, (GLOBAL, SEQ), generator=g) for _ in range(STEPS)]


def build(case, model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    kind, rule, opts, ratio, _, _, _ = CASES[case]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if rule == "lora_pro" and dtype == torch.float64 and "moments" not in opts:
        opts = {**opts, "moments_dtype": "float64"}  # the dense float64 check: float64 moments too
    cfg = ld.AdapterConfig(kind=kind, r=4, alpha=8.0, target_modules=TARGETS, seed=3, update_rule=rule,
                           update_options=dict(opts), loraplus_lr_ratio=ratio)
    ld.inject_adapters(model, cfg)
    if ratio:  # B ≠ 0 from the start (as after a data-aware init), so A has a gradient at step 1
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for _, m in adapter_modules(model):
                m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    return model, cfg


def ds_config(case, stage, world, groups):
    _, _, _, _, inner, lr, sched = CASES[case]
    ds = {"train_micro_batch_size_per_gpu": GLOBAL // world, "gradient_accumulation_steps": 1,
          "train_batch_size": GLOBAL, "zero_optimization": {"stage": stage,
                                                            "stage3_param_persistence_threshold": 0},
          "steps_per_print": 1000, "wall_clock_breakdown": False,
          "gradient_clipping": 0.0}  # DeepSpeed's default is 1.0; the plain-torch runs do not clip
    if inner == "adamw":
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "torch_adam": True, "weight_decay": 0.0,
                                                       "betas": [0.9, 0.999], "eps": 1e-8}}
    else:
        ds["zero_allow_untested_optimizer"] = True
    if sched:
        ds["scheduler"] = {"type": sched, "params": dict(SCHEDULERS[sched])}
        ds = ur.per_group_scheduler(ds, groups)
    return ds


def make_optimizer(case, groups, ds):
    """The inner optimizer and scheduler of the plain-torch run (DeepSpeed builds its own from `ds`)."""
    _, _, _, _, inner, lr, sched = CASES[case]
    opt = ur.inner_optimizer(groups) if inner == "sgd" else torch.optim.AdamW(
        groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if not sched:
        return opt, None
    from deepspeed.runtime import lr_schedules
    return opt, getattr(lr_schedules, sched)(opt, **ds["scheduler"]["params"])


def effective_lrs(groups_of, grads, before, after):
    """Per group: −⟨Δθ, g⟩/⟨g, g⟩ over the group's tensors (the LR SGD applied); None where g = 0
    (A's gradient at the first step, while B = 0)."""
    out = {}
    for gname, idx in groups_of.items():
        num = sum(float(((after[i] - before[i]) * grads[i]).sum()) for i in idx)
        den = sum(float((grads[i] * grads[i]).sum()) for i in idx)
        out[gname] = -num / den if den > 0 else None
    return out


def run_case(case, model_dir, stage=3, use_ds=True, dtype=torch.float32):
    """5 steps of `case`; returns {"traj": [[tensor per adapter param] per step], "names", "eff_lr"}."""
    import torch.distributed as dist
    rank = dist.get_rank() if use_ds else 0
    world = dist.get_world_size() if use_ds else 1
    model, cfg = build(case, model_dir, dtype)
    lr = CASES[case][5]
    groups = ur.param_groups(model, cfg, lr)
    ds = ds_config(case, stage, world, groups)
    ur.check_ds_config(ds, cfg, groups)
    named = [(f"{n}.{k}", p) for n, m in adapter_modules(model) for k, p in m.adapter_params().items()
             if p.requires_grad]
    pid = {id(p): i for i, (_, p) in enumerate(named)}
    groups_of = {g["name"]: [pid[id(p)] for p in g["params"]] for g in groups}
    if use_ds:
        import deepspeed
        client = ur.inner_optimizer(groups) if CASES[case][4] == "sgd" else None
        target, _, _, sched = deepspeed.initialize(model=model, model_parameters=groups, optimizer=client,
                                                   config=ds)
    else:
        target = model
        opt, sched = make_optimizer(case, groups, ds)
    full_pro = cfg.update_rule == "lora_pro" and cfg.update_option("moments") == "full"
    if cfg.update_rule != "plain" and not full_pro:  # LoRA-FA, LoRA-Pro light: inside backward
        ur.attach_update_rule(target)
    pro = ur.LoRAPro(target) if full_pro else None
    params = [p for _, p in named]
    traj, eff, losses, times = [], [], [], []
    for ids in global_batches():
        t0 = time.perf_counter()
        mine = ids[rank * GLOBAL // world:(rank + 1) * GLOBAL // world]
        micros = mine.split(MICRO) if not use_ds else [mine]
        for mb in micros:
            loss = target(input_ids=mb, labels=mb).loss
            losses.append(float(loss.detach()))
            if use_ds:
                target.backward(loss)
            else:
                (loss / len(micros)).backward()
        if pro is not None:
            pro.adjust_gradients()
        before = read_full(params)
        if cfg.loraplus_lr_ratio:
            from deepspeed.utils import safe_get_full_grad
            grads = [safe_get_full_grad(p).detach().cpu().clone() for p in params]
        if use_ds:
            target.step()
        else:
            opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad()
        times.append(time.perf_counter() - t0)
        traj.append(read_full(params))
        if cfg.loraplus_lr_ratio:
            eff.append(effective_lrs(groups_of, grads, before, traj[-1]))
    out = {"names": [n for n, _ in named], "traj": traj, "eff_lr": eff, "losses": losses, "times": times}
    if pro is not None:
        out["moment_bytes"] = pro.moment_bytes()
        out["owners"] = sorted(set(pro.plan.owner.values()))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--local_rank", type=int, default=0)
    p.add_argument("--bench", type=int, default=0,
                   help="benchmark: this many steps of global batch 8 × 128 tokens, all-linear targets; "
                        "prints median step time and this process's peak RSS (one case per launch)")
    args = p.parse_args()
    global STEPS, GLOBAL, SEQ, MICRO, TARGETS
    if args.bench:
        STEPS, GLOBAL, SEQ, MICRO = args.bench, 8, 128, 4
        TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    import deepspeed
    import torch.distributed as dist
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    results = {}
    for case in args.cases.split(","):
        res = run_case(case, args.model, stage=args.stage)
        if "moment_bytes" in res:  # per rank: each holds only its own layers' moments
            mb = torch.tensor([float(res["moment_bytes"])])
            allb = [torch.zeros(1) for _ in range(dist.get_world_size())]
            dist.all_gather(allb, mb)
            res["moment_bytes"] = [float(x) for x in allb]
        results[case] = res
        if args.bench and dist.get_rank() == 0:
            print("BENCH " + json.dumps({
                "case": case, "world": dist.get_world_size(), "stage": args.stage,
                "median_step_s": statistics.median(res["times"][1:]),
                "peak_rss_mib_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "moment_bytes": res.get("moment_bytes")}), flush=True)
    if dist.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        torch.save(results, os.path.join(args.out, "trajectories.pt"))
    dist.barrier()


if __name__ == "__main__":
    main()
