"""`python -m lora_dist.memory`: account one configuration.

Example::

    python -m lora_dist.memory --preset llama2-70b --mode lora_fa --cluster 2x8 --offload \\
        --seq-len 1024 --batch-size 4 --checkpointing

prints the parameter counts, the saved activations per module type, the per-GPU model states and
ZeRO buffers, the activation peak, the per-GPU peak, the largest micro-batch that fits and the host
RAM that offload needs (per node). --json prints the same as one JSON object. Errors (unknown
preset, impossible cluster, negative size...) exit with status 2 and a message naming the value.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

from ..config import ConfigError
from .activations import ALL_PROJ, CATEGORIES, MODES, MemoryConfigError, TrainSpec, list_presets, load_preset
from .budget import DEFAULT_RESERVE_GIB, UPDATE_RULES, plan_memory, update_rule_states
from .init_cost import InitSpec, init_cost
from .states import Cluster, GiB, ZeroConfig


def _gib(x: int) -> str:
    return f"{x / GiB:8.2f} GiB"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_dist.memory",
                                description="Per-GPU memory of one LoRA-family / full fine-tuning "
                                            "configuration under DeepSpeed ZeRO.")
    p.add_argument("--preset", required=True,
                   help=f"model config: one of {list_presets()} or a path to a config .json")
    p.add_argument("--mode", default="lora", help=f"one of {list(MODES)} (default lora)")
    p.add_argument("--r", type=int, default=16, help="adapter rank (default 16)")
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--target-modules", default=",".join(ALL_PROJ),
                   help="comma-separated module names to adapt (default: all projections)")
    p.add_argument("--adapter-dtype", default=None, help="adapter compute dtype (default: model dtype)")
    p.add_argument("--dtype", default="bfloat16", help="training precision: bfloat16 or float32")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1, help="micro-batch size per GPU")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every layer")
    p.add_argument("--zero-stage", type=int, default=3, help="2 or 3 (default 3)")
    p.add_argument("--offload", action="store_true",
                   help="offload optimizer states, and at stage 3 also parameters, to CPU")
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--offload-param", action="store_true")
    p.add_argument("--cluster", default=None, help="NODESxGPUS_PER_NODE, e.g. 2x8 (overrides --nodes)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpus", type=int, default=None, help="total GPUs (must be a multiple of --gpus-per-node)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU (A800-80GB: 80)")
    p.add_argument("--host-mem-gib", type=float, default=None, help="host RAM per node, to check offload")
    p.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE_GIB,
                   help="GPU memory not available to tensors (CUDA context, NCCL, fragmentation)")
    p.add_argument("--max-batch", type=int, default=32, help="largest micro-batch searched")
    p.add_argument("--grad-bytes", type=int, default=2, help="bytes per gradient element (bf16: 2)")
    p.add_argument("--reduce-bucket-size", type=int, default=500_000_000)
    p.add_argument("--full-depth", action="store_true", help="run every layer instead of extrapolating")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    u = p.add_argument_group("update rules (docs/update_rules.md)")
    u.add_argument("--update-rule", default="plain", choices=UPDATE_RULES,
                   help="plain (default); lora_fa (with --mode lora_fa: r×r P_A per layer); lora_pro (with "
                        "--mode lora: full-size moments on owner ranks, inner SGD)")
    u.add_argument("--lora-pro-moments", default=None, choices=("full", "none"),
                   help="LoRA-Pro's full rule (default) or its light variant without moments")
    u.add_argument("--lora-pro-moments-dtype", default="float32", choices=("float32", "bfloat16", "float64"))
    g = p.add_argument_group("data-aware init (docs/init_cost.md)")
    g.add_argument("--init", default=None, help="account this init too (e.g. lora_da): adds an 'init' object")
    g.add_argument("--init-samples", type=int, default=256, help="calibration samples (default 256)")
    g.add_argument("--init-seq-len", type=int, default=None, help="calibration length (default --seq-len)")
    g.add_argument("--init-micro-batch", type=int, default=1, help="calibration micro-batch per GPU (default 1)")
    g.add_argument("--init-stats-dtype", default=None, help="statistics dtype (default: the method's)")
    g.add_argument("--init-hook-dtype", default=None,
                   help="GEMM rate of the hook products: float64, float32, tf32 or bfloat16 (default: stats dtype)")
    g.add_argument("--init-budget-gib", type=float, default=None,
                   help="init memory budget per GPU (default: what the training step leaves free)")
    g.add_argument("--epoch-samples", type=int, default=100_000, help="training samples per epoch (default 100000)")
    return p


def _configure(args, parser):
    if args.preset not in list_presets() and not args.preset.endswith(".json"):
        parser.error(f"unknown preset {args.preset!r}; known presets: {list_presets()} "
                     f"(or give a path to a config .json)")
    try:
        config = load_preset(args.preset)
        spec = TrainSpec(mode=args.mode, batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype,
                         checkpointing=args.checkpointing, r=args.r, alpha=args.alpha,
                         target_modules=tuple(t for t in args.target_modules.split(",") if t),
                         adapter_dtype=args.adapter_dtype)
        ckw = dict(gpu_memory_gib=args.gpu_mem_gib, host_memory_gib=args.host_mem_gib)
        if args.cluster:
            cluster = Cluster.parse(args.cluster, **ckw)
        elif args.gpus is not None:
            cluster = Cluster.from_total(args.gpus, args.gpus_per_node, **ckw)
        else:
            cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, **ckw)
        off_opt = args.offload or args.offload_optimizer
        off_par = args.offload_param or (args.offload and args.zero_stage == 3)
        zero = ZeroConfig(stage=args.zero_stage, offload_optimizer=off_opt, offload_param=off_par,
                          grad_bytes=args.grad_bytes, reduce_bucket_size=args.reduce_bucket_size)
        if args.lora_pro_moments is not None and args.update_rule != "lora_pro":
            raise MemoryConfigError(f"--lora-pro-moments applies to --update-rule lora_pro, "
                                    f"not {args.update_rule}")
        rule = update_rule_states(config, spec, cluster.world_size, args.update_rule,
                                  args.lora_pro_moments or "full", args.lora_pro_moments_dtype)
    except MemoryConfigError as e:
        parser.error(str(e))
    except (OSError, ValueError) as e:
        parser.error(f"cannot load preset {args.preset!r}: {e}")
    return config, spec, cluster, zero, rule


def _init(args, config, plan):
    """The init's InitCost for --init, or None."""
    if not args.init:
        return None
    spec = InitSpec(method=args.init, samples=args.init_samples, seq_len=args.init_seq_len or args.seq_len,
                    micro_batch=args.init_micro_batch, r=args.r, stats_dtype=args.init_stats_dtype,
                    hook_dtype=args.init_hook_dtype, compute_dtype=args.dtype)
    budget = None if args.init_budget_gib is None else int(args.init_budget_gib * GiB)
    return init_cost(plan, config, spec, epoch_samples=args.epoch_samples, budget=budget)


