"""Update rules (docs/update_rules.md): the pure math against an independent float64 implementation
of the note's formulas, LoRA-FA against PEFT's optimizer, LoRA+ parameter groups and schedulers."""
import math

import pytest
import torch

import lora_dist as ld
from lora_dist import update_rules as ur


# ---- independent float64 reference, written from the note ----------------------------------------
def ref_pinv_gram(F, rows, delta=1e-8):
    G = F @ F.T if rows else F.T @ F
    return torch.linalg.pinv(G + delta * torch.eye(G.shape[0], dtype=torch.float64))


def ref_sylvester(S, T, C):
    """S X + X T = C through the Kronecker form (column-major vec): (I⊗S + Tᵀ⊗I) vec X = vec C."""
    n, m = C.shape
    K = torch.kron(torch.eye(m, dtype=torch.float64), S) + torch.kron(T.T.contiguous(), torch.eye(n, dtype=torch.float64))
    x = torch.linalg.solve(K, C.T.reshape(-1))
    return x.reshape(m, n).T


def ref_adjust(gA, gB, A, B, s, sylvester, delta=1e-8):
    PA = ref_pinv_gram(A, True, delta)
    if torch.count_nonzero(B) == 0:
        return gA, s ** -2 * gB @ PA
    PB = ref_pinv_gram(B, False, delta)
    proj = torch.eye(B.shape[0], dtype=torch.float64) - B @ PB @ B.T
    a = s ** -2 * PB @ gA
    b = s ** -2 * proj @ gB @ PA
    if sylvester:
        X = ref_sylvester(B.T @ B, A @ A.T, -s ** -2 * PB @ gA @ A.T)
        a, b = a + X @ A, b - B @ X
    return a, b


def ref_step(gA, gB, A, B, s, M, V, t, b1=0.9, b2=0.999, eps=1e-8):
    a, b = ref_adjust(gA, gB, A, B, s, False)
    G = s * B @ a + s * b @ A
    if t == 1:
        M, V = (1 - b1) * G, (1 - b2) * G ** 2
    else:
        M, V = M + (1 - b1) * (G - M), b2 * V + (1 - b2) * G ** 2
    Gh = (M / (1 - b1 ** t)) / (torch.sqrt(V) / math.sqrt(1 - b2 ** t) + eps)
    a, b = ref_adjust(s * B.T @ Gh, s * Gh @ A.T, A, B, s, True)
    return a, b, M, V


def rel(x, y):
    """Relative error; the absolute one where the reference is exactly zero (A's first-step update)."""
    d = float((x.double() - y).norm())
    return d / float(y.norm()) if y.norm() > 0 else d


def layer(seed, d_out=9, d_in=7, r=3, zero_B=False):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5
    B = torch.zeros(d_out, r, dtype=torch.float64) if zero_B else torch.randn(d_out, r, generator=g, dtype=torch.float64)
    gA = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    gB = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    return gA, gB, A, B


@pytest.mark.parametrize("seed", [0, 1])
def test_lora_fa_gradient_matches_reference(seed):
    _, gB, A, _ = layer(seed)
    out = ur.lora_fa_gradient(gB, A, 2.5)
    assert out.dtype == torch.float64
    assert rel(out, 2.5 ** -2 * gB @ ref_pinv_gram(A, True)) < 1e-10
    out32 = ur.lora_fa_gradient(gB.float(), A.float(), 2.5)
    assert out32.dtype == torch.float32 and rel(out32, 2.5 ** -2 * gB @ ref_pinv_gram(A, True)) < 1e-5


@pytest.mark.parametrize("zero_B", [False, True])
@pytest.mark.parametrize("t", [1, 3])
def test_lora_pro_adjust_matches_reference(zero_B, t):
    gA, gB, A, B = layer(2 + t, zero_B=zero_B)
    a, b = ur.lora_pro_adjust(gA, gB, A, B, 1.7, t)
    ea, eb = ref_adjust(gA, gB, A, B, 1.7, True)
    assert rel(a, ea) < 1e-10 and rel(b, eb) < 1e-10
    if not zero_B:  # the Sylvester term is really there: without it the result differs
        na, _ = ref_adjust(gA, gB, A, B, 1.7, False)
        assert rel(na, ea) > 1e-3
        X = (a - 1.7 ** -2 * ref_pinv_gram(B, False) @ gA) @ torch.linalg.pinv(A)
        C = -1.7 ** -2 * ref_pinv_gram(B, False) @ gA @ A.T
        assert rel(B.T @ B @ X + X @ A @ A.T, C) < 1e-9  # X solves the Sylvester equation


def test_lora_pro_step_five_steps_match_reference():
    """The full rule over five steps from a zero B (the first-step branch), moments carried over."""
    _, _, A, B = layer(7, zero_B=True)
    M = V = eM = eV = None
    lr = 0.05
    eA, eB = A.clone(), B.clone()
    for t in range(1, 6):
        gA, gB, _, _ = layer(100 + t)
        a, b, M, V = ur.lora_pro_step(gA, gB, A, B, 2.0, M, V, t)
        ea, eb, eM, eV = ref_step(gA, gB, eA, eB, 2.0, eM, eV, t)
        for x, y in ((a, ea), (b, eb), (M, eM), (V, eV)):
            assert rel(x, y) < 1e-10, t
        A, B = A - lr * a, B - lr * b
        eA, eB = eA - lr * ea, eB - lr * eb
    assert torch.count_nonzero(B) > 0


def test_lora_pro_step_checks_moments_and_step():
    gA, gB, A, B = layer(0)
    with pytest.raises(ld.ConfigError, match="None exactly at t = 1"):
        ur.lora_pro_step(gA, gB, A, B, 2.0, None, None, 2)
    with pytest.raises(ld.ConfigError, match="from 1"):
        ur.lora_pro_adjust(gA, gB, A, B, 2.0, 0)
