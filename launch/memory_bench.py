#!/usr/bin/env python
"""LoRA-FA against ZeRO offload: per-GPU memory of Llama-2 7B / 13B / 70B on A800-80GB clusters.

Part 1 (the table; model configs only, meta device, no weights):
    rows     {full FT, LoRA, LoRA-FA} × {ZeRO-3, ZeRO-3 + offload} × {checkpointing off, on}
    models   llama2-7b, llama2-13b, llama2-70b (lora_dist/presets)
    clusters 1x8 and 2x8 A800-80GB
    batch    seq 1024, micro-batch 1..32
    columns  per-GPU model states, activations, peak, largest micro-batch that fits, host RAM
  written to <out>/memory_table.md, <out>/memory_table.csv and <out>/memory_plot.png.

Part 2 (measured against predicted): a real training step on small models on this machine's CPU
(saved-activation bytes and process peak memory, each configuration in a fresh process), against
the meta-device prediction. With CUDA available it also measures torch.cuda.max_memory_allocated
and tokens/s for LoRA, LoRA-FA and ZeRO-3 + offload (one fresh process per row); without a GPU it
says so.

Part 3 (GPU only, --gpu-only): those GPU rows for each PRESET:BATCH:SEQ in --gpu-runs, written to
<out>/memory_gpu.md.

    python launch/memory_bench.py                      # everything, writes docs/
    python launch/memory_bench.py --models llama2-70b --skip-measure
    python launch/memory_bench.py --gpu-only --gpu-runs small-llama:2:256,llama2-7b:4:1024
"""
from __future__ import annotations

import argparse
import csv
import os
import shlex
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from lora_dist.memory import (MODES, Cluster, MemoryConfigError, TrainSpec, ZeroConfig,  # noqa: E402
                              account_activations, activation_profile, compare_cpu, count_params,
                              deepspeed_estimate, list_presets, load_preset, plan_memory)
from lora_dist.memory.states import GiB  # noqa: E402

TABLE_METHODS = ("full", "lora", "lora_fa")
MEASURE_MODES = ("full", "frozen", "lora", "lora_fa", "lora_xs", "vera", "tied_lora", "dora")
MiB = 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama2-7b,llama2-13b,llama2-70b",
                   help=f"comma-separated presets (known: {list_presets()})")
    p.add_argument("--clusters", default="1x8,2x8", help="comma-separated NODESxGPUS_PER_NODE")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="A800-80GB: 80")
    p.add_argument("--reserve-gib", type=float, default=2.0)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--out-dir", default=os.path.join(REPO, "docs"))
    p.add_argument("--skip-table", action="store_true")
    p.add_argument("--skip-measure", action="store_true")
    p.add_argument("--measure-preset", default="small-llama", help="model for measured-vs-predicted peak")
    p.add_argument("--exact-preset", default="tiny-llama", help="model for the bf16 saved-bytes exactness check")
    p.add_argument("--measure-batch", type=int, default=2)
    p.add_argument("--measure-seq", type=int, default=256)
    p.add_argument("--measure-modes", default=",".join(MEASURE_MODES))
    p.add_argument("--gpu-only", action="store_true",
                   help="run only the GPU measurements (--gpu-runs) and write <out>/memory_gpu.md")
    p.add_argument("--gpu-runs", default=None,
                   help="comma-separated PRESET:BATCH:SEQ for the GPU measurements "
                        "(default: the --measure-preset/batch/seq of the CPU step)")
    return p.parse_args(argv)


