"""`initialize_adapters`: data-aware and SVD inits, spread across ranks, written into ZeRO-3 shards.

The flow (one code path for 1 process and N ranks):
  1. count calibration samples/tokens (global normalizers: results do not depend on batching);
  2. find input groups (modules reading the same input share one input moment) and build the
     owner plan (plan.py) over per-layer solve cost;
  3. per layer group (a slice of the plan's rounds): one calibration pass with hooks on that
     group's modules (stats.py), each statistic reduced to its owner rank only (comm.py);
  4. per round: every rank receives the full W of the unit it owns (gathered from the ZeRO shards
     to that rank alone), all ranks solve at once, then factors are broadcast and written (working
     copy + fp32 master), and rewritten W's are scattered straight into the shards.
"""
from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from ..adapters import AdapterLinear, adapter_modules
from ..comm import Comm
from ..config import AdapterConfig, ConfigError
from .methods import (INPUT_MOMENT, OUTPUT_GRAD_DIAG, OUTPUT_GRAD_FULL, WEIGHT, WEIGHT_GRADIENT,
                      LayerProblem, get_method)
from .plan import OwnerPlan, Unit
from .stats import Collector, StepContext, per_sample_losses, slot_shapes
from ..zero import unwrap_engine, write_params

BATCH_FIELDS = ("input_ids", "attention_mask", "labels")


@dataclass
class InitReport:
    method: str
    world: int
    n_layers: int = 0
    n_samples: int = 0
    n_loss_tokens: int = 0
    n_positions: int = 0
    passes: int = 0
    phases: Dict[str, float] = field(default_factory=dict)          # this rank's seconds per phase
    phases_per_rank: List[Dict[str, float]] = field(default_factory=list)
    solve_wall: float = 0.0             # Σ over rounds of the slowest rank's solve time
    solve_load: List[float] = field(default_factory=list)            # seconds each rank spent solving
    bytes_sent_per_rank: List[int] = field(default_factory=list)       # every collective
    reduce_bytes_per_rank: List[int] = field(default_factory=list)     # statistics reduced to owners
    allreduce_bytes_per_rank: List[int] = field(default_factory=list)
    stats_peak_bytes_per_rank: List[int] = field(default_factory=list)
    weight_peak_bytes_per_rank: List[int] = field(default_factory=list)
    rss_peak_mib_per_rank: List[float] = field(default_factory=list)
    plan: Optional[OwnerPlan] = None
    layer_info: Dict[str, dict] = field(default_factory=dict)
    statistics: Dict[str, dict] = field(default_factory=dict)  # with return_statistics: owner's layers only

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("plan", "statistics")}
        d["plan"] = self.plan.to_dict() if self.plan else None
        return d

    def summary(self) -> str:
        lines = [f"initialize_adapters: {self.method} on {self.n_layers} layers, {self.world} rank(s), "
                 f"{self.n_samples} samples, {self.passes} pass(es)"]
        if self.phases_per_rank:
            keys = list(self.phases_per_rank[0])
            lines.append("rank  " + "  ".join(f"{k:>8}" for k in keys) + "    sent MiB  stats MiB  rss MiB")
            for r, ph in enumerate(self.phases_per_rank):
                lines.append(f"{r:>4}  " + "  ".join(f"{ph[k]:8.3f}" for k in keys)
                             + f"  {self.bytes_sent_per_rank[r] / 2**20:10.3f}"
                             + f"  {self.stats_peak_bytes_per_rank[r] / 2**20:9.3f}"
                             + f"  {self.rss_peak_mib_per_rank[r]:7.0f}")
        lines.append(f"solve wall {self.solve_wall:.3f}s; reduce-to-owner sent "
                     f"{sum(self.reduce_bytes_per_rank) / 2**20:.3f} MiB vs all-reduce "
                     f"{sum(self.allreduce_bytes_per_rank) / 2**20:.3f} MiB")
        damped = {n: i for n, i in self.layer_info.items() if any(k.startswith("damping") for k in i)}
        if damped:
            worst = max(damped.items(), key=lambda kv: max(v for k, v in kv[1].items() if k.startswith("damping")))
            lines.append(f"damping: largest used {worst[1]} at {worst[0]}")
        return "\n".join(lines)


