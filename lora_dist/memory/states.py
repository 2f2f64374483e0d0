"""Per-rank model-state memory under DeepSpeed ZeRO-2 / ZeRO-3, LoRA-aware.

Notation: P = all parameters, P_t = trainable, P_f = P - P_t frozen, N = nodes × gpus_per_node
ranks, k_p = bytes per parameter in the training precision (2 for bf16), k_g = bytes per gradient
element (DeepSpeed keeps gradient partitions in grad_accum_dtype, which defaults to the model
dtype: 2 for bf16; 4 with grad_accum_dtype fp32), k_m = 4 (fp32 master weights), k_o = 8 (Adam's
two fp32 moments). Frozen parameters have no gradient, master copy or optimizer state.

ZeRO-3 (per rank):
    parameters        k_p · (P - P_pers) / N  +  k_p · P_pers        (GPU; host with offload_param)
    gradients         k_g · P_t / N                                   (GPU; host with offload_optimizer)
    master + Adam     (k_m + k_o) · P_t / N                           (GPU; host with offload_optimizer)
    working buffers   k_p · min(max_live, L_max + prefetch)           (gathered layer + prefetch, GPU)
                    + k_g · reduce_bucket_size   if P_t > 0           (gradient reduce bucket, GPU)
  P_pers: parameters with at most `param_persistence_threshold` elements are never partitioned
  (norm weights, small adapter factors): every rank holds them, and they stay on the GPU. L_max is
  the largest number of parameters one module owns directly (ZeRO-3 gathers module by module): the
  embedding / output head or an MLP projection for Llama. Assumption: the gathered working set is
  that module plus one prefetch bucket, capped at stage3_max_live_parameters.

ZeRO-2 (per rank): parameters are replicated, k_p · P on the GPU (DeepSpeed cannot offload
parameters at stage 2); gradients, master and Adam are partitioned as above; buffers = the reduce
bucket.

Host RAM per node = gpus_per_node × (everything placed on the host for one rank).

The defaults are DeepSpeed's: reduce_bucket_size 5e8, stage3_prefetch_bucket_size 5e7,
stage3_max_live_parameters 1e9, stage3_param_persistence_threshold 1e5.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from .activations import MemoryConfigError, _check_int

GiB = 2 ** 30


@dataclass(frozen=True)
class Cluster:
    """nodes × gpus_per_node GPUs of gpu_memory_gib each; host_memory_gib per node (optional)."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    host_memory_gib: Optional[float] = None
    name: str = "A800-80GB"

    def __post_init__(self):
        _check_int("nodes", self.nodes)
        _check_int("gpus_per_node", self.gpus_per_node)
        if not isinstance(self.gpu_memory_gib, (int, float)) or self.gpu_memory_gib <= 0:
            raise MemoryConfigError(f"gpu_memory_gib must be > 0, got {self.gpu_memory_gib!r}")
        if self.host_memory_gib is not None and (not isinstance(self.host_memory_gib, (int, float))
                                                 or self.host_memory_gib <= 0):
            raise MemoryConfigError(f"host_memory_gib must be > 0, got {self.host_memory_gib!r}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def parse(cls, text: str, **kw) -> "Cluster":
        """'2x8' = 2 nodes of 8 GPUs."""
        m = re.fullmatch(r"\s*(-?\d+)\s*[xX×]\s*(-?\d+)\s*", str(text))
        if not m:
            raise MemoryConfigError(f"cluster {text!r} is not of the form NODESxGPUS_PER_NODE (e.g. 2x8)")
        return cls(nodes=int(m.group(1)), gpus_per_node=int(m.group(2)), **kw)

    @classmethod
    def from_total(cls, gpus: int, gpus_per_node: int, **kw) -> "Cluster":
        """A cluster of `gpus` GPUs in nodes of `gpus_per_node`; the latter must divide the former."""
        _check_int("gpus", gpus)
        _check_int("gpus_per_node", gpus_per_node)
        if gpus % gpus_per_node:
            raise MemoryConfigError(f"{gpus} GPUs cannot be split into nodes of {gpus_per_node} GPUs "
                                    f"({gpus} is not a multiple of {gpus_per_node})")
        return cls(nodes=gpus // gpus_per_node, gpus_per_node=gpus_per_node, **kw)

    def label(self) -> str:
        return f"{self.nodes}x{self.gpus_per_node} {self.name}"


@dataclass(frozen=True)
class ZeroConfig:
    """A DeepSpeed ZeRO setup (see the module docstring for the formulas)."""

    stage: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    param_bytes: int = 2
    grad_bytes: int = 2
    master_bytes: int = 4
    optim_bytes: int = 8
    reduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    param_persistence_threshold: int = 100_000

    def __post_init__(self):
        if self.stage not in (2, 3):
            raise MemoryConfigError(f"ZeRO stage must be 2 or 3, got {self.stage!r}")
        if self.offload_param and self.stage != 3:
            raise MemoryConfigError("offload_param needs ZeRO stage 3 (DeepSpeed offloads parameters "
                                    "only at stage 3); use offload_optimizer alone at stage 2")
        for name in ("param_bytes", "grad_bytes", "master_bytes", "optim_bytes", "reduce_bucket_size",
                     "prefetch_bucket_size", "max_live_parameters", "param_persistence_threshold"):
            _check_int(name, getattr(self, name), minimum=0)

    @classmethod
    def offloaded(cls, stage: int = 3, **kw) -> "ZeroConfig":
        """Optimizer offload, plus parameter offload at stage 3."""
        return cls(stage=stage, offload_optimizer=True, offload_param=(stage == 3), **kw)

    def label(self) -> str:
        s = f"ZeRO-{self.stage}"
        if self.offload_optimizer and self.offload_param:
            s += " + offload"
        elif self.offload_optimizer:
            s += " + opt offload"
        elif self.offload_param:
            s += " + param offload"
        return s


@dataclass
class ParamStats:
    """Parameter counts of a model (shared parameters counted once).

    sizes: (numel, trainable) per parameter; largest_module: most parameters one module owns
    directly; largest_trainable_module: the same over trainable parameters only.
    """

    total: int
    trainable: int
    largest_module: int
    largest_trainable_module: int
    sizes: List[Tuple[int, bool]] = field(repr=False, default_factory=list)

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def persistent(self, threshold: int) -> Tuple[int, int]:
        """(all, trainable) parameters with numel <= threshold (ZeRO-3 keeps them whole on every rank)."""
        a = sum(n for n, _ in self.sizes if n <= threshold)
        t = sum(n for n, tr in self.sizes if n <= threshold and tr)
        return a, t


def param_stats(model: nn.Module) -> ParamStats:
    """Count a model's parameters (works on meta-device models)."""
    seen = set()
    sizes = []
    largest = largest_t = 0
    for m in model.modules():
        own = own_t = 0
        for p in m.parameters(recurse=False):
            own += p.numel()
            own_t += p.numel() if p.requires_grad else 0
            if id(p) in seen:
                continue
            seen.add(id(p))
            sizes.append((p.numel(), bool(p.requires_grad)))
        largest = max(largest, own)
        largest_t = max(largest_t, own_t)
    total = sum(n for n, _ in sizes)
    trainable = sum(n for n, t in sizes if t)
    return ParamStats(total, trainable, largest, largest_t, sizes)


@dataclass
class ModelStates:
    """Bytes per rank. gpu / host: component -> bytes (see the module docstring)."""

    zero: ZeroConfig
    cluster: Cluster
    gpu: Dict[str, int]
    host: Dict[str, int]

    @property
    def gpu_states(self) -> int:
        """Persistent model states on one GPU (parameters, gradients, master, optimizer)."""
        return sum(v for k, v in self.gpu.items() if not k.startswith("buffer"))

    @property
    def gpu_buffers(self) -> int:
        return sum(v for k, v in self.gpu.items() if k.startswith("buffer"))

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def host_per_rank(self) -> int:
        return sum(self.host.values())

    @property
    def host_per_node(self) -> int:
        return self.host_per_rank * self.cluster.gpus_per_node


def model_states(stats: ParamStats, cluster: Cluster, zero: ZeroConfig) -> ModelStates:
    """Per-rank model-state bytes for `stats` trained under `zero` on `cluster` (formulas above)."""
    N = cluster.world_size
    z = zero
    P, Pt = stats.total, stats.trainable
    gpu: Dict[str, int] = {}
    host: Dict[str, int] = {}
    opt_place = host if z.offload_optimizer else gpu
    if z.stage == 3:
        pers, _ = stats.persistent(z.param_persistence_threshold)
        part = P - pers
        (host if z.offload_param else gpu)["params"] = -(-z.param_bytes * part // N)
        gpu["params_persistent"] = z.param_bytes * pers
        gathered = min(z.max_live_parameters, stats.largest_module + z.prefetch_bucket_size)
        gpu["buffer_gather"] = z.param_bytes * gathered
    else:
        gpu["params"] = z.param_bytes * P
    opt_place["grads"] = -(-z.grad_bytes * Pt // N)
    opt_place["master"] = -(-z.master_bytes * Pt // N)
    opt_place["optimizer"] = -(-z.optim_bytes * Pt // N)
    gpu["buffer_reduce"] = z.grad_bytes * z.reduce_bucket_size if Pt else 0
    return ModelStates(z, cluster, gpu, host)


def deepspeed_estimate(stats: ParamStats, cluster: Cluster, offload: bool = False) -> Optional[Tuple[int, int]]:
    """DeepSpeed's own ZeRO-3 estimator (every parameter trains): (GPU bytes, host bytes per node)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        stats.total, stats.largest_module, num_gpus_per_node=cluster.gpus_per_node,
        num_nodes=cluster.nodes, cpu_offload=offload, cpu_offload_params=offload, zero_init=True)
    return gpu, cpu
