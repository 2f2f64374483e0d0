"""The init's pass planner: who owns each unit, and which units share a collection pass.

Pure arithmetic: no process group, no torch. Every rank builds the same plan from the same inputs.

API (all that the engine and the memory tool need):

    units = [UnitCost(name, stats_bytes, workspace_bytes, weight_bytes, inflight_bytes,
                      wire_bytes, solve_cost), ...]
    plan = plan_passes(units, world, budget_bytes)      # -> PassPlan, or ConfigError
    plan.owner[name] -> rank;  plan.passes[p][rank] -> unit names that rank owns in pass p
    plan.peak[p][rank] -> predicted bytes;  plan.wire_sent / plan.wire_recv[p][rank] -> bytes
    plan.n_passes, plan.max_peak(), plan.stats_bytes_max_rank(), str(plan), plan.to_dict()

A *unit* is an adapted module or an input group sharing Σxᵀx (see plan.py). Per unit:
- `stats_bytes`: its reduced statistics, held by its owner from the start of its pass until solved;
- `workspace_bytes`: what its solve allocates on the owner beyond the statistics;
- `weight_bytes`: the gathered base weight W the owner keeps for the solve (0 if not needed);
- `inflight_bytes`: the most a rank buffers while this unit's hook rows of one micro-step are
  exchanged (rows x, δ and weights sent, plus those received by the owner);
- `wire_bytes`: what one rank sends to the owner for this unit over one pass (its rows);
- `solve_cost`: relative solve cost (Method.cost).

Owners: longest-processing-time greedy over two loads at once. Each unit's size is
max(stats/Σstats, cost/Σcost); units in decreasing size (ties by name) go to the rank whose larger
normalized load after adding it is smallest (ties to the lower rank). So neither the bytes nor the
solve time piles up on one rank.

Passes: the per-rank peak of pass p on rank j is

    peak = Σ_{u owned by j in p} stats_u  +  max(max_{u owned by j in p} inflight_u, max_{u in p} send_u)
           +  max_{u owned by j in p} (workspace_u + W_u)

(owned totals of the pass; one unit's exchange at a time: receiving and forming the products of a
unit it owns, or sending its own rows of any unit; one solve at a time), on top of
`reserved` (the calibration micro-step, measured by the engine). The planner takes the smallest
k ≥ ⌈max_j Σ stats_j / (budget − reserved − inflight_max)⌉ for which every rank packs its
own units into k passes under the budget (worst-fit decreasing: each unit, largest first, into the
emptiest pass where it fits, so the passes come out even). Passes are cut by bytes, not by rounds.
A unit that does not fit alone, stats + workspace + W + inflight_max > budget, is a ConfigError
naming it and the bytes it needs, raised before anything runs.

`unit_costs(modules, method, opts, r, ...)` builds the UnitCost list from (name, d_out, d_in, group)
tuples with the engine's own formulas (stats.slot_shapes, Method.workspace_bytes, Method.cost), so
the engine and the memory tool (lora_dist.memory.init_cost) share one accounting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from ..errors import ConfigError
from .methods.base import INPUT_MOMENT, OUTPUT_GRAD_DIAG, OUTPUT_GRAD_FULL, WEIGHT, WEIGHT_GRADIENT
from .stats import Collector, slot_shapes

GiB = 1024 ** 3


def fmt_bytes(n: float) -> str:
    """Human-readable bytes (binary units)."""
    for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class UnitCost:
    name: str
    stats_bytes: int
    workspace_bytes: int = 0
    weight_bytes: int = 0
    inflight_bytes: int = 0
    wire_bytes: int = 0
    solve_cost: float = 0.0
    hook_flops_per_token: int = 0   # forming its statistics on the owner (for the cost model)
    send_bytes: int = 0             # a non-owner's part of inflight_bytes: its own rows of one micro-step

    @property
    def solve_bytes(self) -> int:
        return self.workspace_bytes + self.weight_bytes


@dataclass
class PassPlan:
    world: int
    budget: int
    units: Dict[str, UnitCost]
    owner: Dict[str, int]
    passes: List[Dict[int, List[str]]]                      # pass -> rank -> owned unit names
    reserved: int = 0                                          # budget bytes held by the calibration step
    peak: List[List[int]] = field(default_factory=list)        # pass -> rank -> predicted bytes
    collect_peak: List[List[int]] = field(default_factory=list)  # the same during collection (no solve)
    wire_sent: List[List[int]] = field(default_factory=list)   # pass -> rank -> bytes sent
    wire_recv: List[List[int]] = field(default_factory=list)   # pass -> rank -> bytes received

    @property
    def n_passes(self) -> int:
        return len(self.passes)

    def max_peak(self) -> int:
        return max((max(p) for p in self.peak), default=0)

    def stats_bytes_total(self) -> int:
        return sum(u.stats_bytes for u in self.units.values())

    def stats_bytes_max_rank(self) -> int:
        """Largest statistics a rank holds at once (its owned totals of one pass)."""
        return max((sum(self.units[n].stats_bytes for n in names)
                    for ps in self.passes for names in ps.values()), default=0)

    def wire_bytes_max_rank(self) -> int:
        """Most bytes one rank moves (sent + received) over all passes."""
        return max((sum(self.wire_sent[p][r] + self.wire_recv[p][r] for p in range(self.n_passes))
                    for r in range(self.world)), default=0)

    def to_dict(self) -> dict:
        return {"world": self.world, "budget_bytes": self.budget, "reserved_bytes": self.reserved,
                "passes": self.n_passes,
                "owner": dict(self.owner),
                "units_per_pass": [{str(r): list(v) for r, v in ps.items()} for ps in self.passes],
                "peak_bytes": [list(p) for p in self.peak], "max_peak_bytes": self.max_peak(),
                "collect_peak_bytes": [list(p) for p in self.collect_peak],
                "stats_bytes_total": self.stats_bytes_total(),
                "stats_bytes_max_rank": self.stats_bytes_max_rank(),
                "wire_sent_bytes": [list(p) for p in self.wire_sent],
                "wire_recv_bytes": [list(p) for p in self.wire_recv]}

    def __str__(self) -> str:
        lines = [f"PassPlan: {len(self.units)} units on {self.world} rank(s), {self.n_passes} pass(es), "
                 f"budget {fmt_bytes(self.budget)}/rank ({fmt_bytes(self.reserved)} of it one calibration step), "
                 f"predicted peak {fmt_bytes(self.max_peak())} + the step, "
                 f"statistics {fmt_bytes(self.stats_bytes_total())} in all"]
        for p, ps in enumerate(self.passes):
            n = sum(len(v) for v in ps.values())
            lines.append(f"  pass {p}: {n} unit(s), peak/rank max {fmt_bytes(max(self.peak[p]))}, "
                         f"wire/rank max sent {fmt_bytes(max(self.wire_sent[p]))}, "
                         f"received {fmt_bytes(max(self.wire_recv[p]))}")
            for r in range(self.world):
                if ps.get(r):
                    lines.append(f"    rank {r}: {', '.join(ps[r])}  [{fmt_bytes(self.peak[p][r])}]")
        return "\n".join(lines)


def assign_owners(units: Sequence[UnitCost], world: int) -> Dict[str, int]:
    """Two-load LPT: balance statistics bytes and solve cost over the ranks (see module doc)."""
    tot_b = float(sum(u.stats_bytes for u in units)) or 1.0
    tot_c = float(sum(u.solve_cost for u in units)) or 1.0
    load_b, load_c = [0.0] * world, [0.0] * world
    owner = {}

    def size(u):
        return max(u.stats_bytes / tot_b, u.solve_cost / tot_c)

    for u in sorted(units, key=lambda u: (-size(u), u.name)):
        r = min(range(world), key=lambda k: (max((load_b[k] + u.stats_bytes) / tot_b,
                                                 (load_c[k] + u.solve_cost) / tot_c), k))
        owner[u.name] = r
        load_b[r] += u.stats_bytes
        load_c[r] += u.solve_cost
    return owner


def _pack(units: List[UnitCost], k: int, capacity: int):
    """Worst-fit decreasing of one rank's units into k passes; None if some unit does not fit."""
    bins: List[List[UnitCost]] = [[] for _ in range(k)]
    used = [0] * k
    for u in sorted(units, key=lambda u: (-u.stats_bytes, -u.solve_bytes, u.name)):
        best = None
        for b in range(k):
            need = used[b] + u.stats_bytes + max([u.solve_bytes] + [v.solve_bytes for v in bins[b]])
            if need <= capacity and (best is None or used[b] < used[best]):
                best = b
        if best is None:
            return None
        bins[best].append(u)
        used[best] += u.stats_bytes
    return bins


