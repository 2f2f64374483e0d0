"""`InitReport`: what one `initialize_adapters` call did, per rank, as plain numbers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .passes import PassPlan
from .plan import OwnerPlan


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
    reduce_bytes_per_rank: List[int] = field(default_factory=list)     # statistics moved to owners
    allreduce_bytes_per_rank: List[int] = field(default_factory=list)
    memory_budget: int = 0              # bytes per rank given (or derived from the device); 0: layer_groups
    calibration_step_bytes: int = 0     # measured: one calibration micro-step alone; planned under budget − this
    stats_bytes_total: int = 0          # the reduced statistics of every adapted layer, summed
    stats_peak_bytes_per_rank: List[int] = field(default_factory=list)  # measured: live tensors
    weight_peak_bytes_per_rank: List[int] = field(default_factory=list)
    rss_peak_mib_per_rank: List[float] = field(default_factory=list)
    old_design_bytes_per_rank: List[int] = field(default_factory=list)  # local sums + one reduce, same plan
    plan: Optional[OwnerPlan] = None
    pass_plan: Optional[PassPlan] = None  # passes, units per pass, predicted peak and wire bytes
    layer_info: Dict[str, dict] = field(default_factory=dict)
    statistics: Dict[str, dict] = field(default_factory=dict)  # with return_statistics: owner's layers only

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("plan", "pass_plan", "statistics")}
        d["plan"] = self.plan.to_dict() if self.plan else None
        d["pass_plan"] = self.pass_plan.to_dict() if self.pass_plan else None
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
        lines.append(f"solve wall {self.solve_wall:.3f}s; statistics to owners sent "
                     f"{sum(self.reduce_bytes_per_rank) / 2**20:.3f} MiB vs all-reduce "
                     f"{sum(self.allreduce_bytes_per_rank) / 2**20:.3f} MiB; statistics total "
                     f"{self.stats_bytes_total / 2**20:.3f} MiB")
        damped = {n: i for n, i in self.layer_info.items() if any(k.startswith("damping") for k in i)}
        if damped:
            worst = max(damped.items(), key=lambda kv: max(v for k, v in kv[1].items() if k.startswith("damping")))
            lines.append(f"damping: largest used {worst[1]} at {worst[0]}")
        return "\n".join(lines)
