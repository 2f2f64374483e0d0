"""Adapter layers: one wrapper per kind around a frozen base linear layer.

Layout (PyTorch): the base computes y = x Wᵀ + b with W ∈ R^{d_out×d_in}; lora_A ∈ R^{r×d_in},
lora_B ∈ R^{d_out×r}; s = α/r (α/√r with rsLoRA). Every wrapper holds the base `weight` and `bias`
as its own (frozen) parameters, so that under ZeRO-3 one module's pre-forward hook gathers the base
weight and the adapter together, and the base weight keeps its original state-dict key.

Adapter compute runs in `adapter_dtype` (default: the base weight's dtype, i.e. the training
precision); the adapter input is cast to it and the result cast back to the output dtype.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .zero import gathered, is_partitioned, rank


def seed_for(seed: int, name: str) -> int:
    """A stable 63-bit seed from (global seed, module name): the same on every rank and world size."""
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generator_for(seed: int, name: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed_for(seed, name))
    return g


def kaiming_A(r: int, d_in: int, g: torch.Generator) -> torch.Tensor:
    """A ~ Kaiming-uniform(a=√5), nn.Linear's default: U(-1/√d_in, 1/√d_in). fp32, CPU."""
    A = torch.empty(r, d_in)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
    return A


def gaussian_A(r: int, d_in: int, g: torch.Generator) -> torch.Tensor:
    """A ~ N(0, (1/r)²): standard deviation 1/r, as PEFT's `init_lora_weights="gaussian"`."""
    return torch.randn(r, d_in, generator=g) / r


class AdapterLinear(nn.Module):
    """Base of every adapter kind: y = x Wᵀ + b + adapter(dropout(x)).

    Subclasses define `adapter_forward(x)`, `delta_weight()` (the dense ΔW the adapter adds,
    for merging) and `plain_factors()` (an exactly equivalent plain LoRA (B', A', s') with
    ΔW = s'·B'·A', for PEFT export). Both are read inside `gathered(...)` under ZeRO-3.
    """

    kind = "base"

    def __init__(self, base: nn.Linear, name: str, r: int, scaling: float, dropout: float,
                 adapter_dtype: Optional[torch.dtype]):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.name = name
        self.r = r
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_dtype = adapter_dtype or base.weight.dtype
        self.merged = False
        # True while calibration statistics are collected: the layer computes its base only, so the
        # statistics are those of W0 whatever the adapters hold.
        self.calibrating = False
        # Set by inject when the init needs W or data; cleared by initialize_adapters.
        self.needs_init = False
        # For inits that rewrote W (PiSSA-like): the initial plain factors, so export can express
        # the total change against the original W0 (see export.py).
        self.init_factors: Optional[tuple] = None

    # -- construction helpers ---------------------------------------------------------------------
    def _new(self, *shape, fill: Optional[float] = None, value: Optional[torch.Tensor] = None,
             trainable: bool = True) -> nn.Parameter:
        dev = self.weight.device
        if value is not None and dev.type != "meta":
            t = value.to(device=dev, dtype=self.adapter_dtype)
        else:
            t = torch.empty(*shape, device=dev, dtype=self.adapter_dtype)
            if fill is not None and dev.type != "meta":
                t.fill_(fill)
        return nn.Parameter(t, requires_grad=trainable)

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.calibrating:
            return y
        if self.needs_init and self.training and self.weight.device.type != "meta":
            raise RuntimeError(
                f"adapter {self.name!r} was injected with a data-aware or SVD init that has not run: "
                f"call lora_dist.initialize_adapters(model, config, batches) before training")
        return y + self.adapter_forward(self.dropout(x.to(self.adapter_dtype))).to(y.dtype)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        B, A, s = self.plain_factors()
        return s * (B.double() @ A.double())

    def plain_factors(self):
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """W + ΔW in float64 (read inside `gathered`)."""
        return self.weight.double() + self.delta_weight()

    def adapter_params(self) -> dict:
        """name -> parameter, the adapter's own (shared ones included)."""
        return {n: p for n, p in self.named_parameters(recurse=False) if n not in ("weight", "bias")}

    def extra_repr(self) -> str:
        return f"{self.kind}: in={self.in_features}, out={self.out_features}, r={self.r}, s={self.scaling:g}"


