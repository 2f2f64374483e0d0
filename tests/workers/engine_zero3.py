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
from lora_dist.comm import release_shm_buffers  # noqa: E402
from lora_dist.zero import read_full  # noqa: E402
from calib_data import (ACCEPTANCE_INIT, ACCEPTANCE_SAMPLES, METHODS, TARGETS, calibration_samples, lora_da_stats_bytes,  # noqa: E402
                        make_batches, uneven_shard)

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--out", required=True)
p.add_argument("--tag", required=True)
p.add_argument("--micro", type=int, default=2)
p.add_argument("--layer_groups", type=int, default=None)
p.add_argument("--reduce_every_step", action="store_true")
p.add_argument("--first_step_check", action="store_true")
p.add_argument("--r", type=int, default=4)
p.add_argument("--methods", default=",".join(METHODS), help="comma-separated keys of calib_data.METHODS")
p.add_argument("--uneven", action="store_true", help="contiguous shares proportional to rank + 1")
p.add_argument("--acceptance_model", default=None,
               help="also run issue 11's acceptance: LoRA-DA on this model under the formula budget")
p.add_argument("--local_rank", type=int, default=0)
args = p.parse_args()

deepspeed.init_distributed(dist_backend="gloo")
release_shm_buffers()
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


# as a DistributedSampler without shuffling gives it, or an uneven split (ranks run out at different steps)
shard = uneven_shard(calibration_samples(), rank, world) if args.uneven else calibration_samples()[rank::world]
batches = make_batches(shard, args.micro)
report = {}
for name, kw in [(n, METHODS[n]) for n in args.methods.split(",") if n]:
    cfg = ld.AdapterConfig(r=args.r, alpha=8, target_modules=TARGETS, seed=11, **kw)
    engine, keep = engine_for(cfg)
    rep = ld.initialize_adapters(engine, cfg, batches, layer_groups=args.layer_groups,
                                 reduce_every_step=args.reduce_every_step, progress=False)
    state = snapshot(engine.module)
    r = {"passes": rep.passes, "owner": rep.plan.owner, "sent": rep.reduce_bytes_per_rank,
         "stats_bytes_total": rep.stats_bytes_total,
         "predicted_sent": [sum(ws[r] for ws in rep.pass_plan.wire_sent) for r in range(world)]
         if rep.pass_plan else None,
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
if args.acceptance_model:
    # issue 11: budget = 1.25·total/N + 3 × the largest unit's statistics, from the shapes (+ the step)
    total, largest = lora_da_stats_bytes(256, 688, 5)
    budget = int(1.25 * total / world + 3 * largest)
    args.model = args.acceptance_model
    cfg = ld.AdapterConfig(r=6, alpha=8, target_modules=TARGETS, seed=11, **ACCEPTANCE_INIT)
    engine, keep = engine_for(cfg)
    batches = make_batches(uneven_shard(ACCEPTANCE_SAMPLES(), rank, world), 2)
    # the budget also holds one calibration micro-step (activations, gathered ZeRO-3 parameters),
    # which the engine measures and plans around: learn it from a first, unconstrained call, and
    # give twice that on top of the statistics formula (the measurement varies between calls)
    step = ld.initialize_adapters(engine, cfg, batches, memory_budget=10 ** 12, progress=False).calibration_step_bytes
    budget += 2 * step
    rep = ld.initialize_adapters(engine, cfg, batches, memory_budget=budget, progress=False)
    state = snapshot(engine.module)  # collective
    if rank == 0:
        torch.save(state, os.path.join(args.out, f"{args.tag}_acceptance.pt"))
        report["acceptance"] = {"budget": budget, "total_from_shapes": total, "passes": rep.passes,
                                "stats_bytes_total": rep.stats_bytes_total, "stats_peak": rep.stats_peak_bytes_per_rank,
                                "predicted_peak": rep.pass_plan.max_peak(), "sent": rep.bytes_sent_per_rank,
                                "collect_peak": rep.pass_plan.collect_peak, "step_bytes": rep.calibration_step_bytes,
                                "old_design": rep.old_design_bytes_per_rank}
if rank == 0:
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump(report, f, indent=1)
dist.barrier()
dist.destroy_process_group()  # no gloo threads alive at interpreter exit
