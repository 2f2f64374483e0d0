"""CorDA, Context-oriented Decomposition Adaptation (Yang et al. 2024): an init that writes W."""
from __future__ import annotations

import math

import torch

from ...errors import DataError
from .base import INPUT_MOMENT, WEIGHT, LayerProblem, LayerSolution, Method, fix_signs, option_error


def damped_inverse(C: torch.Tensor, damping: float, tol: float = 0.05, max_doublings: int = 60):
    """(C_λ, C_λ⁻¹, λ) with C_λ = sym(C) + λ·mean(diag C)·I, λ doubled from `damping` until the inverse
    is accurate (‖C_λ C_λ⁻¹ − I‖_F < tol), as the CorDA reference does."""
    C = 0.5 * (C + C.T)
    n = C.shape[0]
    eye = torch.eye(n, dtype=C.dtype, device=C.device)
    base = float(torch.diagonal(C).mean())
    if not base > 0:
        raise DataError("CorDA: the input covariance is zero (no signal reached this layer)")
    lam = float(damping)
    for _ in range(max_doublings):
        Cl = C + (lam * base) * eye
        inv = torch.linalg.inv(Cl)
        err = float(torch.linalg.matrix_norm(Cl @ inv - eye))
        if math.isfinite(err) and err < tol:
            return Cl, inv, lam
        lam = max(2 * lam, 1e-12)
    raise FloatingPointError(f"CorDA: could not invert the input covariance (damping reached {lam:g})")


class CorDA(Method):
    """CorDA, Context-oriented Decomposition Adaptation (Yang et al. 2024; reference code iboing/CorDA,
    cordalib/decomposition.py; PEFT `init_lora_weights="corda"`).

    The weight is decomposed against the covariance of its calibration inputs, so that the components
    that matter for the task context (IPM) or matter least to it (KPM) are split off into the adapter:

        C   = A_in = Σ_t x_tᵀ x_t / T                 (uncentered input second moment, d_in×d_in)
        C_λ = C + λ·mean(diag C)·I                     λ = `damping` (0.01); doubled until
                                                       ‖C_λ C_λ⁻¹ − I‖_F < 0.05, as the reference
        W C_λ = U S Vᵀ                                 (full SVD, d_out×d_in)
        mode "ipm" (instruction-previewed, default): the r largest triplets; "kpm" (knowledge-
        preserving): the r smallest
        B = U_r √(S_r/s),   A = √(S_r/s) V_rᵀ C_λ⁻¹,   W ← W − s·B·A  (= W − U_r S_r V_rᵀ C_λ⁻¹)

    Since W = U S Vᵀ C_λ⁻¹ exactly, the residual keeps the other components and the model output is
    unchanged at init. Signs: each U column's largest-|.| entry positive (V flips with it).

    Differences from PEFT's port, by construction: PEFT builds C from each forward call's input divided
    by its maximum (a per-call rescaling), averaged over calls; we use the plain mean over the calibration
    positions (attention mask, or loss positions with `factor_positions="loss"`), which does not depend
    on batching. The product B·A does not depend on the scale of C, but the split between B and A does.
    Given the same C (PEFT's `covariance_file`), the factors agree (tests/engine/test_methods.py).
    Cost per layer: O(d_in³ + d_out·d_in·min(d_out, d_in)).
    """

    name = "corda"
    needs = frozenset({WEIGHT, INPUT_MOMENT})
    writes_weight = True
    options = {"mode": "ipm", "damping": 0.01}
    reference = "Yang et al. 2024, CorDA; code iboing/CorDA; PEFT init_lora_weights='corda'"

    def check_options(self, o):
        if o["mode"] not in ("ipm", "kpm"):
            raise option_error(self.name, "mode", o["mode"],
                               "'ipm' (instruction-previewed: largest components) or 'kpm' (knowledge-preserving: "
                               "smallest components)")
        d = o["damping"]
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
            raise option_error(self.name, "damping", d, "a number >= 0 (relative to the mean input variance)")

    def cost(self, d_out, d_in, r, opts=None):
        return float(d_in ** 3 + d_out * d_in * d_in + d_out * d_in * min(d_out, d_in))

    def workspace_bytes(self, d_out, d_in, r, opts, itemsize):
        """damped_inverse holds C, I, C_λ, C_λ⁻¹ and C_λ·C_λ⁻¹ (5·d_in²); then W·C and its SVD factors
        (3·d_out·d_in, the k² LAPACK workspace within)."""
        return (5 * d_in * d_in + 3 * d_out * d_in) * itemsize

    def solve(self, p: LayerProblem) -> LayerSolution:
        W = p.W.to(p.dtype)
        C, Cinv, lam = damped_inverse(p.stats[INPUT_MOMENT]["second"].to(p.dtype), float(p.options["damping"]))
        U, S, Vh = torch.linalg.svd(W @ C, full_matrices=False)
        sl = slice(0, p.r) if p.options["mode"] == "ipm" else slice(S.shape[0] - p.r, None)
        U, S, V = U[:, sl], S[sl], Vh[sl].T
        U, V = fix_signs(U, V)
        root = torch.sqrt(S / p.scaling)
        B = (U * root).contiguous()
        A = (root[:, None] * (V.T @ Cinv)).contiguous()
        return LayerSolution(A=A, B=B, info={"damping_relative": lam})