def plan_passes(units: Sequence[UnitCost], world: int, budget: int, reserved: int = 0) -> PassPlan:
    """The fewest passes whose predicted per-rank peak fits `budget` − `reserved` bytes (see module
    doc); `reserved`: what the init holds besides its own buffers (the engine: one calibration
    micro-step's activations and gathered parameters, measured)."""
    if world < 1:
        raise ConfigError(f"world size must be >= 1, got {world}")
    units = list(units)
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise ConfigError(f"unit names must be unique; repeated: {sorted({n for n in names if names.count(n) > 1})}")
    inflight = max((u.inflight_bytes for u in units), default=0)
    for u in sorted(units, key=lambda u: u.name):
        need = u.stats_bytes + u.solve_bytes + inflight + reserved
        if need > budget:
            raise ConfigError(
                f"init memory budget {budget} B ({fmt_bytes(budget)}) per rank is too small for unit "
                f"{u.name!r}: it needs {need} B ({fmt_bytes(need)}) alone (statistics {u.stats_bytes}, "
                f"solve workspace {u.workspace_bytes}, gathered W {u.weight_bytes}, in-flight rows {inflight}, "
                f"one calibration micro-step {reserved}); "
                "raise the budget (init_memory_budget) or lower the statistics dtype")
    owner = assign_owners(units, world)
    mine = {r: [u for u in units if owner[u.name] == r] for r in range(world)}
    capacity = budget - reserved - inflight
    held = max((sum(u.stats_bytes for u in v) for v in mine.values()), default=0)
    k = max(1, math.ceil(held / capacity))  # a lower bound: no pass holds more than the capacity
    while True:
        packed = {r: _pack(mine[r], k, capacity) for r in range(world)}
        if all(b is not None for b in packed.values()):
            break
        k += 1  # terminates: at k = units per rank every unit has a pass to itself, and each fits alone
    passes = [{r: [u.name for u in packed[r][p]] for r in range(world) if packed[r][p]} for p in range(k)]
    passes = [ps for ps in passes if ps]
    plan = PassPlan(world=world, budget=budget, units={u.name: u for u in units}, owner=owner, passes=passes,
                    reserved=reserved)
    _fill_costs(plan)
    return plan


