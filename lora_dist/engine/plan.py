"""Where work runs: a plain, printable plan of which rank owns which layer.

The unit of ownership is an *input group*: adapted modules that read the same input tensor (q/k/v;
gate/up) share one input moment, so one rank owns them together and factors it once. Owners come
from greedy longest-processing-time (LPT) over the per-unit solve cost: units in decreasing cost
(ties by name), each to the least-loaded rank (ties to the lowest rank). The result depends only on
the units, their costs and the world size, never on which rank builds it.

Rounds: rank j's k-th unit is solved in round k, so in every round each rank solves at most one
unit, all ranks at once. Layer groups: consecutive rounds collected in one forward/backward pass;
more groups mean more passes and less statistics memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

import torch

from ..errors import ConfigError
from .passes import UnitCost, unit_costs


@dataclass
class Unit:
    name: str            # the first module of the group
    modules: List[str]   # adapted modules reading the same input
    cost: float


def build_units(mods: Dict, input_owner: Dict[str, str], cost) -> List[Unit]:
    """One unit per input group, in model order; its cost is the sum of `cost(d_out, d_in)` over
    its modules (`mods`: name -> module with in_features/out_features)."""
    units: Dict[str, Unit] = {}
    for n, m in mods.items():
        src = input_owner[n]
        u = units.setdefault(src, Unit(name=src, modules=[], cost=0.0))
        u.modules.append(n)
        u.cost += cost(m.out_features, m.in_features)
    return list(units.values())


@dataclass
class OwnerPlan:
    world: int
    units: List[Unit]
    owner: Dict[str, int] = field(default_factory=dict)            # unit name -> rank
    by_rank: Dict[int, List[str]] = field(default_factory=dict)    # rank -> unit names, in solve order
    load: List[float] = field(default_factory=list)

    @classmethod
    def build(cls, units: List[Unit], world: int) -> "OwnerPlan":
        if world < 1:
            raise ConfigError(f"OwnerPlan: world size must be >= 1, got {world}")
        plan = cls(world=world, units=list(units))
        plan.load = [0.0] * world
        plan.by_rank = {r: [] for r in range(world)}
        for u in sorted(units, key=lambda u: (-u.cost, u.name)):
            r = min(range(world), key=lambda k: (plan.load[k], k))
            plan.owner[u.name] = r
            plan.by_rank[r].append(u.name)
            plan.load[r] += u.cost
        return plan

    @classmethod
    def assigned(cls, units: List[Unit], world: int, by_rank: Dict[int, List[str]]) -> "OwnerPlan":
        """A plan with given owners and solve order (e.g. from the pass planner, passes.py)."""
        plan = cls(world=world, units=list(units), by_rank={r: list(by_rank.get(r, [])) for r in range(world)})
        cost = {u.name: u.cost for u in units}
        plan.owner = {n: r for r, names in plan.by_rank.items() for n in names}
        plan.load = [sum(cost[n] for n in plan.by_rank[r]) for r in range(world)]
        return plan

    # -- queries ---------------------------------------------------------------------------------
    def unit(self, name: str) -> Unit:
        return next(u for u in self.units if u.name == name)

    def owner_of(self, module: str) -> int:
        for u in self.units:
            if module in u.modules:
                return self.owner[u.name]
        raise KeyError(module)

    @property
    def n_rounds(self) -> int:
        return max((len(v) for v in self.by_rank.values()), default=0)

    def rounds(self) -> List[Dict[int, Optional[str]]]:
        """Round k maps each rank to the unit it solves then (None: idle)."""
        return [{r: (self.by_rank[r][k] if k < len(self.by_rank[r]) else None) for r in range(self.world)}
                for k in range(self.n_rounds)]

    def groups(self, n_groups: Optional[int]) -> List[List[int]]:
        """Round indices per collection pass: `n_groups` contiguous, near-equal slices of the rounds."""
        n = self.n_rounds
        if not n_groups or n_groups <= 1 or n <= 1:
            return [list(range(n))]
        n_groups = min(n_groups, n)
        bounds = [round(i * n / n_groups) for i in range(n_groups + 1)]
        return [list(range(bounds[i], bounds[i + 1])) for i in range(n_groups)]

    def balance(self) -> float:
        """max load / mean load (1.0 = perfect)."""
        mean = sum(self.load) / self.world
        return max(self.load) / mean if mean > 0 else 1.0

    def to_dict(self) -> dict:
        return {"world": self.world, "owner": dict(self.owner), "load": list(self.load),
                "rounds": [{str(r): u for r, u in rd.items()} for rd in self.rounds()]}

    def __str__(self) -> str:
        lines = [f"OwnerPlan: {len(self.units)} units on {self.world} rank(s), {self.n_rounds} round(s), "
                 f"balance {self.balance():.3f}"]
        for r in range(self.world):
            lines.append(f"  rank {r}: load {self.load[r]:.3g}")
            for name in self.by_rank[r]:
                u = self.unit(name)
                lines.append(f"    {name}  [{len(u.modules)} module(s), cost {u.cost:.3g}]")
        return "\n".join(lines)


# -- by bytes: the statistics' cost per unit, the device budget, passes (passes.py) --------------
def collection_costs(mods: Dict, units: List[Unit], method, opts: Dict, r: int, world: int,
                     step_rows: List[int], dtypes: Dict[str, torch.dtype]) -> List[UnitCost]:
    """Each unit's bytes (statistics, solve workspace, W, rows in flight, wire) from the one
    accounting the memory tool uses (passes.unit_costs), for this run's micro-steps.

    On N > 1 ranks a unit's statistics travel as rows (its inputs and output gradients, to the
    owner every micro-step), so no rank holds a copy of statistics it does not own. Local sums
    reduced once would send fewer bytes where d_in² < steps·T·(d_in + Σd_out) (small layers, many
    tokens, as in the tests), but every rank would hold them for the whole pass: memory decides.
    One rank: local sums (they are the totals), `wire_bytes` 0, `inflight_bytes` the product temporaries."""
    modules = [(n, mods[n].out_features, mods[n].in_features, u.name) for u in units for n in u.modules]
    size = {k: torch.empty((), dtype=v).element_size() for k, v in dtypes.items()}
    costs = unit_costs(modules, method, opts, r, world=world, tokens_per_step=max(step_rows, default=1),
                       steps_per_rank=max(1, len(step_rows)), stats_itemsize=size["stats"],
                       solve_itemsize=size["solve"], compute_itemsize=size["compute"])
    out = []
    for c in costs:
        if world == 1:
            c = replace(c, wire_bytes=0)
        out.append(c)
    return out


def device_budget(device: torch.device, comm) -> int:
    """Bytes per rank when no budget is given: on a GPU, free memory minus a reserve of
    max(2 GiB, 10% of the device) for the calibration forward/backward; on CPU, available RAM
    (MemAvailable) split over the ranks of this node, minus 10%. The smallest over ranks, so every
    rank plans the same passes."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        mine = free - max(2 * 1024 ** 3, total // 10)
    else:
        mine = int(_available_ram() * 0.9) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return -comm.max_int(-int(mine))


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
