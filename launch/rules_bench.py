"""Update rules side by side against plain LoRA, in ONE DeepSpeed ZeRO-3 launch (issue 12).

    DS_ACCELERATOR=cpu python launch/rules_bench.py --preset small-llama --repeats 7
    DS_ACCELERATOR=cpu python launch/rules_bench.py --quick          # tiny preset, seconds (the test)

Every rank builds one engine per rule (plain LoRA with AdamW, LoRA-FA's projection with AdamW,
LoRA-Pro's full rule with its inner SGD, LoRA-Pro light with AdamW, LoRA+ at ratio 16 with AdamW),
takes one untimed warm-up step with each, then runs `--repeats` rounds; a round times one optimizer
step (forward, backward, LoRA-Pro's adjust_gradients, step, between two barriers) of every rule, in
an order rotated from round to round, on the same batch. The table gives each rule's median step,
its ratio to plain's median from the same rounds, and the median and range of the per-round ratios
rule/plain, which show the noise: on a shared machine only this interleaving makes the rules
comparable.

Memory per rank is what each engine holds across steps for the adapters, read from the live
objects after the last step (largest rank): the fp32 master partitions, the
inner optimizer's state (Adam's m, v; none for SGD), and the rule's own state (LoRA-Pro's full-size
moments on their owner ranks; LoRA-FA's r×r G_A and P_A per layer). Activations, gradient
partitions and the frozen model are the same for every rule but LoRA-FA (no A) and are left out. Below the table: LoRA-Pro's moment memory at
7B/13B/70B from the memory tool (`lora_dist.memory.budget.update_rule_states`, one accounting).
The last line is `JSON {...}` with every number, for scripts and tests.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (label, kind, update_rule, update_options, loraplus ratio, inner optimizer)
RULES = {
    "plain": ("plain LoRA", "lora", "plain", {}, None, "adamw"),
    "lora_fa": ("LoRA-FA (projected g_B)", "lora_fa", "lora_fa", {}, None, "adamw"),
    "lora_pro": ("LoRA-Pro full", "lora", "lora_pro", {}, None, "sgd"),
    "lora_pro_light": ("LoRA-Pro light", "lora", "lora_pro", {"moments": "none"}, None, "adamw"),
    "loraplus": ("LoRA+ (ratio 16)", "lora", "plain", {}, 16.0, "adamw"),
}
LR = 1e-3


def _bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _engine(name, model_dir, r, world, micro):
    """One ZeRO-3 engine for rule `name`; returns (engine, LoRAPro or None, RuleHandle or None)."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    import lora_dist as ld
    from lora_dist import update_rules as ur

    _, kind, rule, opts, ratio, inner = RULES[name]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = ld.AdapterConfig(kind=kind, r=r, alpha=2.0 * r, target_modules=ALL, seed=3, update_rule=rule,
                           update_options=dict(opts), loraplus_lr_ratio=ratio)
    ld.inject_adapters(model, cfg)
    groups = ur.param_groups(model, cfg, LR)
    ds = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
          "train_batch_size": micro * world, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    if inner == "adamw":
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": LR, "torch_adam": True, "weight_decay": 0.0}}
    else:
        ds["zero_allow_untested_optimizer"] = True
    ur.check_ds_config(ds, cfg, groups)
    client = ur.inner_optimizer(groups) if inner == "sgd" else None
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=client, config=ds)
    full_pro = rule == "lora_pro" and cfg.update_option("moments") == "full"
    pro = ur.LoRAPro(engine) if full_pro else None
    handle = ur.attach_update_rule(engine) if rule != "plain" and not full_pro else None
    return engine, pro, handle


def _step(engine, pro, ids) -> float:
    import torch.distributed as dist
    dist.barrier()
    t0 = time.perf_counter()
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    if pro is not None:
        pro.adjust_gradients()
    engine.step()
    dist.barrier()
    return time.perf_counter() - t0


def _memory(engine, pro, handle) -> dict:
    """This rank's adapter-side bytes: fp32 master partitions, optimizer state, rule state."""
    import torch
    zero_opt = engine.optimizer
    inner = zero_opt.optimizer
    # ZeRO-3 hands its inner optimizer the flat fp32 partitions only during step(); read them here
    masters = getattr(zero_opt, "fp32_partitioned_groups_flat", None) or \
        [p for g in inner.param_groups for p in g["params"]]
    state = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    rule = pro.moment_bytes() if pro is not None else 0
    if handle is not None:
        rule += _bytes([t for gp in handle.layers.values() for t in gp])
    return {"master": _bytes(masters), "optimizer": _bytes(state), "rule_state": rule}


def worker(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    names = args.rules.split(",")
    micro = args.batch // world
    engines = {n: _engine(n, args.model, args.r, world, micro) for n in names}
    vocab = engines[names[0]][0].module.config.vocab_size
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g) for _ in range(args.repeats + 1)]
    times = {n: [] for n in names}
    for k, ids in enumerate(batches):
        mine = ids[rank * micro:(rank + 1) * micro]
        order = names[k % len(names):] + names[:k % len(names)]  # rotate: no rule always runs first
        for n in order:
            dt = _step(engines[n][0], engines[n][1], mine)
            if k > 0:  # round 0 is the warm-up (allocations, first-step branches)
                times[n].append(dt)
    mem = {n: _memory(*engines[n]) for n in names}
    every = [None] * world
    dist.all_gather_object(every, mem)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"times": times, "memory_by_rank": every, "world": world}, f)
    dist.barrier()


