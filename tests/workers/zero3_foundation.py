"""2-rank ZeRO-3 worker for the foundation checks; every kind in one launch, one JSON report.

For each kind: load a tiny Llama under zero.Init (HfDeepSpeedConfig + from_pretrained), inject,
deepspeed.initialize, train a few steps, then check frozen weights, optimizer membership, save a PEFT
adapter, and merge. The parent test compares the saved adapter in stock PEFT.
"""
import argparse
import json
import os

import deepspeed
import torch
import torch.distributed as dist

import lora_dist as ld
from lora_dist.comm import release_shm_buffers
from lora_dist.zero import is_partitioned, read_full

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--out", required=True)
p.add_argument("--kinds", default="lora,lora_fa,dora,vera,tied_lora")
p.add_argument("--local_rank", type=int, default=0)
args = p.parse_args()

deepspeed.init_distributed(dist_backend="gloo")
release_shm_buffers()
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(1234)

DS = {
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
    "train_batch_size": 2 * world,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True, "weight_decay": 0.0}},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 1000, "wall_clock_breakdown": False,
}


def batch(seed, n=2, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


report = {}
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

for kind in args.kinds.split(","):
    dschf = HfDeepSpeedConfig(DS)  # keep alive: makes from_pretrained build under zero.Init
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    q = model.model.layers[0].self_attn.q_proj
    res = {"zero_init_shape": list(q.weight.shape), "ds_shape": list(q.weight.ds_shape)}
    cfg = ld.AdapterConfig(kind=kind, r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"], seed=3)
    names = ld.inject_adapters(model, cfg)
    res["n_adapted"] = len(names)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    before = read_full(frozen)
    engine, opt, _, _ = deepspeed.initialize(model=model, config=DS,
                                             model_parameters=[p for p in model.parameters() if p.requires_grad])
    trainable = [p for p in model.parameters() if p.requires_grad]
    res["adapters_partitioned"] = all(is_partitioned(p) and p.shape == (0,) for p in trainable)
    in_opt = {id(p) for g in engine.optimizer.fp16_groups for p in g}
    res["trainable_in_optimizer"] = all(id(p) in in_opt for p in trainable)
    res["frozen_in_optimizer"] = sum(id(p) in in_opt for p in frozen)
    res["n_trainable"] = sum(p.ds_numel for p in trainable)
    res["n_optimizer_numel"] = sum(p.ds_numel for g in engine.optimizer.fp16_groups for p in g)
    engine.train()
    losses = []
    for step in range(8):
        out = engine(**batch(100 + rank))
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    res["losses"] = losses
    after = read_full(frozen)
    res["frozen_max_change"] = max((a - b).abs().max().item() for a, b in zip(after, before))
    engine.eval()
    ev = batch(7, n=2, t=10)
    with torch.no_grad():
        logits = engine(input_ids=ev["input_ids"]).logits.float()
    save_dir = os.path.join(args.out, kind)
    # a directory holding a foreign file: refused on every rank (rank 0 decides) before any gather,
    # so the ranks stay in step and the save below works
    refused = os.path.join(args.out, f"{kind}_used")
    if rank == 0:
        os.makedirs(refused)
        with open(os.path.join(refused, "metrics.jsonl"), "w") as f:
            f.write("{}\n")
    dist.barrier()
    try:
        ld.save_adapter(engine, refused)
        err = None
    except ld.ConfigError as e:
        err = str(e)
    errors = [None] * world
    dist.all_gather_object(errors, err)
    res["refusals"] = [m is not None and "'metrics.jsonl'" in m for m in errors]
    res["refused_dir"] = sorted(os.listdir(refused))
    ld.save_adapter(engine, save_dir)
    w_before = read_full([q.weight])[0]
    ld.merge_adapters(engine)
    w_after = read_full([q.weight])[0]
    with torch.no_grad():
        merged_logits = engine(input_ids=ev["input_ids"]).logits.float()
    res["merge_logit_diff"] = (merged_logits - logits).abs().max().item()
    res["merge_changed_weight"] = (w_after - w_before).abs().max().item()
    if rank == 0:
        torch.save({"input_ids": ev["input_ids"], "logits": logits}, os.path.join(save_dir, "expected.pt"))
        report[kind] = res
    del engine, opt, model, dschf
    dist.barrier()

if rank == 0:
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
dist.barrier()
dist.destroy_process_group()  # no gloo threads alive at interpreter exit