def _fill_costs(plan: PassPlan) -> None:
    """Predicted peak and wire bytes per pass and rank."""
    N = plan.world
    for ps in plan.passes:
        in_pass = [plan.units[n] for names in ps.values() for n in names]
        send = max((u.send_bytes for u in in_pass), default=0)
        peak, collect, sent, recv = [], [], [], []
        for r in range(N):
            own = [plan.units[n] for n in ps.get(r, [])]
            held = sum(u.stats_bytes for u in own)
            # receiving and forming its own units' products, or sending its rows of another's
            inflight = max([send] + [u.inflight_bytes for u in own])
            collect.append(held + inflight)
            peak.append(held + inflight + max((u.solve_bytes for u in own), default=0))
            recv.append(sum(u.wire_bytes for u in own) * (N - 1))
            sent.append(sum(u.wire_bytes for u in in_pass) - sum(u.wire_bytes for u in own))
        plan.peak.append(peak)
        plan.collect_peak.append(collect)
        plan.wire_sent.append(sent)
        plan.wire_recv.append(recv)


def _product_temporaries(stats: frozenset, d_outs: List[int], d_in: int, c: int, s_b: int) -> int:
    """The most bytes Collector._products holds besides the totals while adding one chunk of c
    positions in the statistics dtype: x (c·d_in) plus, for Σxᵀx, its masked rows and their
    transposed copy (2·c·d_in); for g, δ and w·δ (2·c·d_out); for Σδ²/Σδᵀδ, δ and its masked rows
    twice (3·c·d_out); the largest of these over the unit's modules (one product at a time)."""
    if not stats:
        return 0
    most = 2 * d_in if INPUT_MOMENT in stats else 0
    for d_out in d_outs:
        if WEIGHT_GRADIENT in stats:
            most = max(most, 2 * d_out)
        if OUTPUT_GRAD_DIAG in stats or OUTPUT_GRAD_FULL in stats:
            most = max(most, 3 * d_out)
    return c * s_b * (d_in + most)


