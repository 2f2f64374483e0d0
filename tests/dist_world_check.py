"""Launched by tests/job/test_slurm.py through the per-node DeepSpeed command (one process per "node"),
and run as a single process by tests/job/test_ds_config.py.

Joins torch.distributed via deepspeed.init_distributed(), all-reduces the ranks, and for each
--ds_config trains a tiny Llama for a few steps with that config (its "auto" values filled by
lora_dist.job.ds_config). Writes what it saw to OUT/rank<R>.json for the test to check.
"""

import argparse
import json
import os

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=None)  # appended by the deepspeed launcher
parser.add_argument("--out", required=True)
parser.add_argument("--ds_config", action="append", default=[], help="may repeat: one run per config")
parser.add_argument("--steps", type=int, default=4)
args = parser.parse_args()

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
total = torch.tensor([float(rank + 1)])
dist.all_reduce(total)
result = {
    "rank": rank,
    "world_size": world,
    "rank_sum": total.item(),
    "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")},
    "local_rank_arg": args.local_rank,
}



def run_config(path: str) -> dict:
    """Train the q/v projections of a seeded tiny Llama for --steps optimizer steps under `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_dist.job.demo import preset_config
    from lora_dist.job.ds_config import prepare_ds_config

    preset = preset_config("tiny-llama")
    config = prepare_ds_config(
        path, world_size=world, train_batch_size=4, micro_batch_size=1, lr=1e-3, weight_decay=0.0,
        betas=(0.9, 0.999), eps=1e-8, warmup_steps=1, total_steps=args.steps, bf16=False, gradient_clipping=1.0,
        hidden_size=preset["hidden_size"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_dict(preset))
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(("q_proj.weight", "v_proj.weight")))
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
    )
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as with a sharded dataset
    batch = torch.randint(3, preset["vocab_size"], (1, 16), generator=gen)
    losses, lrs = [], []
    for _ in range(args.steps * engine.gradient_accumulation_steps()):
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        lrs.append(engine.get_lr()[0])
    q = engine.module.model.layers[0].self_attn.q_proj.weight
    stage = engine.zero_optimization_stage()
    if stage == 3:
        local, full = q.ds_tensor.numel(), q.ds_numel
        with deepspeed.zero.GatheredParameters([q]):
            checksum = q.detach().double().sum()
    else:
        local = full = q.numel()
        checksum = q.detach().double().sum()
    sums = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(sums, checksum.reshape(1))
    return {
        "zero_stage": stage,
        "train_batch_size": engine.train_batch_size(),
        "micro_batch": engine.train_micro_batch_size_per_gpu(),
        "grad_accum": engine.gradient_accumulation_steps(),
        "offload_optimizer": bool(engine.zero_offload_optimizer()),
        "offload_param": bool(engine.zero_offload_param()),
        "optimizer": type(engine.basic_optimizer).__name__,
        "losses": losses,
        "lrs": lrs,
        "q_local_numel": local,
        "q_full_numel": full,
        "q_checksums": [s.item() for s in sums],
    }


result["ds"] = {path: run_config(path) for path in args.ds_config}

os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
dist.barrier()
