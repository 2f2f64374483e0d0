"""Benchmark of the distributed init engine (prints a table; not a test).

    python launch/init_bench.py                      # defaults: LoRA-DA and PiSSA on a 4-layer h=512 Llama
    python launch/init_bench.py --init lora_da --layers 6

It launches itself with the real DeepSpeed launcher (CPU: DS_ACCELERATOR=cpu, gloo) and measures,
side by side in one run:
  1. solve-phase speedup, 2 ranks vs 1, for each init given (one thread per rank in both, so the
     comparison is of the distribution, not of BLAS threading): Σ over rounds of the slowest rank's
     solve time. Each launch runs the init once to warm up (one-time library loading, ~1-2 s per
     process, which every rank pays whatever the world size) and then --repeats times; the median
     is used. Next to it, the machine's own ceiling: how much faster 2 concurrent one-thread GEMM
     processes get through the work than 1 (2.0 on two free cores; ~1.6 on the 2-vCPU development
     VM, whose vCPUs share execution units, which caps a compute-bound solve's speedup there);
  2. per-rank peak memory of init versus one training step on the same config: the peak of heap
     bytes in use (glibc mallinfo2: what CPU tensors occupy, whatever the allocator keeps cached),
     sampled by a thread during the phase, minus the level just before it (the engine's own
     lora_dist.engine.footprint.LivePeak, which also sizes the calibration step); each phase runs once to
     warm up (lazy library loads, first-touch buffers) and is measured the second time. No layer
     groups: (a) memory_budget = the training step's measured peak: the passes it takes (planned
     under that budget minus one calibration micro-step, which the engine measures) and init
     peak / train-step peak (≤ 1 is the acceptance); (b) the default budget: the measured statistics peak per rank against
     total/N (and total/N + the largest unit);
  3. bytes each rank sent moving statistics to their owners (rows to owners, or local sums reduced),
     against the earlier design on the same run and plan (local sums of every unit, reduced once).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default="lora_da,pissa", help="comma-separated; the first is used for memory")
    p.add_argument("--kind", default="lora_fa")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1376)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--layer_groups", type=int, default=None,
                   help="passes for the memory comparison (default: one per round, the least memory)")
    p.add_argument("--calib_micro", type=int, default=1,
                   help="calibration sub-batch for the memory comparison (statistics do not depend on it)")
    p.add_argument("--repeats", type=int, default=3,
                   help="measured init runs per launch for the speedup (after one warm-up); the median is used")
    p.add_argument("--speed_only", action="store_true", help="only the solve-speedup comparison (part 1)")
    p.add_argument("--memory_only", action="store_true", help="only the memory and wire comparison (parts 2-3)")
    p.add_argument("--precision", action="store_true",
                   help="only the hook-product precision measurement (float64 vs fp32 products of bf16 rows)")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    p.add_argument("--worker", choices=["init", "train"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report", default=None, help=argparse.SUPPRESS)
    p.add_argument("--groups", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--calib_micro_used", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for k in ("hidden", "ffn", "layers", "r", "samples", "seq", "micro", "repeats"):
        if getattr(a, k) <= 0:
            p.error(f"--{k} must be positive, got {getattr(a, k)}")
    return a


def _batches(args, rank, world, vocab):
    import torch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.samples, args.seq), generator=g)
    mine = ids[rank::world]
    out = []
    for s in range(0, len(mine), args.micro):
        x = mine[s:s + args.micro]
        lab = x.clone()
        lab[:, : args.seq // 4] = -100  # a prompt without loss
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": lab})
    return out


def worker(args):
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    sys.path.insert(0, REPO)
    import lora_dist as ld
    from lora_dist.comm import release_shm_buffers
    from lora_dist.engine.footprint import LivePeak

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    release_shm_buffers()  # DeepSpeed leaves its /dev/shm buffers behind otherwise
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1,
          "train_batch_size": args.micro * world,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
          "zero_optimization": {"stage": 3}, "steps_per_print": 10 ** 9}
    keep = HfDeepSpeedConfig(ds)  # noqa: F841  (from_pretrained builds under zero.Init)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    init = args.init if args.worker == "init" else "kaiming"
    opts = {"n_train": 10000} if init == "lora_da" else {}
    cfg = ld.AdapterConfig(kind=args.kind, init=init, r=args.r, alpha=2 * args.r, target_modules=TARGETS,
                           init_options=opts)
    ld.inject_adapters(model, cfg)
    engine, *_ = deepspeed.initialize(model=model, config=ds,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    batches = _batches(args, rank, world, model.config.vocab_size)
    result = {"rank": rank, "world": world}
    # Heap polling only in the memory runs: its thread would take CPU from the timed solves (with
    # 2 ranks on 2 cores it competes with the other rank's solve and skews the speedup).
    measure_memory = args.worker == "train" or args.measure
    heap = LivePeak(torch.device("cpu")) if measure_memory else contextlib.nullcontext()

    def phase():
        if args.worker == "init":
            return ld.initialize_adapters(engine, cfg, batches, layer_groups=args.groups, progress=False,
                                          micro_batch=args.calib_micro_used, memory_budget=args.budget)
        engine.train()
        out = engine(**batches[0])
        engine.backward(out.loss)
        engine.step()

    # One warm-up run (one-time library loading), then measured runs: `repeats` of them for the
    # speedup (the median; shared machines are noisy), one for memory.
    runs = []
    for attempt in range(1 + (1 if measure_memory else args.repeats)):
        dist.barrier()
        with heap:
            rep = phase()
        if args.worker == "init":
            runs.append(rep)
    if measure_memory:
        result["heap_rise_mib"] = heap.rise / 2 ** 20
    if args.worker == "init":
        measured = sorted(runs[1:], key=lambda rp: rp.solve_wall)
        rep = measured[len(measured) // 2]  # the median run (the slower middle one for an even count)
        result.update(first_run_solve_wall=runs[0].solve_wall, solve_walls=[rp.solve_wall for rp in runs[1:]],
                      solve_wall=rep.solve_wall, solve_load=rep.solve_load, sent=rep.reduce_bytes_per_rank,
                      allreduce=rep.allreduce_bytes_per_rank, stats_peak=rep.stats_peak_bytes_per_rank,
                      passes=rep.passes, n_layers=rep.n_layers, phases=rep.phases_per_rank,
                      balance=rep.plan.balance(), old_design=rep.old_design_bytes_per_rank,
                      stats_total=rep.stats_bytes_total,
                      budget=rep.pass_plan.budget if rep.pass_plan else None,
                      step_bytes=rep.calibration_step_bytes,
                      predicted_peak=rep.pass_plan.max_peak() if rep.pass_plan else None,
                      largest_unit=max((u.stats_bytes for u in rep.pass_plan.units.values()), default=0)
                      if rep.pass_plan else None)
    all_results = [None] * world
    dist.all_gather_object(all_results, result)
    if rank == 0:
        with open(args.report, "w") as f:
            json.dump(all_results, f)
    dist.barrier()
    dist.destroy_process_group()  # no gloo threads left running at interpreter exit


def launch(args, nproc, mode, model_dir, report, groups=None, budget=None, measure=False):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runner = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    runner = [runner] if os.path.exists(runner) else [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd = runner + ["--num_gpus", str(nproc),
           "--master_port", str(port), os.path.abspath(__file__), "--worker", mode, "--model", model_dir,
           "--report", report, "--init", args.init, "--kind", args.kind, "--r", str(args.r),
           "--samples", str(args.samples), "--seq", str(args.seq), "--micro", str(args.micro),
           "--repeats", str(args.repeats)]
    if groups:
        cmd += ["--groups", str(groups)]
    if budget:
        cmd += ["--budget", str(int(budget))]
    if measure:
        cmd += ["--measure", "--calib_micro_used", str(args.calib_micro)]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"benchmark launch failed ({' '.join(cmd)}):\n{(p.stdout + p.stderr)[-4000:]}")
    with open(report) as f:
        return json.load(f)


_GEMM_PROBE = """
import time, torch
torch.set_num_threads(1)
a = torch.randn(1024, 1024, dtype=torch.float64); b = torch.randn(1024, 1024, dtype=torch.float64)
a @ b
t = time.perf_counter()
for _ in range(12):
    a @ b