def _check_batches(batches: list, needs_labels: bool) -> list:
    if not batches:
        raise ConfigError("initialize_adapters: no calibration batches on this rank; every rank needs its "
                          "shard of the calibration samples (e.g. from a DistributedSampler)")
    fields = BATCH_FIELDS if needs_labels else BATCH_FIELDS[:2]
    for i, b in enumerate(batches):
        if not isinstance(b, dict):
            raise ConfigError(f"calibration batch {i} is a {type(b).__name__}; expected a dict with {list(fields)}")
        for f in fields:
            if f not in b:
                raise ConfigError(f"calibration batch {i} lacks field {f!r} (has {sorted(b)}); "
                                  f"batches need {list(fields)}")
        if b["input_ids"].shape != b["attention_mask"].shape or (needs_labels and b["labels"].shape != b["input_ids"].shape):
            raise ConfigError(f"calibration batch {i}: input_ids {tuple(b['input_ids'].shape)}, attention_mask "
                              f"{tuple(b['attention_mask'].shape)} and labels must have one shape")
    return batches


@contextlib.contextmanager
def _calibration_mode(module: nn.Module, mods: Dict[str, AdapterLinear], backward: bool):
    """Train mode (so gradient checkpointing applies) with every dropout off, nothing trainable,
    adapters bypassed, inputs requiring grad; everything restored on exit."""
    modes = {m: m.training for m in module.modules()}
    grads = {p: p.requires_grad for p in module.parameters()}
    handles = []
    try:
        module.train()
        for m in module.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
        for p in grads:
            p.requires_grad_(False)
        for m in mods.values():
            m.calibrating = True
        if backward:
            emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
            if emb is None:
                emb = next((m for m in module.modules() if isinstance(m, nn.Embedding)), None)
            if emb is None:
                raise ConfigError("initialize_adapters: cannot find the input embedding to start backward from")
            handles.append(emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True)))
        yield
    finally:
        for h in handles:
            h.remove()
        for m in mods.values():
            m.calibrating = False
        for p, g in grads.items():
            p.requires_grad_(g)
        for m, t in modes.items():
            m.training = t