def unit_costs(modules: Sequence[Tuple[str, int, int, str]], method, opts: Dict, r: int, *, world: int,
               tokens_per_step: int, steps_per_rank: int, stats_itemsize: int, solve_itemsize: int,
               compute_itemsize: int) -> List[UnitCost]:
    """UnitCosts of the sharded collection for `modules` = (name, d_out, d_in, group), group = the
    first module reading the same input (the unit's name).

    Per unit: statistics = Σ over its modules of slot_shapes(stats_needed) · stats_itemsize; solve
    workspace = the largest module's Method.workspace_bytes (+ its statistics' copy in the solve
    dtype when the dtypes differ); W = its modules' weights in the solve dtype if the method needs W;
    rows per token = d_in (x) + Σ d_out (δ, if a backward statistic is needed), compute_itemsize
    bytes each, + 9 B (float64 weight, bool mask); in flight = the owner receiving all `world`
    ranks' rows of one micro-step plus its own send copy, (world + 1)·T·row bytes (none on one
    process: local sums), plus the product temporaries of one chunk of min(T, Collector.CHUNK)
    positions (_product_temporaries); wire = steps_per_rank·T·row bytes sent per rank;
    hook FLOPs per token = 2 · (elements of every product but Σx)."""
    stats = (method.stats_needed(opts) if method.needs_data else frozenset()) - {WEIGHT}
    s_b, w_b, T = stats_itemsize, solve_itemsize, tokens_per_step
    needs_d = method.needs_backward and bool(stats)
    groups: Dict[str, list] = {}
    for name, d_out, d_in, group in modules:
        groups.setdefault(group, []).append((name, d_out, d_in))
    units = []
    for g, mods in groups.items():
        d_in = mods[0][2]
        sb, ws, wb, cost, flops = 0, 0, 0, 0.0, 0
        for name, d_out, _ in mods:
            shapes = slot_shapes(stats, d_out, d_in, name == g)
            elems = sum(math.prod(s) for s in shapes.values())
            sb += elems * s_b
            conv = elems * w_b if s_b != w_b else 0  # the solve's .to(solve dtype) copies
            ws = max(ws, method.workspace_bytes(d_out, d_in, r, opts, w_b) + conv)
            wb += d_out * d_in * w_b if WEIGHT in method.needs else 0
            cost += method.cost(d_out, d_in, r, opts)
            flops += 2 * sum(math.prod(s) for k, s in shapes.items() if k != "sum")
        row = (d_in if stats else 0) + (sum(m[1] for m in mods) if needs_d else 0)
        row_bytes = row * compute_itemsize + (9 if needs_d else 0)
        rows = (world + 1) * T * row_bytes if world > 1 else 0  # one process: local sums, no rows
        inflight = rows + _product_temporaries(stats, [m[1] for m in mods], d_in, min(T, Collector.CHUNK), s_b)
        units.append(UnitCost(g, stats_bytes=sb, workspace_bytes=ws, weight_bytes=wb, inflight_bytes=inflight,
                              wire_bytes=steps_per_rank * T * row_bytes, solve_cost=cost,
                              hook_flops_per_token=flops, send_bytes=T * row_bytes if world > 1 else 0))
    return units
