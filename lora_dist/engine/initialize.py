"""`initialize_adapters`: data-aware and SVD inits, spread across ranks, written into ZeRO-3 shards.

The driver runs named phases (one code path for 1 process and N ranks):
  count    calibration samples/tokens/positions over all ranks (global normalizers: results do not
           depend on batching);
  plan     input groups (modules reading the same input share one input moment), each unit's bytes
           (statistics, solve workspace, W, rows in flight), owners balancing bytes and solve cost,
           and the fewest passes whose per-rank peak fits the memory budget (plan.py, passes.py);
  collect  per pass: one calibration pass with hooks on that pass's modules (stats.py); each
           micro-step's rows of a unit go to its owner, which forms and adds the products, so a
           rank holds its owned totals plus one unit's rows in flight (comm.gather_rows);
  gather   per round: every rank receives the full W of the unit it owns (from the ZeRO shards, to
           that rank alone);
  solve    all ranks solve their unit at once (methods/);
  write    factors broadcast from the owner and written (working copy + fp32 master); a rewritten
           W = W − s·B·A is computed on the owner and scattered straight into the shards;
  report   per-rank phases, bytes and peaks gathered into an `InitReport`.
"""
from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch
from tqdm.auto import tqdm

from ..adapters import AdapterLinear, adapter_modules
from ..comm import Comm
from ..config import AdapterConfig
from ..errors import ConfigError, DataError
from ..zero import unwrap_engine, write_params
from .methods import INPUT_MOMENT, WEIGHT, LayerProblem, Method, get_method
from .footprint import LivePeak
from .passes import plan_passes
from .plan import OwnerPlan, build_units, collection_costs, device_budget
from .report import InitReport
from .stats import (Collector, calibration_mode, check_batches, input_groups, local_counts, normalized,
                    per_sample_losses, slot_shapes, split_batch, step_context)

PHASES = ("count", "collect", "reduce", "gather", "solve", "write")


@dataclass
class _Run:
    """What the phases share for one call."""
    module: torch.nn.Module
    mods: Dict[str, AdapterLinear]
    config: AdapterConfig
    method: Method
    opts: dict
    stats: frozenset
    stats_dtype: torch.dtype
    solve_dtype: torch.dtype
    comm: Comm
    report: InitReport
    show: bool
    device: torch.device
    batches: List[dict] = field(default_factory=list)
    n_steps: int = 0
    norms: tuple = (0.0, 0.0, 0.0)          # samples, loss tokens, factor positions (global)
    input_owner: Dict[str, str] = field(default_factory=dict)
    units: Dict[str, list] = field(default_factory=dict)    # unit name -> its modules
    plan: Optional[OwnerPlan] = None
    schedule: List[List[dict]] = field(default_factory=list)  # pass -> rounds (rank -> unit or None)
    unit_cost: Dict[str, object] = field(default_factory=dict)    # unit name -> passes.UnitCost
    rows_units: set = field(default_factory=set)             # units whose rows go to the owner
    step_rows: List[int] = field(default_factory=list)       # per micro-step: most positions on a rank
    phases: Dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in PHASES})
    stats_peak: int = 0
    weight_peak: int = 0
    round_solve: List[float] = field(default_factory=list)

    @contextlib.contextmanager
    def timed(self, phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] += time.perf_counter() - t

    def bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, leave=False, disable=not self.show)


