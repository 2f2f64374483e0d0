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


# ---- LoRA-FA in backward against PEFT's create_lorafa_optimizer -----------------------------------
R, ALPHA, LR = 4, 8.0, 1e-2


def lm_batches(n=5, bsz=2, seq=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (bsz, seq), generator=g) for _ in range(n)]


def ours_lora_fa(clip=None):
    from conftest import tiny_llama
    model = tiny_llama(0)
    ld.inject_adapters(model, ld.AdapterConfig(kind="lora_fa", update_rule="lora_fa", r=R, alpha=ALPHA,
                                               target_modules=["q_proj", "v_proj"], seed=5))
    ur.attach_update_rule(model)
    return model


def peft_lora(A_of):
    from peft import LoraConfig, get_peft_model
    from conftest import tiny_llama
    model = get_peft_model(tiny_llama(0), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, m in model.named_modules():
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
                key = n.split("base_model.model.", 1)[1]
                m.lora_A["default"].weight.copy_(A_of[key])
                m.lora_B["default"].weight.zero_()
    return model


def B_of_peft(model):
    return {n.split("base_model.model.", 1)[1].replace(".lora_B.default.weight", ""): p.detach().clone()
            for n, p in model.named_parameters() if "lora_B" in n}


def train_both(monkeypatch, clip_order=None, max_norm=None):
    """5 steps: ours (hook + torch AdamW, ε=1e-30) and PEFT's LoRA-FA optimizer (ε=1e-30, no bf16).
    With `clip_order`, ours clips with update_rules.clip_grad_norm_(order) and PEFT, as the HF
    Trainer does, clips the raw gradients with torch before its step projects them."""
    import peft.optimizers.lorafa as lorafa
    from peft.optimizers import create_lorafa_optimizer
    from lora_dist.adapters import adapter_modules

    monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)
    ours = ours_lora_fa()
    A_of = {n: m.lora_A.detach().clone() for n, m in adapter_modules(ours)}
    theirs = peft_lora(A_of)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=LR, eps=1e-30,
                              weight_decay=0.0)
    opt_t = create_lorafa_optimizer(theirs, r=R, lora_alpha=ALPHA, lr=LR)
    for g in opt_t.param_groups:
        g["eps"] = 1e-30
    norms = []
    for ids in lm_batches():
        for model, opt in ((ours, opt_o), (theirs, opt_t)):
            model(input_ids=ids, labels=ids).loss.backward()
            if clip_order and model is ours:
                norms.append(ur.clip_grad_norm_(ours, max_norm, order=clip_order))
            elif clip_order:
                norms.append(float(torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)))
            opt.step()
            opt.zero_grad()
    return {n: m.lora_B.detach() for n, m in adapter_modules(ours)}, B_of_peft(theirs), norms


def max_rel(a, b):
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


def test_lora_fa_follows_peft_lorafa_optimizer(monkeypatch):
    ours, theirs, _ = train_both(monkeypatch)
    assert set(ours) == set(theirs) and len(ours) == 4
    assert all(v.norm() > 0 for v in theirs.values())
    assert max_rel(ours, theirs) < 1e-4


def test_lora_fa_raw_clip_order_follows_peft_clip_then_project(monkeypatch):
    ours, theirs, norms = train_both(monkeypatch, clip_order="raw", max_norm=0.05)
    raw_ours, raw_theirs = norms[0::2], norms[1::2]
    assert all(n > 0.05 for n in raw_theirs)  # the clip acted at every step
    assert raw_ours == pytest.approx(raw_theirs, rel=1e-4)  # the raw norm, recovered from g̃_B
    assert max_rel(ours, theirs) < 1e-4