def moment_rows(r: int = 16) -> list:
    """LoRA-Pro's full-size moments (fp32) at 7B/13B/70B, all-linear, from the memory tool."""
    from lora_dist.memory.activations import TrainSpec, load_preset
    from lora_dist.memory.budget import update_rule_states

    rows = []
    for preset in ("llama2-7b", "llama2-13b", "llama2-70b"):
        spec = TrainSpec(mode="lora", r=r, target_modules=tuple(ALL))
        st = {w: update_rule_states(load_preset(preset), spec, w, "lora_pro") for w in (8, 16)}
        rows.append({"preset": preset, "total": st[8]["moment_bytes_total"],
                     "per_rank_8": st[8]["moment_bytes_per_rank"], "per_rank_16": st[16]["moment_bytes_per_rank"],
                     "transient_16": st[16]["step_transient_bytes"]})
    return rows


def summarize(raw: dict) -> dict:
    """Median step per rule, its ratio to plain's median, the median and range of the per-round
    ratios rule/plain (the noise), and per-rank memory (largest rank) with ratios."""
    med = {n: statistics.median(ts) for n, ts in raw["times"].items()}
    rows = {}
    for n in raw["times"]:
        parts = {k: max(m[n][k] for m in raw["memory_by_rank"]) for k in ("master", "optimizer", "rule_state")}
        total = max(sum(m[n].values()) for m in raw["memory_by_rank"])
        paired = [t / t0 for t, t0 in zip(raw["times"][n], raw["times"]["plain"])]  # same round
        rows[n] = {"median_step_s": med[n], "step_ratio": med[n] / med["plain"],
                   "paired_ratio_median": statistics.median(paired), "paired_ratio_min": min(paired),
                   "paired_ratio_max": max(paired), "memory_bytes": total, **parts}
    for n in rows:
        rows[n]["memory_ratio"] = rows[n]["memory_bytes"] / rows["plain"]["memory_bytes"]
    return rows


def _print(rows: dict, moments: list, raw: dict, args) -> None:
    mib = 2 ** 20
    print(f"{args.preset}, all-linear r = {args.r}, {raw['world']} ZeRO-3 ranks, global batch {args.batch} x "
          f"{args.seq} tokens, {args.repeats} interleaved rounds (medians)")
    print("| rule | step ms | step / plain | per-round ratio: median [min, max] | state MiB per rank | state / plain "
          "| fp32 master | Adam states | rule state |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, x in rows.items():
        print(f"| {RULES[n][0]} | {1e3 * x['median_step_s']:.1f} | {x['step_ratio']:.3f} | "
              f"{x['paired_ratio_median']:.2f} [{x['paired_ratio_min']:.2f}, {x['paired_ratio_max']:.2f}] | "
              f"{x['memory_bytes'] / mib:.4f} | {x['memory_ratio']:.3f} | {x['master'] / mib:.4f} | "
              f"{x['optimizer'] / mib:.4f} | {x['rule_state'] / mib:.4f} |")
    print("\nLoRA-Pro full-size moments (fp32, all-linear, r = 16; `python -m lora_dist.memory --update-rule lora_pro`):")
    print("| model | total | per rank, 8 GPUs | per rank, 16 GPUs | step temporaries |")
    print("|---|---|---|---|---|")
    for m in moments:
        print(f"| {m['preset']} | {m['total'] / 2 ** 30:.2f} GiB | {m['per_rank_8'] / 2 ** 30:.2f} GiB | "
              f"{m['per_rank_16'] / 2 ** 30:.2f} GiB | {m['transient_16'] / 2 ** 30:.2f} GiB |")
    print("JSON " + json.dumps({"rules": rows, "moments": moments, "times": raw["times"], "world": raw["world"],
                                "memory_by_rank": raw["memory_by_rank"],
                                "preset": args.preset, "r": args.r}))


def _remove_shm(port: int) -> None:
    """Delete the CPU shm all-reduce buffers this launch created (/dev/shm, ~66 MB per rank, named
    after the master port): DeepSpeed's shm comm op never unlinks them, and on a shared machine they
    pile up in RAM."""
    import glob
    for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.remove(f)
        except OSError:
            pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small-llama", help="a buildable demo preset (small-llama, tiny-llama)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (each times every rule once)")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences), split over the ranks")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--quick", action="store_true", help="tiny-llama, batch 4 x 16 tokens, 3 rounds")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.preset, args.batch, args.seq, args.repeats = "tiny-llama", 4, 16, 3
    names = args.rules.split(",")
    if names[0] != "plain" or any(n not in RULES for n in names):
        p.error(f"--rules must start with plain and name rules from {list(RULES)}, got {args.rules!r}")
    if args.repeats < 1 or args.world < 1 or args.batch % args.world:
        p.error(f"need --repeats >= 1 and --batch ({args.batch}) divisible by --world ({args.world})")
    from lora_dist.job.demo import ensure_preset
    model_dir = str(ensure_preset(args.preset))
    out = os.path.join(tempfile.mkdtemp(), "rules_bench.json")
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(args.world),
           "--master_port", str(port), os.path.abspath(__file__), "--worker", "--model", model_dir, "--out", out,
           "--rules", args.rules, "--repeats", str(args.repeats), "--batch", str(args.batch),
           "--seq", str(args.seq), "--r", str(args.r)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    finally:
        _remove_shm(port)
    if proc.returncode != 0:
        sys.stderr.write((proc.stdout + proc.stderr)[-6000:])
        print(f"error: the {args.world}-rank benchmark launch failed (exit code {proc.returncode})", file=sys.stderr)
        return 1
    with open(out) as f:
        raw = json.load(f)
    _print(summarize(raw), moment_rows(), raw, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
