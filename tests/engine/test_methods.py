"""Every initialization against an independent dense float64 implementation written here from the
formulas of docs/methods.md, on a tiny Llama in one process; float32 output/export claims; PEFT parity
(or the documented, tested difference) for PiSSA, OLoRA, EVA, LoRA-GA and CorDA.

The reference never touches lora_dist's statistics engine: it runs the plain (un-injected) model one
sample at a time without padding, takes g from autograd on the full weights, δ from the layer outputs,
and does every decomposition with numpy.
"""
import math
import os

import numpy as np
import peft  # a declared test dependency: a missing one fails, never skips
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_dist as ld
from calib_data import calibration_samples, make_batches
from conftest import perturb_trainable, tiny_llama
from lora_dist.adapters import adapter_modules, generator_for, seed_for
from lora_dist.config import COMPATIBLE_INITS, DATA_FREE_INITS, INITS, KINDS
from lora_dist.engine.methods import INPUT_MOMENT, METHODS, WEIGHT_GRADIENT, compatibility_table, summary_table

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 8.0
N_TRAIN, LR = 1000, 2e-4
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "methods.md")


# ---------------------------------------------------------------------------------------------------
# data
def make_samples(n=16, seed=0):
    """Variable-length samples (8..15 tokens), prompt tokens labelled -100, one sample with no loss
    token at all (it still feeds the input moments, never the gradient)."""
    return calibration_samples(n, seed, min_len=8, spread=8, prompt_mod=4, no_loss=(3,))


SAMPLES = make_samples()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread. With two threads on a loaded 2-core machine, OpenMP's
    spin-waiting makes a 128×64 SVD take ~0.7 s instead of ~5 ms."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------
# dense float64 reference statistics: plain model, one unpadded sample at a time, full autograd
def dense_statistics(smp, weighting="sample_mean"):
    model = tiny_llama().double()
    lins = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in TARGETS}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lins.values():
        m.weight.requires_grad_(True)
    io = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: io.__setitem__(n, (i[0], o))) for n, m in lins.items()]
    n_loss = [int((l[1:] != -100).sum()) for _, l in smp]
    n_c, n_tok = sum(k > 0 for k in n_loss), sum(n_loss)
    acc = {n: {"second": 0.0, "sum": 0.0, "G": 0.0, "Gf": 0.0, "g": 0.0} for n in lins}
    T = 0
    for (ids, labels), k in zip(smp, n_loss):
        logits = model(input_ids=ids[None]).logits[0]
        T += len(ids)
        for n in lins:
            x = io[n][0][0]
            acc[n]["second"] = acc[n]["second"] + x.T @ x
            acc[n]["sum"] = acc[n]["sum"] + x.sum(0)
        if k == 0:
            continue
        L_i = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum") / k
        # ∇_W L_i from autograd on the full weights, δ_t = ∂L_i/∂y_t from the layer outputs. The weight
        # w_i multiplies the per-sample gradient (g = Σ_i w_i ∇_W L_i): transformers' RMSNorm runs in
        # float32 even in a float64 model, so scaling the loss before backward would round differently.
        grads = torch.autograd.grad(L_i, [m.weight for m in lins.values()] + [io[n][1] for n in lins])
        w = 1.0 / n_c if weighting == "sample_mean" else k / n_tok
        for j, n in enumerate(lins):
            d = grads[len(lins) + j][0]
            acc[n]["g"] = acc[n]["g"] + w * grads[j]
            acc[n]["G"] = acc[n]["G"] + (d * d).sum(0)
            acc[n]["Gf"] = acc[n]["Gf"] + d.T @ d
    for h in hooks:
        h.remove()
    return {n: {"W": m.weight.detach().numpy().copy(), "g": acc[n]["g"].numpy(),
                "A_in": (acc[n]["second"] / T).detach().numpy(), "mu": (acc[n]["sum"] / T).detach().numpy(),
                "G": (acc[n]["G"] / T).numpy(), "Gf": (acc[n]["Gf"] / T).numpy()}
            for n, m in lins.items()}


@pytest.fixture(scope="module")
def dense():
    return {"sample_mean": dense_statistics(SAMPLES), "token_mean": dense_statistics(SAMPLES, "token_mean")}


# ---------------------------------------------------------------------------------------------------
# dense float64 reference solvers (numpy), straight from docs/methods.md
def signs_fixed(U, V=None):
    """The documented sign rule: each column of U has its largest-|.| entry positive; V's columns follow."""
    s = np.sign(U[np.abs(U).argmax(0), np.arange(U.shape[1])])
    s[s == 0] = 1
    return U * s, (None if V is None else V * s)


def np_svd(M):
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return U, S, Vt.T


