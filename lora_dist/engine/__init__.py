"""The calibration-statistics engine, in three separable parts:

- what to compute: `methods/` (each init declares its statistics and solves one layer), `stats.py`
  (the hooks that accumulate them);
- where it runs: `plan.py` (the owner plan, a plain printable object);
- how bytes move: `lora_dist.comm` (a no-op at world size 1).

`initialize.py` drives them: count, plan, collect + reduce, gather, solve, write, report.
"""
from .initialize import InitReport, initialize_adapters

__all__ = ["initialize_adapters", "InitReport"]
