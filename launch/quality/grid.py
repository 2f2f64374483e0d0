"""The protocol: an LR sweep on validation, then seeds at each method's best LR, scored on test.

1. sweep:  every method at each LR of its grid, seed 0;
2. extend: where the best validation loss sits at an edge of the LRs tried, one more LR half a
           decade past that edge (at most `MAX_EXTEND` times), so no method is judged at an LR
           that is merely the grid's boundary;
3. seeds:  the best LR (lowest final validation loss) with seeds 1 … S−1; seed 0's run is reused.
Where the grid cannot afford a sweep per method (the encoder part), a family shares its leader's.

Runs are independent, single-threaded processes; `workers` of them run at once (two on this 2-core
machine). Every finished run is appended to a JSONL cache as one line and flushed, so a killed
benchmark resumes where it stopped; a run is identified by (task, method, lr, seed, steps, batch,
the base model's recipe).
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
from typing import Callable, Dict, Iterable, List, Optional, Tuple

MAX_EXTEND = 2
STEP = math.sqrt(10.0)

Spec = Tuple[str, float, int]  # (method, lr, seed)


def run_key(row_or_spec: dict) -> str:
    d = row_or_spec
    return f"{d['task']}|{d['method']}|{d['lr']:.6g}|{d['seed']}|{d['steps']}|{d['batch']}|{d['base']}"


class Cache:
    """The JSONL file of finished runs."""

    def __init__(self, path: str):
        self.path = path
        self.rows: Dict[str, dict] = {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        self.rows[run_key(row)] = row

    def add(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[run_key(row)] = row


# -- the worker side ------------------------------------------------------------------------------
_TASK = None


def _init_worker(make_task: Callable, args: tuple) -> None:
    """Build the task, then warm up: a 2-step run of a data-aware method pays the one-time costs
    (lazy imports of the engine and DeepSpeed's utilities, oneDNN setup) that would otherwise land
    in the first measured run's init time."""
    import torch
    torch.set_num_threads(1)  # one core per run; `workers` runs share the machine
    global _TASK
    _TASK = make_task(*args)
    from .methods import METHODS
    from .run import run_one
    for name in ("lora_da", "lora_pro", "fa_kaiming_proj"):
        if name in _TASK.methods:
            run_one(_TASK, METHODS[name], 1e-4, 0, 2, 4, evaluate=False)


def _work(job: dict) -> dict:
    from .methods import METHODS
    from .run import run_one
    row = run_one(_TASK, METHODS[job["method"]], job["lr"], job["seed"], job["steps"], job["batch"])
    return {**row, "base": job["base"], "task": job["task"]}


class Grid:
    """Runs specs for one task through a process pool (started on first use, kept for every phase;
    use as a context manager), skipping what the cache holds."""

    def __init__(self, cache: Cache, make_task: Callable, task_args: tuple, meta: dict, workers: int, log=print):
        self.cache, self.make_task, self.task_args = cache, make_task, task_args
        self.meta, self.workers, self.log = meta, workers, log  # meta: task, steps, batch, base
        self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.close() if exc[0] is None else self.pool.terminate()
            self.pool.join()
            self.pool = None

    def job(self, spec: Spec) -> dict:
        return {**self.meta, "method": spec[0], "lr": spec[1], "seed": spec[2]}

    def run(self, specs: Iterable[Spec], phase: str) -> None:
        todo = [self.job(s) for s in specs if run_key(self.job(s)) not in self.cache.rows]
        if not todo:
            return
        self.log(f"[{self.meta['task']}] {phase}: {len(todo)} runs on {self.workers} processes")
        if self.pool is None:
            self.pool = mp.get_context("spawn").Pool(self.workers, _init_worker, (self.make_task, self.task_args))
        for k, row in enumerate(self.pool.imap_unordered(_work, todo), 1):
            self.cache.add(row)
            last = row["evals"][-1] if row["evals"] else {}
            self.log(f"  {k}/{len(todo)} {row['method']} lr={row['lr']:.3g} seed={row['seed']}: "
                     f"val loss {last.get('val_loss', float('nan')):.4f}  ({row['train_s']:.1f} s)")

    def rows(self, method: str, lr: Optional[float] = None, seed: Optional[int] = None) -> List[dict]:
        out = []
        for row in self.cache.rows.values():
            if all(row[k] == self.meta[k] for k in self.meta) and row["method"] == method:
                if (lr is None or math.isclose(row["lr"], lr)) and (seed is None or row["seed"] == seed):
                    out.append(row)
        return out


def final_val(row: dict) -> float:
    """The selection score: final validation loss (inf for a diverged or unevaluated run)."""
    if row.get("diverged") or not row["evals"] or row["evals"][-1]["step"] != row["steps"]:
        return math.inf
    v = row["evals"][-1]["val_loss"]
    return v if math.isfinite(v) else math.inf


def best_lr(grid: Grid, method: str) -> Tuple[float, List[float]]:
    """(best LR, every LR tried, sorted) from the seed-0 runs."""
    runs = sorted(grid.rows(method, seed=0), key=lambda r: r["lr"])
    best = min(runs, key=final_val)
    return best["lr"], [r["lr"] for r in runs]


def protocol(grid: Grid, methods: Dict[str, object], seeds: int, leaders: Optional[Dict[str, str]] = None) -> Dict[str, float]:
    """Sweep, extend, seeds; returns {method: best LR}. `leaders` shares a sweep within a family:
    {method: the method whose sweep it uses} (default: its own); a follower runs every seed at its
    leader's best LR."""
    leaders = leaders or {}
    lead = {n: leaders.get(n, n) for n in methods}
    sweepers = sorted(set(lead.values()), key=list(methods).index)
    grid.run([(n, lr, 0) for n in sweepers for lr in methods[n].lrs], "LR sweep on validation")
    while True:  # the count of LRs tried bounds the extensions, so a rerun over the cache adds none
        more = []
        for n in sweepers:
            best, tried = best_lr(grid, n)
            if len(tried) < 2 or len(tried) >= len(methods[n].lrs) + MAX_EXTEND:
                continue
            if best == tried[0]:
                more.append((n, tried[0] / STEP, 0))
            elif best == tried[-1]:
                more.append((n, tried[-1] * STEP, 0))
        if not more:
            break
        grid.run(more, "LR sweep, past a winning edge")
    best = {n: best_lr(grid, n)[0] for n in sweepers}
    chosen = {n: best[lead[n]] for n in methods}
    grid.run([(n, lr, s) for n, lr in chosen.items() for s in range(0 if lead[n] != n else 1, seeds)],
             "seeds at the best LR, on test")
    return chosen