def initialize_adapters(model_or_engine, config: Optional[AdapterConfig] = None,
                        batches: Optional[Iterable[dict]] = None, *, n_train: Optional[int] = None,
                        lr: Optional[float] = None, layer_groups: Optional[int] = None,
                        reduce_every_step: bool = False, stats_dtype: Optional[torch.dtype] = None,
                        solve_dtype: torch.dtype = torch.float64, micro_batch: Optional[int] = None,
                        progress: bool = True, return_statistics: bool = False,
                        memory_budget: Optional[int] = None) -> InitReport:
    """Run `config.init` on the adapters of `model_or_engine` (a model or a DeepSpeedEngine).

    batches: this rank's shard of the calibration samples, an iterable of dicts with input_ids,
        attention_mask and labels (-100 = no loss; forward-only inits such as EVA need no labels);
        on N ranks the result equals one process fed all.
    n_train, lr: the training-set size (LoRA-DA's N) and first warm-up learning rate (LoRA-SB's η),
        when init_options do not give them.
    memory_budget: bytes per rank the init may hold (statistics + solve workspace + gathered W +
        rows in flight). None = derived from the device (plan.device_budget: free memory minus a
        reserve on a GPU, available RAM per local rank on CPU). The engine plans the fewest passes that fit
        (passes.py) and prints the plan; a budget one unit alone cannot fit is a ConfigError naming
        the unit and the bytes it needs, before any pass runs.
    layer_groups: instead of a budget, collect in this many passes, each over a slice of the cost-only
        owner plan's rounds (the earlier interface; not together with memory_budget).
    reduce_every_step: the earlier way to bound non-owned statistics. On N > 1 ranks they now reach
        their owners every micro-step anyway (as rows); it only changes when local sums (one rank)
        are folded into the totals.
    micro_batch: split the given batches into sub-batches of at most this many samples (trailing
        all-padding columns trimmed): less activation memory, same result (statistics do not depend
        on batching).
    stats_dtype: accumulation precision; default fp32, or what the method asks for (LoRA-DA: float64).
    solve_dtype: precision of the per-layer solves (default float64: cheap next to collection, and
        the factorizations of ill-conditioned factors need it); factors are cast once when written.
    return_statistics: keep each owned layer's normalized statistics in `report.statistics` (tests).
    Collective: every rank calls it with the same config. Leaves no trace: no gradients, no optimizer
    state, no hooks, train/eval modes and requires_grad as before.
    """
    run = _setup(model_or_engine, config, stats_dtype, solve_dtype, progress)
    if isinstance(run, InitReport):  # kaiming / gaussian: inject_adapters already did it
        return run
    try:
        return _run_phases(run, batches, micro_batch, memory_budget, layer_groups, reduce_every_step,
                           n_train, lr, return_statistics)
    finally:
        run.comm.close()  # the rows group's gloo threads must not outlive the call


def _run_phases(run: _Run, batches, micro_batch, memory_budget, layer_groups, reduce_every_step,
                n_train, lr, return_statistics) -> InitReport:
    """count, plan, then per pass collect and per round gather, solve, write; then report."""
    with run.timed("count"):
        _count(run, batches, micro_batch)
    _plan(run, memory_budget, layer_groups)
    bar = run.bar(sum(len(rounds) for rounds in run.schedule), f"{run.config.init}: solve rounds")
    for rounds in run.schedule:
        totals = _collect(run, rounds, reduce_every_step) if run.stats else {}
        for rd in rounds:
            with run.timed("gather"):
                W_mine = _gather(run, rd)
            sols = _solve(run, rd, W_mine, totals, n_train, lr, return_statistics)
            with run.timed("write"):
                for r in range(run.comm.world):
                    for n in _modules_of(run, rd[r]):
                        _write_layer(run, run.mods[n], sols.get(n), r)
            bar.update(1)
        totals.clear()
    bar.close()
    for m in run.mods.values():
        m.needs_init = False
    return _finish_report(run)


