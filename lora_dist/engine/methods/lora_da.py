"""LoRA-DA (Zhang et al.; reference code zqy0126/LoRA-DA @928f484): data-aware init from the
asymptotic error of the fine-tuned weight, via K-FAC factors of the Fisher.
"""
from __future__ import annotations

import math

import torch

from .base import (INPUT_MOMENT, OUTPUT_GRAD_DIAG, OUTPUT_GRAD_FULL, WEIGHT_GRADIENT, LayerProblem,
                   LayerSolution, Method, fix_signs, option_error)
from ...config import ConfigError


def cholesky_damped(M: torch.Tensor, damping: float, what: str, name: str):
    """Cholesky of sym(M) + λI; λ grows ×10 until it succeeds. Returns (L, λ used).

    Holds one extra d×d buffer besides M and L (the damping is added on its diagonal in place)."""
    S = M + M.T
    S.mul_(0.5)
    diag = S.diagonal()
    lam, added = float(damping), 0.0
    for _ in range(12):
        diag.add_(lam - added)
        added = lam
        L, info = torch.linalg.cholesky_ex(S)
        if int(info) == 0:
            return L, lam
        del L
        lam = max(lam * 10, 1e-12)
    raise FloatingPointError(f"layer {name!r}: {what} is not positive definite even with damping {lam:g} "
                             f"(phase: solve)")