def ref_pissa(st, r, s, smallest=False):
    U, S, V = np_svd(st["W"])
    sl = slice(len(S) - r, None) if smallest else slice(0, r)
    U, V = signs_fixed(U[:, sl], V[:, sl])
    root = np.sqrt(S[sl] / s)
    return {"B": U * root, "A": root[:, None] * V.T}


def ref_olora(st, r, s):
    Q, Rm = np.linalg.qr(st["W"])
    return {"B": Q[:, :r], "A": Rm[:r]}


def ref_lora_xs(st, r, s, name, r_std=1e-5):
    U, S, V = np_svd(st["W"])
    U, V = signs_fixed(U[:, :r], V[:, :r])
    Rm = torch.randn(r, r, generator=generator_for(0, name + "R"), dtype=torch.float64).numpy() * r_std
    return {"B": U, "A": S[:r, None] * V.T, "R": Rm}


def ref_eva(st, r, whiten=False):
    cov = st["A_in"] - np.outer(st["mu"], st["mu"])
    lam, Q = np.linalg.eigh(0.5 * (cov + cov.T))
    lam, Q = lam[::-1][:r], Q[:, ::-1][:, :r]
    Q, _ = signs_fixed(Q)
    A = Q.T / np.sqrt(lam)[:, None] if whiten else Q.T
    return {"B": np.zeros((st["W"].shape[0], r)), "A": A}


def ref_corda(st, r, s, mode="ipm", damping=0.01):
    C = st["A_in"]
    C = 0.5 * (C + C.T) + damping * np.mean(np.diag(C)) * np.eye(C.shape[0])
    U, S, V = np_svd(st["W"] @ C)
    sl = slice(0, r) if mode == "ipm" else slice(len(S) - r, None)
    U, V = signs_fixed(U[:, sl], V[:, sl])
    root = np.sqrt(S[sl] / s)
    return {"B": U * root, "A": root[:, None] * np.linalg.solve(C, V).T}


def ref_lora_ga(st, r, s, name, gamma=16.0, direction="ArB2r", scale="stable"):
    U, S, V = np_svd(st["g"])
    U, V = signs_fixed(U[:, :2 * r], V[:, :2 * r])
    ia, ib = {"ArB2r": (np.arange(r), np.arange(r, 2 * r)), "A2rBr": (np.arange(r, 2 * r), np.arange(r)),
              "ArBr": (np.arange(1, 2 * r, 2), np.arange(0, 2 * r, 2))}.get(direction, (None, None))
    if direction == "random":
        perm = torch.randperm(2 * r, generator=generator_for(0, name + "direction")).numpy()
        ia, ib = perm[:r], perm[r:]
    zeta = {"stable": st["g"].shape[0] ** 0.25 / math.sqrt(gamma), "unit": 1.0, "gd": 1.0 / s}[scale]
    return {"A": V[:, ia].T * zeta, "B": U[:, ib] * zeta}


def ref_lora_one(st, r, s, gamma=128.0):
    U, S, V = np_svd(-st["g"])
    U, V = signs_fixed(U[:, :r], V[:, :r])
    c = 1.0 / math.sqrt(S[0] * gamma)
    return {"B": U * np.sqrt(S[:r]) * c, "A": np.sqrt(S[:r])[:, None] * V.T * c}


def ref_lora_sb(st, r, s, eta):
    dW = -eta * np.sign(st["g"])
    U, S, V = np_svd(dW)
    U, V = signs_fixed(U[:, :r], V[:, :r])
    return {"B": U, "A": V.T, "R": np.diag(S[:r] / s)}


def ref_lora_da(st, r, s, beta=0.03, gamma=1024.0, damping=1e-6, fisher="diag", ablation=None, n_train=N_TRAIN):
    g = st["g"]
    if ablation == "no_variance_no_fisher":
        dW = -g.T
        dW = dW / np.linalg.norm(dW, 2)
        omega = -dW @ dW.T
    else:
        A_in = 0.5 * (st["A_in"] + st["A_in"].T) + damping * np.eye(g.shape[1])
        A_inv = np.linalg.inv(A_in)
        if fisher == "diag":
            g_inv = 1.0 / (st["G"] + damping)
            dW = -A_inv @ g.T @ np.diag(g_inv)
            sum_ginv = g_inv.sum()
        else:
            G = 0.5 * (st["Gf"] + st["Gf"].T) + damping * np.eye(g.shape[0])
            G_inv = np.linalg.inv(G)
            dW = -A_inv @ g.T @ G_inv
            sum_ginv = np.trace(G_inv)
        sigma = np.linalg.norm(dW, 2)
        dW = dW / sigma
        var = beta * sum_ginv / n_train / sigma ** 2 * A_inv
        omega = {None: var - dW @ dW.T, "no_bias": var, "no_variance": -dW @ dW.T}[ablation]
    _, Q = np.linalg.eigh(0.5 * (omega + omega.T))
    a0, _ = signs_fixed(Q[:, :r])
    return {"A": a0.T / math.sqrt(gamma), "B": dW.T @ a0 / math.sqrt(gamma), "dW": dW}


