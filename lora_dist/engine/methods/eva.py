"""EVA, Explained Variance Adaptation (Paischer et al. 2024; PEFT `init_lora_weights="eva"`)."""
from __future__ import annotations

import torch

from .base import INPUT_MOMENT, LayerProblem, LayerSolution, Method, fix_signs, option_error
from ...errors import ConfigError, DataError


class EVA(Method):
    """EVA, Explained Variance Adaptation (Paischer et al. 2024; PEFT `init_lora_weights="eva"`).

    A = the top-r principal directions of the layer inputs, B = 0, W unchanged.

    The reference (and PEFT) run an incremental PCA over the activations until the components converge.
    The engine reduces the exact moments instead (INPUT_MOMENT: A_in = Σ_t x_tᵀx_t / T and μ = Σ_t x_t / T
    over the attention-mask positions, or the loss-bearing ones with `factor_positions="loss"`), so the PCA
    is exact and does not depend on batching or world size:

        Σ = A_in − μ μᵀ  (the centered input covariance, d_in×d_in),   Σ = Q diag(λ) Qᵀ, λ descending
        A = Q[:, :r]ᵀ                       (whiten=False, default)
        A = diag(λ_:r)^{-1/2} Q[:, :r]ᵀ     (whiten=True)
        B = 0

    Signs: each eigenvector's largest-|.| entry is made positive. Modules reading the same input
    (q/k/v, gate/up) share one A_in, so they get the same A.

    Rank redistribution (the paper's ρ: r·ρ candidate components per layer, the total budget Σr handed to
    the components with the largest explained-variance ratio across all layers) changes each layer's rank,
    so it needs a cross-layer step and a re-injection that the engine does not have yet: `redistribute=True`
    and `rho` (which only matters for redistribution) are refused with a ConfigError.
    Cost per layer: O(d_in³) (one symmetric eigendecomposition per input group).
    """

    name = "eva"
    needs = frozenset({INPUT_MOMENT})
    options = {"whiten": False, "redistribute": False}
    reference = "Paischer et al. 2024, EVA; PEFT init_lora_weights='eva'"

    def resolve_options(self, given):
        if "rho" in given:  # before the generic unknown-option message: say why it is refused
            raise ConfigError(f"init_options.rho={given['rho']!r} for init 'eva': rho only sizes the candidate "
                              "components of rank redistribution across layers, which is not supported yet "
                              "(every layer keeps rank r), so it would do nothing. Remove init_options.rho.")
        return super().resolve_options(given)

    def check_options(self, o):
        if not isinstance(o["whiten"], bool):
            raise option_error(self.name, "whiten", o["whiten"], "True or False")
        if not isinstance(o["redistribute"], bool):
            raise option_error(self.name, "redistribute", o["redistribute"], "True or False")
        if o["redistribute"]:
            raise ConfigError("init_options.redistribute=True for init 'eva': rank redistribution across layers "
                              "is not supported yet (it needs a cross-layer step and per-layer ranks); every "
                              "layer keeps rank r. Leave init_options.redistribute False.")

    def cost(self, d_out, d_in, r, opts=None):
        return float(d_in ** 3)

    def workspace_bytes(self, d_out, d_in, r, opts, itemsize):
        """cov, its symmetrized temporaries and eigh's eigenvectors: about 4·d_in²."""
        return 4 * d_in * d_in * itemsize

    def solve(self, p: LayerProblem) -> LayerSolution:
        m = p.stats[INPUT_MOMENT]
        mu = m["mean"].to(p.dtype)
        cov = m["second"].to(p.dtype) - torch.outer(mu, mu)
        cov = 0.5 * (cov + cov.T)
        lam, Q = torch.linalg.eigh(cov)                      # ascending
        lam, Q = lam.flip(0)[: p.r], Q.flip(1)[:, : p.r]
        Q, _ = fix_signs(Q)
        A = Q.T.contiguous()
        info = {"explained_variance": [float(v) for v in lam],
                "explained_variance_ratio": float(lam.sum() / torch.diagonal(cov).sum().clamp(min=1e-300))}
        if p.options["whiten"]:
            if not bool((lam > 0).all()):
                raise DataError(f"EVA whitening: the input covariance has {int((lam <= 0).sum())} non-positive "
                                 "eigenvalue(s) among the top r; use more calibration tokens or whiten=False")
            A = A / torch.sqrt(lam)[:, None]
        B = torch.zeros(p.d_out, p.r, dtype=A.dtype)
        return LayerSolution(A=A, B=B, info=info)
