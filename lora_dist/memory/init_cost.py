"""The data-aware init in the memory and cost model: memory per GPU, passes, wire bytes, wall time.

One accounting with the engine: the units' bytes come from `engine.passes.unit_costs` (the
statistics of a module are `engine.stats.slot_shapes` of the method's `stats_needed`, in the
method's statistics dtype; the solve workspace is the method's `workspace_bytes`; the solve cost
is its `cost`); owners and passes come from `engine.passes.plan_passes`.

Units (as the engine forms them): modules reading the same input share Σxᵀx and one owner. For the
Llama family: {q,k,v}_proj, o_proj, {gate,up}_proj, down_proj per layer.

Sharded collection (the design): each micro-batch's hook rows of a unit, inputs x (T×d_in) and
output gradients δ (T×d_out per module) in the compute dtype, plus a float64 weight and a bool mask
per token, go to the unit's owner, which forms the products in the statistics dtype. Per unit:
- wire bytes a rank sends per pass: steps_per_rank · T · row bytes (T = micro-batch · seq tokens);
- in flight, one unit at a time: the owner receives all N ranks' rows of one micro-step at once
  (plus its own contiguous send copy): (N + 1)·T·row bytes, and converts them to the statistics
  dtype in chunks of 512 positions (Collector.CHUNK).

Memory: budget = usable GPU memory − the training step's resident states (parameters, gradients,
optimizer and ZeRO buffers on the GPU) − the calibration forward/backward's activation peak (the
training step's, at the calibration micro-batch, scaled linearly to the calibration length).
`peak_bytes` = planned init peak + that activation peak: what the init adds on top of the states.

Time (stated rates, `Rates`; A800-80GB defaults):
- calibration pass: f·P·tokens / (N · bf16 peak · MFU), f = 2 (forward-only statistics),
  4 (forward + input-gradient backward; the weights are frozen) or 6 (with checkpointing);
- hooks: on each owner, per token 2·d_in² (Σxᵀx), 2·d_out·d_in (g), 2·d_out (diag G),
  2·d_out² (full G) FLOPs at the hook dtype's GEMM rate × efficiency; the busiest rank counts;
- solves: 2·Method.cost FLOPs per module at the solve dtype's rate × solve efficiency, busiest rank;
- wire: per pass, the busiest rank's max(sent, received) over NVLink (same node) and the node
  interconnect shared by the node's GPUs (other nodes), in proportion to the peers there;
- epoch: f·P·epoch_samples·seq_len / (N · bf16 · MFU) with f = 4 or 6 as above (LoRA training:
  no base-weight gradients); fraction_of_epoch = init seconds / epoch seconds.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

from ..engine.methods import get_method
from ..engine.passes import plan_passes, unit_costs
from ..errors import ConfigError, MemoryConfigError

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
INPUT_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class Rates:
    """Stated hardware rates (A800-80GB SXM; dense, no sparsity)."""
    bf16_tflops: float = 312.0          # tensor-core bf16 peak
    mfu: float = 0.40                   # model FLOPs utilization of forward/backward passes
    gemm_tflops: Dict[str, float] = field(default_factory=lambda: {
        "float64": 19.5,                # DGEMM on FP64 tensor cores (9.7 without)
        "float32": 19.5,                # plain fp32 GEMM, TF32 off
        "tf32": 156.0,                  # fp32 inputs on TF32 tensor cores, fp32 accumulation
        "bfloat16": 312.0})             # bf16 inputs, fp32 accumulation
    gemm_efficiency: float = 0.7        # of peak, large hook GEMMs
    solve_efficiency: float = 0.10      # 2·Method.cost / time over the GEMM rate: 0.09-0.28 measured (CPU, fp64)
    nvlink_gbs: float = 200.0           # GB/s per GPU per direction (A800: 400 GB/s bidirectional)
    node_link_gbs: float = 100.0        # GB/s per node per direction (4 × 200 Gb/s)


def adapted_modules(config, target_modules) -> List[tuple]:
    """(name, d_out, d_in, group) of every adapted projection of a Llama-family config, in model
    order; group = the unit (the first module reading the same input)."""
    if getattr(config, "model_type", None) not in ("llama", "mistral", "qwen2"):
        raise MemoryConfigError(f"--init accounting knows Llama-family configs; got model_type "
                                f"{getattr(config, 'model_type', None)!r}")
    h, f = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    unknown = sorted(set(target_modules) - set(shapes))
    if unknown:
        raise MemoryConfigError(f"--target-modules {unknown} are not Llama projections {sorted(shapes)}")
    out = []
    for i in range(config.num_hidden_layers):
        first = {}
        for leaf in shapes:
            if leaf not in target_modules:
                continue
            sib = next((s for s in INPUT_SIBLINGS if leaf in s), (leaf,))
            name = f"model.layers.{i}.{'self_attn' if leaf in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{leaf}"
            group = first.setdefault(sib, name)
            out.append((name, *shapes[leaf], group))
    return out


@dataclass
class InitSpec:
    """One init to account: method, calibration samples × length, micro-batch, precisions."""
    method: str
    samples: int
    seq_len: int
    micro_batch: int = 1
    r: int = 16
    options: Dict = field(default_factory=dict)
    compute_dtype: str = "bfloat16"     # dtype of the hook rows on the wire
    stats_dtype: Optional[str] = None   # None: the method's (LoRA-DA float64) or float32
    hook_dtype: Optional[str] = None    # GEMM rate of the hook products; None: the statistics dtype
    solve_dtype: str = "float64"

    def validate(self):
        for k in ("samples", "seq_len", "micro_batch", "r"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MemoryConfigError(f"--init-{k.replace('_', '-')} must be an integer >= 1, got {v!r}")
        for k in ("compute_dtype", "stats_dtype", "solve_dtype"):
            v = getattr(self, k)
            if v is not None and v not in DTYPES:
                raise MemoryConfigError(f"init {k}={v!r}; choose one of {list(DTYPES)}")
        if self.hook_dtype is not None and self.hook_dtype not in Rates().gemm_tflops:
            raise MemoryConfigError(f"--init-hook-dtype={self.hook_dtype!r}; choose one of "
                                    f"{list(Rates().gemm_tflops)}")


def _itemsize(name: str) -> int:
    return torch.empty((), dtype=DTYPES[name]).element_size()


def init_units(modules, spec: InitSpec, world: int):
    """(UnitCost list, statistics dtype name) for the sharded design: engine.passes.unit_costs."""
    method = get_method(spec.method)
    opts = method.resolve_options(spec.options)
    s_name = spec.stats_dtype or {torch.float64: "float64"}.get(method.stats_dtype, "float32")
    units = unit_costs(modules, method, opts, spec.r, world=world, tokens_per_step=spec.micro_batch * spec.seq_len,
                       steps_per_rank=math.ceil(spec.samples / (world * spec.micro_batch)),
                       stats_itemsize=_itemsize(s_name), solve_itemsize=_itemsize(spec.solve_dtype),
                       compute_itemsize=_itemsize(spec.compute_dtype))
    return units, s_name


@dataclass
class InitCost:
    """The `"init"` object of `python -m lora_dist.memory --json` (see the module docstring)."""
    summary: Dict
    plan: object

    def to_dict(self) -> Dict:
        return dict(self.summary)


def _link_seconds(nbytes: float, N: int, cluster, rates: Rates) -> float:
    """Seconds for one rank to move `nbytes` spread evenly over its N − 1 peers."""
    if N == 1:
        return 0.0
    g = cluster.gpus_per_node
    off = (N - g) / (N - 1) if N > g else 0.0  # share of a rank's peers on other nodes
    return nbytes * (1 - off) / (rates.nvlink_gbs * 1e9) + nbytes * off / (rates.node_link_gbs / g * 1e9)


def _wire_seconds(plan, cluster, rates: Rates) -> float:
    """Per pass, the busiest rank's max(sent, received) (the links are full duplex)."""
    return sum(_link_seconds(max(max(s, r) for s, r in zip(plan.wire_sent[p], plan.wire_recv[p])),
                             plan.world, cluster, rates) for p in range(plan.n_passes))