# ---------------------------------------------------------------------------------------------------
# our side
def run_ours(init, kind="lora", r=R, alpha=ALPHA, rslora=False, opts=None, dtype=torch.float64,
             stats_dtype=None, targets=TARGETS, smp=SAMPLES, micro=3, seed=0, **kw):
    model = tiny_llama().to(dtype)
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules()
          if isinstance(m, nn.Linear) and n.split(".")[-1] in targets}
    ids = make_batches(smp[:4], 4)[0]
    with torch.no_grad():
        before = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    cfg = ld.AdapterConfig(kind=kind, init=init, r=r, alpha=alpha, use_rslora=rslora, target_modules=targets,
                           init_options=dict(opts or {}), seed=seed)
    ld.inject_adapters(model, cfg)
    kw = {"n_train": N_TRAIN, "lr": LR, **kw}
    rep = ld.initialize_adapters(model, batches=make_batches(smp, micro), stats_dtype=stats_dtype or dtype,
                                 progress=False, **kw)
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    facs = {}
    for n, m in adapter_modules(model):
        f = {"A": m.lora_A.detach().clone(), "B": m.lora_B.detach().clone(), "W": m.weight.detach().clone(),
             "s": m.scaling}
        if kind == "lora_xs":
            f["R"] = m.lora_R.detach().clone()
        facs[n] = f
    return {"model": model, "W0": W0, "factors": facs, "logit_diff": (after - before).abs().max().item(),
            "report": rep, "cfg": cfg}


WORST = {}  # comparison family -> worst relative error seen (printed at the end with -s)


def assert_close(got, ref, tol, what):
    got = got.detach().double().numpy() if torch.is_tensor(got) else got
    scale = max(np.abs(ref).max(), 1e-30)
    err = np.abs(got - ref).max() / scale
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:g}"
    key = what.split(" ")[0]
    WORST[key] = max(WORST.get(key, 0.0), float(err))
    return err


@pytest.fixture(autouse=True, scope="module")
def _print_worst():
    yield
    print("\nworst relative errors: " + ", ".join(f"{k}: {v:.1e}" for k, v in sorted(WORST.items())))


def assert_close_up_to_sign(got, ref, tol, what, paired_with=None):
    """Columns of B (rows of A) equal the reference up to one sign per rank component; `paired_with`
    = (got_A, ref_A) makes A's row j use B's column j sign."""
    got = got.detach().double().numpy()
    sgn = np.sign((got * ref).sum(0))
    sgn[sgn == 0] = 1
    assert_close(got * sgn, ref, tol, what)
    if paired_with is not None:
        gA, rA = paired_with
        assert_close(gA.detach().double().numpy() * sgn[:, None], rA, tol, what + " (A, paired sign)")


# ---------------------------------------------------------------------------------------------------
# registry, options, compatibility, docs
def test_registry_has_a_solver_for_every_data_aware_init():
    assert set(METHODS) == set(INITS) - set(DATA_FREE_INITS)
    for name, m in METHODS.items():
        assert m.name == name and m.reference and m.needs
        for s in m.needs:
            assert isinstance(s, str)


BAD_OPTIONS = [
    ("pissa", "niter", -1), ("pissa", "niter", 1.5),
    ("lora_ga", "gamma", 0), ("lora_ga", "direction", "BrAr"), ("lora_ga", "scale", "weightS"),
    ("lora_ga", "niter", "4"), ("lora_one", "gamma", -2.0), ("lora_one", "niter", True),
    ("lora_sb", "eta", 0.0), ("lora_sb", "eta", "1e-4"), ("lora_sb", "niter", -3),
    ("eva", "whiten", "yes"), ("eva", "rho", 0.5), ("eva", "rho", float("nan")),
    ("corda", "mode", "largest"), ("corda", "damping", -1.0),
    ("lora_da", "beta", 0), ("lora_da", "gamma", -1), ("lora_da", "damping", -1e-3), ("lora_da", "n_train", 0),
    ("lora_da", "fisher", "kfac"), ("lora_da", "ablation", "no_fisher"),
    ("lora_ga", "gradient_weighting", "batch_mean"),
]