print(time.perf_counter() - t)
"""


def machine_ceiling():
    """Throughput of 2 concurrent one-thread fp64 GEMM processes relative to one: the most a 2-rank
    compute-bound solve can gain on this machine (2.0 on two free cores; less where the two cores
    share execution units or memory bandwidth, e.g. SMT siblings or a busy host)."""
    def run(n):
        ps = [subprocess.Popen([sys.executable, "-c", _GEMM_PROBE], stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1")) for _ in range(n)]
        return [float(p.communicate()[0]) for p in ps]
    alone = min(run(1)[0] for _ in range(3))
    together = min(max(run(2)) for _ in range(3))
    return alone, together, 2 * alone / together


def precision_rows(d_in=1024, tokens=16384, chunk=512, seed=0):
    """Hook products on the owner: float64 against fp32 products (what bf16 tensor cores give: a
    product of two bf16 numbers is exact in fp32, so fp32 GEMMs of bf16-valued rows with fp32
    accumulation are the tensor-core result up to summation order) added into a float64 total per
    chunk. Rows: bf16, correlated (a decaying spectrum) with a mean offset, as layer inputs are.
    Reports the relative error of Σxᵀx, of the LoRA-DA direction A_in⁻¹gᵀ (Cholesky, damping 1e-6),
    and the batching dependence (chunk vs chunk/2) of each, plus hook GEMM FLOPs per token."""
    import torch
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d_in, dtype=torch.float64)
    x = (torch.randn(tokens, d_in, generator=g, dtype=torch.float64) @ mix.T + 0.5).to(torch.bfloat16)
    grad = torch.randn(64, d_in, generator=g, dtype=torch.float64)

    def total(dtype, c):
        acc = torch.zeros(d_in, d_in, dtype=torch.float64)
        for s in range(0, tokens, c):
            xc = x[s:s + c].to(dtype)
            acc += (xc.T @ xc).double()
        return acc / tokens

    def direction(A):
        L = torch.linalg.cholesky(A + 1e-6 * torch.eye(d_in, dtype=torch.float64))
        return torch.cholesky_solve(grad.T, L)

    def rel(a, b):
        return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))

    ref = total(torch.float64, chunk)
    d_ref = direction(ref)
    rows = [(f"hook precision: d_in {d_in}, {tokens} bf16 tokens, chunks of {chunk}; cond(A_in)",
             f"{float(torch.linalg.cond(ref)):.2e}")]
    for name, dt in (("float64", torch.float64), ("fp32 (= bf16 tensor cores)", torch.float32)):
        a, b = total(dt, chunk), total(dt, chunk // 2)
        rows.append((f"{name} products: rel. error of Σxᵀx / of A_in⁻¹gᵀ", f"{rel(a, ref):.1e} / {rel(direction(a), d_ref):.1e}"))
        rows.append((f"{name} products: chunk {chunk} vs {chunk // 2}, Σxᵀx / A_in⁻¹gᵀ",
                     f"{rel(a, b):.1e} / {rel(direction(a), direction(b)):.1e}"))
    rows.append(("hook GEMM FLOPs per token, Σxᵀx (2·d_in²)", f"{2 * d_in * d_in:.2e}"))
    return rows


def _print_rows(rows):
    w = max(len(k) for k, _ in rows)
    print("-" * (w + 14))
    for k, v in rows:
        print(f"{k:<{w}}  {v:>10}")
    print("-" * (w + 14))


def _memory_rows(args, mem_init, mem_train, mem_default):
    rows = []
    how = f"layer_groups {args.layer_groups}" if args.layer_groups else "budget = train-step peak"
    for r in range(2):
        ri, rt = mem_init[r]["heap_rise_mib"], mem_train[r]["heap_rise_mib"]
        rows.append((f"rank {r}: train-step peak rise (MiB)", f"{rt:.1f}"))
        rows.append((f"rank {r}: {args.init} init peak rise, {how}, {mem_init[0]['passes']} pass(es), "
                     f"sub-batch {args.calib_micro} (MiB)", f"{ri:.1f}"))
        rows.append((f"rank {r}: init / train-step peak", f"{ri / rt:.2f}"))
    if not args.layer_groups:
        m = mem_init[0]
        rows.append(("budget = train-step peak: budget; one calibration micro-step (measured); predicted "
                     "init peak + step (MiB)", f"{m['budget'] / 2**20:.1f}; {m['step_bytes'] / 2**20:.1f}; "
                     f"{(m['predicted_peak'] + m['step_bytes']) / 2**20:.1f}"))
    d = mem_default[0]
    per_rank = d["stats_total"] / 2
    rows.append((f"default budget: passes; budget per rank (MiB)", f"{d['passes']}; {d['budget'] / 2**20:.0f}"))
    rows.append(("statistics total, total/N, largest unit (MiB)",
                 f"{d['stats_total'] / 2**20:.2f}, {per_rank / 2**20:.2f}, {d['largest_unit'] / 2**20:.2f}"))
    for r in range(2):
        peak = d["stats_peak"][r]
        rows.append((f"rank {r}: measured stats peak (MiB); / (total/N); / (total/N + largest unit)",
                     f"{peak / 2**20:.2f}; {peak / per_rank:.2f}; {peak / (per_rank + d['largest_unit']):.2f}"))
    for r in range(2):
        rows.append((f"rank {r}: statistics sent to owners, this design / earlier design (MiB)",
                     f"{d['sent'][r] / 2**20:.2f} / {d['old_design'][r] / 2**20:.2f}"))
    rows.append(("this design / earlier design bytes", f"{sum(d['sent']) / max(1, sum(d['old_design'])):.2f}"))
    return rows


def main(argv=None):
    args = parse(argv)
    if args.worker:
        return worker(args)
    if args.precision:
        return _print_rows(precision_rows())
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tmp = tempfile.mkdtemp(prefix="init_bench_")
    model_dir = os.path.join(tmp, "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=max(128, args.seq))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    n_layers = 7 * args.layers
    inits = args.init.split(",")
    print(f"init_bench: {inits} (kind {args.kind}, r={args.r}) on a {args.layers}-layer Llama "
          f"h={args.hidden} ffn={args.ffn}: {n_layers} adapted layers; {args.samples} samples × {args.seq} tokens, "
          f"micro-batch {args.micro}; 1 thread per rank; {os.cpu_count()} CPU cores", flush=True)
    rows, speed = [], {}
    alone, together, ceiling = machine_ceiling() if not args.memory_only else (0.0, 0.0, 0.0)
    if not args.memory_only:
        rows.append(("machine: 1-thread fp64 GEMM, 1 process / 2 at once (s)", f"{alone:.2f} / {together:.2f}"))
        rows.append(("machine: 2-process GEMM throughput vs 1 (speedup ceiling)", f"{ceiling:.2f}x"))
    for init in ([] if args.memory_only else inits):
        sub = argparse.Namespace(**{**vars(args), "init": init})
        one = launch(sub, 1, "init", model_dir, os.path.join(tmp, f"one_{init}.json"))
        two = launch(sub, 2, "init", model_dir, os.path.join(tmp, f"two_{init}.json"))
        speed[init] = {"one": one, "two": two, "speedup": one[0]["solve_wall"] / two[0]["solve_wall"],
                       "machine_ceiling": ceiling}
        rows += [(f"{init}: first run (library loading), 1 rank / 2 ranks (s)",
                  f"{one[0]['first_run_solve_wall']:.2f} / {two[0]['first_run_solve_wall']:.2f}"),
                 (f"{init}: solve wall, 1 rank, median of {args.repeats} (s)", f"{one[0]['solve_wall']:.3f}"),
                 (f"{init}: solve wall, 2 ranks, median of {args.repeats} (s)", f"{two[0]['solve_wall']:.3f}"),
                 (f"{init}: solve walls, 1 rank (s)", " ".join(f"{x:.2f}" for x in one[0]["solve_walls"])),
                 (f"{init}: solve walls, 2 ranks (s)", " ".join(f"{x:.2f}" for x in two[0]["solve_walls"])),
                 (f"{init}: solve-phase speedup 2 vs 1", f"{speed[init]['speedup']:.2f}x"),
                 (f"{init}: solve load per rank, 2 ranks (s)", " / ".join(f"{x:.3f}" for x in two[0]["solve_load"])),
                 (f"{init}: plan balance (max/mean cost)", f"{two[0]['balance']:.3f}")]
    if args.speed_only:
        _print_rows(rows)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"speed": speed}, f, indent=1)
        return
    args.init = inits[0]
    mem_train = launch(args, 2, "train", model_dir, os.path.join(tmp, "mem_train.json"), measure=True)
    train_peak = max(r["heap_rise_mib"] for r in mem_train) * 2 ** 20
    mem_init = launch(args, 2, "init", model_dir, os.path.join(tmp, "mem_init.json"), groups=args.layer_groups,
                      budget=None if args.layer_groups else train_peak, measure=True)
    mem_default = launch(args, 2, "init", model_dir, os.path.join(tmp, "mem_default.json"), measure=True)
    rows += _memory_rows(args, mem_init, mem_train, mem_default)
    _print_rows(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"speed": speed, "mem_init": mem_init, "mem_train": mem_train, "mem_default": mem_default},
                      f, indent=1)


if __name__ == "__main__":
    main()