def test_lora_fa_projected_clip_order_differs_from_peft(monkeypatch):
    """The default ("projected", what DeepSpeed's gradient_clipping does) clips by the norm of the
    projected gradient, which differs from the raw one (here s⁻²·(AAᵀ)⁻¹ ≈ 0.75·I shrinks it; with
    LoRA-DA's A it grows ~256x), so it clips by a different factor and leaves PEFT's path."""
    ours, theirs, norms = train_both(monkeypatch, clip_order="projected", max_norm=0.05)
    proj, raw = norms[0::2], norms[1::2]
    assert all(abs(p / r - 1) > 0.1 for p, r in zip(proj, raw)) and min(proj) > 0.05
    assert max_rel(ours, theirs) > 1e-2


def test_attach_refuses_uninitialized_and_replaces_itself():
    from conftest import tiny_llama
    model = tiny_llama(0)
    ld.inject_adapters(model, ld.AdapterConfig(kind="lora_fa", update_rule="lora_fa", init="pissa", r=2,
                                               target_modules=["q_proj"]))
    with pytest.raises(ld.ConfigError, match="initialize_adapters"):
        ur.attach_update_rule(model)
    model = ours_lora_fa()
    ur.attach_update_rule(model)  # a second attach replaces the first: one projection, not two
    hooks = [h for m in model.modules() if hasattr(m, "lora_B") for h in m.lora_B._backward_hooks.values()]
    assert len(hooks) == 4
    with pytest.raises(ld.ConfigError, match="order='l2'"):
        ur.clip_grad_norm_(model, 1.0, order="l2")


# ---- LoRA+ groups and schedulers --------------------------------------------------------------------
def _tiny_with(kind, **kw):
    from conftest import tiny_llama
    model = tiny_llama(0)
    ld.inject_adapters(model, ld.AdapterConfig(kind=kind, r=2, target_modules=["q_proj", "v_proj"], **kw))
    return model


@pytest.mark.parametrize("kind,b_side", [
    ("lora", {"lora_B"}), ("lora_fa", {"lora_B"}), ("dora", {"lora_B", "lora_magnitude"}),
    ("tied_lora", {"lora_B", "tied_u", "tied_v"})])
def test_loraplus_groups_follow_peft_split(kind, b_side):
    model = _tiny_with(kind, loraplus_lr_ratio=16)
    groups = ur.param_groups(model, model.lora_dist_config, 1e-3, weight_decay=0.1)
    by = {g["name"]: g for g in groups}
    leaf = {id(p): n.rsplit(".", 1)[-1] for n, p in model.named_parameters()}
    assert {leaf[id(p)] for p in by["lora_B"]["params"]} == b_side
    assert by["lora_B"]["lr"] == pytest.approx(16e-3) and by["lora_B"]["lr_ratio"] == 16
    if kind == "lora_fa":
        assert "lora_A" not in by  # A is frozen: no empty group
    else:
        assert by["lora_A"]["lr"] == 1e-3 and {leaf[id(p)] for p in by["lora_A"]["params"]} == {"lora_A"}
    n_train = sum(p.requires_grad for p in model.parameters())
    assert sum(len(g["params"]) for g in groups) == n_train
    assert all(g["weight_decay"] == 0.1 for g in groups)
    plain = _tiny_with(kind)
    (one,) = ur.param_groups(plain, plain.lora_dist_config, 1e-3)
    assert one["lr"] == 1e-3 and len(one["params"]) == n_train


GROUPS = [{"lr_ratio": 1.0}, {"lr_ratio": 16.0}]