@pytest.mark.parametrize("init,key,value", BAD_OPTIONS)
def test_every_bad_option_is_a_config_error_naming_it(init, key, value):
    kind = "lora_xs" if init == "lora_sb" else "lora"
    with pytest.raises(ld.ConfigError, match=rf"init_options\.{key}"):
        METHODS[init].resolve_options({key: value})
    # the same error surfaces from initialize_adapters, before any pass
    model = tiny_llama()
    ld.inject_adapters(model, ld.AdapterConfig(kind=kind, init=init, r=R, target_modules=["q_proj"],
                                               init_options={key: value}))
    with pytest.raises(ld.ConfigError, match=rf"init_options\.{key}"):
        ld.initialize_adapters(model, batches=make_batches(SAMPLES[:3], 3), progress=False)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ld.ConfigError, match="not options of init 'lora_one'.*gamma"):
        METHODS["lora_one"].resolve_options({"gama": 3})


def test_eva_rank_redistribution_is_refused_clearly():
    with pytest.raises(ld.ConfigError, match=r"init_options\.redistribute.*not supported yet"):
        METHODS["eva"].resolve_options({"redistribute": True})
    # rho only sizes redistribution's candidates: accepted it would do nothing, so it is refused too
    with pytest.raises(ld.ConfigError, match=r"init_options\.rho=3 .*not supported yet"):
        METHODS["eva"].resolve_options({"rho": 3})
    assert "rho" not in METHODS["eva"].resolve_options({})


def test_every_kind_init_pair_follows_the_table():
    n_ok = n_bad = 0
    for kind in KINDS:
        for init in INITS:
            if init in COMPATIBLE_INITS[kind]:
                assert ld.AdapterConfig(kind=kind, init=init).init == init
                n_ok += 1
            else:
                with pytest.raises(ld.ConfigError, match=rf"init='{init}' does not apply to kind='{kind}'"):
                    ld.AdapterConfig(kind=kind, init=init)
                n_bad += 1
    assert n_ok == sum(len(v) for v in COMPATIBLE_INITS.values()) and n_bad > 0
    for kind, init in [("lora", "lora_sb"), ("vera", "eva"), ("dora", "pissa"), ("lora_xs", "lora_da")]:
        with pytest.raises(ld.ConfigError, match="does not apply"):
            ld.AdapterConfig(kind=kind, init=init)


def test_docs_embed_the_generated_tables():
    text = open(DOCS).read()
    hint = "regenerate with: python -c 'from lora_dist.engine.methods import compatibility_table, summary_table; " \
           "print(compatibility_table()); print(summary_table())'"
    assert compatibility_table() in text, "docs/methods.md compatibility table is stale; " + hint
    assert summary_table() in text, "docs/methods.md summary table is stale; " + hint
    for init in set(INITS) - set(DATA_FREE_INITS):
        assert f"`{init}`" in text


# ---------------------------------------------------------------------------------------------------
# every method against the dense float64 reference
def _ref(init, kind, opts, st, name, s):
    o = dict(opts)
    o.pop("gradient_weighting", None)
    if init in ("pissa", "milora"):
        return ref_pissa(st, R, s, smallest=init == "milora")
    if init == "olora":
        return ref_olora(st, R, s)
    if init == "lora_xs":
        return ref_lora_xs(st, R, s, name)
    if init == "eva":
        return ref_eva(st, R, whiten=o.get("whiten", False))
    if init == "corda":
        return ref_corda(st, R, s, **o)
    if init == "lora_ga":
        return ref_lora_ga(st, R, s, name, **o)
    if init == "lora_one":
        return ref_lora_one(st, R, s, **o)
    if init == "lora_sb":
        return ref_lora_sb(st, R, s, eta=o.get("eta", LR))
    if init == "lora_da":
        o.pop("solver", None)
        return ref_lora_da(st, R, s, **o)
    raise AssertionError(init)


DENSE_CASES = [
    ("pissa", "lora", {}), ("milora", "lora", {}), ("olora", "lora", {}), ("lora_xs", "lora_xs", {}),
    ("eva", "lora", {}), ("eva", "lora", {"whiten": True}), ("eva", "lora_fa", {}),
    ("corda", "lora", {}), ("corda", "lora", {"mode": "kpm"}),
    ("lora_ga", "lora", {}), ("lora_ga", "lora", {"direction": "ArBr"}), ("lora_ga", "lora", {"direction": "A2rBr"}),
    ("lora_ga", "lora", {"direction": "random", "gamma": 4.0}), ("lora_ga", "lora", {"scale": "gd"}),
    ("lora_ga", "lora_fa", {"scale": "unit"}),
    ("lora_one", "lora", {}), ("lora_one", "lora", {"gamma": 16.0, "gradient_weighting": "token_mean"}),
    ("lora_sb", "lora_xs", {"niter": None}), ("lora_sb", "lora_xs", {"niter": None, "eta": 3e-3}),
    ("lora_da", "lora", {"solver": "eigh"}), ("lora_da", "lora_fa", {"solver": "eigh"}),
    ("lora_da", "lora", {"solver": "eigh", "fisher": "full"}),
    ("lora_da", "lora", {"solver": "eigh", "beta": 0.3, "gamma": 64.0, "damping": 1e-4}),
    ("lora_da", "lora", {"solver": "eigh", "ablation": "no_bias"}),
    ("lora_da", "lora_fa", {"solver": "eigh", "ablation": "no_variance"}),
    ("lora_da", "lora", {"solver": "eigh", "ablation": "no_variance_no_fisher"}),
    ("lora_da", "lora", {"solver": "eigh", "gradient_weighting": "token_mean"}),
]