class LoRALinear(AdapterLinear):
    """LoRA (kind `lora`) and LoRA-FA (kind `lora_fa`).

        y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ,     ΔW = s·B·A.

    LoRA trains A and B. LoRA-FA freezes A (it keeps its init) and trains only B, so backward saves
    only x·Aᵀ (r wide) for B's gradient, never x itself: LoRA-FA costs the frozen base's activations.
    Default init: A Kaiming-uniform (or Gaussian), B = 0, so ΔW = 0 at step 0.
    """

    def __init__(self, base, name, r, scaling, dropout, adapter_dtype, A_init: Optional[torch.Tensor],
                 freeze_A: bool):
        super().__init__(base, name, r, scaling, dropout, adapter_dtype)
        self.kind = "lora_fa" if freeze_A else "lora"
        self.lora_A = self._new(r, self.in_features, value=A_init, fill=0.0, trainable=not freeze_A)
        self.lora_B = self._new(self.out_features, r, fill=0.0)
        # An update rule that must see both gradients of one micro-batch together (LoRA-Pro's light
        # variant) replaces the branch with its autograd Function: f(x, A, B, s) -> s·x·Aᵀ·Bᵀ.
        self.grad_rule = None

    def adapter_forward(self, x):
        if self.grad_rule is not None:
            return self.grad_rule(x, self.lora_A, self.lora_B, self.scaling)
        return self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def plain_factors(self):
        return self.lora_B, self.lora_A, self.scaling


class DoRALinear(LoRALinear):
    """DoRA: weight-decomposed LoRA, as PEFT implements it.

        W' = diag(m / ‖W + sBA‖_row) · (W + sBA),     y = x W'ᵀ + b,

    with ‖·‖_row the L2 norm of each output row (over d_in) and m ∈ R^{d_out} initialized to ‖W‖_row.
    The norm is detached in the forward (DoRA paper §4.3, as PEFT), so it is treated as a constant in
    backward. With dropout p > 0 the forward is, as PEFT's,
        y = x Wᵀ + b + (m/n − 1)·(x̃ Wᵀ) + (m/n)·s·x̃ Aᵀ Bᵀ,  x̃ = dropout(x), n = ‖W + sBA‖_row.
    """

    kind = "dora"

    def __init__(self, base, name, r, scaling, dropout, adapter_dtype, A_init):
        super().__init__(base, name, r, scaling, dropout, adapter_dtype, A_init, freeze_A=False)
        self.kind = "dora"
        self.lora_magnitude = self._new(self.out_features, fill=0.0)
        if self.weight.device.type != "meta":
            with gathered([self.weight]):  # collective under ZeRO-3: every rank computes the same m
                m = self.weight.detach().float().norm(dim=1)
            with torch.no_grad():
                self.lora_magnitude.data.copy_(m.to(self.lora_magnitude.dtype))

    def _scale(self):
        BA = self.scaling * (self.lora_B @ self.lora_A)
        norm = (self.weight.to(BA.dtype) + BA).norm(dim=1).detach()
        return self.lora_magnitude / norm

    def forward(self, x):
        if self.merged or self.calibrating:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight, self.bias)
        xd = self.dropout(x.to(self.adapter_dtype))
        scale = self._scale()
        lora = self.scaling * F.linear(F.linear(xd, self.lora_A), self.lora_B)
        base_d = F.linear(xd, self.weight.to(xd.dtype))
        return y + ((scale - 1) * base_d + scale * lora).to(y.dtype)

    def merged_weight(self):
        Wp = self.weight.double() + self.scaling * (self.lora_B.double() @ self.lora_A.double())
        return (self.lora_magnitude.double() / Wp.norm(dim=1))[:, None] * Wp

    def delta_weight(self):
        return self.merged_weight() - self.weight.double()

    def plain_factors(self):
        raise TypeError("DoRA has no plain-LoRA form; it is exported natively (use_dora=True)")