def _input_groups(module, mods: Dict[str, AdapterLinear], batch: dict, comm: Comm) -> Dict[str, str]:
    """module -> the first module (model order) that reads the very same input tensor."""
    seen, keep, handles = {}, [], []

    def hook(name):
        def f(mod, inputs, out):
            x = inputs[0]
            keep.append(x)  # hold it: no address reuse while probing
            seen.setdefault(name, (x.data_ptr(), tuple(x.shape), x.stride(), x.storage_offset()))
        return f

    for n, m in mods.items():
        handles.append(m.register_forward_hook(hook(n)))
    try:
        with torch.no_grad():
            module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    first, owner = {}, {}
    for n in mods:
        key = seen.get(n)
        owner[n] = first.setdefault(key, n) if key is not None else n
    return comm.broadcast_object(owner, src=0)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def initialize_adapters(model_or_engine, config: Optional[AdapterConfig] = None,
                        batches: Optional[Iterable[dict]] = None, *, n_train: Optional[int] = None,
                        lr: Optional[float] = None, layer_groups: Optional[int] = None,
                        reduce_every_step: bool = False, stats_dtype: Optional[torch.dtype] = None,
                        solve_dtype: torch.dtype = torch.float64, micro_batch: Optional[int] = None,
                        progress: bool = True, return_statistics: bool = False) -> InitReport:
    """Run `config.init` on the adapters of `model_or_engine` (a model or a DeepSpeedEngine).

    batches: this rank's shard of the calibration samples, an iterable of dicts with input_ids,
        attention_mask and labels (-100 = no loss); on N ranks the result equals one process fed all.
    n_train, lr: the training-set size (LoRA-DA's N) and first warm-up learning rate (LoRA-SB's η),
        when init_options do not give them.
    layer_groups: collect statistics in this many passes (each over a slice of the plan's rounds):
        more forward/backward passes, less statistics memory. None = one pass.
    reduce_every_step: reduce each micro-batch's statistics to their owners at once, so no rank holds
        more than one micro-batch of non-owned statistics.
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
    module, engine = unwrap_engine(model_or_engine)
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
    report = InitReport(method=config.init, world=comm.world, n_layers=len(mods))
    if not config.needs_initialize:  # kaiming / gaussian: inject_adapters already did it
        return report
    method = get_method(config.init)
    opts = method.resolve_options(dict(config.init_options))
    stats = method.stats_needed(opts)
    stats_dtype = stats_dtype or method.stats_dtype or torch.float32
    needs_w = WEIGHT in method.needs
    device = _model_device(module)
    phases = {k: 0.0 for k in ("count", "collect", "reduce", "gather", "solve", "write")}
    show = progress and comm.rank == 0

    # 1. normalizers -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    if stats:
        batches = _check_batches(list(batches) if batches is not None else [], needs_labels=method.needs_backward)
        if micro_batch:
            if micro_batch < 1:
                raise ConfigError(f"initialize_adapters: micro_batch must be >= 1, got {micro_batch}")
            batches = [sub for b in batches for sub in _split(b, micro_batch)]
        local = [0.0, 0.0, 0.0]
        for b in batches:
            _, n_i = _sample_token_counts(b["labels"])
            pos = _position_mask(b, opts)
            local[0] += float((n_i > 0).sum())
            local[1] += float(n_i.sum())
            local[2] += float(pos.sum())
        n_samples, n_tok, n_pos = comm.sum_scalars(local)
        if method.needs_backward and n_samples == 0:
            raise ConfigError("calibration batches have no loss-bearing tokens (every label is -100)")
        if INPUT_MOMENT in stats and n_pos == 0:
            raise ConfigError("calibration batches have no positions kept by the attention mask")
        n_steps = comm.max_int(len(batches))
        report.n_samples, report.n_loss_tokens, report.n_positions = int(n_samples), int(n_tok), int(n_pos)
    phases["count"] += time.perf_counter() - t0

    # 2. input groups and the owner plan ---------------------------------------------------------
    if INPUT_MOMENT in stats:
        with _calibration_mode(module, mods, backward=False):
            input_owner = _input_groups(module, mods, _to(batches[0], device), comm)
    else:
        input_owner = {n: n for n in mods}
    units: Dict[str, Unit] = {}
    for n, m in mods.items():
        src = input_owner[n]
        u = units.setdefault(src, Unit(name=src, modules=[], cost=0.0))
        u.modules.append(n)
        u.cost += method.cost(m.out_features, m.in_features, config.r, opts)
    plan = OwnerPlan.build(list(units.values()), comm.world)
    report.plan = plan
    rounds = plan.rounds()
    groups = plan.groups(layer_groups)

    stats_peak, weight_peak, round_solve = 0, 0, []
    bar = _progress(show, total=len(rounds), desc=f"{config.init}: solve rounds")
    for group in groups:
        group_units = [rounds[k][r] for k in group for r in range(comm.world) if rounds[k][r]]
        group_mods = [n for u in group_units for n in units[u].modules]
        totals: Dict[str, Dict[str, torch.Tensor]] = {}

        # 3. collect and reduce to owners --------------------------------------------------------
        if stats:
            report.passes += 1
            coll = Collector({n: mods[n] for n in group_mods}, stats, input_owner, stats_dtype,
                             backward=method.needs_backward)

            def reduce_now():
                t = time.perf_counter()
                sums = coll.take()
                for n in sorted(group_mods):
                    m = mods[n]
                    owner = plan.owner_of(n)
                    for key, shape in slot_shapes(stats, m.out_features, m.in_features, input_owner[n] == n).items():
                        local_t = sums.get(n, {}).pop(key, None)  # dropped once reduced: no copy lingers
                        if local_t is None:
                            local_t = torch.zeros(shape, dtype=stats_dtype, device=device)
                        red = comm.reduce_to(local_t, owner)
                        if red is not None:
                            slot = totals.setdefault(n, {})
                            slot[key] = slot[key] + red if key in slot else red
                phases["reduce"] += time.perf_counter() - t

            with _calibration_mode(module, mods, backward=method.needs_backward):
                coll.attach()
                try:
                    sbar = _progress(show, total=n_steps, desc=f"{config.init}: statistics pass {report.passes}/{len(groups)}")
                    for step in range(n_steps):
                        t = time.perf_counter()
                        dummy = step >= len(batches)  # this rank has fewer batches: zero-weight pass
                        b = _to(batches[0] if dummy else batches[step], device)
                        coll.ctx = _step_context(b, opts, n_samples, n_tok, dummy)
                        if method.needs_backward:
                            out = module(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                            losses, _ = per_sample_losses(out.logits, b["labels"])
                            (losses.sum() * (0.0 if dummy else 1.0)).backward()
                            del out, losses
                        else:
                            with torch.no_grad():
                                module(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                        phases["collect"] += time.perf_counter() - t
                        stats_peak = max(stats_peak, coll.bytes_peak + _nbytes(totals))
                        if reduce_every_step:
                            reduce_now()
                        sbar.update(1)
                    sbar.close()
                finally:
                    coll.detach()
            if not reduce_every_step:
                reduce_now()
            stats_peak = max(stats_peak, coll.bytes_peak + _nbytes(totals))
            bad = next((f"layer {n!r}: non-finite {k} statistic (phase: collect)"
                        for n, d in totals.items() for k, v in d.items() if not torch.isfinite(v).all()), None)
            comm.raise_if_any(bad, FloatingPointError)

        # 4. rounds: gather W to owners, solve concurrently, write back ------------------------------
        for k in group:
            rd = rounds[k]
            t = time.perf_counter()
            mine = units[rd[comm.rank]].modules if rd[comm.rank] else []
            W_mine = {}
            if needs_w:
                for r in range(comm.world):
                    for n in (units[rd[r]].modules if rd[r] else []):
                        W = comm.gather_full(mods[n].weight, dst=r)
                        if r == comm.rank:
                            W_mine[n] = W.to(dtype=solve_dtype).clone()
                weight_peak = max(weight_peak, sum(w.numel() * w.element_size() for w in W_mine.values()))
            phases["gather"] += time.perf_counter() - t

            t = time.perf_counter()
            sols, err, cfg_err = {}, None, None
            for n in mine:
                m = mods[n]
                prob = LayerProblem(name=n, d_out=m.out_features, d_in=m.in_features, r=config.r,
                                    scaling=m.scaling, kind=config.kind, options=opts, seed=config.seed,
                                    n_train=n_train, lr=lr, W=W_mine.get(n), n_samples=report.n_samples,
                                    dtype=solve_dtype, stats=_normalized(n, totals, input_owner, stats, n_pos))
                if return_statistics:
                    report.statistics[n] = prob.stats
                try:
                    sol = method.solve(prob)
                    for what, v in (("A", sol.A), ("B", sol.B), ("R", sol.R)):
                        if v is not None and not torch.isfinite(v).all():
                            raise FloatingPointError(f"non-finite {what}")
                except ConfigError as e:  # raised on every rank below, as a ConfigError
                    cfg_err = str(e)
                    break
                except Exception as e:  # named and raised on every rank below
                    err = f"layer {n!r}: {type(e).__name__}: {e} (phase: solve)"
                    break
                sols[n] = sol
                report.layer_info[n] = dict(sol.info)
            solve_t = time.perf_counter() - t
            phases["solve"] += solve_t
            round_solve.append(solve_t)
            W_mine.clear()
            comm.raise_if_any(cfg_err, ConfigError)
            comm.raise_if_any(err, FloatingPointError)

            t = time.perf_counter()
            for r in range(comm.world):
                for n in (units[rd[r]].modules if rd[r] else []):
                    _write_layer(mods[n], sols.get(n), r, comm, method.writes_weight, config.kind, solve_dtype)
            phases["write"] += time.perf_counter() - t
            bar.update(1)
        totals.clear()
    bar.close()

    for m in mods.values():
        m.needs_init = False
    per_round = comm.all_gather_object(round_solve)
    report.solve_wall = sum(max(rr[k] for rr in per_round) for k in range(len(round_solve)))
    report.solve_load = [sum(rr) for rr in per_round]
    report.phases = phases
    gathered = comm.all_gather_object({"phases": phases, "sent": comm.sent, "red": comm.reduce_sent,
                                       "ar": comm.allreduce_equivalent,
                                       "stats": stats_peak, "weight": weight_peak, "rss": _rss_mib(),
                                       "info": report.layer_info})
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


def _write_layer(m: AdapterLinear, sol, src: int, comm: Comm, writes_weight: bool, kind: str, dtype):
    """Broadcast one layer's factors from its owner and write them everywhere (collective)."""
    shapes = {"A": (m.r, m.in_features), "B": (m.out_features, m.r)}
    if kind == "lora_xs":
        shapes["R"] = (m.r, m.r)
    vals = {}
    for key, shape in shapes.items():
        dev = m.weight.device
        t = (getattr(sol, key).to(device=dev, dtype=dtype).contiguous() if comm.rank == src
             else torch.empty(shape, dtype=dtype, device=dev))
        vals[key] = comm.broadcast(t, src)
    # as stored: the adapter dtype; W is rewritten with exactly these values
    A = vals["A"].to(m.adapter_dtype)
    B = vals["B"].to(m.adapter_dtype)
    values = {m.lora_A: A, m.lora_B: B}
    if "R" in vals:
        values[m.lora_R] = vals["R"].to(m.adapter_dtype)
    write_params(values)
    if writes_weight:
        new_W = None
        if comm.rank == src:
            W = comm.gather_full(m.weight, dst=src)
            new_W = W.double() - m.scaling * (B.double() @ A.double())
        else:
            comm.gather_full(m.weight, dst=src)
        comm.scatter_full(m.weight, new_W, src)
        m.init_factors = (B.detach().clone(), A.detach().clone())


