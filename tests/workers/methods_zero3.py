"""Every initialization under real ZeRO-3 (2 CPU ranks, or 2 "nodes"), in one launch, one JSON report.

For each case: load a tiny Llama under zero.Init (HfDeepSpeedConfig + from_pretrained), inject,
deepspeed.initialize, run `initialize_adapters` on the engine with this rank's shard of the calibration
batches, gather the resulting factors and base weights (rank 0 saves them: the parent test compares them
with a single-process run on all batches), check the model output at init, train a few AdamW steps
(loss must go down; the optimizer's fp32 master must hold the init), save a PEFT adapter and the logits
stock PEFT must reproduce.
"""
import argparse
import json
import os
import time

import deepspeed
import torch
import torch.distributed as dist

import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora_dist as ld  # noqa: E402
from calib_data import calibration_samples, make_batches  # noqa: E402
from lora_dist.adapters import adapter_modules
from lora_dist.engine.methods import METHODS
from lora_dist.comm import release_shm_buffers
from lora_dist.zero import read_full

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, LR, N_TRAIN, STEPS = 4, 8.0, 5e-3, 1000, 4

# label -> (init, kind, rslora, init_options)
CASES = {
    "kaiming": ("kaiming", "lora_fa", False, {}),
    "gaussian": ("gaussian", "lora", False, {}),
    "pissa": ("pissa", "lora", False, {}),
    "pissa_rslora": ("pissa", "lora", True, {"niter": 2}),
    "milora": ("milora", "lora", False, {}),
    "olora": ("olora", "lora", False, {}),
    "eva": ("eva", "lora", False, {"whiten": True}),
    "corda": ("corda", "lora", False, {}),
    "lora_ga": ("lora_ga", "lora", False, {}),
    "lora_one": ("lora_one", "lora", False, {}),
    "lora_sb": ("lora_sb", "lora_xs", False, {}),
    "lora_xs": ("lora_xs", "lora_xs", False, {}),
    "lora_da": ("lora_da", "lora", True, {}),
    "lora_da_fa": ("lora_da", "lora_fa", False, {"fisher": "full"}),
}


def calibration_batches(n_samples=12, micro=2, seed=0):
    """Variable-length right-padded micro-batches with prompt tokens labelled -100 (the same on every
    rank; each rank uses batches[rank::world])."""
    return make_batches(calibration_samples(n_samples, seed, min_len=7, spread=8), micro)


def config_for(label):
    init, kind, rslora, opts = CASES[label]
    return ld.AdapterConfig(kind=kind, init=init, r=R, alpha=ALPHA, use_rslora=rslora, target_modules=TARGETS,
                            init_options=dict(opts), seed=7)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    release_shm_buffers()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1234)
    ds = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "torch_adam": True, "weight_decay": 0.0}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 1000, "wall_clock_breakdown": False,
    }
    batches = calibration_batches()
    mine = batches[rank::world]
    g = torch.Generator().manual_seed(99)
    train_ids = torch.randint(0, 128, (2, 12), generator=g)
    train = {"input_ids": train_ids, "attention_mask": torch.ones_like(train_ids), "labels": train_ids.clone()}
    eval_ids = torch.randint(0, 128, (2, 10), generator=g)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        torch.save(batches, os.path.join(args.out, "calibration.pt"))

    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    report = {"world": world, "cases": {}}
    for label in args.cases.split(","):
        t0 = time.time()
        cfg = config_for(label)
        dschf = HfDeepSpeedConfig(ds)  # keep alive: from_pretrained builds under zero.Init
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        res = {"partitioned": tuple(model.model.layers[0].self_attn.q_proj.weight.shape) == (0,)}
        ld.inject_adapters(model, cfg)
        engine, _, _, _ = deepspeed.initialize(model=model, config=ds,
                                               model_parameters=[q for q in model.parameters() if q.requires_grad])
        mods = adapter_modules(model)
        engine.eval()
        with torch.no_grad():
            before = engine(input_ids=eval_ids).logits.float()
        rep = ld.initialize_adapters(engine, cfg, mine, n_train=N_TRAIN, lr=LR, stats_dtype=torch.float64,
                                     progress=False)
        with torch.no_grad():
            at_init = engine(input_ids=eval_ids).logits.float()
        res["init_logit_change"] = (at_init - before).abs().max().item()
        res["passes"] = rep.passes
        res["solve_load"] = rep.solve_load
        res["owners"] = sorted({rep.plan.owner_of(n) for n, _ in mods}) if rep.plan else []
        keys = ["lora_A", "lora_B"] + (["lora_R"] if cfg.kind == "lora_xs" else [])
        params = [getattr(m, k) for _, m in mods for k in keys] + [m.weight for _, m in mods]
        full = read_full(params)
        nk = len(keys)
        facs = {n: {k: full[i * nk + j] for j, k in enumerate(keys)} for i, (n, _) in enumerate(mods)}
        for i, (n, _) in enumerate(mods):
            facs[n]["weight"] = full[len(mods) * nk + i]
        trainable = [q for q in model.parameters() if q.requires_grad]
        init_vals = read_full(trainable)

        engine.train()
        losses = []
        for _ in range(STEPS):
            out = engine(**train)
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.item())
        res["losses"] = losses
        after = read_full(trainable)
        # AdamW moves each entry by about lr per step: a master copy that missed the init would jump
        res["max_step_change_over_lr"] = max((a - b).abs().max().item() for a, b in zip(after, init_vals)) / LR
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=eval_ids).logits.float()
        save_dir = os.path.join(args.out, label)
        ld.save_adapter(engine, save_dir)
        res["seconds"] = time.time() - t0
        if rank == 0:
            torch.save({"factors": facs, "input_ids": eval_ids, "logits": logits,
                        "layer_info": rep.layer_info}, os.path.join(args.out, f"{label}.pt"))
            report["cases"][label] = res
        del engine, model, dschf
        dist.barrier()

    if rank == 0:
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()  # no gloo threads alive at interpreter exit


if __name__ == "__main__":
    main()