class LoRAXSLinear(AdapterLinear):
    """LoRA-XS: y = x Wᵀ + b + s · x Aᵀ Rᵀ Bᵀ,  ΔW = s·B·R·A.

    B ∈ R^{d_out×r} and A ∈ R^{r×d_in} are frozen (from an SVD of W, or LoRA-SB's gradient
    estimate); only the r×r core R trains. Until initialize_adapters runs, B = A = R = 0.
    """

    kind = "lora_xs"

    def __init__(self, base, name, r, scaling, dropout, adapter_dtype):
        super().__init__(base, name, r, scaling, dropout, adapter_dtype)
        self.lora_A = self._new(r, self.in_features, fill=0.0, trainable=False)
        self.lora_B = self._new(self.out_features, r, fill=0.0, trainable=False)
        self.lora_R = self._new(r, r, fill=0.0)

    def adapter_forward(self, x):
        return self.scaling * F.linear(F.linear(F.linear(x, self.lora_A), self.lora_R), self.lora_B)

    def plain_factors(self):
        return self.lora_B @ self.lora_R, self.lora_A, self.scaling


class VeRALinear(AdapterLinear):
    """VeRA: y = x Wᵀ + b + Λ_b B̂ Λ_d Â x,  ΔW = diag(λ_b)·B̂·diag(λ_d)·Â.

    Â = A[:, :d_in], B̂ = B[:d_out, :] are slices of one frozen random pair (A ∈ R^{r×max d_in},
    B ∈ R^{max d_out×r}, Kaiming-uniform from the seed) shared by every adapted layer; they are
    buffers, replicated on every rank. λ_b ∈ R^{d_out} (init 0) and λ_d ∈ R^r (init vera_d_initial)
    train. No α/r scale: the λ's carry it.
    """

    kind = "vera"

    def __init__(self, base, name, r, dropout, adapter_dtype, shared_A, shared_B, d_initial):
        super().__init__(base, name, r, 1.0, dropout, adapter_dtype)
        # Shared tensors registered as non-persistent buffers: every wrapper points at the same storage.
        self.register_buffer("vera_A", shared_A, persistent=False)
        self.register_buffer("vera_B", shared_B, persistent=False)
        self.vera_lambda_b = self._new(self.out_features, fill=0.0)
        self.vera_lambda_d = self._new(r, fill=d_initial)

    def _sliced(self):
        A = self.vera_A[:, : self.in_features].to(self.adapter_dtype)
        B = self.vera_B[: self.out_features, :].to(self.adapter_dtype)
        return B, A

    def adapter_forward(self, x):
        B, A = self._sliced()
        return self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, A), B)

    def plain_factors(self):
        B, A = self._sliced()
        return self.vera_lambda_b[:, None] * B, self.vera_lambda_d[:, None] * A, 1.0


class TiedLoRALinear(AdapterLinear):
    """Tied-LoRA: y = x Wᵀ + b + s · diag(v) B diag(u) A x,  ΔW = s·diag(v)·B·diag(u)·A.

    A ∈ R^{r×d_in} and B ∈ R^{d_out×r} are one pair per module type, shared across depth (every
    `q_proj` uses the same A and B); u ∈ R^r and v ∈ R^{d_out} belong to each layer. Init: A
    Kaiming-uniform, B = 0, u = v = 1. `tied_trainable` chooses which of A, B, u, v train (TL6: all).
    """

    kind = "tied_lora"

    def __init__(self, base, name, r, scaling, dropout, adapter_dtype, shared_A, shared_B, trainable):
        super().__init__(base, name, r, scaling, dropout, adapter_dtype)
        self.lora_A = shared_A
        self.lora_B = shared_B
        self.tied_u = self._new(r, fill=1.0, trainable="u" in trainable)
        self.tied_v = self._new(self.out_features, fill=1.0, trainable="v" in trainable)

    def adapter_forward(self, x):
        h = self.tied_u * F.linear(x, self.lora_A)
        return self.scaling * self.tied_v * F.linear(h, self.lora_B)

    def plain_factors(self):
        return self.tied_v[:, None] * self.lora_B, self.tied_u[:, None] * self.lora_A, self.scaling


def adapter_modules(model: nn.Module):
    """(qualified name, AdapterLinear) pairs in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]


def merge_module(m: AdapterLinear) -> None:
    """W ← W + ΔW for one layer, exactly (float64 arithmetic, one cast); collective under ZeRO-3."""
    if m.merged:
        return
    params = [m.weight] + list(m.adapter_params().values())
    with gathered(params, modifier_rank=0):
        if not is_partitioned(m.weight) or rank() == 0:
            with torch.no_grad():
                m.weight.data.copy_(m.merged_weight().to(m.weight.dtype))
    m.merged = True

