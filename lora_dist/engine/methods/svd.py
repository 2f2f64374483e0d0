"""Inits from a factorization of the base weight W: PiSSA, MiLoRA, OLoRA, LoRA-XS.

All of them need only W (gathered to the owner); none needs calibration data.
"""
from __future__ import annotations

import torch

from .base import WEIGHT, LayerProblem, LayerSolution, Method, check_niter, singular_triplets


def svd_cost(d_out: int, d_in: int) -> float:
    """Relative cost of a thin SVD with vectors, l = max, k = min side: l·k² + k³.

    Fits one-thread fp64 timings better than d_out·d_in·k (which over-weights the long side):
    measured 512²: 0.12 s, 1376×512: 0.21 s (model ratio 1.84, measured 1.73; d·d·k gives 2.69).
    """
    k, long = min(d_out, d_in), max(d_out, d_in)
    return float(long * k * k + k ** 3)


class PiSSA(Method):
    """PiSSA (Meng et al. 2024): the principal singular triplets of W become the adapter.

        W = U S Vᵀ,  B = U_r √(S_r/s),  A = √(S_r/s) V_rᵀ,  W ← W − s·B·A  (output unchanged).

    Option `niter`: None = full SVD; an integer = randomized SVD (torch.svd_lowrank, q=r, niter
    subspace iterations), PEFT's "pissa_niter_K". Cost per layer: O(d_out·d_in·min(d_out, d_in)).
    """

    name = "pissa"
    needs = frozenset({WEIGHT})
    writes_weight = True
    options = {"niter": None}
    reference = "Meng et al. 2024, PiSSA; PEFT init_lora_weights='pissa'"
    smallest = False

    def check_options(self, opts):
        check_niter(self.name, opts.get("niter"))

    def cost(self, d_out, d_in, r, opts=None):
        niter = (opts or {}).get("niter")
        if niter is not None and not self.smallest:  # randomized: passes of W against an (n × r) block
            return float(d_out * d_in * r * (2 * int(niter) + 2))
        return svd_cost(d_out, d_in)

    def workspace_bytes(self, d_out, d_in, r, opts, itemsize):
        """Randomized (niter): svd_lowrank's few (d_out + d_in)·r blocks; else a full SVD's factors."""
        if opts.get("niter") is not None and not self.smallest:
            return 4 * (d_out + d_in) * r * itemsize
        return super().workspace_bytes(d_out, d_in, r, opts, itemsize)

    def solve(self, p: LayerProblem) -> LayerSolution:
        U, S, V = singular_triplets(p.W, p.r, p, niter=p.options.get("niter"), smallest=self.smallest)
        root = torch.sqrt(S / p.scaling)
        B = U * root
        A = root[:, None] * V.T
        return LayerSolution(A=A, B=B)


class MiLoRA(PiSSA):
    """MiLoRA (Wang et al. 2025): as PiSSA with the r *smallest* singular triplets.

        B = U_[−r:] √(S/s),  A = √(S/s) V_[−r:]ᵀ,  W ← W − s·B·A.  Full SVD only.
    """

    name = "milora"
    options = {}
    reference = "Wang et al. 2025, MiLoRA"
    smallest = True


class OLoRA(Method):
    """OLoRA: W = Q R (thin QR), B = Q[:, :r], A = R[:r, :], W ← W − s·B·A.

    Signs: Householder QR is deterministic for a given W. Cost O(d_out·d_in·min(d_out, d_in)).
    """

    name = "olora"
    needs = frozenset({WEIGHT})
    writes_weight = True
    reference = "Büyükakyüz 2024, OLoRA; PEFT init_lora_weights='olora'"

    def workspace_bytes(self, d_out, d_in, r, opts, itemsize):
        """Thin QR: Q (d_out×k) and R (k×d_in), k = min(d_out, d_in)."""
        k = min(d_out, d_in)
        return (d_out * k + k * d_in) * itemsize

    def solve(self, p):
        Q, R = torch.linalg.qr(p.W)
        B, A = Q[:, : p.r].contiguous(), R[: p.r].contiguous()
        return LayerSolution(A=A, B=B)


class LoRAXSInit(Method):
    """LoRA-XS (Bałazy et al. 2024), for kind lora_xs: W = U S Vᵀ,

        B = U_r (frozen),  A = S_r V_rᵀ (frozen),  R ~ N(0, σ²) trainable r×r (σ = 1e-5),  W unchanged.
    """

    name = "lora_xs"
    needs = frozenset({WEIGHT})
    options = {"r_std": 1e-5}
    reference = "Bałazy et al. 2024, LoRA-XS"

    def cost(self, d_out, d_in, r, opts=None):
        return svd_cost(d_out, d_in)

    def solve(self, p):
        U, S, V = singular_triplets(p.W, p.r, p)
        R = torch.randn(p.r, p.r, generator=p.generator("R"), dtype=torch.float64).to(p.W.dtype)
        return LayerSolution(A=S[:, None] * V.T, B=U, R=R * float(p.options["r_std"]))
