"""What to compute: a method declares the statistics it needs and solves one layer. Nothing else.

Statistics (normalized by the engine; see docs/methods.md and shared/design/methods.md):
- WEIGHT_GRADIENT  g = Σ_i w_i Σ_{t∈i} δ_tᵀ x_t (d_out×d_in), δ_t = ∂L_i/∂y_t, w_i = 1/N_c
                   ("sample_mean": g = ∇_W of the mean over samples of per-sample mean-token losses)
                   or n_i/N_tok ("token_mean").
- INPUT_MOMENT     {"second": Σ_t x_tᵀx_t / T (d_in×d_in), "mean": Σ_t x_t / T, "count": T} over the
                   attention-mask positions (or loss-bearing positions); shared by modules reading the
                   same input.
- OUTPUT_GRAD_DIAG Σ_t (∂L_i/∂y_t)² / T (d_out), same positions as INPUT_MOMENT.
- OUTPUT_GRAD_FULL Σ_t (∂L_i/∂y_t)ᵀ(∂L_i/∂y_t) / T (d_out×d_out).
- WEIGHT           the layer's full base weight W (gathered to the owner only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from ...adapters import generator_for
from ...config import ConfigError

WEIGHT_GRADIENT = "weight_gradient"
INPUT_MOMENT = "input_moment"
OUTPUT_GRAD_DIAG = "output_grad_diag"
OUTPUT_GRAD_FULL = "output_grad_full"
WEIGHT = "weight"
STATISTICS = (WEIGHT_GRADIENT, INPUT_MOMENT, OUTPUT_GRAD_DIAG, OUTPUT_GRAD_FULL)

COMMON_OPTIONS = {"gradient_weighting": "sample_mean", "factor_positions": "attention"}


@dataclass
class LayerProblem:
    """Everything one layer's solve sees, on its owner rank."""
    name: str
    d_out: int
    d_in: int
    r: int
    scaling: float
    kind: str
    options: Dict
    seed: int
    n_train: Optional[int] = None          # training-set size, when the job knows it
    lr: Optional[float] = None             # first warm-up step's learning rate, when known
    W: Optional[torch.Tensor] = None       # full base weight, in the solve dtype
    stats: Dict = field(default_factory=dict)
    n_samples: int = 0                     # calibration samples (global)
    dtype: torch.dtype = torch.float32     # solve precision

    def generator(self, salt: str = "") -> torch.Generator:
        """Seeded from (seed, module name): the same whoever solves it."""
        return generator_for(self.seed, self.name + salt)


@dataclass
class LayerSolution:
    A: torch.Tensor                        # r × d_in
    B: torch.Tensor                        # d_out × r
    R: Optional[torch.Tensor] = None       # r × r (kind lora_xs)
    info: Dict = field(default_factory=dict)