@pytest.mark.parametrize("init,kind,opts", DENSE_CASES, ids=lambda v: str(v) if not isinstance(v, dict) else
                         ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_matches_dense_float64_reference(dense, init, kind, opts):
    out = run_ours(init, kind=kind, opts=opts)
    ref_stats = dense[opts.get("gradient_weighting", "sample_mean")]
    method = METHODS[init]
    assert len(out["factors"]) == 14
    for n, f in out["factors"].items():
        ref = _ref(init, kind, opts, ref_stats[n], n, f["s"])
        if init == "olora":  # Householder QR: sign conventions as LAPACK's, compared up to sign
            assert_close_up_to_sign(f["B"], ref["B"], 1e-9, f"dense:{init} {n} B", paired_with=(f["A"], ref["A"]))
        else:  # signs fixed by the documented rule: exact comparison
            assert_close(f["A"], ref["A"], 1e-8, f"dense:{init} {n} A")
            if np.abs(ref["B"]).max() > 0:
                assert_close(f["B"], ref["B"], 1e-8, f"dense:{init} {n} B")
            else:  # EVA: B = 0 exactly
                np.testing.assert_array_equal(f["B"].numpy(), ref["B"])
        if "R" in ref:
            assert_close(f["R"], ref["R"], 1e-8, f"dense:{init} {n} R")
        W0 = out["W0"][n]
        if method.writes_weight:  # W ← W − s·B·A with the factors as stored
            expect = W0 - f["s"] * f["B"] @ f["A"]
            assert (f["W"] - expect).abs().max() <= 1e-12 * W0.abs().max()
            assert (f["W"] - W0).abs().max() > 1e-4
        else:
            assert torch.equal(f["W"], W0)
    if method.writes_weight or init == "eva":
        assert out["logit_diff"] <= 1e-10, out["logit_diff"]
    mods = dict(adapter_modules(out["model"]))
    if kind == "lora_fa":
        assert all(not m.lora_A.requires_grad and m.lora_B.requires_grad for m in mods.values())


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_data_free_inits_follow_their_formula_per_module_seed(init):
    """kaiming: A ~ U(−1/√d_in, 1/√d_in) (Kaiming-uniform with a = √5); gaussian: A ~ N(0, 1/r²); B = 0;
    each drawn from the generator seeded by (seed, module name), so any rank or world size agrees."""
    model = tiny_llama()
    ld.inject_adapters(model, ld.AdapterConfig(kind="lora", init=init, r=R, target_modules=TARGETS, seed=11))
    for n, m in adapter_modules(model):
        g = generator_for(11, n)
        if init == "kaiming":
            bound = 1.0 / math.sqrt(m.in_features)
            ref = torch.empty(R, m.in_features).uniform_(-bound, bound, generator=g)
            assert m.lora_A.abs().max() <= bound
        else:
            ref = torch.randn(R, m.in_features, generator=g) / R
        assert torch.equal(m.lora_A.detach(), ref) and not m.lora_B.detach().any()


@pytest.mark.parametrize("init", ["pissa", "corda", "lora_ga"])
def test_rslora_scale_in_base_weight_methods(dense, init):
    """With rsLoRA s = α/√r: PiSSA and CorDA split √(S/s) with that s, LoRA-GA's factors do not depend
    on s, and W ← W − s·B·A uses it; the output is unchanged."""
    s = ALPHA / math.sqrt(R)
    out = run_ours(init, rslora=True)
    for n, f in out["factors"].items():
        assert f["s"] == s
        ref = _ref(init, "lora", {}, dense["sample_mean"][n], n, s)
        assert_close(f["A"], ref["A"], 1e-8, f"dense-rslora:{init} {n} A")
        assert_close(f["B"], ref["B"], 1e-8, f"dense-rslora:{init} {n} B")
        assert (f["W"] - (out["W0"][n] - s * torch.from_numpy(ref["B"] @ ref["A"]))).abs().max() <= 1e-12
    assert out["logit_diff"] <= 1e-10


def test_lora_da_default_lobpcg_agrees_with_exact_eigenvectors(dense):
    """The default solver (LOBPCG from a seeded start, lobpcg_niter=10 as the reference) against the exact
    eigenvectors of Ω: the subspace agrees to < 5e-3 in projector entries after 10 iterations (the
    reference's own truncation) and to < 1e-6 once LOBPCG has converged (30 iterations)."""
    for niter, tol in ((10, 5e-3), (30, 1e-6)):
        out = run_ours("lora_da", opts={"lobpcg_niter": niter})
        worst = 0.0
        for n, f in out["factors"].items():
            ref = ref_lora_da(dense["sample_mean"][n], R, f["s"])
            a, b = f["A"].numpy(), ref["A"]
            Pa, Pb = a.T @ np.linalg.pinv(a.T), b.T @ np.linalg.pinv(b.T)
            worst = max(worst, np.abs(Pa - Pb).max())
            assert out["report"].layer_info[n]["eigensolver"] == "lobpcg"
            # whatever a0 the eigensolver returned: orthonormal rows, and B = ΔŴᵀ a0/√γ = ΔŴᵀ Aᵀ
            assert np.abs(a @ a.T * 1024.0 - np.eye(R)).max() < 1e-8
            assert_close(f["B"], ref["dW"].T @ a.T, 1e-8, f"lobpcg:lora_da {n} B")
        assert worst < tol, (niter, worst)


def test_lora_xs_kind_lora_sb_reproduces_the_sign_step(dense):
    """LoRA-SB: s·B·R·A = [−η sign(g)]_r and B, A orthonormal; the default randomized SVD (niter=10) is
    the seeded torch.svd_lowrank of the same ΔW."""
    out = run_ours("lora_sb", kind="lora_xs", opts={})
    for n, f in out["factors"].items():
        dW = -LR * np.sign(dense["sample_mean"][n]["g"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for(0, n + "svd"))
            U, S, V = torch.svd_lowrank(torch.from_numpy(dW), q=R, niter=10)
        U, V = signs_fixed(U.numpy(), V.numpy())
        assert_close(f["B"], U, 1e-8, f"lowrank:lora_sb {n}")
        assert_close(f["A"], V.T, 1e-8, f"lowrank:lora_sb {n}")
        assert_close(f["R"], np.diag(S.numpy()) / f["s"], 1e-8, f"lowrank:lora_sb {n}")
        np.testing.assert_allclose(f["B"].numpy().T @ f["B"].numpy(), np.eye(R), atol=1e-10)
        best = np.linalg.svd(dW, compute_uv=False)[:R]
        assert S.numpy()[0] >= 0.9 * best[0]  # the randomized estimate captures the top direction


def test_lora_sb_eta_comes_from_options_or_the_training_lr():
    out = run_ours("lora_sb", kind="lora_xs", opts={"niter": None}, lr=5e-4)
    n, f = next(iter(out["factors"].items()))
    assert out["report"].layer_info[n]["eta"] == 5e-4
    out = run_ours("lora_sb", kind="lora_xs", opts={"niter": None, "eta": 1e-3}, lr=5e-4)
    assert out["report"].layer_info[n]["eta"] == 1e-3
    with pytest.raises(ld.ConfigError, match=r"init_options\.eta"):
        run_ours("lora_sb", kind="lora_xs", opts={}, lr=None)


def test_randomized_svd_variants_follow_the_seed_contract(dense):
    """pissa niter=K: the seeded torch.svd_lowrank(W, q=r, niter=K); near-optimal residual."""
    out = run_ours("pissa", opts={"niter": 3})
    for n, f in out["factors"].items():
        W = dense["sample_mean"][n]["W"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for(0, n + "svd"))
            U, S, V = torch.svd_lowrank(torch.from_numpy(W), q=R, niter=3)
        U, V = signs_fixed(U.numpy(), V.numpy())
        root = np.sqrt(S.numpy() / f["s"])
        assert_close(f["B"], U * root, 1e-8, f"lowrank:pissa {n}")
        assert_close(f["A"], root[:, None] * V.T, 1e-8, f"lowrank:pissa {n}")
        opt = np.linalg.norm(W - ref_pissa({"W": W}, R, 1.0)["B"] @ ref_pissa({"W": W}, R, 1.0)["A"])
        got = np.linalg.norm(W - f["s"] * (f["B"] @ f["A"]).numpy())
        assert got <= 1.05 * opt


def test_randomized_gradient_svd_is_exact_when_q_covers_the_layer(dense):
    """lora_ga / lora_one with niter set run svd_lowrank with q = 4r; when 4r ≥ min(d_out, d_in)
    the range is the whole space and the result equals the full-SVD path."""
    for init, opts in (("lora_ga", {"niter": 4}), ("lora_one", {"niter": 2})):
        a = run_ours(init, r=16, alpha=32, opts=opts, targets=["q_proj", "v_proj"])
        b = run_ours(init, r=16, alpha=32, opts={**opts, "niter": None}, targets=["q_proj", "v_proj"])
        for n in a["factors"]:
            for k in ("A", "B"):
                assert_close(a["factors"][n][k], b["factors"][n][k].numpy(), 1e-7, f"lowrank=full:{init} {n} {k}")


def test_same_result_for_any_micro_batching():
    a = run_ours("lora_ga", micro=1)
    b = run_ours("lora_ga", micro=16)
    assert a["factors"]
    for n in a["factors"]:
        for k in ("A", "B", "W"):  # lora_ga writes W too
            assert_close(a["factors"][n][k], b["factors"][n][k].numpy(), 1e-9, f"micro-batching:lora_ga {n} {k}")


# ---------------------------------------------------------------------------------------------------
# float32: output unchanged at init, exact export to stock PEFT against the original W0 (rsLoRA too)
EXPORT_CASES = [("pissa", "lora", False), ("pissa", "lora", True), ("milora", "lora", True), ("olora", "lora", True),
                ("lora_ga", "lora", False), ("lora_ga", "lora", True), ("corda", "lora", True),
                ("eva", "lora", False), ("lora_one", "lora", False), ("lora_da", "lora", True),
                ("lora_da", "lora_fa", False), ("lora_sb", "lora_xs", False), ("lora_xs", "lora_xs", False)]


@pytest.mark.parametrize("init,kind,rslora", EXPORT_CASES)
def test_float32_output_unchanged_and_stock_peft_reproduces_export(tmp_path, init, kind, rslora):
    out = run_ours(init, kind=kind, rslora=rslora, dtype=torch.float32)
    if METHODS[init].writes_weight:
        assert out["logit_diff"] <= 1e-5, out["logit_diff"]
    model = out["model"]
    perturb_trainable(model, scale=0.02)  # as after training: the export must carry sBA − sB0A0 exactly
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    ld.save_adapter(model, str(tmp_path / "a"))
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a")).eval()
    with torch.no_grad():
        theirs = pm(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    if METHODS[init].writes_weight:
        import json
        cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
        assert cfg["r"] == 2 * R and not cfg["use_rslora"]


# ---------------------------------------------------------------------------------------------------
# PEFT parity
def _peft_module(pm, n):
    return dict(pm.named_modules())["base_model.model." + n]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_match_peft(init):
    out = run_ours(init, dtype=torch.float32)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                           init_lora_weights=init))
    for n, f in out["factors"].items():
        m = _peft_module(pm, n)
        pA, pB = m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()
        # both decompose the same float32 W in float32: singular vectors agree to ~eps32/relative gap
        # (the top gaps of these random layers are ~5e-3, so ~1e-5..1e-4); the rewritten W to 1e-5
        assert_close_up_to_sign(f["B"], pB.double().numpy(), 3e-4, f"peft:{init} {n} B",
                                paired_with=(f["A"], pA.double().numpy()))
        assert (f["W"] - m.base_layer.weight).abs().max() <= 1e-5


def test_eva_matches_peft_incremental_pca():
    """PEFT's EVA (incremental PCA, svd_lowrank with q = 2·n_components): with r = 32 on 64-wide inputs
    q covers the space, PEFT's PCA is exact, and its components equal our eigenvectors up to sign.
    Whitening differs by design: PEFT divides component j by √σ_j, σ_j the singular value of the centered
    data matrix it has seen (σ_j² = n_rows·λ_j), which grows with the amount of calibration data; we
    divide by √λ_j (λ_j the covariance eigenvalue), which does not. With one batch PEFT sees the data
    twice before its convergence test passes, so n_rows = 2T here."""
    from peft.tuners.lora.config import EvaConfig
    smp = make_samples(24, seed=3)
    one = make_batches(smp, len(smp))[0]
    T = int(one["attention_mask"].sum())
    # q/v share one input (one PCA); o_proj has its own. Whitening is checked on single-module input
    # groups only: PEFT 0.21 whitens in place once per module of a group, so q and v would both be
    # divided by √σ twice (observed; see docs/methods.md).
    for whiten, targets in ((False, ["q_proj", "v_proj", "o_proj"]), (True, ["q_proj", "o_proj"])):
        out = run_ours("eva", r=32, alpha=32, opts={"whiten": whiten}, dtype=torch.float32,
                       stats_dtype=torch.float64, targets=targets, smp=smp)
        cfg = peft.LoraConfig(r=32, lora_alpha=32, target_modules=targets, init_lora_weights="eva",
                              eva_config=EvaConfig(rho=1.0, use_label_mask=False, whiten=whiten))
        pm = peft.get_peft_model(tiny_llama(), cfg)
        peft.initialize_lora_eva_weights(pm, dataloader=[{"input_ids": one["input_ids"],
                                                          "attention_mask": one["attention_mask"]}],
                                         show_progress_bar=False)
        for n, f in out["factors"].items():
            ours = f["A"].double().numpy()
            theirs = _peft_module(pm, n).lora_A["default"].weight.detach().double().numpy()
            unit_o = ours / np.linalg.norm(ours, axis=1, keepdims=True)
            unit_t = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
            # the top components one by one (up to sign), the whole 32-dim subspace through its projector
            assert_close_up_to_sign(torch.from_numpy(unit_o[:8].T), unit_t[:8].T, 1e-4, f"peft:eva {n}")
            assert np.abs(unit_o.T @ unit_o - unit_t.T @ unit_t).max() < 1e-4
            if whiten:
                lam = 1.0 / (ours ** 2).sum(1)                  # our row norms are λ^{-1/2}
                sigma = 1.0 / (theirs ** 2).sum(1)              # PEFT's are σ^{-1/2}
                np.testing.assert_allclose(sigma ** 2 / lam, 2 * T, rtol=1e-4)
            else:
                np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, rtol=1e-5)


