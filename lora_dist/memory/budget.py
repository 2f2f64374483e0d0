"""Per-GPU peak, largest micro-batch and host RAM: activations (meta device) + model states (ZeRO).

    peak(b) = model states on the GPU + ZeRO working buffers + act_peak(b)

act_peak(b) is the peak of live non-parameter tensor bytes over forward and backward of one
micro-batch of b sequences, with each parameter gradient freed as soon as it is accumulated (ZeRO
moves it into the reduce bucket, counted in the buffers); it includes the saved activations, the
logits / loss tensors and the backward's transient gradients. It is found by `simulate_step` on
the meta device. Both it and the saved bytes are exactly affine in the batch size b and in the
number of decoder layers L (every layer is the same), so `activation_profile` replays copies of
the model cut to 1, 2 and 3 layers and extrapolates, checking the assumed form on extra points and
falling back to the full depth if a check fails (details in its docstring).

The largest micro-batch is the largest b <= max_batch with peak(b) <= usable GPU memory, where
usable = gpu_memory - reserve (default 2 GiB for the CUDA context, NCCL buffers and allocator
fragmentation).

Update rules (`update_rule_states`, docs/update_rules.md): LoRA-Pro's full rule adds each layer's
full-size moments M, V (2·d_out·d_in elements) on its owner rank, counted as
`update_rules.lora_pro_moment_bytes` plans them (the largest rank's share), and replaces Adam by
the inner SGD (no optimizer state). Its step temporaries (3·d_out·d_in fp32 of the largest owned
layer) live after backward, when the activations are gone, so the peak becomes
    peak(b) = model states + buffers + max(act_peak(b), step temporaries).
LoRA-FA's projection keeps one r×r float64 P_A per adapted layer, replicated (L·r²·8 bytes); the
light LoRA-Pro variant keeps nothing of size d_out·d_in.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

from .activations import (CATEGORIES, MemoryConfigError, TrainSpec, build_model, simulate_step)
from .states import Cluster, GiB, ModelStates, ParamStats, ZeroConfig, model_states, param_stats

DEFAULT_RESERVE_GIB = 2.0


@dataclass
class ActivationProfile:
    """Saved bytes and act_peak of one TrainSpec (its batch_size is ignored) as functions of b.

    at1 = (saved, act_peak) at b = 1; for b >= 2 both are affine: saved0 + b·saved1 and
    peak0 + b·peak1. (b = 1 can differ by a few bytes: with one row, the shifted labels of the
    loss are a view instead of a copy.) by_category_b1: the saved bytes per category at b = 1.
    """

    spec: TrainSpec
    at1: tuple
    saved0: int
    saved1: int
    peak0: int
    peak1: int
    by_category_b1: Dict[str, int]
    adapter_input_bytes_b1: int
    method: str  # "extrapolated" (truncated depths) or "full-depth"

    def saved(self, b: int) -> int:
        return self.at1[0] if b == 1 else self.saved0 + b * self.saved1

    def act_peak(self, b: int) -> int:
        return self.at1[1] if b == 1 else self.peak0 + b * self.peak1


def _with_layers(config, n: int):
    c = copy.deepcopy(config)
    c.num_hidden_layers = n
    if getattr(c, "layer_types", None):
        c.layer_types = list(c.layer_types)[:n]
    return c


def _run(config, spec: TrainSpec, model, b: int):
    prof = simulate_step(config, spec.replace(batch_size=b), "meta", drop_grads=True, model=model)
    return prof.saved.total_bytes, prof.act_peak, prof.saved


def _profile_from(spec, F: dict, r1, method: str) -> ActivationProfile:
    """F[b] = (saved, act_peak) for b = 1, 2, 3."""
    s1, p1 = F[3][0] - F[2][0], F[3][1] - F[2][1]
    return ActivationProfile(spec, (F[1][0], F[1][1]), F[2][0] - 2 * s1, s1, F[2][1] - 2 * p1, p1,
                             dict(r1.by_category), r1.adapter_input_bytes, method)


def activation_profile(config, spec: TrainSpec, full_depth: bool = False) -> ActivationProfile:
    """Saved bytes and activation peak of `spec` on `config` for every batch size (meta device).

    Fast path (default, L >= 3 layers), with f(n, b) a replay of the model cut to n layers at
    micro-batch b: every decoder layer adds the same tensors, all proportional to b, so
        f(L, b) = f(1, b) + (L - 1)·b·Δ,   Δ = f(2, 1) - f(1, 1),
    and f(1, b) is affine in b for b >= 2. Replays: f(1, b) for b = 1..4, f(2, 1), f(2, 2), f(3, 1).
    Checked: f(2, 2) - f(1, 2) = 2Δ, f(3, 1) - f(2, 1) = Δ and f(1, 4) on the line through
    f(1, 2), f(1, 3). If a check fails, or with full_depth=True, the full model runs at b = 1, 2, 3.
    """
    L = config.num_hidden_layers
    if not full_depth and L >= 3:
        models = {n: build_model(_with_layers(config, n), spec, "meta") for n in (1, 2, 3)}
        pts = {(n, b): _run(config, spec, models[n], b)
               for n, b in ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1))}
        ok = True
        for i in (0, 1):  # 0: saved bytes, 1: activation peak
            delta = pts[2, 1][i] - pts[1, 1][i]
            ok &= pts[2, 2][i] - pts[1, 2][i] == 2 * delta
            ok &= pts[3, 1][i] - pts[2, 1][i] == delta
            ok &= pts[1, 4][i] - pts[1, 3][i] == pts[1, 3][i] - pts[1, 2][i]
        if ok:
            F = {b: tuple(pts[1, b][i] + (L - 1) * b * (pts[2, 1][i] - pts[1, 1][i]) for i in (0, 1))
                 for b in (1, 2, 3)}
            r1, r2 = pts[1, 1][2], pts[2, 1][2]
            rep = dataclasses.replace(
                r1, by_category={c: r1.by_category[c] + (L - 1) * (r2.by_category[c] - r1.by_category[c])
                                 for c in CATEGORIES},
                adapter_input_bytes=r1.adapter_input_bytes + (L - 1) * (r2.adapter_input_bytes - r1.adapter_input_bytes))
            return _profile_from(spec, F, rep, "extrapolated")
    model = build_model(config, spec, "meta")
    pts = {b: _run(config, spec, model, b) for b in (1, 2, 3)}
    return _profile_from(spec, {b: pts[b][:2] for b in pts}, pts[1][2], "full-depth")


def count_params(config, spec: TrainSpec) -> ParamStats:
    """Parameter counts of `config` prepared for `spec.mode` (built on the meta device)."""
    return param_stats(build_model(config, spec, "meta"))


@dataclass
class MemoryPlan:
    """Everything for one (model, training mode, ZeRO setup, cluster)."""

    spec: TrainSpec
    cluster: Cluster
    zero: ZeroConfig
    params: ParamStats
    states: ModelStates
    profile: ActivationProfile
    reserve_bytes: int
    max_batch: int
    rule: Optional[dict] = None  # update_rule_states(...) when an update rule is accounted

    @property
    def usable_bytes(self) -> int:
        return int(self.cluster.gpu_memory_gib * GiB) - self.reserve_bytes

    def peak(self, b: int) -> int:
        step = self.rule["step_transient_bytes"] if self.rule else 0
        return self.states.gpu_total + max(self.profile.act_peak(b), step)

    def activations(self, b: int) -> int:
        return self.profile.saved(b)

    def fits(self, b: int) -> bool:
        return self.peak(b) <= self.usable_bytes

    @property
    def max_micro_batch(self) -> int:
        """Largest b in [1, max_batch] that fits; 0 if even b = 1 does not."""
        best = 0
        for b in range(1, self.max_batch + 1):
            if self.fits(b):
                best = b
        return best

    @property
    def host_per_node(self) -> int:
        return self.states.host_per_node

    @property
    def host_fits(self) -> Optional[bool]:
        if self.cluster.host_memory_gib is None:
            return None
        return self.host_per_node <= self.cluster.host_memory_gib * GiB

    def summary(self) -> dict:
        b = self.spec.batch_size
        return {
            "mode": self.spec.mode, "checkpointing": self.spec.checkpointing, "dtype": self.spec.dtype,
            "seq_len": self.spec.seq_len, "batch_size": b, "zero": self.zero.label(),
            "cluster": self.cluster.label(), "world_size": self.cluster.world_size,
            "params_total": self.params.total, "params_trainable": self.params.trainable,
            "gpu_states_bytes": self.states.gpu_states, "gpu_buffers_bytes": self.states.gpu_buffers,
            "gpu_components": dict(self.states.gpu), "host_components_per_rank": dict(self.states.host),
            "activations_bytes": self.activations(b), "act_peak_bytes": self.profile.act_peak(b),
            "peak_bytes": self.peak(b), "usable_bytes": self.usable_bytes,
            "fits": self.fits(b), "max_micro_batch": self.max_micro_batch, "max_batch_searched": self.max_batch,
            "host_per_node_bytes": self.host_per_node, "activation_method": self.profile.method,
            "saved_by_category_b1": dict(self.profile.by_category_b1),
            "update_rule": dict(self.rule) if self.rule else {"rule": "plain"},
        }


UPDATE_RULES = ("plain", "lora_fa", "lora_pro")


def update_rule_states(config, spec: TrainSpec, world: int, rule: str = "plain", moments: str = "full",
                       moments_dtype: str = "float32") -> dict:
    """Per-rank bytes an update rule adds (module docstring), as a dict with "rule", "moments",
    "moment_bytes_per_rank" (the largest rank's), "moment_bytes_total", "step_transient_bytes",
    "projection_bytes" (LoRA-FA's r×r P_A, replicated) and "adam_replaced" (the inner step is SGD).

    lora_fa needs mode lora_fa and lora_pro mode lora (as AdapterConfig requires); the moments come
    from `update_rules.lora_pro_moment_bytes` over the adapted layers' shapes.
    """
    from ..update_rules import lora_pro_moment_bytes
    from .init_cost import adapted_modules

    need = {"lora_fa": "lora_fa", "lora_pro": "lora"}
    if rule not in UPDATE_RULES:
        raise MemoryConfigError(f"--update-rule {rule!r}: choose one of {list(UPDATE_RULES)}")
    if rule in need and spec.mode != need[rule]:
        raise MemoryConfigError(f"--update-rule {rule} needs --mode {need[rule]}, got --mode {spec.mode}")
    if moments not in ("full", "none"):
        raise MemoryConfigError(f"--lora-pro-moments {moments!r}: choose full or none")
    out = {"rule": rule, "moments": moments if rule == "lora_pro" else None, "moment_bytes_per_rank": 0,
           "moment_bytes_total": 0, "step_transient_bytes": 0, "projection_bytes": 0, "adam_replaced": False}
    if rule == "plain":
        return out
    shapes = [(n, o, i) for n, o, i, _ in adapted_modules(config, spec.target_modules)]
    if rule == "lora_fa":
        out["projection_bytes"] = len(shapes) * spec.r * spec.r * 8
    elif moments == "full":
        mb = lora_pro_moment_bytes(shapes, world, moments_dtype)
        out.update(moment_bytes_per_rank=mb["max_rank"], moment_bytes_total=mb["total"],
                   step_transient_bytes=mb["transient"], adam_replaced=True)
    return out


def plan_memory(config, spec: TrainSpec, cluster: Cluster, zero: ZeroConfig, *,
                reserve_gib: float = DEFAULT_RESERVE_GIB, max_batch: int = 32,
                profile: Optional[ActivationProfile] = None, params: Optional[ParamStats] = None,
                full_depth: bool = False, update_rule: Optional[dict] = None) -> MemoryPlan:
    """Combine activations and model states for one configuration (see the module docstring).

    update_rule: `update_rule_states(...)`; LoRA-Pro's moments join the GPU states
    ("lora_pro_moments"; LoRAPro keeps them where the gradients are), the Adam states become 0
    (inner SGD), LoRA-FA's P_A is "lora_fa_projection"."""
    if not isinstance(reserve_gib, (int, float)) or reserve_gib < 0:
        raise MemoryConfigError(f"reserve_gib must be >= 0, got {reserve_gib!r}")
    if reserve_gib >= cluster.gpu_memory_gib:
        raise MemoryConfigError(f"reserve_gib={reserve_gib} leaves nothing of a {cluster.gpu_memory_gib} GiB GPU")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise MemoryConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    params = params or count_params(config, spec)
    profile = profile or activation_profile(config, spec, full_depth=full_depth)
    states = model_states(params, cluster, zero)
    if update_rule and update_rule["adam_replaced"]:
        (states.host if "optimizer" in states.host else states.gpu)["optimizer"] = 0
        states.gpu["lora_pro_moments"] = update_rule["moment_bytes_per_rank"]
    if update_rule and update_rule["projection_bytes"]:
        states.gpu["lora_fa_projection"] = update_rule["projection_bytes"]
    return MemoryPlan(spec, cluster, zero, params, states, profile, int(reserve_gib * GiB), max_batch,
                      update_rule)