def _setup(model_or_engine, config, stats_dtype, solve_dtype, progress):
    """The shared state of one call, or an empty report when the init needs no engine."""
    module, _ = unwrap_engine(model_or_engine)
    mods = dict(adapter_modules(module))
    injected: Optional[AdapterConfig] = getattr(module, "lora_dist_config", None)
    if not mods or injected is None:
        raise ConfigError("initialize_adapters: the model has no adapters; call inject_adapters first")
    config = config or injected
    diff = [k for k in ("kind", "r", "alpha", "use_rslora", "init") if getattr(config, k) != getattr(injected, k)]
    if diff:
        raise ConfigError(f"initialize_adapters: config differs from the injected one in {diff} "
                          f"(injected {[getattr(injected, k) for k in diff]})")
    comm = Comm()
    if not config.needs_initialize:
        return InitReport(method=config.init, world=comm.world, n_layers=len(mods))
    method = get_method(config.init)
    opts = method.resolve_options(dict(config.init_options))
    stats = method.stats_needed(opts) - {WEIGHT} if method.needs_data else frozenset()  # W-only: no pass
    return _Run(module=module, mods=mods, config=config, method=method, opts=opts,
                stats=stats, stats_dtype=stats_dtype or method.stats_dtype or torch.float32,
                solve_dtype=solve_dtype, comm=comm, show=progress and comm.rank == 0,
                report=InitReport(method=config.init, world=comm.world, n_layers=len(mods)),
                device=_model_device(module))


def _count(run: _Run, batches, micro_batch) -> None:
    """Phase count: global normalizers (samples, loss tokens, factor positions) and micro-steps."""
    if not run.stats:
        return
    bs = check_batches(list(batches) if batches is not None else [], needs_labels=run.method.needs_backward)
    if micro_batch is not None:
        if micro_batch < 1:
            raise ConfigError(f"initialize_adapters: micro_batch must be >= 1, got {micro_batch}")
        bs = [sub for b in bs for sub in split_batch(b, micro_batch)]
    n_samples, n_tok, n_pos = run.comm.sum_scalars(local_counts(bs, run.opts))
    if run.method.needs_backward and n_samples == 0:
        raise ConfigError("calibration batches have no loss-bearing tokens (every label is -100)")
    if INPUT_MOMENT in run.stats and n_pos == 0:
        raise ConfigError("calibration batches have no positions kept by the attention mask")
    run.batches, run.norms = bs, (n_samples, n_tok, n_pos)
    run.n_steps = run.comm.max_int(len(bs))
    # positions per micro-step (a rank out of batches reruns its first one at zero weight)
    mine = [int(bs[s if s < len(bs) else 0]["input_ids"].numel()) for s in range(run.n_steps)]
    run.step_rows = [max(col) for col in zip(*run.comm.all_gather_object(mine))]
    run.report.n_samples, run.report.n_loss_tokens, run.report.n_positions = int(n_samples), int(n_tok), int(n_pos)


def _plan(run: _Run, memory_budget: Optional[int], layer_groups: Optional[int]) -> None:
    """Phase plan: input groups (one probing forward, rank 0's answer broadcast), units, how each
    unit's statistics travel, owners and passes (by bytes under the budget, or legacy layer groups)."""
    if INPUT_MOMENT in run.stats:
        with calibration_mode(run.module, run.mods, backward=False):
            owner = input_groups(run.module, run.mods, _to(run.batches[0], run.device))
        run.input_owner = run.comm.broadcast_object(owner, src=0)
    else:
        run.input_owner = {n: n for n in run.mods}
    cost = lambda d_out, d_in: run.method.cost(d_out, d_in, run.config.r, run.opts)  # noqa: E731
    units = build_units(run.mods, run.input_owner, cost)
    run.units = {u.name: u.modules for u in units}
    costs = collection_costs(run.mods, units, run.method, run.opts, run.config.r, run.comm.world, run.step_rows,
                             {"compute": next(iter(run.mods.values())).weight.dtype, "stats": run.stats_dtype,
                              "solve": run.solve_dtype})
    run.unit_cost = {c.name: c for c in costs}
    run.report.stats_bytes_total = sum(c.stats_bytes for c in costs)
    run.rows_units = {c.name for c in costs if c.wire_bytes > 0}  # N > 1 ranks: rows to the owner
    if layer_groups is not None:
        if memory_budget is not None:
            raise ConfigError("initialize_adapters: give memory_budget or layer_groups, not both")
        run.plan = OwnerPlan.build(units, run.comm.world)
        rounds = run.plan.rounds()
        run.schedule = [[rounds[k] for k in g] for g in run.plan.groups(layer_groups)]
    else:
        if memory_budget is None:
            memory_budget = device_budget(run.device, run.comm)
        step = _step_footprint(run) if run.stats else 0
        run.report.memory_budget, run.report.calibration_step_bytes = int(memory_budget), step
        passes = plan_passes(costs, run.comm.world, int(memory_budget), reserved=step)
        run.report.pass_plan = passes
        if run.show:
            tqdm.write(str(passes))
        run.plan = OwnerPlan.assigned(units, run.comm.world, {r: [n for ps in passes.passes for n in ps.get(r, [])]
                                                             for r in range(run.comm.world)})
        run.schedule = [[{r: (ps[r][k] if k < len(ps.get(r, [])) else None) for r in range(run.comm.world)}
                         for k in range(max(len(v) for v in ps.values()))] for ps in passes.passes]
    run.report.plan = run.plan
    run.report.old_design_bytes_per_rank = [
        sum(c.stats_bytes for c in costs if run.plan.owner[c.name] != r) if run.comm.world > 1 else 0
        for r in range(run.comm.world)]


