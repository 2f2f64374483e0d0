"""The calibration-statistics engine: hooks on the adapted modules, never `.grad` of frozen weights.

A forward hook on each adapted module keeps its input x; a tensor hook on its output receives
δ = ∂L/∂y in backward, where L = Σ_i L_i (per-sample mean-token losses), so δ at a position of
sample i is ∂L_i/∂y_t. The statistics are accumulated there, once per real backward:
- with reentrant checkpointing the first forward runs without grad (skipped) and the recompute's
  output gets δ: counted once;
- with non-reentrant checkpointing the recompute's outputs are not in the graph and never get δ:
  counted once.
A forward-only method (input moments only) runs under no_grad and accumulates in the forward hook.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .methods.base import INPUT_MOMENT, OUTPUT_GRAD_DIAG, OUTPUT_GRAD_FULL, WEIGHT_GRADIENT


class StepContext:
    """What the hooks need about the current micro-batch, flattened to positions."""

    def __init__(self, position_mask: torch.Tensor, position_weight: torch.Tensor):
        self.mask = position_mask.reshape(-1)        # bool: positions the factors run over
        self.weight = position_weight.reshape(-1)    # per-position sample weight w_i for g
        self.shape = tuple(position_mask.shape)


class Collector:
    """Local (this rank's) sums of the requested statistics for a set of modules.

    `modules`: name -> AdapterLinear; `stats`: the statistics to collect; `input_owner`: module ->
    the module whose input moment it shares (its group's first module).
    """

    def __init__(self, modules: Dict, stats: frozenset, input_owner: Dict[str, str], dtype: torch.dtype,
                 backward: bool):
        self.modules = modules
        self.stats = stats
        self.input_owner = input_owner
        self.dtype = dtype
        self.backward = backward
        self.ctx: Optional[StepContext] = None
        self.sums: Dict[str, Dict[str, torch.Tensor]] = {}
        self.handles: List = []
        self.bytes_peak = 0

    # -- hooks -----------------------------------------------------------------------------------
    def attach(self):
        for name, m in self.modules.items():
            self.handles.append(m.register_forward_hook(self._forward_hook(name)))

    def detach(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _forward_hook(self, name):
        def hook(mod, inputs, out):
            x = inputs[0]
            if self.backward:
                if torch.is_grad_enabled() and out.requires_grad:
                    out.register_hook(lambda d, x=x: self._accumulate(name, x.detach(), d.detach()))
            elif not torch.is_grad_enabled():
                self._accumulate(name, x.detach(), None)
        return hook

    # -- accumulation ----------------------------------------------------------------------------
    def _slot(self, name, key, shape, device):
        d = self.sums.setdefault(name, {})
        if key not in d:
            d[key] = torch.zeros(shape, dtype=self.dtype, device=device)
        return d[key]

    # Positions converted to the accumulation dtype at a time: bounds the temporaries (a float64
    # copy of x and δ) whatever the micro-batch, e.g. 512 × 28672 × 8 B = 117 MB at 70B's down_proj.
    CHUNK = 512

    def _accumulate(self, name, x, delta):
        ctx = self.ctx
        xf = x.reshape(-1, x.shape[-1])
        if xf.shape[0] != ctx.mask.numel():
            raise RuntimeError(f"module {name!r}: its input has {xf.shape[0]} positions but the batch has "
                               f"{ctx.mask.numel()} (input shape {tuple(x.shape)}, batch {ctx.shape}); "
                               "statistics need one input row per token")
        dev, d_in = xf.device, xf.shape[1]  # statistics live where the layer runs
        df = None if delta is None else delta.reshape(-1, delta.shape[-1])
        mask_all = ctx.mask.to(dev)
        w_all = ctx.weight.to(device=dev, dtype=self.dtype)
        own_input = INPUT_MOMENT in self.stats and self.input_owner.get(name) == name
        for s in range(0, xf.shape[0], self.CHUNK):
            x2 = xf[s:s + self.CHUNK].to(self.dtype)
            mask = mask_all[s:s + self.CHUNK]
            if own_input:
                xm = x2[mask]
                self._slot(name, "second", (d_in, d_in), dev).addmm_(xm.T, xm)
                self._slot(name, "sum", (d_in,), dev).add_(xm.sum(0))
                del xm
            if df is None:
                continue
            d2 = df[s:s + self.CHUNK].to(self.dtype)
            if WEIGHT_GRADIENT in self.stats:
                w = w_all[s:s + self.CHUNK]
                self._slot(name, "g", (d2.shape[1], d_in), dev).addmm_((d2 * w[:, None]).T, x2)
            if OUTPUT_GRAD_DIAG in self.stats or OUTPUT_GRAD_FULL in self.stats:
                dm = d2[mask]
                if OUTPUT_GRAD_DIAG in self.stats:
                    self._slot(name, "G_diag", (d2.shape[1],), dev).add_((dm * dm).sum(0))
                if OUTPUT_GRAD_FULL in self.stats:
                    self._slot(name, "G_full", (d2.shape[1], d2.shape[1]), dev).addmm_(dm.T, dm)
        self.bytes_peak = max(self.bytes_peak, self.nbytes())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self.sums.values() for t in d.values())

    def take(self) -> Dict[str, Dict[str, torch.Tensor]]:
        sums, self.sums = self.sums, {}
        return sums


def slot_shapes(stats: frozenset, d_out: int, d_in: int, owns_input: bool) -> Dict[str, tuple]:
    """The accumulator shapes a module has, in a fixed order (so every rank reduces the same list)."""
    shapes = {}
    if INPUT_MOMENT in stats and owns_input:
        shapes["second"] = (d_in, d_in)
        shapes["sum"] = (d_in,)
    if WEIGHT_GRADIENT in stats:
        shapes["g"] = (d_out, d_in)
    if OUTPUT_GRAD_DIAG in stats:
        shapes["G_diag"] = (d_out,)
    if OUTPUT_GRAD_FULL in stats:
        shapes["G_full"] = (d_out, d_out)
    return shapes


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor):
    """(L_i, n_i): each sample's mean next-token cross-entropy over its loss-bearing tokens, and
    their count. Samples without loss tokens get L_i = 0."""
    shift_logits = logits[:, :-1]
    if shift_logits.dtype not in (torch.float32, torch.float64):  # bf16/fp16 logits: CE in fp32
        shift_logits = shift_logits.float()
    shift_labels = labels[:, 1:]
    valid = shift_labels != -100
    ce = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                           shift_labels.clamp(min=0).reshape(-1), reduction="none")
    ce = ce.view(shift_labels.shape) * valid
    n = valid.sum(1)
    return ce.sum(1) / n.clamp(min=1), n