def init_cost(mplan, config, spec: InitSpec, epoch_samples: int = 100_000, rates: Rates = Rates(),
              budget: Optional[int] = None) -> InitCost:
    """The init's memory, passes, wire bytes and time next to the training step `mplan` (a
    budget.MemoryPlan). budget: bytes per rank for the init; None = what the step leaves free."""
    spec.validate()
    if isinstance(epoch_samples, bool) or not isinstance(epoch_samples, int) or epoch_samples < 1:
        raise MemoryConfigError(f"--epoch-samples must be an integer >= 1, got {epoch_samples!r}")
    cluster, N = mplan.cluster, mplan.cluster.world_size
    method = get_method(spec.method)
    data = method.needs_data
    modules = adapted_modules(config, mplan.spec.target_modules)
    units, s_name = init_units(modules, spec, N)
    act = 0
    if data:
        act = int(mplan.profile.act_peak(spec.micro_batch) * spec.seq_len / mplan.spec.seq_len)
    free = mplan.usable_bytes - mplan.states.gpu_total - act
    budget = free if budget is None else int(budget)
    if budget <= 0:
        raise MemoryConfigError(f"no GPU memory left for the init: usable {mplan.usable_bytes} B − resident "
                                f"states {mplan.states.gpu_total} B − calibration activations {act} B")
    try:
        plan = plan_passes(units, N, budget)
    except ConfigError as e:
        raise MemoryConfigError(str(e)) from None
    seconds = _seconds(plan, units, spec, s_name, mplan, method, rates, data)
    f = 4 + (2 if mplan.spec.checkpointing else 0)
    epoch = f * mplan.params.total * epoch_samples * mplan.spec.seq_len / (N * rates.bf16_tflops * 1e12 * rates.mfu)
    total = sum(seconds.values())
    peak = plan.max_peak() + act
    summary = {
        "method": spec.method, "samples": spec.samples, "seq_len": spec.seq_len, "micro_batch": spec.micro_batch,
        "stats_dtype": s_name, "hook_dtype": spec.hook_dtype or s_name, "solve_dtype": spec.solve_dtype,
        "budget_bytes": budget, "peak_bytes": peak, "calibration_act_peak_bytes": act,
        "fits": mplan.states.gpu_total + peak <= mplan.usable_bytes,
        "passes": plan.n_passes if data else 0, "units": len(units),
        "stats_bytes_total": plan.stats_bytes_total(), "stats_bytes_max_rank": plan.stats_bytes_max_rank(),
        "wire_bytes_per_rank": max((sum(p[r] for p in plan.wire_sent) for r in range(N)), default=0),
        "wire_recv_bytes_max_rank": max((sum(p[r] for p in plan.wire_recv) for r in range(N)), default=0),
        "seconds": total, "seconds_parts": seconds, "epoch_samples": epoch_samples, "epoch_seconds": epoch,
        "fraction_of_epoch": total / epoch,
        "assumptions": {**asdict(rates), "design": "hook rows shipped to each unit's owner; products formed "
                        "there in the statistics dtype; (N+1)·T·row bytes in flight per unit"},
    }
    return InitCost(summary, plan)


