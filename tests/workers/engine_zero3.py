"""ZeRO-3 worker for the engine: initialize_adapters on a DeepSpeedEngine, each rank with its own
shard of the calibration samples; writes the resulting adapters and base weights (rank 0) and checks
that the first step after init equals a step from a fresh engine loaded with the same values."""
import argparse
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora_dist as ld  # noqa: E402
from lora_dist.zero import read_full  # noqa: E402
from calib_data import METHODS, TARGETS, calibration_samples, make_batches  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--out", required=True)
p.add_argument("--tag", required=True)
p.add_argument("--micro", type=int, default=2)
p.add_argument("--layer_groups", type=int, default=None)
p.add_argument("--reduce_every_step", action="store_true")
p.add_argument("--first_step_check", action="store_true")
p.add_argument("--local_rank", type=int, default=0)
args = p.parse_args()

deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True, "weight_decay": 0.0}},
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10 ** 6}

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402


def engine_for(cfg, adapter_dir=None):
    keep = HfDeepSpeedConfig(DS)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if adapter_dir:
        ld.load_adapter(model, adapter_dir)
    else:
        ld.inject_adapters(model, cfg)
    engine, *_ = deepspeed.initialize(model=model, config=DS,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    return engine, keep


def snapshot(model):
    mods = ld.adapter_modules(model)
    params = [p for _, m in mods for p in m.adapter_params().values()] + [m.weight for _, m in mods]
    names = [f"{n}.{k}" for n, m in mods for k in m.adapter_params()] + [f"{n}.weight" for n, _ in mods]
    return dict(zip(names, read_full(params)))


shard = calibration_samples()[rank::world]  # as a DistributedSampler without shuffling gives it
batches = make_batches(shard, args.micro)
report = {}
for name, kw in METHODS.items():
    cfg = ld.AdapterConfig(r=4, alpha=8, target_modules=TARGETS, seed=11, **kw)
    engine, keep = engine_for(cfg)
    rep = ld.initialize_adapters(engine, cfg, batches, layer_groups=args.layer_groups,
                                 reduce_every_step=args.reduce_every_step, progress=False)
    state = snapshot(engine.module)
    r = {"passes": rep.passes, "owner": rep.plan.owner, "sent": rep.reduce_bytes_per_rank,
         "allreduce": rep.allreduce_bytes_per_rank, "stats_peak": rep.stats_peak_bytes_per_rank,
         "phases": rep.phases_per_rank, "solve_load": rep.solve_load,
         "no_optimizer_state": len(engine.optimizer.optimizer.state) == 0,
         "grads_none": all(p.grad is None for p in engine.module.parameters())}
    if args.first_step_check:
        adir = os.path.join(args.out, f"{args.tag}_{name}_adapter")
        ld.save_adapter(engine, adir)
        g = torch.Generator().manual_seed(50 + rank)
        ids = torch.randint(1, 128, (2, 12), generator=g)
        step_batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        engine.train()
        loss = engine(**step_batch).loss
        engine.backward(loss)
        engine.step()
        after_a = snapshot(engine.module)
        fresh, keep2 = engine_for(cfg, adapter_dir=adir)
        fresh.train()
        loss_b = fresh(**step_batch).loss
        fresh.backward(loss_b)
        fresh.step()
        after_b = snapshot(fresh.module)
        r["first_step_loss"] = [loss.item(), loss_b.item()]
        r["first_step_max_diff"] = max((after_a[k] - after_b[k]).abs().max().item() for k in after_a)
        r["first_step_moved"] = max((after_a[k] - state[k]).abs().max().item() for k in after_a)
        del fresh, keep2
    if rank == 0:
        torch.save(state, os.path.join(args.out, f"{args.tag}_{name}.pt"))
        report[name] = r
    del engine, keep
    dist.barrier()
if rank == 0:
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump(report, f, indent=1)