def _validate(args):
    known = list_presets()
    models = [m for m in args.models.split(",") if m]
    for m in models + [args.measure_preset, args.exact_preset]:
        if m not in known:
            raise MemoryConfigError(f"unknown preset {m!r}; known presets: {known}")
    clusters = [Cluster.parse(c, gpu_memory_gib=args.gpu_mem_gib) for c in args.clusters.split(",") if c]
    if not clusters:
        raise MemoryConfigError("--clusters is empty; give e.g. 1x8,2x8")
    for name in ("seq_len", "max_batch", "r", "measure_batch", "measure_seq"):
        v = getattr(args, name)
        if v < 1:
            raise MemoryConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.reserve_gib < 0:
        raise MemoryConfigError(f"--reserve-gib must be >= 0, got {args.reserve_gib}")
    gpu_runs = []
    for item in (args.gpu_runs or f"{args.measure_preset}:{args.measure_batch}:{args.measure_seq}").split(","):
        parts = item.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise MemoryConfigError(f"--gpu-runs entry {item!r} is not PRESET:BATCH:SEQ (e.g. small-llama:2:256)")
        if parts[0] not in known:
            raise MemoryConfigError(f"--gpu-runs: unknown preset {parts[0]!r}; known presets: {known}")
        if int(parts[1]) < 1 or int(parts[2]) < 1:
            raise MemoryConfigError(f"--gpu-runs entry {item!r}: batch and sequence length must be >= 1")
        gpu_runs.append((parts[0], int(parts[1]), int(parts[2])))
    args.gpu_runs_parsed = gpu_runs
    modes = [m for m in args.measure_modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise MemoryConfigError(f"unknown mode {m!r} in --measure-modes; choose from {list(MODES)}")
    return models, clusters, modes


def _g(x):
    return f"{x / GiB:.1f}"


# --------------------------------------------------------------------------------------------------
# part 1: the table
# --------------------------------------------------------------------------------------------------

def build_table(models, clusters, args):
    rows, curves, timings, ds_rows = [], [], {}, []
    zeros = (ZeroConfig(stage=3), ZeroConfig.offloaded(stage=3))
    for name in models:
        t0 = time.time()
        config = load_preset(name)
        for method in TABLE_METHODS:
            base = TrainSpec(mode=method, seq_len=args.seq_len, r=args.r)
            params = count_params(config, base)
            for ckpt in (False, True):
                spec = base.replace(checkpointing=ckpt)
                prof = activation_profile(config, spec)
                for cluster in clusters:
                    for zero in zeros:
                        plan = plan_memory(config, spec, cluster, zero, reserve_gib=args.reserve_gib,
                                           max_batch=args.max_batch, profile=prof, params=params)
                        mb = plan.max_micro_batch
                        row = {
                            "model": name, "cluster": cluster.label(), "method": spec.label().replace(" +ckpt", ""),
                            "zero": zero.label(), "checkpointing": "on" if ckpt else "off",
                            "trainable_params": params.trainable,
                            "states_gib": plan.states.gpu_states / GiB,
                            "buffers_gib": plan.states.gpu_buffers / GiB,
                            "act_b1_gib": plan.activations(1) / GiB,
                            "act_peak_b1_gib": prof.act_peak(1) / GiB,
                            "peak_b1_gib": plan.peak(1) / GiB,
                            "max_micro_batch": mb,
                            "peak_at_max_gib": plan.peak(mb) / GiB if mb else float("nan"),
                            "act_b32_gib": plan.activations(args.max_batch) / GiB,
                            "host_gib_per_node": plan.host_per_node / GiB,
                            "activation_method": prof.method,
                        }
                        rows.append(row)
                        curves.append((name, cluster.label(), spec.label(), zero.label(),
                                       [plan.peak(b) / GiB for b in range(1, args.max_batch + 1)],
                                       plan.usable_bytes / GiB))
        full = count_params(config, TrainSpec(mode="full", seq_len=args.seq_len))
        for cluster in clusters:
            ds = deepspeed_estimate(full, cluster, offload=False)
            if ds:
                ds_rows.append((name, cluster.label(), full.total, ds[0] / GiB,
                                next(r["states_gib"] + r["buffers_gib"] for r in rows
                                     if r["model"] == name and r["cluster"] == cluster.label()
                                     and r["method"] == "full FT" and r["zero"] == "ZeRO-3")))
        timings[name] = time.time() - t0
        print(f"[table] {name}: {time.time() - t0:.1f} s", flush=True)
    return rows, curves, timings, ds_rows


COLUMNS = [("model", "model"), ("cluster", "cluster"), ("method", "method"), ("zero", "ZeRO"),
           ("checkpointing", "ckpt"), ("states_gib", "model states/GPU (GiB)"),
           ("buffers_gib", "ZeRO buffers/GPU (GiB)"), ("act_b1_gib", "activations b=1 (GiB)"),
           ("peak_b1_gib", "peak b=1 (GiB)"), ("max_micro_batch", "max micro-batch"),
           ("peak_at_max_gib", "peak at max (GiB)"), ("host_gib_per_node", "host RAM/node (GiB)")]


def _fmt(v):
    if isinstance(v, float):
        return "-" if v != v else f"{v:.1f}"
    return str(v)


def markdown_table(rows, max_batch):
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |"
    sep = "|" + "|".join("---" if k in ("model", "cluster", "method", "zero", "checkpointing") else "---:"
                         for k, _ in COLUMNS) + "|"
    out = [head, sep]
    for r in rows:
        cells = []
        for k, _ in COLUMNS:
            v = r[k]
            if k == "max_micro_batch":
                v = "OOM" if v == 0 else (f"{v}+" if v == max_batch else str(v))
            cells.append(_fmt(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_csv(rows, path):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(curves, models, clusters, max_batch, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"full FT": "tab:red", "LoRA": "tab:blue", "LoRA-FA": "tab:green"}
    fig, axes = plt.subplots(len(clusters), len(models), figsize=(5.2 * len(models), 4.2 * len(clusters)),
                             squeeze=False, sharex=True)
    bs = list(range(1, max_batch + 1))
    for i, cl in enumerate(clusters):
        for j, m in enumerate(models):
            ax = axes[i][j]
            usable = None
            for (name, clabel, label, zlabel, ys, usable_gib) in curves:
                if name != m or clabel != cl.label():
                    continue
                usable = usable_gib
                method = label.replace(" +ckpt", "")
                ls = "-" if "+ckpt" in label else ":"
                lw = 2.2 if "offload" in zlabel else 1.2
                mk = "o" if "offload" in zlabel else None
                ax.plot(bs, ys, ls, color=colors.get(method, "k"), lw=lw, marker=mk, markersize=2.5,
                        label=f"{label}, {zlabel}")
            if usable is not None:
                ax.axhline(usable, color="k", lw=0.8)
                ax.text(1, usable * 1.02, f"usable {usable:.0f} GiB", fontsize=7)
            ax.set_ylim(0, 2.0 * cl.gpu_memory_gib)
            ax.set_title(f"{m}, {cl.label()}", fontsize=9)
            ax.set_xlabel("micro-batch (seq 1024)")
            ax.set_ylabel("predicted per-GPU peak (GiB)")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle("Predicted per-GPU peak vs micro-batch (seq 1024, bf16, r=16): solid = checkpointing on, "
                 "dotted = off; thick with dots = ZeRO-3 + offload; black line = usable GPU memory", fontsize=9)
    fig.tight_layout(rect=(0, 0.09, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# part 2: measured against predicted
# --------------------------------------------------------------------------------------------------

def exactness_rows(preset, modes, batch, seq):
    """bf16 and fp32, checkpointing off/on: meta-predicted vs real-tensor saved bytes (in-process)."""
    config = load_preset(preset)
    rows = []
    for dtype in ("bfloat16", "float32"):
        for ckpt in (False, True):
            for mode in modes:
                spec = TrainSpec(mode=mode, batch_size=batch, seq_len=seq, dtype=dtype, checkpointing=ckpt, r=8)
                pred = account_activations(config, spec, "meta")
                meas = account_activations(config, spec, "cpu")
                rows.append((spec, pred.total_bytes, meas.total_bytes))
    return rows


def measure_rows(preset, modes, batch, seq, r):
    rows = []
    for ckpt in (False, True):
        for mode in modes:
            spec = TrainSpec(mode=mode, batch_size=batch, seq_len=seq, dtype="float32", checkpointing=ckpt, r=r)
            t0 = time.time()
            c = compare_cpu(preset, spec)
            rows.append(c)
            print(f"  {spec.label():22s} saved pred {c.predicted_saved / MiB:8.2f} MiB meas {c.measured_saved / MiB:8.2f} MiB"
                  f" {'==' if c.saved_exact else '!='}   peak pred {c.predicted_peak / MiB:8.1f} MiB"
                  f" meas {c.measured_peak / MiB:8.1f} MiB ({100 * c.peak_error:+.1f}%)  [{time.time() - t0:.0f} s]",
                  flush=True)
    return rows


def cuda_rows(preset, batch, seq):
    """Real GPU steps with their predictions (needs CUDA).

    Plain PyTorch runs are predicted by `simulate_step` on the meta device (the same first step);
    the ZeRO-3 + offload run by `plan_memory` for one GPU: persistent parameters + ZeRO buffers +
    activation peak.
    """
    import torch
    from lora_dist.memory import measure_cuda_step, simulate_step
    config = load_preset(preset)
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GiB
    out = []
    for mode, offload in (("lora", False), ("lora_fa", False), ("lora", True)):
        spec = TrainSpec(mode=mode, batch_size=batch, seq_len=seq, dtype="bfloat16")
        res = measure_cuda_step(preset, spec, zero_offload=offload)
        if offload:
            plan = plan_memory(config, spec, Cluster(nodes=1, gpus_per_node=1, gpu_memory_gib=gpu_gib),
                               ZeroConfig.offloaded(stage=3), reserve_gib=0.0)
            predicted = plan.peak(batch)
        else:
            predicted = simulate_step(config, spec, "meta").peak_step
        out.append((res, predicted))
    return out


def gpu_section(runs):
    """Markdown lines of the GPU measurements, one table per (preset, batch, seq); a note without CUDA."""
    import torch
    if not torch.cuda.is_available():
        note = ("No GPU is available here, so torch.cuda.max_memory_allocated and tokens/s for LoRA, "
                "LoRA-FA and ZeRO-3 + offload were not measured (the code path is "
                "`lora_dist.memory.run_cuda_step`; this bench runs it when CUDA is available; "
                "docs/memory_gpu.md holds a run on an H100).")
        print(note)
        return ["### GPU", "", note, ""]
    name = torch.cuda.get_device_name(0)
    md = ["### GPU", "", f"Device: {name}, torch {torch.__version__}. Predicted: `simulate_step` on the meta "
          "device for plain PyTorch steps (AdamW over the trainable parameters); `plan_memory` for one GPU for "
          "ZeRO-3 + offload (optimizer and parameters on CPU, torch AdamW on the CPU partitions). Measured: "
          "`torch.cuda.max_memory_allocated` over the first step, in a fresh process per row, minus the "
          "bytes allocated before the model was built (the cuBLAS workspaces of a warm-up matmul, shown "
          "as 'baseline'; the plan's reserve covers them); tokens/s over the next 3 steps.", ""]
    for preset, batch, seq in runs:
        print(f"[gpu] {preset}, bf16, micro-batch {batch} x {seq}", flush=True)
        md += [f"#### {preset}, bf16, micro-batch {batch} × {seq}", "",
               "| run | predicted peak (MiB) | measured step peak (MiB) | error | baseline (MiB) | saved (MiB) | tokens/s |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        for r, pred in cuda_rows(preset, batch, seq):
            saved = "-" if r.saved_bytes is None else f"{r.saved_bytes / MiB:.1f}"
            err = 100 * (pred - r.step_peak) / r.step_peak
            line = (f"| {r.spec.label()}{' ZeRO-3 + offload' if r.zero_offload else ''} | {pred / MiB:.1f} | "
                    f"{r.step_peak / MiB:.1f} | {err:+.1f}% | {r.baseline / MiB:.1f} | {saved} | {r.tokens_per_s:.0f} |")
            md.append(line)
            print(line, flush=True)
        md += [""]
    return md


def main(argv=None):
    args = parse_args(argv)
    try:
        models, clusters, modes = _validate(args)
    except MemoryConfigError as e:
        print(f"memory_bench.py: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    if args.gpu_only:
        md = [f"<!-- generated by `python launch/memory_bench.py {' '.join(shlex.quote(a) for a in (argv or sys.argv[1:]))}` -->",
              ""] + gpu_section(args.gpu_runs_parsed)
        with open(os.path.join(args.out_dir, "memory_gpu.md"), "w") as fh:
            fh.write("\n".join(md) + "\n")
        print(f"wrote {args.out_dir}/memory_gpu.md")
        return 0
    cmd = "python launch/memory_bench.py" + ("" if argv is None and len(sys.argv) == 1 else
                                             " " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    md = [f"<!-- generated by `{cmd}`; do not edit by hand -->", ""]
    if not args.skip_table:
        t0 = time.time()
        rows, curves, timings, ds_rows = build_table(models, clusters, args)
        total = time.time() - t0
        table = markdown_table(rows, args.max_batch)
        print(table)
        write_csv(rows, os.path.join(args.out_dir, "memory_table.csv"))
        plot(curves, models, clusters, args.max_batch, os.path.join(args.out_dir, "memory_plot.png"))
        md += [f"# Per-GPU memory: full FT, LoRA, LoRA-FA under ZeRO-3 with and without offload", "",
               f"Generated by `{cmd}` in {total:.0f} s on a 2-core CPU machine "
               f"({', '.join(f'{k} {v:.1f} s' for k, v in timings.items())}).", "",
               f"Sequence length {args.seq_len}, bf16, LoRA/LoRA-FA r={args.r} on all seven projections; "
               f"GPUs: {clusters[0].name}, usable = {args.gpu_mem_gib:g} GiB - {args.reserve_gib:g} GiB reserve. "
               f"'max micro-batch' is the largest b <= {args.max_batch} whose peak fits ('{args.max_batch}+': "
               f"all fit, 'OOM': not even b = 1). 'ZeRO-3 + offload' offloads optimizer states and parameters "
               f"to CPU; 'host RAM/node' is what that offload pins on each node. See docs/memory.md for the "
               f"formulas and assumptions.", "", table, "", "![per-GPU peak](memory_plot.png)", ""]
        if ds_rows:
            md += ["## DeepSpeed's estimator for comparison (assumes every parameter trains)", "",
                   "| model | cluster | parameters | DeepSpeed ZeRO-3 estimate (GiB/GPU) | ours, full FT ZeRO-3 states + buffers (GiB/GPU) |",
                   "|---|---|---:|---:|---:|"]
            for name, cl, n, ds_gib, ours in ds_rows:
                md.append(f"| {name} | {cl} | {n:,} | {ds_gib:.1f} | {ours:.1f} |")
            md += ["", "DeepSpeed counts 18 bytes per parameter (fp32 gradients) plus 4 bytes × the largest "
                   "layer; ours counts bf16 gradient partitions (DeepSpeed's default grad_accum_dtype for bf16) "
                   "and the default reduce bucket and prefetch buffers. For LoRA and LoRA-FA see the table "
                   "above: the frozen 99 % of the parameters cost 2 bytes each, sharded.", ""]
    if not args.skip_measure:
        print(f"[measure] saved-activation exactness, {args.exact_preset}, bf16 and fp32, b=2 s=64", flush=True)
        ex = exactness_rows(args.exact_preset, modes, 2, 64)
        md += ["## Measured against predicted (CPU)", "",
               f"### Saved-for-backward bytes, {args.exact_preset}, micro-batch 2 × 64 tokens, r=8", "",
               "Predicted: the model run on the meta device. Measured: the same forward on real CPU tensors. "
               "Both count each storage once and exclude parameters and buffers.", "",
               "| mode | dtype | ckpt | predicted (bytes) | measured (bytes) | equal |", "|---|---|---|---:|---:|---|"]
        for spec, p, m in ex:
            md.append(f"| {spec.label().replace(' +ckpt', '')} | {spec.dtype} | {'on' if spec.checkpointing else 'off'} "
                      f"| {p:,} | {m:,} | {'yes' if p == m else 'NO'} |")
            print(f"  {spec.label():22s} {spec.dtype:9s} predicted {p:>12,} measured {m:>12,} {'==' if p == m else '!='}")
        print(f"[measure] training step, {args.measure_preset}, fp32, b={args.measure_batch} s={args.measure_seq}, "
              f"one fresh process per row", flush=True)
        cmp_rows = measure_rows(args.measure_preset, modes, args.measure_batch, args.measure_seq, args.r)
        md += ["", f"### Training step, {args.measure_preset}, fp32, micro-batch {args.measure_batch} × "
               f"{args.measure_seq} tokens, r={args.r}, AdamW", "",
               "Predicted: `simulate_step` on the meta device (every storage followed from allocation to "
               "release over forward, backward and optimizer step). Measured: a real step in a fresh process; "
               "saved bytes from the saved-tensor hooks, peak = peak RSS of the step minus the RSS before the "
               "model was built (glibc mmap threshold 64 KiB so freed tensors leave RSS).", "",
               "| mode | ckpt | saved predicted (MiB) | saved measured (MiB) | equal | peak predicted (MiB) | peak measured (MiB) | error |",
               "|---|---|---:|---:|---|---:|---:|---:|"]
        for c in cmp_rows:
            md.append(f"| {c.spec.label().replace(' +ckpt', '')} | {'on' if c.spec.checkpointing else 'off'} | "
                      f"{c.predicted_saved / MiB:.3f} | {c.measured_saved / MiB:.3f} | {'yes' if c.saved_exact else 'NO'} | "
                      f"{c.predicted_peak / MiB:.1f} | {c.measured_peak / MiB:.1f} | {100 * c.peak_error:+.1f}% |")
        md += [""] + gpu_section(args.gpu_runs_parsed)
    with open(os.path.join(args.out_dir, "memory_table.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print(f"wrote {args.out_dir}/memory_table.md" + ("" if args.skip_table else ", memory_table.csv, memory_plot.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