def _print_init(ic) -> None:
    s = ic.summary
    print(f"init {s['method']}: {s['samples']} samples x {s['seq_len']} tokens, statistics in {s['stats_dtype']}, "
          f"hook GEMMs at the {s['hook_dtype']} rate")
    print(f"    budget {_gib(s['budget_bytes']).strip()}, peak {_gib(s['peak_bytes']).strip()} on top of the "
          f"states ({'fits' if s['fits'] else 'OUT OF MEMORY'}), {s['passes']} pass(es)")
    print(f"    statistics {_gib(s['stats_bytes_total']).strip()} in all, "
          f"{_gib(s['stats_bytes_max_rank']).strip()} max per rank; "
          f"wire {_gib(s['wire_bytes_per_rank']).strip()} sent per rank")
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds_parts"].items())
    print(f"    {s['seconds']:.0f} s ({parts}) = {100 * s['fraction_of_epoch']:.2f}% of an epoch of "
          f"{s['epoch_samples']} samples ({s['epoch_seconds']:.0f} s)")


def _print_rule(rule: dict) -> None:
    if rule["rule"] == "lora_fa":
        print(f"update rule lora_fa: P_A = (AAᵀ+δI)⁻¹, r×r float64 per adapted layer, replicated: "
              f"{rule['projection_bytes']:,} bytes per GPU (negligible)")
    elif rule["rule"] == "lora_pro" and rule["moments"] == "none":
        print("update rule lora_pro, light variant (no moments): no state of size d_out·d_in")
    elif rule["rule"] == "lora_pro":
        print(f"update rule lora_pro: full-size moments {_gib(rule['moment_bytes_total']).strip()} in all, "
              f"{_gib(rule['moment_bytes_per_rank']).strip()} on the largest owner rank (in the states above; "
              f"Adam states 0: the inner step is SGD); step temporaries "
              f"{_gib(rule['step_transient_bytes']).strip()} (after backward: the peak takes the larger of "
              f"them and the activation peak)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config, spec, cluster, zero, rule = _configure(args, parser)
    t0 = time.time()
    try:
        plan = plan_memory(config, spec, cluster, zero, reserve_gib=args.reserve_gib, max_batch=args.max_batch,
                           full_depth=args.full_depth, update_rule=rule)
        ic = _init(args, config, plan)
    except (MemoryConfigError, ConfigError) as e:  # ConfigError: the adapter injection (e.g. r too large)
        parser.error(str(e))
    dt = time.time() - t0
    s = plan.summary()
    s["preset"] = args.preset
    s["seconds"] = round(dt, 2)
    if ic is not None:
        s["init"] = ic.to_dict()
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    b = spec.batch_size
    prof = plan.profile
    print(f"{args.preset}: {spec.label()}, {spec.dtype}, seq {spec.seq_len} x micro-batch {b}, "
          f"{zero.label()} on {cluster.label()} ({cluster.world_size} GPUs of {cluster.gpu_memory_gib:g} GiB)")
    print(f"parameters: {plan.params.total:,} total, {plan.params.trainable:,} trainable, "
          f"{plan.params.frozen:,} frozen")
    print(f"saved activations (micro-batch {b}): {_gib(plan.activations(b))}")
    if b == 1:
        for c in CATEGORIES:
            v = prof.by_category_b1.get(c, 0)
            if v:
                print(f"    {c:12s} {_gib(v)}")
        if prof.by_category_b1.get("adapters", 0):
            ain = prof.adapter_input_bytes_b1
            print(f"    (adapters = {_gib(ain).strip()} of adapter inputs x not already saved by the base "
                  f"+ {_gib(prof.by_category_b1['adapters'] - ain).strip()} of narrow intermediates such as x·Aᵀ)")
    print(f"activation peak (saved + backward transients): {_gib(prof.act_peak(b))}")
    print("per GPU:")
    for k, v in plan.states.gpu.items():
        print(f"    {k:18s} {_gib(v)}")
    print(f"    {'model states':18s} {_gib(plan.states.gpu_states)}")
    print(f"    {'peak':18s} {_gib(plan.peak(b))}   (usable {_gib(plan.usable_bytes).strip()}: "
          f"{'fits' if plan.fits(b) else 'OUT OF MEMORY'})")
    mb = plan.max_micro_batch
    print(f"largest micro-batch that fits (<= {plan.max_batch}): {mb if mb else 'none (OOM at 1)'}")
    if plan.states.host:
        hf = plan.host_fits
        extra = "" if hf is None else (" (fits)" if hf else f" (EXCEEDS {cluster.host_memory_gib:g} GiB)")
        print(f"host RAM for offload: {_gib(plan.states.host_per_rank).strip()} per rank, "
              f"{_gib(plan.host_per_node).strip()} per node{extra}")
    else:
        print("host RAM for offload: none (no offload)")
    _print_rule(rule)
    if ic is not None:
        _print_init(ic)
    print(f"[activations: {prof.method}, {dt:.1f} s]")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
