"""Update rules that survive ZeRO-3: LoRA-FA's projected gradient, LoRA-Pro's adjustment, LoRA+.

Notation (docs/update_rules.md): A ∈ R^{r×d_in}, B ∈ R^{d_out×r}, s the scale, g_A, g_B the
gradients of the loss with respect to A and B; P_A = (AAᵀ+δI)⁻¹, P_B = (BᵀB+δI)⁻¹ (both r×r,
symmetric positive definite, so the inverse is the pseudo-inverse the references take).

The pure per-layer math (`lora_fa_gradient`, `lora_pro_adjust`, `lora_pro_step`) takes and returns
full tensors in float32 or float64; the r×r inverses and the Sylvester solve run in float64 whatever
the input (P_B ≈ 1/δ while B is tiny), and the results come back in the input's dtype.

Where each rule lives:
- LoRA-FA: linear in g_B with A frozen, so P_A is built once and applied by a gradient hook on B on
  every rank and micro-batch, before any reduction (`attach_update_rule`): any optimizer then sees
  the projected gradient, DeepSpeed's under ZeRO-3 included.
- LoRA+: parameter groups (`param_groups`), checked against the DeepSpeed scheduler
  (`check_scheduler` / `per_group_scheduler`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .errors import ConfigError

# --------------------------------------------------------------------------------------------------
# The pure math
# --------------------------------------------------------------------------------------------------


def _inv_gram(F: torch.Tensor, delta: float, rows: bool) -> torch.Tensor:
    """(F Fᵀ + δI)⁻¹ if rows else (Fᵀ F + δI)⁻¹, float64 (r×r, SPD: a Cholesky inverse)."""
    F = F.double()
    G = F @ F.T if rows else F.T @ F
    G = G + delta * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(G))


def _sylvester(S: torch.Tensor, T: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """X with S·X + X·T = C for symmetric PSD S, T (one of them PD): in the eigenbases
    S = UΛUᵀ, T = VΜVᵀ the equation is diagonal, X = U·[(UᵀCV)_ij / (λ_i + μ_j)]·Vᵀ."""
    lam, U = torch.linalg.eigh(S)
    mu, V = torch.linalg.eigh(T)
    return U @ ((U.T @ C @ V) / (lam[:, None] + mu[None, :])) @ V.T


def _check_step(t) -> None:
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ConfigError(f"update_rules: the step t counts optimizer steps from 1, got {t!r}")


def lora_fa_gradient(g_B: torch.Tensor, A: torch.Tensor, scaling: float, delta: float = 1e-8) -> torch.Tensor:
    """LoRA-FA's projected gradient of B:  g̃_B = s⁻²·g_B·(AAᵀ+δI)⁻¹."""
    P_A = _inv_gram(A, delta, rows=True)
    return ((g_B.double() @ P_A) / scaling ** 2).to(g_B.dtype)


def _adjust(g_A, g_B, A, B, s, delta, sylvester: bool):
    """LoRA-Pro's Adjust in float64 (the note's step 1, or with `sylvester` its step 4).

    B = 0:  g_A′ = g_A,  g_B′ = s⁻²·g_B·P_A.
    else:   g_A′ = s⁻²·P_B·g_A (+ X·A),  g_B′ = s⁻²·(I − B·P_B·Bᵀ)·g_B·P_A (− B·X),
            with X solving BᵀB·X + X·AAᵀ = −s⁻²·P_B·g_A·Aᵀ when `sylvester`.
    """
    g_A, g_B, A, B = g_A.double(), g_B.double(), A.double(), B.double()
    P_A = _inv_gram(A, delta, rows=True)
    if not bool(B.any()):
        return g_A, (g_B @ P_A) / s ** 2
    P_B = _inv_gram(B, delta, rows=False)
    gA = (P_B @ g_A) / s ** 2
    # (I − B·P_B·Bᵀ)·g_B without forming the d_out×d_out projector
    gB = ((g_B - B @ (P_B @ (B.T @ g_B))) @ P_A) / s ** 2
    if sylvester:
        X = _sylvester(B.T @ B, A @ A.T, -(gA @ A.T))
        gA = gA + X @ A
        gB = gB - B @ X
    return gA, gB