class LoRADA(Method):
    """LoRA-DA. With K-FAC J ≈ G ⊗ A_in and A with orthonormal rows, the expected error of the
    fine-tuned weight is tr(A Ω Aᵀ) + const, with the Initialization Guidance Matrix (d_in×d_in)

        Ω = β·(Σ Ginv / N / σ²)·A_in⁻¹  −  a·ΔŴ ΔŴᵀ      (variance − bias),

    computed per layer as the reference code does:
      1. A_in ← sym(Σxᵀx/T) + λI, Cholesky (λ = damping; raised ×10 if needed, reported);
      2. Ginv ← 1/(diag(G)/T + λ)  (fisher="diag"; "full": Ginv = (G/T + λI)⁻¹, Σ Ginv → tr);
      3. ΔŴ ← −A_in⁻¹ gᵀ Ginv (d_in×d_out), σ = its largest singular value, ΔŴ ← ΔŴ/σ;
      4. Ω as above, symmetrized (a = 1; N = training-set size `n_train`);
      5. a0 = eigenvectors of Ω for its r smallest eigenvalues: LOBPCG (niter = lobpcg_niter) from a
         QR-orthonormalized random start seeded by the module name; eigh if LOBPCG fails;
      6. lora_A = a0ᵀ/√γ, lora_B = ΔŴᵀ a0/√γ.  W unchanged.
    Ablations: "no_bias" (Ω = variance term), "no_variance" (Ω = −ΔŴΔŴᵀ), "no_variance_no_fisher"
    (ΔŴ = −gᵀ/σ, no Fisher; Ω = −ΔŴΔŴᵀ). Option solver="eigh" skips LOBPCG.
    Cost per layer O(d_in³ + d_in²·d_out); memory ≈ 3·d_in² + d_in·d_out.
    """

    name = "lora_da"
    needs = frozenset({WEIGHT_GRADIENT, INPUT_MOMENT, OUTPUT_GRAD_DIAG})
    options = {"beta": 0.03, "gamma": 1024.0, "damping": 1e-6, "n_train": None, "fisher": "diag",
               "ablation": None, "lobpcg_niter": 10, "solver": "lobpcg"}
    reference = "Zhang et al., LoRA-DA; code zqy0126/LoRA-DA @928f484"
    stats_dtype = torch.float64  # Ω's small eigenvectors are sensitive to fp32 summation order

    def check_options(self, o):
        if o["fisher"] not in ("diag", "full"):
            raise option_error(self.name, "fisher", o["fisher"], "'diag' or 'full'")
        if o["ablation"] not in (None, "no_bias", "no_variance", "no_variance_no_fisher"):
            raise option_error(self.name, "ablation", o["ablation"],
                               "None, 'no_bias', 'no_variance' or 'no_variance_no_fisher'")
        if o["solver"] not in ("lobpcg", "eigh"):
            raise option_error(self.name, "solver", o["solver"], "'lobpcg' or 'eigh'")
        for k in ("beta", "gamma"):
            if not isinstance(o[k], (int, float)) or o[k] <= 0:
                raise option_error(self.name, k, o[k], "a positive number")
        if not isinstance(o["damping"], (int, float)) or o["damping"] < 0:
            raise option_error(self.name, "damping", o["damping"], "a number >= 0")
        if o["n_train"] is not None and (not isinstance(o["n_train"], int) or o["n_train"] < 1):
            raise option_error(self.name, "n_train", o["n_train"], "the training-set size, a positive integer")

    def stats_needed(self, o):
        s = {WEIGHT_GRADIENT}
        if o["ablation"] != "no_variance_no_fisher":
            s |= {INPUT_MOMENT, OUTPUT_GRAD_FULL if o["fisher"] == "full" else OUTPUT_GRAD_DIAG}
        return frozenset(s)

    def cost(self, d_out, d_in, r, opts=None):
        return float(d_in ** 3 + d_in * d_in * d_out)

    def workspace_bytes(self, d_out, d_in, r, opts, itemsize):
        """sym(A_in)+λI and its Cholesky L (then L and Ω; then Ω and its transposed copy): 2·d_in²;
        gᵀ·Ginv and ΔŴ: 2·d_in·d_out; fisher="full" adds G's sym, Cholesky and inverse: 3·d_out²."""
        n = 2 * d_in * d_in + 2 * d_in * d_out
        if opts.get("fisher") == "full":
            n += 3 * d_out * d_out
        return n * itemsize

    def solve(self, p: LayerProblem) -> LayerSolution:
        o = p.options
        n_train = o["n_train"] if o["n_train"] is not None else p.n_train
        if n_train is None and o["ablation"] not in ("no_variance", "no_variance_no_fisher"):
            raise ConfigError("init_options.n_train is required for init 'lora_da' (the training-set size N "
                              "of the variance term); the training job passes it")
        g = p.stats[WEIGHT_GRADIENT].to(p.dtype)
        lam = float(o["damping"])
        info = {}
        if o["ablation"] == "no_variance_no_fisher":
            dW = -g.T
            sigma = torch.linalg.matrix_norm(dW, ord=2)
            dW = dW / sigma
            omega = torch.mm(dW, dW.T).neg_()
        else:
            L, lam_used = cholesky_damped(p.stats[INPUT_MOMENT]["second"].to(p.dtype), lam, "A_in", p.name)
            info["damping_A_in"] = lam_used
            if o["fisher"] == "full":
                G = p.stats[OUTPUT_GRAD_FULL].to(p.dtype)
                LG, lam_g = cholesky_damped(G, lam, "G", p.name)
                info["damping_G"] = lam_g
                Ginv = torch.cholesky_inverse(LG)
                sum_ginv = torch.trace(Ginv)
                dW = -torch.cholesky_solve(g.T @ Ginv, L)
            else:
                Ginv = 1.0 / (p.stats[OUTPUT_GRAD_DIAG].to(p.dtype) + lam)
                sum_ginv = Ginv.sum()
                dW = -torch.cholesky_solve(g.T * Ginv[None, :], L)
            sigma = torch.linalg.matrix_norm(dW, ord=2)
            dW.div_(sigma)
            # Ω in one d_in×d_in buffer: peak ≈ A_in + L + Ω (the reference's 3·d_in²)
            if o["ablation"] == "no_variance":
                del L
                omega = torch.mm(dW, dW.T).neg_()
            else:
                omega = torch.cholesky_inverse(L)
                del L
                omega.mul_(float(o["beta"]) * (sum_ginv / n_train / sigma ** 2))
                if o["ablation"] != "no_bias":
                    omega.addmm_(dW, dW.T, alpha=-1.0)
        omega.add_(omega.T.clone()).mul_(0.5)  # symmetrize
        a0, how = self._smallest_eigvecs(omega, p)
        info["eigensolver"] = how
        a0, _ = fix_signs(a0)
        scale = 1.0 / math.sqrt(float(o["gamma"]))
        return LayerSolution(A=(a0.T * scale).contiguous(), B=(dW.T @ a0) * scale, info=info)

    def _smallest_eigvecs(self, omega, p):
        r, n = p.r, omega.shape[0]
        if p.options["solver"] == "lobpcg" and n >= 3 * r:
            X = torch.randn(n, r, generator=p.generator("lobpcg"), dtype=torch.float64).to(omega.dtype)
            X, _ = torch.linalg.qr(X)
            try:
                _, vecs = torch.lobpcg(omega, k=r, X=X, largest=False, niter=int(p.options["lobpcg_niter"]))
                if torch.isfinite(vecs).all():
                    return vecs, "lobpcg"
            except Exception:  # LOBPCG can break down (rank-deficient blocks): fall back, report it
                pass
        _, vecs = torch.linalg.eigh(omega)
        return vecs[:, :r], "eigh"