def _seconds(plan, units, spec, s_name, mplan, method, rates: Rates, data: bool) -> Dict[str, float]:
    """Predicted seconds per part (module docstring)."""
    N = plan.world
    tokens = spec.samples * spec.seq_len
    if not data:
        calib = hooks = 0.0
    else:
        f = 4 + (2 if mplan.spec.checkpointing else 0) if method.needs_backward else 2
        calib = plan.n_passes * f * mplan.params.total * tokens / (N * rates.bf16_tflops * 1e12 * rates.mfu)
        rate = rates.gemm_tflops[spec.hook_dtype or s_name] * 1e12 * rates.gemm_efficiency
        hooks = max(sum(u.hook_flops_per_token for u in units if plan.owner[u.name] == r) for r in range(N)) * tokens / rate
    solve_rate = rates.gemm_tflops[spec.solve_dtype] * 1e12 * rates.solve_efficiency
    cost = {u.name: u.solve_cost for u in units}
    solves = max(sum(2 * cost[u] for u in cost if plan.owner[u] == r) for r in range(N)) / solve_rate
    # W of every adapted module all-gathered (ZeRO-3) in the compute dtype: each rank receives (N−1)/N
    w = sum(u.weight_bytes for u in units) * _itemsize(spec.compute_dtype) // _itemsize(spec.solve_dtype)
    gather = _link_seconds(w * (N - 1) / N, N, mplan.cluster, rates)
    return {"calibration": calib, "hooks": hooks, "solves": solves,
            "wire": _wire_seconds(plan, mplan.cluster, rates) + gather}

