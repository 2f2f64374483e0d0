"""docs/init_cost.md's table: `python -m lora_dist.memory.init_table > table.md`.

Every init × Llama-2 7B/13B/70B × 1×8, 2×8, 4×8 A800-80GB from `init_cost.init_cost`, with the
training step the sbatch scripts run (LoRA r=8 on all projections, 1024 tokens, micro-batch 1,
activation checkpointing, ZeRO-3) and 256 calibration samples.
"""
from __future__ import annotations

from typing import List, Optional

from ..errors import ConfigError
from .init_cost import InitSpec, init_cost
from .states import GiB


TABLE_INITS = ("lora_da", "lora_ga", "lora_one", "lora_sb", "eva", "corda", "pissa", "milora", "olora", "lora_xs")
TABLE_PRESETS = ("llama2-7b", "llama2-13b", "llama2-70b")
TABLE_CLUSTERS = ("1x8", "2x8", "4x8")


def _row(preset, cluster, s) -> str:
    g = lambda b: f"{b / GiB:,.1f}"  # noqa: E731
    return (f"| `{s['method']}` | {preset} | {cluster} | {g(s['peak_bytes'])} | {s['passes']} | "
            f"{g(s['stats_bytes_total'])} | {g(s['stats_bytes_max_rank'])} | {g(s['wire_bytes_per_rank'])} | "
            f"{s['seconds']:,.0f} | {100 * s['fraction_of_epoch']:.2f}% |")


def markdown_table(samples: int = 256, seq_len: int = 1024, r: int = 8, epoch_samples: int = 100_000,
                   hook_dtype: Optional[str] = None, inits=TABLE_INITS) -> str:
    """Every init × Llama-2 7B/13B/70B × 1×8, 2×8, 4×8 A800-80GB, as the sbatch scripts train
    (LoRA r=8 on all projections, 1024 tokens, micro-batch 1, checkpointing, ZeRO-3)."""
    from .activations import TrainSpec, load_preset
    from .budget import plan_memory
    from .states import Cluster, ZeroConfig

    head = ["| init | model | GPUs | peak GiB | passes | stats GiB | stats/rank GiB | wire/rank GiB | "
            "seconds | of epoch |", "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    rows = {}
    spec = TrainSpec(mode="lora", r=r, seq_len=seq_len, checkpointing=True)
    for preset in TABLE_PRESETS:
        cfg, base = load_preset(preset), None
        for cl in TABLE_CLUSTERS:
            base = plan_memory(cfg, spec, Cluster.parse(cl), ZeroConfig(stage=3),
                               profile=base.profile if base else None, params=base.params if base else None)
            for m in inits:
                s = init_cost(base, cfg, InitSpec(m, samples=samples, seq_len=seq_len, r=r, hook_dtype=hook_dtype),
                              epoch_samples=epoch_samples).summary
                rows[m, preset, cl] = _row(preset, cl, s)
    return "\n".join(head + [rows[m, p, c] for m in inits for p in TABLE_PRESETS for c in TABLE_CLUSTERS])


def solve_efficiency(shapes=(("lora_da", 1536, 1536), ("lora_da", 1536, 4096), ("pissa", 4096, 1536),
                             ("eva", 1536, 1536), ("lora_ga", 1536, 4096)), r: int = 8) -> List[tuple]:
    """Measured 2·Method.cost / solve time over this CPU's float64 GEMM rate (one thread), per
    (method, d_out, d_in), on random statistics: the basis of `Rates.solve_efficiency`."""
    import time

    import torch

    from ..engine.methods import INPUT_MOMENT, OUTPUT_GRAD_DIAG, WEIGHT_GRADIENT, LayerProblem, get_method

    def best(f, n=2):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = 1536
        a, b = torch.randn(n, n, dtype=torch.float64), torch.randn(n, n, dtype=torch.float64)
        gemm = 2 * n ** 3 / best(lambda: a @ b, 3)
        out = []
        for name, d_out, d_in in shapes:
            m = get_method(name)
            o = m.resolve_options({})
            x = torch.randn(4 * d_in, d_in, dtype=torch.float64)
            stats = {WEIGHT_GRADIENT: torch.randn(d_out, d_in, dtype=torch.float64),
                     INPUT_MOMENT: {"second": x.T @ x / x.shape[0], "mean": x.mean(0), "count": float(x.shape[0])},
                     OUTPUT_GRAD_DIAG: torch.rand(d_out, dtype=torch.float64) + 0.1}
            p = LayerProblem(name="m", d_out=d_out, d_in=d_in, r=r, scaling=2.0, kind="lora", options=o, seed=0,
                             W=torch.randn(d_out, d_in, dtype=torch.float64), stats=stats, dtype=torch.float64,
                             n_train=1000)
            t = best(lambda: m.solve(p))
            out.append((name, d_out, d_in, t, 2 * m.cost(d_out, d_in, r, o) / t / gemm))
        return out
    finally:
        torch.set_num_threads(threads)


def _main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m lora_dist.memory.init_table",
                                description="docs/init_cost.md's table: every init x Llama-2 7B/13B/70B x 1x8/2x8/4x8")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--epoch-samples", type=int, default=100_000)
    p.add_argument("--hook-dtype", default=None, help="GEMM rate of the hook products (default: stats dtype)")
    p.add_argument("--inits", default=",".join(TABLE_INITS))
    p.add_argument("--solve-efficiency", action="store_true",
                   help="measure 2*cost/time over the fp64 GEMM rate of a few solves on this CPU instead")
    a = p.parse_args(argv)
    if a.solve_efficiency:
        for name, d_out, d_in, t, eff in solve_efficiency():
            print(f"{name} {d_out}x{d_in}: {t:.2f} s, 2*cost/time = {eff:.2f} of the fp64 GEMM rate")
        return 0
    try:
        print(markdown_table(a.samples, a.seq_len, epoch_samples=a.epoch_samples, hook_dtype=a.hook_dtype,
                             inits=tuple(a.inits.split(","))))
    except ConfigError as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