def _step_footprint(run: _Run) -> int:
    """Bytes one calibration micro-step holds by itself (its first batch, no hooks), the largest
    over ranks (footprint.py): the planner gets memory_budget minus this."""
    b = _to(run.batches[0], run.device)
    with calibration_mode(run.module, run.mods, backward=run.method.needs_backward):
        with LivePeak(run.device) as lp:
            _forward_backward(run, b, run.method.needs_backward, dummy=False)
    return run.comm.max_int(lp.rise)


def _modules_of(run: _Run, unit: Optional[str]) -> List[str]:
    return run.units[unit] if unit else []


def _collect(run: _Run, rounds: List[dict], reduce_every_step: bool) -> Dict:
    """Phase collect + reduce: one calibration pass over these rounds' units; returns this rank's
    owned totals (module -> slot -> summed tensor). Rows-mode units reach their owners during the
    pass (stats.Collector); local-mode units are reduced to them after it (or after every step)."""
    unit_names = [u for rd in rounds for u in rd.values() if u]
    names = [n for u in unit_names for n in run.units[u]]
    local = [n for u in unit_names if u not in run.rows_units for n in run.units[u]]
    run.report.passes += 1
    backward = run.method.needs_backward
    coll = Collector({n: run.mods[n] for n in names}, {u: run.units[u] for u in unit_names}, run.plan.owner,
                     run.rows_units & set(unit_names), run.stats, run.stats_dtype, backward, run.comm)
    for u in coll.rows_units:  # what an all-reduce of these statistics would send, for the report
        run.comm.allreduce_equivalent += 2 * (run.comm.world - 1) * run.unit_cost[u].stats_bytes // run.comm.world
    n_samples, n_tok, _ = run.norms
    with calibration_mode(run.module, run.mods, backward=backward):
        coll.attach()
        try:
            sbar = run.bar(run.n_steps, f"{run.config.init}: statistics pass {run.report.passes}/{len(run.schedule)}")
            for step in range(run.n_steps):
                with run.timed("collect"):
                    dummy = step >= len(run.batches)  # this rank has fewer batches: zero-weight pass
                    b = _to(run.batches[0 if dummy else step], run.device)
                    coll.ctx = step_context(b, run.opts, n_samples, n_tok, dummy)
                    if coll.rows_units:  # every rank's token masks and weights (9 B a token)
                        coll.peers = run.comm.all_gather_object((coll.ctx.mask, coll.ctx.weight))
                        run.comm.sent += 9 * coll.ctx.mask.numel() * (run.comm.world - 1)
                    _forward_backward(run, b, backward, dummy)
                    coll.finish_step()
                if reduce_every_step and local:
                    _reduce(run, coll, local)
                sbar.update(1)
            sbar.close()
        finally:
            coll.detach()
    if local:
        _reduce(run, coll, local)
    run.stats_peak = max(run.stats_peak, coll.peak)
    totals = coll.totals
    bad = next((f"layer {n!r}: non-finite {k} statistic (phase: collect)"
                for n, d in totals.items() for k, v in d.items() if not torch.isfinite(v).all()), None)
    run.comm.raise_if_any(bad, FloatingPointError)
    return totals