def test_lora_ga_matches_peft_up_to_its_documented_scaling():
    """PEFT's LoRA-GA port, fed by its own gradient estimate (batch size 1, mean-token loss, averaged over
    the samples = our g), with 4r ≥ min(d) so its svd_lowrank is exact. Documented difference: PEFT
    multiplies B by diag(S[r:2r]) and scales only B by ζ; the authors' code scales both A and B by ζ:
        PEFT_A = A/ζ,   PEFT_B = B·diag(S[r:2r]).
    Both keep the model output unchanged at init."""
    targets, r = ["q_proj", "v_proj"], 16
    smp = [s for s in make_samples(24, seed=4) if int((s[1][1:] != -100).sum()) > 0]
    out = run_ours("lora_ga", r=r, alpha=2 * r, dtype=torch.float32, stats_dtype=torch.float64, targets=targets,
                   smp=smp, return_statistics=True)
    base = tiny_llama()
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights="lora_ga",
                          lora_ga_config=peft.LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=16))

    def train_step():
        for ids, labels in smp:
            base(input_ids=ids[None], labels=labels[None]).loss.backward()

    peft.preprocess_loraga(base, cfg, train_step)
    pm = peft.get_peft_model(base, cfg)
    for n, f in out["factors"].items():
        g = out["report"].statistics[n][WEIGHT_GRADIENT].numpy()
        S = np.linalg.svd(g, compute_uv=False)
        zeta = f["B"].shape[0] ** 0.25 / math.sqrt(16)
        m = _peft_module(pm, n)
        pA = m.lora_A["default"].weight.detach().double().numpy()
        pB = m.lora_B["default"].weight.detach().double().numpy()
        assert_close_up_to_sign(f["A"].T / zeta, pA.T, 5e-4, f"peft:lora_ga {n} A")
        assert_close_up_to_sign(f["B"] * torch.from_numpy(S[r:2 * r]).float(), pB, 5e-4, f"peft:lora_ga {n} B")
        W0 = out["W0"][n].double()
        assert (m.base_layer.weight.double() - (W0 - f["s"] * torch.from_numpy(pB @ pA))).abs().max() < 1e-5