class Method:
    """Base class. Subclasses set `name`, `needs`, `writes_weight`, `options`, and define `solve`.

    A method with `writes_weight` rewrites W ← W − s·B·A with the factors as written (the engine
    does it, in float64, so the model output is unchanged at init)."""

    name = ""
    needs: frozenset = frozenset()
    writes_weight = False
    options: Dict = {}
    reference = ""
    # Accumulation precision the solve needs; None = the engine's default (fp32). A method that
    # inverts the factors (LoRA-DA) asks for float64: fp32 sums of Σxᵀx change with the summation
    # order (batching, world size) enough to swap near-degenerate eigenvectors of its Ω.
    stats_dtype: Optional[torch.dtype] = None

    @property
    def needs_backward(self) -> bool:
        return bool(self.needs & {WEIGHT_GRADIENT, OUTPUT_GRAD_DIAG, OUTPUT_GRAD_FULL})

    @property
    def needs_data(self) -> bool:
        return bool(self.needs & set(STATISTICS))

    def resolve_options(self, given: Dict) -> Dict:
        allowed = {**COMMON_OPTIONS, **self.options}
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ConfigError(f"init_options {unknown} are not options of init {self.name!r}; "
                              f"its options are {sorted(allowed)}")
        opts = {**allowed, **given}
        if opts["gradient_weighting"] not in ("sample_mean", "token_mean"):
            raise ConfigError(f"init_options.gradient_weighting={opts['gradient_weighting']!r}; "
                              "use 'sample_mean' or 'token_mean'")
        if opts["factor_positions"] not in ("attention", "loss"):
            raise ConfigError(f"init_options.factor_positions={opts['factor_positions']!r}; "
                              "use 'attention' or 'loss'")
        self.check_options(opts)
        return opts

    def check_options(self, opts: Dict) -> None:
        """Raise ConfigError naming the option when a value is invalid."""

    def stats_needed(self, opts: Dict) -> frozenset:
        """The statistics to collect for these options (default: `needs`)."""
        return self.needs

    def cost(self, d_out: int, d_in: int, r: int, opts: Optional[Dict] = None) -> float:
        """Relative solve cost of one layer (flop-like), for the owner plan; opts: the init options."""
        return float(d_out * d_in * min(d_out, d_in))

    def workspace_bytes(self, d_out: int, d_in: int, r: int, opts: Dict, itemsize: int) -> int:
        """Bytes one layer's solve allocates on its owner beyond its statistics and W, at `itemsize`
        bytes per element (the solve dtype); counted from the solve's buffers. Default: a full SVD's
        factors, U (d_out×k) and Vᵀ (k×d_in) with k = min(d_out, d_in), plus LAPACK's k² workspace."""
        k = min(d_out, d_in)
        return (d_out * k + k * d_in + k * k) * itemsize

    def solve(self, p: LayerProblem) -> LayerSolution:
        raise NotImplementedError


def fix_signs(U: torch.Tensor, V: Optional[torch.Tensor] = None):
    """Deterministic signs for singular/eigen vectors: each column of U gets its largest-|.| entry
    positive (V's matching columns flip with it), so results do not depend on the solver's whims."""
    idx = U.abs().argmax(dim=0)
    s = torch.sign(U[idx, torch.arange(U.shape[1])])
    s[s == 0] = 1
    return (U * s, None if V is None else V * s)


def check_niter(method: str, n) -> None:
    """`niter`: None (full SVD) or a non-negative integer (randomized SVD)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise option_error(method, "niter", n, "None (full SVD) or a non-negative integer (randomized SVD)")


def singular_triplets(M: torch.Tensor, k: int, p: LayerProblem, niter: Optional[int] = None,
                      q: Optional[int] = None, smallest: bool = False):
    """(U_k, S_k, V_k) of M ≈ U diag(S) Vᵀ with deterministic signs (`fix_signs`); the k largest
    triplets, or the k smallest with `smallest`.

    niter None (or smallest): a thin LAPACK SVD of the tall orientation (LAPACK is ~1.5x faster on
    tall than on wide matrices: 0.21 s vs 0.30 s for 1376x512 vs 512x1376, fp64, one thread; Mᵀ =
    V S Uᵀ). Otherwise torch.svd_lowrank(M, q=min(max(q, k), min(M.shape)), niter) with the global
    RNG seeded from p.generator("svd") for the call, so every rank and world size gets the same start.
    """
    if niter is not None and not smallest:
        q = min(max(q or k, k), min(M.shape))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.generator("svd").initial_seed())
            U, S, V = torch.svd_lowrank(M, q=q, niter=int(niter))
        U, S, V = U[:, :k], S[:k], V[:, :k]
    else:
        if M.shape[0] < M.shape[1]:
            V, S, Uh = torch.linalg.svd(M.T, full_matrices=False)
            U, Vh = Uh.T, V.T
        else:
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        sl = slice(S.shape[0] - k, None) if smallest else slice(0, k)
        U, S, V = U[:, sl], S[sl], Vh[sl].T
    U, V = fix_signs(U, V)
    return U, S, V


def option_error(method: str, key: str, value, expect: str) -> ConfigError:
    return ConfigError(f"init_options.{key}={value!r} for init {method!r}: {expect}")