def lora_pro_adjust(g_A: torch.Tensor, g_B: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                    t: int, delta: float = 1e-8):
    """LoRA-Pro's adjusted gradients (step 4 of the note; the paper's light variant when applied to
    the raw gradients):

        B = 0 (the first step of a zero-init B; BᵀB is singular):
            g_A′ = g_A,  g_B′ = s⁻²·g_B·P_A;
        otherwise, with X (r×r) solving BᵀB·X + X·AAᵀ = −s⁻²·P_B·g_A·Aᵀ:
            g_A′ = s⁻²·P_B·g_A + X·A,  g_B′ = s⁻²·(I − B·P_B·Bᵀ)·g_B·P_A − B·X.

    `t` is the 1-based optimizer step (checked; the branch is decided by B = 0, which is where the
    general formula breaks down: after a data-aware init B ≠ 0 at t = 1 and the general one applies).
    Returns (g_A′, g_B′) in the inputs' dtypes.
    """
    _check_step(t)
    gA, gB = _adjust(g_A, g_B, A, B, scaling, delta, sylvester=True)
    return gA.to(g_A.dtype), gB.to(g_B.dtype)


def lora_pro_step(g_A: torch.Tensor, g_B: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                  M: Optional[torch.Tensor], V: Optional[torch.Tensor], t: int,
                  betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8, delta: float = 1e-8):
    """LoRA-Pro's full rule for one layer at step t (1-based); the inner step is A −= lr·g_A′,
    B −= lr·g_B′ (plain SGD).

    1. (g̅_A, g̅_B) = Adjust(g_A, g_B) without the Sylvester term; G̃ = s·B·g̅_A + s·g̅_B·A.
    2. Full-size Adam moments: M = (1−β₁)G̃, V = (1−β₂)G̃² at t = 1 (M = V = None given);
       later M ← M + (1−β₁)(G̃ − M), V ← β₂V + (1−β₂)G̃².
       Ĝ = (M/(1−β₁ᵗ)) / (√V/√(1−β₂ᵗ) + ε).
    3. ĝ_A = s·Bᵀ·Ĝ, ĝ_B = s·Ĝ·Aᵀ.
    4. (g_A′, g_B′) = Adjust(ĝ_A, ĝ_B) with the Sylvester term (`lora_pro_adjust`).

    M and V keep their dtype (the moments' storage dtype; g_A's at t = 1); the arithmetic runs in
    float64.
    Returns (g_A′, g_B′, M, V).
    """
    _check_step(t)
    if (M is None) != (t == 1) or (V is None) != (t == 1):
        raise ConfigError(f"lora_pro_step: the moments M, V must be None exactly at t = 1 (got t={t}, "
                          f"M {'None' if M is None else 'given'}, V {'None' if V is None else 'given'})")
    b1, b2 = betas
    s = scaling
    gA, gB = _adjust(g_A, g_B, A, B, s, delta, sylvester=False)
    Bd, Ad = B.double(), A.double()
    G = s * (Bd @ gA) + s * (gB @ Ad)
    if M is None:
        M64, V64 = (1 - b1) * G, (1 - b2) * G * G
        mdtype = g_A.dtype
    else:
        M64 = M.double() + (1 - b1) * (G - M.double())
        V64 = b2 * V.double() + (1 - b2) * G * G
        mdtype = M.dtype
    del G
    Gh = (M64 / (1 - b1 ** t)) / (V64.sqrt() / math.sqrt(1 - b2 ** t) + eps)
    hA, hB = s * (Bd.T @ Gh), s * (Gh @ Ad.T)
    out_A, out_B = _adjust(hA, hB, A, B, s, delta, sylvester=True)
    return out_A.to(g_A.dtype), out_B.to(g_B.dtype), M64.to(mdtype), V64.to(mdtype)