def _forward_backward(run: _Run, b: dict, backward: bool, dummy: bool) -> None:
    if backward:
        out = run.module(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        losses, _ = per_sample_losses(out.logits, b["labels"])
        (losses.sum() * (0.0 if dummy else 1.0)).backward()
    else:
        with torch.no_grad():
            run.module(input_ids=b["input_ids"], attention_mask=b["attention_mask"])


def _reduce(run: _Run, coll: Collector, names: List[str]) -> None:
    """Reduce this rank's local sums to their owners, one slot at a time (each freed once sent),
    into the collector's owned totals."""
    with run.timed("reduce"):
        sums = coll.take()
        for n in sorted(names):
            m = run.mods[n]
            owner = run.plan.owner_of(n)
            for key, shape in slot_shapes(run.stats, m.out_features, m.in_features,
                                          run.input_owner[n] == n).items():
                local_t = sums.get(n, {}).pop(key, None)  # dropped once reduced: no copy lingers
                if local_t is None:
                    local_t = torch.zeros(shape, dtype=run.stats_dtype, device=run.device)
                coll.inflight = _nbytes(sums) + local_t.numel() * local_t.element_size()
                coll.note()
                red = run.comm.reduce_to(local_t, owner)
                del local_t  # the owner's `red` is this very tensor: counted once, in the totals below
                if red is not None:
                    slot = coll.totals.setdefault(n, {})
                    slot[key] = slot[key] + red if key in slot else red
                coll.inflight = _nbytes(sums)
                coll.note()
        coll.inflight = 0


def _gather(run: _Run, rd: dict) -> Dict[str, torch.Tensor]:
    """Phase gather: the full W of each module this rank owns in round `rd`, in the solve dtype."""
    W_mine: Dict[str, torch.Tensor] = {}
    if WEIGHT not in run.method.needs:
        return W_mine
    comm = run.comm
    for r in range(comm.world):
        for n in _modules_of(run, rd[r]):
            W = comm.gather_full(run.mods[n].weight, dst=r)
            if r == comm.rank:
                W_mine[n] = W.to(dtype=run.solve_dtype).clone()
    run.weight_peak = max(run.weight_peak, _nbytes({"": W_mine}))
    return W_mine


def _solve(run: _Run, rd: dict, W_mine: Dict, totals: Dict, n_train, lr, keep_stats: bool) -> Dict:
    """Phase solve: this rank's unit of the round; an error on any rank is raised on every rank."""
    t = time.perf_counter()
    sols, failure = {}, None
    cfg = run.config
    for n in _modules_of(run, rd[run.comm.rank]):
        m = run.mods[n]
        prob = LayerProblem(name=n, d_out=m.out_features, d_in=m.in_features, r=cfg.r, scaling=m.scaling,
                            kind=cfg.kind, options=run.opts, seed=cfg.seed, n_train=n_train, lr=lr,
                            W=W_mine.get(n), n_samples=run.report.n_samples, dtype=run.solve_dtype,
                            stats=normalized(n, totals, run.input_owner, run.stats, run.norms[2]))
        if keep_stats:
            run.report.statistics[n] = prob.stats
        try:
            sol = run.method.solve(prob)
            for what, v in (("A", sol.A), ("B", sol.B), ("R", sol.R)):
                if v is not None and not torch.isfinite(v).all():
                    raise FloatingPointError(f"non-finite {what}")
        except (ConfigError, DataError) as e:  # raised on every rank below, as the same class
            failure = (type(e).__name__, str(e) if isinstance(e, ConfigError) else f"layer {n!r}: {e} (phase: solve)")
            break
        except Exception as e:  # named and raised on every rank below
            failure = ("FloatingPointError", f"layer {n!r}: {type(e).__name__}: {e} (phase: solve)")
            break
        sols[n] = sol
        run.report.layer_info[n] = dict(sol.info)
    dt = time.perf_counter() - t
    run.phases["solve"] += dt
    run.round_solve.append(dt)
    W_mine.clear()
    failures = [f for f in run.comm.all_gather_object(failure) if f]  # one collective for every rank
    if failures:
        kind, text = failures[0]
        raise {"ConfigError": ConfigError, "DataError": DataError}.get(kind, FloatingPointError)(text)
    return sols


def _write_layer(run: _Run, m: AdapterLinear, sol, src: int) -> None:
    """Phase write, one layer (collective): the owner's factors on every rank, cast to the adapter
    dtype and written; with `writes_weight`, W ← W − s·B·A in float64 from the factors as stored."""
    comm = run.comm
    shapes = {"A": (m.r, m.in_features), "B": (m.out_features, m.r)}
    if run.config.kind == "lora_xs":
        shapes["R"] = (m.r, m.r)
    given = {k: getattr(sol, k) for k in shapes} if comm.rank == src else None
    vals = comm.broadcast_tensors(given, shapes, run.solve_dtype, m.weight.device, src)
    A, B = vals["A"].to(m.adapter_dtype), vals["B"].to(m.adapter_dtype)
    values = {m.lora_A: A, m.lora_B: B}
    if "R" in vals:
        values[m.lora_R] = vals["R"].to(m.adapter_dtype)
    write_params(values)
    if run.method.writes_weight:
        W = comm.gather_full(m.weight, dst=src)
        new_W = W.double() - m.scaling * (B.double() @ A.double()) if comm.rank == src else None
        comm.scatter_full(m.weight, new_W, src)
        m.init_factors = (B.detach().clone(), A.detach().clone())


def _finish_report(run: _Run) -> InitReport:
    """Phase report: every rank's phases, bytes and peaks, gathered to every rank."""
    report, comm = run.report, run.comm
    per_round = comm.all_gather_object(run.round_solve)
    report.solve_wall = sum(max(rr[k] for rr in per_round) for k in range(len(run.round_solve)))
    report.solve_load = [sum(rr) for rr in per_round]
    report.phases = run.phases
    gathered = comm.all_gather_object({"phases": run.phases, "sent": comm.sent, "red": comm.reduce_sent,
                                       "ar": comm.allreduce_equivalent, "stats": run.stats_peak,
                                       "weight": run.weight_peak, "rss": _rss_mib(), "info": report.layer_info})
    report.phases_per_rank = [g["phases"] for g in gathered]
    report.bytes_sent_per_rank = [g["sent"] for g in gathered]
    report.reduce_bytes_per_rank = [g["red"] for g in gathered]
    report.allreduce_bytes_per_rank = [g["ar"] for g in gathered]
    report.stats_peak_bytes_per_rank = [g["stats"] for g in gathered]
    report.weight_peak_bytes_per_rank = [g["weight"] for g in gathered]
    report.rss_peak_mib_per_rank = [g["rss"] for g in gathered]
    for g in gathered:
        report.layer_info.update(g["info"])
    return report


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _model_device(module) -> torch.device:
    p = next(module.parameters())
    return p.ds_tensor.device if hasattr(p, "ds_tensor") else p.device


def _to(b: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}


def _nbytes(totals) -> int:
    return sum(t.numel() * t.element_size() for d in totals.values() for t in d.values())