@pytest.mark.parametrize("sched,key", [
    ({"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3}}, "warmup_max_lr"),
    ({"type": "WarmupDecayLR", "params": {"total_num_steps": 10}}, "warmup_max_lr"),  # default 0.001
    ({"type": "WarmupLR", "params": {"warmup_min_lr": 1e-5}}, "warmup_min_lr"),
    ({"type": "OneCycle", "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": [1e-3, 1e-2]}}, "cycle_min_lr"),
    ({"type": "WarmupLR", "params": {"warmup_max_lr": [1e-3, 1e-3]}}, "not proportional"),
    ({"type": "WarmupLR", "params": {"warmup_max_lr": [1e-3]}}, "1 values for 2"),
])
def test_flattening_scheduler_is_refused_with_a_ratio(sched, key):
    from lora_dist.errors import DeepSpeedConfigError
    with pytest.raises(DeepSpeedConfigError, match=key):
        ur.check_scheduler({"scheduler": sched}, GROUPS)
    ur.check_scheduler({"scheduler": sched}, [{"lr_ratio": 1.0}])  # no ratio: nothing to undo


@pytest.mark.parametrize("sched", [
    {"type": "WarmupCosineLR", "params": {"total_num_steps": 10}},
    {"type": "WarmupLR", "params": {"warmup_min_lr": 0}},  # max absent: the groups' own lr
    {"type": "WarmupDecayLR", "params": {"warmup_max_lr": [1e-3, 1.6e-2], "warmup_min_lr": 0}},
])
def test_schedulers_that_keep_the_ratio_pass(sched):
    ur.check_scheduler({"scheduler": sched}, GROUPS)
    ur.check_scheduler({}, GROUPS)


def test_per_group_scheduler_writes_proportional_lists():
    cfg = {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 2e-3, "warmup_min_lr": 1e-5,
                                                             "total_num_steps": 9}}}
    out = ur.per_group_scheduler(cfg, GROUPS)
    assert out["scheduler"]["params"]["warmup_max_lr"] == [2e-3, 3.2e-2]
    assert out["scheduler"]["params"]["warmup_min_lr"] == [1e-5, 1.6e-4]
    assert cfg["scheduler"]["params"]["warmup_max_lr"] == 2e-3  # the input is left alone
    dflt = ur.per_group_scheduler({"scheduler": {"type": "WarmupDecayLR", "params": {}}}, GROUPS)
    assert dflt["scheduler"]["params"]["warmup_max_lr"] == [0.001, 0.016]


def test_update_rule_saved_with_the_adapter(tmp_path):
    """The rule travels with the adapter's own config: a resume reads it back unchanged."""
    from lora_dist.export import read_adapter_config
    model = _tiny_with("lora", update_rule="lora_pro", update_options={"moments": "none", "eps": 1e-7})
    ld.save_adapter(model, str(tmp_path / "a"))
    back = ld.AdapterConfig.from_dict(read_adapter_config(str(tmp_path / "a"))["config"])
    assert back == model.lora_dist_config and back.update_option("eps") == 1e-7
    from conftest import tiny_llama
    fresh = tiny_llama(0)
    ld.load_adapter(fresh, str(tmp_path / "a"))
    assert fresh.lora_dist_config.update_rule == "lora_pro"


# ---- trajectories: one process, ZeRO-3, two nodes, ZeRO-2; dense float64 references -----------------
import importlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers"))
W = importlib.import_module("update_rules")  # tests/workers/update_rules.py


@pytest.fixture(scope="module")
def plain_runs(tiny_llama_dir):
    """Every case as one plain torch process (float32, two micro-batches per step)."""
    return {c: W.run_case(c, tiny_llama_dir, use_ds=False) for c in W.CASES}


def assert_same_trajectory(run, ref, tol=1e-5, what=""):
    assert run["names"] == ref["names"]
    assert len(run["traj"]) == len(ref["traj"]) == W.STEPS
    for step, (xs, ys) in enumerate(zip(run["traj"], ref["traj"])):
        for n, x, y in zip(ref["names"], xs, ys):
            err = float((x.double() - y.double()).norm() / max(float(y.double().norm()), 1e-30))
            assert err < tol, f"{what}: {n} differs by {err:.2e} at step {step + 1}"


def assert_moves(ref):
    first, last = ref["traj"][0], ref["traj"][-1]
    assert any(float((a - b).norm()) > 0 for a, b in zip(first, last))


