"""Inits from the calibration gradient g = ∂L/∂W: LoRA-GA, LoRA-One, LoRA-SB.

All three need only the engine's WEIGHT_GRADIENT statistic (no W, no moments): with the default
`gradient_weighting="sample_mean"`, g = ∇_W (1/N_c) Σ_i L_i, the gradient of the mean over calibration
samples of per-sample mean-token losses (what the reference codes compute with batch size 1);
"token_mean" gives the gradient of the mean over all loss-bearing tokens instead.

SVDs: option `niter` = None runs a full, exact SVD (torch.linalg.svd); an integer runs the randomized
`torch.svd_lowrank(M, q, niter)` the reference codes use, with its random start drawn from a generator
seeded by (seed, module name), so every rank and world size gets the same factors. Singular vector
signs are fixed deterministically (`fix_signs`: each left vector's largest-|.| entry positive, the
right vector flips with it).
"""
from __future__ import annotations

import math
import torch

from .base import (WEIGHT_GRADIENT, LayerProblem, LayerSolution, Method, check_niter, option_error,
                   singular_triplets)
from ...errors import ConfigError, DataError


def _check_positive(method: str, key: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise option_error(method, key, v, "a positive number")


def _singular_workspace(d_out, d_in, r, opts, itemsize) -> int:
    """singular_triplets' buffers: a full SVD's factors (d_out·k + k·d_in + k², k = min), or with niter
    svd_lowrank's few (d_out + d_in)·q blocks (q ≤ 4r, as its callers ask)."""
    k = min(d_out, d_in)
    if opts.get("niter") is None:
        return (d_out * k + k * d_in + k * k) * itemsize
    return 4 * (d_out + d_in) * 4 * r * itemsize


def _gradient(p: LayerProblem) -> torch.Tensor:
    g = p.stats[WEIGHT_GRADIENT].to(p.dtype)
    if not torch.isfinite(g).all():
        raise FloatingPointError("non-finite weight gradient")
    return g


class LoRAGA(Method):
    """LoRA-GA (Wang et al. 2024; reference code Outsider565/LoRA-GA @89af7de).

        U, S, V = svd(g)                      (g = mean gradient over the calibration samples)
        direction "ArB2r" (default):  A = V[:, :r]ᵀ · ζ,   B = U[:, r:2r] · ζ
                  "ArBr":   A = V[:, 1:2r:2]ᵀ · ζ, B = U[:, 0:2r:2] · ζ   (alternating)
                  "A2rBr":  A = V[:, r:2r]ᵀ · ζ,   B = U[:, :r] · ζ
                  "random": a seeded permutation π of 0..2r−1; A = V[:, π[:r]]ᵀ · ζ, B = U[:, π[r:]] · ζ
        scale "stable" (default): ζ = d_out^{1/4} / √γ (γ = `gamma`, 16);  "unit": ζ = 1;
              "gd": ζ = 1/s  (the reference code's other scalings)
        W ← W − s·B·A (written by the engine, in float64, from the factors as stored): output unchanged.

    `niter`: None = full SVD (default, exact); an integer = torch.svd_lowrank with q = min(4r, d),
    as the reference (which uses niter=4). Upstream PEFT's port multiplies B by diag(S) of the chosen
    components and scales only B by ζ; we follow the authors' code (see docs/methods.md).
    Needs 2r ≤ min(d_out, d_in). Cost per layer: O(d_out·d_in·min(d_out, d_in)) (full SVD).
    """

    name = "lora_ga"
    needs = frozenset({WEIGHT_GRADIENT})
    writes_weight = True
    options = {"gamma": 16.0, "direction": "ArB2r", "scale": "stable", "niter": None}
    reference = "Wang et al. 2024, LoRA-GA; code Outsider565/LoRA-GA @89af7de"
    DIRECTIONS = ("ArB2r", "ArBr", "A2rBr", "random")
    SCALES = ("stable", "unit", "gd")

    def check_options(self, o):
        _check_positive(self.name, "gamma", o["gamma"])
        if o["direction"] not in self.DIRECTIONS:
            raise option_error(self.name, "direction", o["direction"], f"one of {list(self.DIRECTIONS)}")
        if o["scale"] not in self.SCALES:
            raise option_error(self.name, "scale", o["scale"], f"one of {list(self.SCALES)}")
        check_niter(self.name, o["niter"])

    def workspace_bytes(self, d_out, d_in, r, opts, itemsize):
        return _singular_workspace(d_out, d_in, r, opts, itemsize)

    def solve(self, p: LayerProblem) -> LayerSolution:
        o, r = p.options, p.r
        if 2 * r > min(p.d_out, p.d_in):
            raise ConfigError(f"init 'lora_ga' needs 2r = {2 * r} <= min(d_out, d_in) = {min(p.d_out, p.d_in)} "
                              f"for module {p.name!r}")
        U, S, V = singular_triplets(_gradient(p), 2 * r, p, niter=o["niter"], q=4 * r)
        d = o["direction"]
        if d == "ArB2r":
            ia, ib = torch.arange(0, r), torch.arange(r, 2 * r)
        elif d == "A2rBr":
            ia, ib = torch.arange(r, 2 * r), torch.arange(0, r)
        elif d == "ArBr":
            ia, ib = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
        else:
            perm = torch.randperm(2 * r, generator=p.generator("direction"))
            ia, ib = perm[:r], perm[r:]
        if o["scale"] == "stable":
            zeta = p.d_out ** 0.25 / math.sqrt(float(o["gamma"]))
        elif o["scale"] == "gd":
            zeta = 1.0 / p.scaling
        else:
            zeta = 1.0
        A = (V[:, ia].T * zeta).contiguous()
        B = (U[:, ib] * zeta).contiguous()
        return LayerSolution(A=A, B=B, info={"sigma_max": float(S[0])})


class LoRAOne(Method):
    """LoRA-One (Zhang et al. 2025; reference code YuanheZ/LoRA-One @01bba05).

        U, S, V = svd(−g),  B = U_r diag(√S_r) / √(σ₁γ),  A = diag(√S_r) V_rᵀ / √(σ₁γ)   (γ = 128)

    so s·B·A = (s/γ)·[−g]_r / σ₁: one best rank-r, σ₁-normalized gradient step of size s/γ.
    W unchanged (the model moves at step 0, on purpose). `niter`: None = full SVD (default);
    an integer = torch.svd_lowrank(q = min(4r, d)) as the reference (niter=4).
    Cost per layer: O(d_out·d_in·min(d_out, d_in)).
    """

    name = "lora_one"
    needs = frozenset({WEIGHT_GRADIENT})
    options = {"gamma": 128.0, "niter": None}
    reference = "Zhang et al. 2025, LoRA-One; code YuanheZ/LoRA-One @01bba05"

    def check_options(self, o):
        _check_positive(self.name, "gamma", o["gamma"])
        check_niter(self.name, o["niter"])

    def workspace_bytes(self, d_out, d_in, r, opts, itemsize):
        return _singular_workspace(d_out, d_in, r, opts, itemsize)

    def solve(self, p: LayerProblem) -> LayerSolution:
        U, S, V = singular_triplets(-_gradient(p), p.r, p, niter=p.options["niter"], q=4 * p.r)
        sigma1 = float(S[0])
        if not sigma1 > 0:
            raise DataError("the calibration gradient of this layer is zero; LoRA-One needs a nonzero gradient")
        c = 1.0 / math.sqrt(sigma1 * float(p.options["gamma"]))
        root = torch.sqrt(S)
        return LayerSolution(A=(root[:, None] * V.T * c).contiguous(), B=(U * root * c).contiguous(),
                             info={"sigma_max": sigma1})


class LoRASB(Method):
    """LoRA-SB (Ponkshe et al. 2025; reference code CERT-Lab/lora-sb @4feb81c), kind lora_xs only.

    First AdamW step estimate from the calibration samples:
        ΔW_avg = −η · sign(Σ_i ∇_W L(x_i))
    The engine's g is Σ_i w_i ∇_W L_i with positive weights w_i reduced across ranks before the sign,
    so sign(g) is the reference's sign of the summed gradient. η = init_options.eta, else the first
    warm-up step's learning rate the training job passes (`lr=`).
        U, S, V = svd_lowrank(ΔW_avg, q=r, niter=10)        (seeded per module)
        B = U_r (frozen),  A = V_rᵀ (frozen),  R = S_r / s (trainable r×r, diagonal)
    so s·B·R·A = [ΔW_avg]_r. W unchanged: the model starts at W0 + [ΔW_avg]_r. (The reference forces
    α = r, i.e. s = 1 and R = S_r; any s gives the same update.) `niter`: 10 = the reference; None =
    an exact truncated SVD. Cost per layer: O(d_out·d_in·r·niter) randomized.
    """

    name = "lora_sb"
    needs = frozenset({WEIGHT_GRADIENT})
    options = {"eta": None, "niter": 10}
    reference = "Ponkshe et al. 2025, LoRA-SB; code CERT-Lab/lora-sb @4feb81c"

    def check_options(self, o):
        if o["eta"] is not None:
            _check_positive(self.name, "eta", o["eta"])
        check_niter(self.name, o["niter"])

    def cost(self, d_out, d_in, r, opts=None):
        return float(d_out * d_in * r * 12)

    def workspace_bytes(self, d_out, d_in, r, opts, itemsize):
        return _singular_workspace(d_out, d_in, r, opts, itemsize)

    def solve(self, p: LayerProblem) -> LayerSolution:
        eta = p.options["eta"] if p.options["eta"] is not None else p.lr
        if eta is None:
            raise ConfigError("init 'lora_sb' needs init_options.eta (the first warm-up step's learning rate) "
                              "or the training job's lr passed to initialize_adapters(lr=...)")
        dW = -float(eta) * torch.sign(_gradient(p))
        U, S, V = singular_triplets(dW, p.r, p, niter=p.options["niter"], q=p.r)
        R = torch.diag(S / p.scaling)
        return LayerSolution(A=V.T.contiguous(), B=U.contiguous(), R=R, info={"eta": float(eta)})