def _normalized(name, totals, input_owner, stats, n_pos) -> dict:
    out = {}
    if name not in totals and not (INPUT_MOMENT in stats and input_owner[name] in totals):
        return out
    t = totals.get(name, {})
    if INPUT_MOMENT in stats:
        src = totals[input_owner[name]]
        out[INPUT_MOMENT] = {"second": src["second"] / n_pos, "mean": src["sum"] / n_pos, "count": n_pos}
    if WEIGHT_GRADIENT in stats:
        out[WEIGHT_GRADIENT] = t["g"]  # already weighted by w_i (global normalizers)
    if OUTPUT_GRAD_DIAG in stats:
        out[OUTPUT_GRAD_DIAG] = t["G_diag"] / n_pos
    if OUTPUT_GRAD_FULL in stats:
        out[OUTPUT_GRAD_FULL] = t["G_full"] / n_pos
    return out


def _split(b: dict, k: int) -> list:
    """Sub-batches of at most k rows, each cut after its last attended column."""
    out = []
    n = b["input_ids"].shape[0]
    for s in range(0, n, k):
        sub = {key: (v[s:s + k] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v)
               for key, v in b.items()}
        cols = sub["attention_mask"].bool().any(0).nonzero()
        width = int(cols.max()) + 1 if len(cols) else 1
        out.append({key: (v[:, :width] if torch.is_tensor(v) and v.dim() == 2 else v) for key, v in sub.items()})
    return out