def assert_loraplus_ratio(run, ratio=4.0):
    """The effective LR of B is ratio × A's at every step, and the schedule really varies it."""
    seen = []
    for step, e in enumerate(run["eff_lr"]):
        a, b = e["lora_A"], e["lora_B"]
        if a == 0 and b == 0:  # a schedule that starts at 0 (WarmupCosineLR's first step)
            continue
        assert b == pytest.approx(ratio * a, rel=1e-4), f"step {step + 1}: A {a}, B {b}"
        seen.append(a)
    assert len(seen) >= 4 and max(seen) > 1.5 * min(seen)


def test_loraplus_ratio_in_scheduled_plain_runs(plain_runs):
    for case in ("plus_cos", "plus_decay"):
        assert_loraplus_ratio(plain_runs[case])


def test_pro_moments_full_size_light_none(plain_runs):
    # q: 64×64, v: 32×64 (2 KV heads of 16), up: 128×64; two layers; M and V in float32
    assert plain_runs["pro"]["moment_bytes"] == 2 * 2 * 4 * (64 * 64 + 32 * 64 + 128 * 64)
    assert "moment_bytes" not in plain_runs["pro_light"]  # the light variant keeps no full-size state
    for c in W.CASES:
        assert_moves(plain_runs[c])


def _adam(p, g, st, t, lr, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.AdamW's step written from its formula (weight decay 0)."""
    st["m"] = b1 * st.get("m", 0) + (1 - b1) * g
    st["v"] = b2 * st.get("v", 0) + (1 - b2) * g * g
    return p - lr * (st["m"] / (1 - b1 ** t)) / (torch.sqrt(st["v"] / (1 - b2 ** t)) + eps)


def dense_reference(case, model_dir):
    """float64: raw gradients by autograd on a model without any rule, then the note's formulas
    (ref_pinv_gram / ref_step, written above) and the optimizer step written out."""
    model, cfg = W.build(case, model_dir, torch.float64)
    mods = ld.adapter_modules(model)
    s, lr = cfg.scaling, W.CASES[case][5]
    state, traj = {}, []
    for t, ids in enumerate(W.global_batches(), start=1):
        for mb in ids.split(W.MICRO):
            (model(input_ids=mb, labels=mb).loss / (W.GLOBAL // W.MICRO)).backward()
        with torch.no_grad():
            for n, m in mods:
                A, B = m.lora_A.detach().clone(), m.lora_B.detach().clone()
                if case == "fa":
                    g = s ** -2 * m.lora_B.grad @ ref_pinv_gram(A, True)
                    m.lora_B.copy_(_adam(B, g, state.setdefault(n, {}), t, lr))
                elif case == "pro_light":  # the adjustment of the raw gradients, then AdamW
                    a, b = ref_adjust(m.lora_A.grad, m.lora_B.grad, A, B, s, True)
                    m.lora_A.copy_(_adam(A, a, state.setdefault(n + "A", {}), t, lr))
                    m.lora_B.copy_(_adam(B, b, state.setdefault(n + "B", {}), t, lr))
                else:
                    st = state.setdefault(n, {"M": None, "V": None})
                    a, b, st["M"], st["V"] = ref_step(m.lora_A.grad, m.lora_B.grad, A, B, s, st["M"], st["V"], t)
                    m.lora_A.copy_(A - lr * a)
                    m.lora_B.copy_(B - lr * b)
        model.zero_grad(set_to_none=True)
        traj.append([p.detach().clone() for n, m in mods for k, p in m.adapter_params().items() if p.requires_grad])
    return traj


@pytest.mark.parametrize("case", ["fa", "pro", "pro_light"])
def test_rule_matches_dense_float64_training_step(case, tiny_llama_dir):
    run = W.run_case(case, tiny_llama_dir, use_ds=False, dtype=torch.float64)
    assert_same_trajectory(run, {"names": run["names"], "traj": dense_reference(case, tiny_llama_dir)},
                           tol=1e-9, what=f"{case} vs dense float64")


def _launched(tmp_path, tiny_llama_dir, how, stage):
    from launch_utils import run_ranks, run_two_nodes
    out = str(tmp_path / how)
    args = ["--model", tiny_llama_dir, "--out", out, "--stage", str(stage)]
    if how == "nodes":
        run_two_nodes("update_rules.py", args)
    else:
        run_ranks("update_rules.py", args, nproc=2)
    return torch.load(os.path.join(out, "trajectories.pt"), weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("how,stage", [("ranks", 3), ("nodes", 3), ("ranks", 2)])
def test_every_rule_same_trajectory_distributed(tmp_path, tiny_llama_dir, plain_runs, how, stage):
    runs = _launched(tmp_path, tiny_llama_dir, how, stage)
    assert set(runs) == set(W.CASES)
    for case, run in runs.items():
        assert_same_trajectory(run, plain_runs[case], what=f"{case} on 2 {how}, ZeRO-{stage}")
    for case in ("plus_cos", "plus_decay"):
        assert_loraplus_ratio(runs[case])
    # LoRA-Pro's moments are spread: both ranks own layers, together exactly the single-process total
    assert runs["pro"]["owners"] == [0, 1]
    mb = runs["pro"]["moment_bytes"]
    assert min(mb) > 0 and sum(mb) == plain_runs["pro"]["moment_bytes"]


# ---- LoRA-Pro: resume, raw-gradient clipping, ds_config checks, moment accounting ------------------
def _pro_loop(model_dir, steps, pro=None, opt=None, model=None, max_grad_norm=None, start=0):
    if model is None:
        model, cfg = W.build("pro", model_dir)
        opt = ur.inner_optimizer(ur.param_groups(model, cfg, 5e-3))
        pro = ur.LoRAPro(model, max_grad_norm=max_grad_norm)
    for ids in W.global_batches()[start:start + steps]:
        for mb in ids.split(W.MICRO):
            (model(input_ids=mb, labels=mb).loss / 2).backward()
        pro.adjust_gradients()
        opt.step()
        opt.zero_grad()
    return model, pro, opt


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_lora_pro_resumes_onto_the_same_trajectory(tiny_llama_dir, tmp_path):
    full, _, _ = _pro_loop(tiny_llama_dir, 5)
    part, pro, _ = _pro_loop(tiny_llama_dir, 3)
    torch.save(pro.state_dict(), tmp_path / "pro.pt")
    ld.save_adapter(part, str(tmp_path / "ad"))
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ld.load_adapter(model, str(tmp_path / "ad"))
    resumed = ur.LoRAPro(model)
    resumed.load_state_dict(torch.load(tmp_path / "pro.pt"))
    assert resumed.t == 3 and set(resumed.M) == set(pro.M)
    opt = ur.inner_optimizer(ur.param_groups(model, model.lora_dist_config, 5e-3))
    _pro_loop(tiny_llama_dir, 2, resumed, opt, model, start=3)
    a, b = _adapters(model), _adapters(full)
    assert max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b) < 1e-6
    fresh = ur.LoRAPro(model)  # without the moments the trajectory would differ: the state matters
    fresh.world = 2
    with pytest.raises(ld.ConfigError, match="same world size"):
        fresh.load_state_dict(resumed.state_dict())


def test_lora_pro_max_grad_norm_clips_raw_gradients(tiny_llama_dir):
    """LoRAPro(max_grad_norm) = the rule applied to raw gradients clipped by torch first."""
    model, pro, _ = _pro_loop(tiny_llama_dir, 3, max_grad_norm=1e-3)
    assert pro.last_grad_norm > 1e-3  # the clip acted
    ref, cfg = W.build("pro", tiny_llama_dir)
    opt = ur.inner_optimizer(ur.param_groups(ref, cfg, 5e-3))
    plain = ur.LoRAPro(ref)
    for ids in W.global_batches()[:3]:
        for mb in ids.split(W.MICRO):
            (ref(input_ids=mb, labels=mb).loss / 2).backward()
        torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad], 1e-3)
        plain.adjust_gradients()
        opt.step()
        opt.zero_grad()
    a, b = _adapters(model), _adapters(ref)
    assert max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b) < 1e-5
    unclipped, _, _ = _pro_loop(tiny_llama_dir, 3)
    c = _adapters(unclipped)
    assert max(float((a[k] - c[k]).norm() / c[k].norm()) for k in c) > 1e-3
    with pytest.raises(ld.ConfigError, match="max_grad_norm"):
        ur.LoRAPro(ref, max_grad_norm=0)


