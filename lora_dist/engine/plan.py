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

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..errors import ConfigError


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