def _model_device(module) -> torch.device:
    p = next(module.parameters())
    return p.ds_tensor.device if hasattr(p, "ds_tensor") else p.device


def _to(b: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}


def _sample_token_counts(labels):
    valid = labels[:, 1:] != -100
    return valid, valid.sum(1)


def _position_mask(b, opts) -> torch.Tensor:
    """Positions the input/output-gradient factors run over: attention-mask positions, or the
    loss-bearing ones (input position t predicts label t+1)."""
    if opts["factor_positions"] == "loss":
        valid, _ = _sample_token_counts(b["labels"])
        return torch.nn.functional.pad(valid, (0, 1), value=False) & b["attention_mask"].bool()
    return b["attention_mask"].bool()


def _step_context(b, opts, n_samples, n_tok, dummy) -> StepContext:
    mask = _position_mask(b, opts)
    if "labels" in b:
        _, n_i = _sample_token_counts(b["labels"])
        if opts["gradient_weighting"] == "token_mean":
            w = n_i.double() / max(n_tok, 1)
        else:
            w = (n_i > 0).double() / max(n_samples, 1)
    else:
        w = torch.zeros(mask.shape[0], dtype=torch.float64)
    if dummy:
        mask = torch.zeros_like(mask)
        w = torch.zeros_like(w)
    return StepContext(mask, w[:, None].expand(mask.shape).to(torch.float64))


def _nbytes(totals) -> int:
    return sum(t.numel() * t.element_size() for d in totals.values() for t in d.values())


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(show: bool, total: int, desc: str):
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False)