@pytest.mark.parametrize("ds,needle", [
    ({"gradient_clipping": 0, "optimizer": {"type": "AdamW"}}, "optimizer \\(type 'AdamW'\\)"),
    ({"zero_optimization": {"stage": 3}}, "gradient_clipping = 1.0 \\(DeepSpeed default\\)"),
    ({"gradient_clipping": 0.5}, "gradient_clipping = 0.5"),
    ({"gradient_clipping": 0, "zero_optimization": {"stage": 2}}, "zero_allow_untested_optimizer"),
])
def test_check_ds_config_refuses_what_lora_pro_cannot_run_under(ds, needle):
    from lora_dist.errors import DeepSpeedConfigError
    cfg = ld.AdapterConfig(update_rule="lora_pro")
    with pytest.raises(DeepSpeedConfigError, match=needle):
        ur.check_ds_config(ds, cfg, [{"lr_ratio": 1.0}])
    ur.check_ds_config(ds, ld.AdapterConfig(update_rule="lora_pro", update_options={"moments": "none"}),
                       [{"lr_ratio": 1.0}])  # the light variant keeps the configured optimizer
    ur.check_ds_config({"gradient_clipping": 0, "zero_allow_untested_optimizer": True,
                        "zero_optimization": {"stage": 3}}, cfg, [{"lr_ratio": 1.0}])