def test_corda_matches_peft_given_the_same_covariance(tmp_path):
    """PEFT's CorDA loads our input second moment through its covariance_file, then runs its own damping,
    SVD of W·C and C⁻¹ reconstruction: the factors agree up to sign. (PEFT's own collection divides each
    forward call's input by its maximum; ours is the plain mean over positions: documented.)"""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    for mode in ("ipm", "kpm"):
        out = run_ours("corda", opts={"mode": mode}, dtype=torch.float32, stats_dtype=torch.float64,
                       return_statistics=True)
        cov = {n: st[INPUT_MOMENT]["second"].float() for n, st in out["report"].statistics.items()}
        path = str(tmp_path / f"cov_{mode}.pt")
        torch.save(cov, path)
        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="corda",
                              corda_config=CordaConfig(covariance_file=path, corda_method=mode))
        base = tiny_llama()
        preprocess_corda(base, cfg)
        pm = peft.get_peft_model(base, cfg)
        for n, f in out["factors"].items():
            m = _peft_module(pm, n)
            pA = m.lora_A["default"].weight.detach().double().numpy()
            pB = m.lora_B["default"].weight.detach().double().numpy()
            # PEFT decomposes in float32: the smallest triplets (kpm) are the least accurate ones
            tol = 1e-3 if mode == "ipm" else 1e-2
            assert_close_up_to_sign(f["B"], pB, tol, f"peft:corda-{mode} {n} B", paired_with=(f["A"], pA))
            assert (f["W"] - m.base_layer.weight).abs().max() < 1e-5