def test_lora_pro_moment_accounting_matches_what_it_holds(plain_runs, tiny_llama_dir):
    from transformers import AutoConfig
    from lora_dist.memory.activations import load_preset
    from lora_dist.memory.init_cost import adapted_modules
    tiny = AutoConfig.from_pretrained(tiny_llama_dir)
    shapes = [(n, o, i) for n, o, i, _ in adapted_modules(tiny, W.TARGETS)]
    one = ur.lora_pro_moment_bytes(shapes, 1)
    assert one["total"] == plain_runs["pro"]["moment_bytes"]
    two = ur.lora_pro_moment_bytes(shapes, 2)
    assert two["total"] == one["total"] and two["max_rank"] < one["total"]
    cfg = load_preset("llama2-70b")
    allx = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    m = ur.lora_pro_moment_bytes([(n, o, i) for n, o, i, _ in adapted_modules(cfg, allx)], 16)
    elems = 80 * (2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 28672 * 8192)
    assert m["total"] == 8 * elems and m["max_rank"] <= 1.01 * m["total"] / 16


def test_attach_points_lora_pro_to_LoRAPro_and_plain_installs_nothing():
    model = _tiny_with("lora", update_rule="lora_pro")
    with pytest.raises(ld.ConfigError, match="LoRAPro"):
        ur.attach_update_rule(model)
    light = _tiny_with("lora", update_rule="lora_pro", update_options={"moments": "none"})
    with pytest.raises(ld.ConfigError, match="attach_update_rule"):
        ur.LoRAPro(light)
    h = ur.attach_update_rule(light)
    assert len(h.light) == 4 and all(m.grad_rule is not None for m in h.light)
    h.remove()
    assert all(m.grad_rule is None for _, m in ld.adapter_modules(light))
    plain = _tiny_with("lora")
    assert ur.attach_update_rule(plain).hooks == []
    with pytest.raises(ld.ConfigError, match="update_rule must be 'lora_pro'"):
        ur.LoRAPro(plain)
