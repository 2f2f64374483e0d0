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

from .comm import Comm
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
                  betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8, delta: float = 1e-8,
                  moments_dtype: Optional[torch.dtype] = None):
    """LoRA-Pro's full rule for one layer at step t (1-based); the inner step is A −= lr·g_A′,
    B −= lr·g_B′ (plain SGD).

    1. (g̅_A, g̅_B) = Adjust(g_A, g_B) without the Sylvester term; G̃ = s·B·g̅_A + s·g̅_B·A.
    2. Full-size Adam moments: M = (1−β₁)G̃, V = (1−β₂)G̃² at t = 1 (M = V = None given);
       later M ← M + (1−β₁)(G̃ − M), V ← β₂V + (1−β₂)G̃² (in place).
       Ĝ = (M/(1−β₁ᵗ)) / (√V/√(1−β₂ᵗ) + ε).
    3. ĝ_A = s·Bᵀ·Ĝ, ĝ_B = s·Ĝ·Aᵀ.
    4. (g_A′, g_B′) = Adjust(ĝ_A, ĝ_B) with the Sylvester term (`lora_pro_adjust`).

    The d_out×d_in work runs in float64 for float64 inputs, else float32 (three full-size
    temporaries at most); r-sized work in float64. New moments take `moments_dtype` (default: that
    compute dtype). Returns (g_A′, g_B′, M, V).
    """
    _check_step(t)
    if (M is None) != (t == 1) or (V is None) != (t == 1):
        raise ConfigError(f"lora_pro_step: the moments M, V must be None exactly at t = 1 (got t={t}, "
                          f"M {'None' if M is None else 'given'}, V {'None' if V is None else 'given'})")
    b1, b2 = betas
    s = scaling
    cd = torch.float64 if g_A.dtype == torch.float64 else torch.float32
    gA, gB = _adjust(g_A, g_B, A, B, s, delta, sylvester=False)
    Bc, Ac = B.to(cd), A.to(cd)
    G = torch.addmm(s * (Bc @ gA.to(cd)), gB.to(cd), Ac, alpha=s)
    if M is None:
        md = moments_dtype or cd
        M, V = (G * (1 - b1)).to(md), (G * G * (1 - b2)).to(md)
    else:
        Gm = G.to(M.dtype)
        M.lerp_(Gm, 1 - b1)
        V.mul_(b2).addcmul_(Gm, Gm, value=1 - b2)
    del G
    Gh = V.to(cd).sqrt().div_(math.sqrt(1 - b2 ** t)).add_(eps)  # a new tensor: V stays
    Gh = torch.div(M.to(cd), Gh, out=Gh).div_(1 - b1 ** t)
    hA, hB = s * (Bc.T @ Gh), s * (Gh @ Ac.T)
    del Gh
    out_A, out_B = _adjust(hA, hB, A, B, s, delta, sylvester=True)
    return out_A.to(g_A.dtype), out_B.to(g_B.dtype), M, V


# --------------------------------------------------------------------------------------------------
# LoRA-FA inside backward
# --------------------------------------------------------------------------------------------------


class RuleHandle:
    """What `attach_update_rule` installed: the gradient hooks (`remove()` takes them off) and, per
    LoRA-FA layer, G_A = AAᵀ+δI and its inverse (float64, r×r) for `clip_grad_norm_`."""

    def __init__(self, rule: str, scaling: float):
        self.rule = rule
        self.scaling = scaling
        self.hooks = []
        self.layers = {}  # B parameter -> (G_A, P_A)
        self.light = []  # modules whose branch runs LoRA-Pro's light Function

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        for m in self.light:
            m.grad_rule = None
        self.light = []
        self.hooks.clear()
        self.layers.clear()


def _fa_hook(P: torch.Tensor, scaling: float):
    """g_B ↦ s⁻²·g_B·P_A, computed in float64 (an r-wide GEMM) and cast back to g_B's dtype."""
    cache = {}

    def hook(g: torch.Tensor) -> torch.Tensor:
        Pd = cache.get(g.device)
        if Pd is None:
            Pd = cache[g.device] = P.to(g.device) / scaling ** 2
        return (g.double() @ Pd).to(g.dtype)
    return hook


def attach_update_rule(model_or_engine, config=None) -> RuleHandle:
    """Install `config.update_rule` (default: the model's own config) on every adapted layer.

    lora_fa: A is frozen, so P_A = (AAᵀ+δI)⁻¹ is fixed: it is built here once per layer from the full
    A (gathered under ZeRO-3; collective: every rank calls this) and a gradient hook on B maps each
    micro-batch's g_B to s⁻²·g_B·P_A before it is accumulated or reduced. Because the map is linear,
    the reduced, accumulated gradient is exactly the projection of the reduced one, on any world size.
    Call it after `initialize_adapters`/`load_adapter` (A final), before the first backward.
    lora_pro with moments="none" (the light variant): each layer's adapter branch runs
    `_LoRAProLight`, whose backward returns the adjusted (g_A′, g_B′) of the micro-batch.
    plain: nothing to install. lora_pro with full moments: a ConfigError pointing to `LoRAPro`
    (it acts between backward and step).
    """
    from .adapters import adapter_modules
    from .zero import read_full, unwrap_engine

    module, _ = unwrap_engine(model_or_engine)
    config = config or getattr(module, "lora_dist_config", None)
    if config is None:
        raise ConfigError("attach_update_rule: the model has no adapters (call inject_adapters first)")
    old = getattr(module, "_lora_dist_rule", None)
    if old is not None:  # attaching twice would project twice
        old.remove()
    handle = RuleHandle(config.update_rule, config.scaling)
    if config.update_rule == "lora_pro" and config.update_option("moments") == "none":
        rule = _light_rule(float(config.update_option("delta")))
        for _, m in adapter_modules(module):
            m.grad_rule = rule
        handle.light = [m for _, m in adapter_modules(module)]
    elif config.update_rule == "lora_pro":
        raise ConfigError("attach_update_rule: update_rule='lora_pro' acts between backward and step, not in "
                          "backward: use pro = LoRAPro(engine) and call pro.adjust_gradients() before each "
                          "optimizer step (docs/update_rules.md)")
    if config.update_rule == "lora_fa":
        delta = float(config.update_option("delta"))
        for name, m in adapter_modules(module):
            if m.needs_init:
                raise ConfigError(f"attach_update_rule: adapter {name!r} is not initialized yet; LoRA-FA's "
                                  "projection is built from the final A: run initialize_adapters first")
            if m.lora_A.requires_grad:
                raise ConfigError(f"attach_update_rule: update_rule='lora_fa' needs a frozen A; {name}.lora_A trains")
            (A,) = read_full([m.lora_A])
            G = A.double() @ A.double().T + delta * torch.eye(A.shape[0], dtype=torch.float64)
            P = torch.cholesky_inverse(torch.linalg.cholesky(G))
            handle.layers[m.lora_B] = (G, P)
            handle.hooks.append(m.lora_B.register_hook(_fa_hook(P, config.scaling)))
    module._lora_dist_rule = handle
    return handle


class _LoRAProLight(torch.autograd.Function):
    """The adapter branch y = s·(x·Aᵀ)·Bᵀ whose backward returns LoRA-Pro's adjusted gradients.

    Backward forms the micro-batch's raw g_B = s·Σ gyᵀ·(x·Aᵀ) and g_A = s·Σ (gy·B)ᵀ·x together and
    returns Adjust(g_A, g_B) (`lora_pro_adjust`, float64 inner math). For fixed A and B the map is
    linear, so the sum over micro-batches and ranks that follows equals the adjustment of the
    reduced gradient. x's gradient is the plain s·gy·B·A.
    """

    @staticmethod
    def forward(ctx, x, A, B, scaling, delta):
        h = torch.nn.functional.linear(x, A)
        ctx.save_for_backward(x, A, B)
        ctx.scaling, ctx.delta = scaling, delta
        return scaling * torch.nn.functional.linear(h, B)

    @staticmethod
    def backward(ctx, gy):
        x, A, B = ctx.saved_tensors
        s = ctx.scaling
        gyB = gy @ B  # (..., r)
        gx = s * (gyB @ A)
        cd = torch.promote_types(x.dtype, torch.float32)  # raw gradients in float32 at least
        x2 = x.reshape(-1, x.shape[-1]).to(cd)
        gy2, gyB2 = gy.reshape(-1, gy.shape[-1]).to(cd), gyB.reshape(-1, B.shape[1]).to(cd)
        gB = s * (gy2.T @ (x2 @ A.to(cd).T))
        gA = s * (gyB2.T @ x2)
        a, b = _adjust(gA, gB, A, B, s, ctx.delta, sylvester=True)
        return gx, a.to(A.dtype), b.to(B.dtype), None, None


def _light_rule(delta: float):
    def rule(x, A, B, scaling):
        return _LoRAProLight.apply(x, A, B, scaling, delta)
    return rule


def clip_grad_norm_(model, max_norm: float, order: str = "projected") -> float:
    """Clip the gradients of a plain (non-DeepSpeed) model in place; returns the norm it clipped by.

    order="projected": the norm of the gradients as they are (LoRA-FA's projected g̃_B), as
        torch.nn.utils.clip_grad_norm_ and DeepSpeed's `gradient_clipping` see them.
    order="raw": PEFT + HF Trainer's clip-then-project: the norm is that of the raw gradients,
        recovered exactly from the projected ones as g_B = s²·g̃_B·(AAᵀ+δI); since the projection is
        linear, scaling g̃_B by c = min(1, max_norm/(‖g_raw‖+1e-6)) equals projecting c·g_raw.
    """
    if order not in ("projected", "raw"):
        raise ConfigError(f"clip_grad_norm_: order={order!r}; choose 'projected' or 'raw'")
    params = [p for p in model.parameters() if p.grad is not None]
    handle = getattr(model, "_lora_dist_rule", None)
    layers = handle.layers if (handle is not None and order == "raw") else {}
    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        g = p.grad.double()
        if p in layers:
            g = handle.scaling ** 2 * (g @ layers[p][0].to(g.device))
        sq += (g * g).sum().cpu()
    norm = float(sq.sqrt())
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return norm


# --------------------------------------------------------------------------------------------------
# LoRA+: parameter groups, and the schedulers that would undo them
# --------------------------------------------------------------------------------------------------


def _is_B_side(name: str, p: torch.Tensor) -> bool:
    """PEFT's LoRA+ split: B matrices and 1-D adapter vectors (DoRA's m, Tied-LoRA's u, v)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "lora_B" or (p.dim() == 1 and leaf not in ("weight", "bias"))


def param_groups(model_or_engine, config, lr: float, weight_decay: float = 0.0) -> list:
    """Optimizer parameter groups for the model's trainable parameters.

    Without `config.loraplus_lr_ratio`: one group at `lr`. With ratio ρ (LoRA+): group "lora_A"
    (A and every other trainable tensor) at lr, group "lora_B" (B and 1-D adapter vectors) at lr·ρ.
    Each group carries `lr_ratio` (1 or ρ) so a scheduler's per-group values can be derived
    (`per_group_scheduler`). Empty groups are left out. Pass the list as DeepSpeed's
    `model_parameters` (or to a torch optimizer): the group's own lr wins over the ds_config's.
    """
    from .zero import unwrap_engine

    module, _ = unwrap_engine(model_or_engine)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("param_groups: the model has no trainable parameters")
    ratio = config.loraplus_lr_ratio
    if ratio is None:
        return [{"params": [p for _, p in named], "lr": lr, "weight_decay": weight_decay,
                 "name": "all", "lr_ratio": 1.0}]
    a = [p for n, p in named if not _is_B_side(n, p)]
    b = [p for n, p in named if _is_B_side(n, p)]
    groups = [{"params": a, "lr": lr, "weight_decay": weight_decay, "name": "lora_A", "lr_ratio": 1.0},
              {"params": b, "lr": lr * ratio, "weight_decay": weight_decay, "name": "lora_B",
               "lr_ratio": float(ratio)}]
    return [g for g in groups if g["params"]]


# scheduler type -> the params holding an absolute LR that DeepSpeed applies to every group alike when
# given one number (WarmupCosineLR scales each group's own lr and is not listed).
_FLATTENING = {
    "WarmupLR": ("warmup_min_lr", "warmup_max_lr"),
    "WarmupDecayLR": ("warmup_min_lr", "warmup_max_lr"),
    "OneCycle": ("cycle_min_lr", "cycle_max_lr"),
    "LRRangeTest": ("lr_range_test_min_lr",),
}
# DeepSpeed's defaults when the key is absent (None: the groups' own lr, which keeps the ratio).
_DEFAULTS = {("WarmupLR", "warmup_max_lr"): None, ("WarmupLR", "warmup_min_lr"): 0.0,
             ("WarmupDecayLR", "warmup_max_lr"): 0.001, ("WarmupDecayLR", "warmup_min_lr"): 0.0,
             ("LRRangeTest", "lr_range_test_min_lr"): 0.001}


def _scheduler_lr_values(ds_config: dict):
    """(type, [(key, value-or-default)]) of the scheduler's absolute-LR params ([] when none)."""
    sched = (ds_config or {}).get("scheduler")
    if not sched:
        return None, []
    kind = sched.get("type")
    params = sched.get("params") or {}
    keys = _FLATTENING.get(kind, ())
    return kind, [(k, params.get(k, _DEFAULTS.get((kind, k)))) for k in keys]


def check_scheduler(ds_config: dict, groups: list) -> None:
    """Refuse a DeepSpeed scheduler that would set one LR on groups meant to differ (LoRA+).

    WarmupLR / WarmupDecayLR / OneCycle / LRRangeTest write an absolute LR into every group; given
    one number (as our ds_config filling writes `warmup_max_lr`) that undoes the ratio. A list with
    one value per group, proportional to the groups' `lr_ratio`, keeps it; so does a zero, and
    WarmupCosineLR, which scales each group's own lr. Raises DeepSpeedConfigError naming the key.
    """
    from .errors import DeepSpeedConfigError

    ratios = [float(g.get("lr_ratio", 1.0)) for g in groups]
    if len(set(ratios)) <= 1:
        return
    kind, values = _scheduler_lr_values(ds_config)
    for key, v in values:
        where = f"scheduler.params.{key} (scheduler.type {kind})"
        if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0):
            continue
        if isinstance(v, (list, tuple)):
            if len(v) != len(groups):
                raise DeepSpeedConfigError(f"{where} has {len(v)} values for {len(groups)} parameter groups")
            base = [float(x) / r for x, r in zip(v, ratios)]
            if all(math.isclose(b, base[0], rel_tol=1e-9, abs_tol=0.0) for b in base):
                continue
            raise DeepSpeedConfigError(f"{where} = {list(v)} is not proportional to the groups' LoRA+ lr "
                                       f"ratios {ratios}: it would change loraplus_lr_ratio")
        raise DeepSpeedConfigError(
            f"{where} = {v!r} sets one LR on every parameter group and would undo loraplus_lr_ratio "
            f"(groups at ratios {ratios}); give one value per group (lora_dist.update_rules."
            f"per_group_scheduler writes them) or use WarmupCosineLR")


def per_group_scheduler(ds_config: dict, groups: list) -> dict:
    """A copy of `ds_config` whose absolute scheduler LRs are per-group lists: value × group lr_ratio
    (a scalar value, or DeepSpeed's default when the key is absent and the default is a number)."""
    import copy

    out = copy.deepcopy(ds_config)
    kind, values = _scheduler_lr_values(out)
    ratios = [float(g.get("lr_ratio", 1.0)) for g in groups]
    for key, v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out["scheduler"].setdefault("params", {})[key] = [float(v) * r for r in ratios]
    check_scheduler(out, groups)
    return out


# --------------------------------------------------------------------------------------------------
# LoRA-Pro between backward and step
# --------------------------------------------------------------------------------------------------


def _full_value(p: torch.Tensor) -> torch.Tensor:
    """The full value of a trainable parameter: the optimizer's fp32 master where one exists
    (collective under ZeRO), else the tensor itself (gathered under ZeRO-3)."""
    from .zero import has_master_copy, read_full

    if has_master_copy(p):
        from deepspeed.utils import safe_get_full_fp32_param
        return safe_get_full_fp32_param(p)
    return read_full([p])[0].to(p.device)


class LoRAPro:
    """LoRA-Pro's full rule (`lora_pro_step`, update_options.moments="full") on a plain model or a
    DeepSpeed engine (ZeRO-0..3), between backward and step.

    Each layer's full-size M, V (d_out×d_in,
    `moments_dtype`) live on one owner rank only, from an LPT plan over d_out·d_in (the init
    engine's OwnerPlan), so they cost total/N per rank. Per layer, every rank reads the reduced full
    g_A, g_B and full A, B (collective), the owner runs the rule, broadcasts the r-sized results, and
    every rank writes them as the gradients; the inner optimizer must be plain SGD
    (`inner_optimizer`). The light variant (moments="none") acts inside backward instead
    (`attach_update_rule`).

    Call `adjust_gradients()` on every rank after the backward that completes an accumulation
    (engine.is_gradient_accumulation_boundary()) and before the optimizer step.
    Clipping: `max_grad_norm` clips the raw reduced gradients (global norm over every adapted
    layer, read in a first pass) before the rule, as a clip before Adam would; DeepSpeed's own
    `gradient_clipping` would act on the adjusted gradients and is refused (`check_ds_config`).
    `state_dict()`/`load_state_dict()` carry t and this rank's moments (sharded as held).
    """

    def __init__(self, model_or_engine, config=None, max_grad_norm: Optional[float] = None):
        from .adapters import adapter_modules
        from .engine.plan import OwnerPlan, Unit
        from .zero import unwrap_engine, world_size

        module, _ = unwrap_engine(model_or_engine)
        config = config or getattr(module, "lora_dist_config", None)
        if config is None or config.update_rule != "lora_pro":
            raise ConfigError("LoRAPro: the adapter config's update_rule must be 'lora_pro', got "
                              f"{getattr(config, 'update_rule', None)!r}")
        if config.update_option("moments") != "full":
            raise ConfigError("LoRAPro: update_options.moments='none' is LoRA-Pro's light variant, which acts "
                              "inside backward: use attach_update_rule(model_or_engine) instead")
        self.config = config
        self.layers = adapter_modules(module)
        self.moments_dtype = getattr(torch, config.update_option("moments_dtype"))
        self.world = world_size()
        units = [Unit(n, [n], float(m.out_features * m.in_features)) for n, m in self.layers]
        self.plan = OwnerPlan.build(units, self.world)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ConfigError(f"LoRAPro: max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: Optional[float] = None
        self.t = 0
        self.M, self.V = {}, {}

    def owner(self, name: str) -> int:
        return self.plan.owner[name]

    def adjust_gradients(self) -> None:
        """Rewrite every adapted layer's (g_A, g_B) with LoRA-Pro's (collective).

        Three passes, so that the owners' full-size work runs on all ranks at once rather than
        layer after layer: (1) read each layer's reduced gradients and full factors (collective),
        each rank keeping the layers it owns; (2) each owner runs the rule on its layers;
        (3) per layer, the owner broadcasts the r-sized results and every rank writes them.
        """
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad
        from .zero import rank

        self.t += 1
        me, delta = rank(), float(self.config.update_option("delta"))
        coef = self._clip_coef()
        kept, shapes = {}, {}
        for name, m in self.layers:
            gA, gB = safe_get_full_grad(m.lora_A), safe_get_full_grad(m.lora_B)
            if gA is None or gB is None:
                raise ConfigError(f"LoRAPro.adjust_gradients: {name} has no gradient; call it after backward")
            shapes[name] = (gA.shape, gB.shape, gA.dtype, gB.dtype, gA.device)
            A, B = _full_value(m.lora_A), _full_value(m.lora_B)
            if me == self.owner(name):
                kept[name] = (gA.double() * coef, gB.double() * coef, A, B)
        results = {name: self._rule(name, m, *kept[name], delta) for name, m in self.layers if name in kept}
        for name, m in self.layers:
            sA, sB, dA, dB, dev = shapes[name]
            a, b = self._broadcast(name, results.get(name), sA, sB, dev)
            safe_set_full_grad(m.lora_A, a.to(device=dev, dtype=dA))
            safe_set_full_grad(m.lora_B, b.to(device=dev, dtype=dB))

    def _clip_coef(self) -> float:
        """min(1, max_grad_norm/(‖g_raw‖+1e-6)) over every adapted layer's raw gradients (a first,
        read-only pass; collective), as torch.nn.utils.clip_grad_norm_ computes it."""
        from deepspeed.utils import safe_get_full_grad

        if self.max_grad_norm is None:
            return 1.0
        sq = 0.0
        for _, m in self.layers:
            for p in (m.lora_A, m.lora_B):
                sq += float(safe_get_full_grad(p).double().pow(2).sum())
        self.last_grad_norm = math.sqrt(sq)
        return min(1.0, self.max_grad_norm / (self.last_grad_norm + 1e-6))

    def _rule(self, name, m, gA, gB, A, B, delta):
        """The full rule for one owned layer, updating its moments."""
        c = self.config
        a, b, self.M[name], self.V[name] = lora_pro_step(
            gA, gB, A, B, m.scaling, self.M.get(name), self.V.get(name), self.t,
            betas=tuple(c.update_option("betas")), eps=float(c.update_option("eps")), delta=delta,
            moments_dtype=self.moments_dtype)
        return a, b

    def _broadcast(self, name, result, sA, sB, device):
        """The owner's (g_A′, g_B′) on every rank (one float64 buffer of r·(d_in+d_out))."""
        nA = sA.numel()
        buf = torch.empty(nA + sB.numel(), dtype=torch.float64, device=device)
        if result is not None:
            buf.copy_(torch.cat([result[0].reshape(-1), result[1].reshape(-1)]))
        Comm().broadcast(buf, src=self.owner(name))  # a no-op at world size 1
        return buf[:nA].view(sA), buf[nA:].view(sB)

    def moment_bytes(self) -> int:
        """Bytes of the moments this rank holds (after the first step)."""
        return sum(t.numel() * t.element_size() for d in (self.M, self.V) for t in d.values())

    def state_dict(self) -> dict:
        return {"t": self.t, "world": self.world, "M": dict(self.M), "V": dict(self.V)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world") != self.world:
            raise ConfigError(f"LoRAPro.load_state_dict: the moments were saved sharded over {state.get('world')} "
                              f"ranks, this run has {self.world}; resume on the same world size")
        self.t, self.M, self.V = int(state["t"]), dict(state["M"]), dict(state["V"])


def inner_optimizer(groups: list) -> torch.optim.Optimizer:
    """LoRA-Pro's inner step: plain SGD (θ −= lr·g, no momentum) on the given parameter groups."""
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.0)


def check_ds_config(ds_config: dict, config, groups: list) -> None:
    """Refuse a ds_config that cannot carry the rule: LoRA-Pro's full rule with an "optimizer"
    section (its inner step must be SGD: pass `inner_optimizer(groups)` to deepspeed.initialize,
    with zero_optimization.stage > 0 needing "zero_allow_untested_optimizer": true), and LoRA+
    groups under a scheduler that flattens them (`check_scheduler`)."""
    from .errors import DeepSpeedConfigError

    if config.update_rule == "lora_pro" and config.update_option("moments") == "full":
        clip = ds_config.get("gradient_clipping", 1.0)  # DeepSpeed's default is 1.0, not off
        if clip != 0:
            raise DeepSpeedConfigError(
                f"gradient_clipping = {clip!r}{' (DeepSpeed default)' if 'gradient_clipping' not in ds_config else ''}: "
                "under update_rule='lora_pro' it would clip the adjusted, Adam-normalized gradients; set it "
                "to 0 and pass max_grad_norm to LoRAPro to clip the raw gradients")
        if ds_config.get("optimizer"):
            raise DeepSpeedConfigError(
                f"optimizer (type {ds_config['optimizer'].get('type')!r}): update_rule='lora_pro' writes Adam-"
                "adjusted gradients for a plain SGD inner step; remove the optimizer section and pass "
                "lora_dist.update_rules.inner_optimizer(groups) to deepspeed.initialize")
        stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
        if stage and not ds_config.get("zero_allow_untested_optimizer"):
            raise DeepSpeedConfigError(
                f"zero_allow_untested_optimizer: ZeRO stage {stage} takes LoRA-Pro's torch SGD inner step "
                "only with \"zero_allow_untested_optimizer\": true")
    check_scheduler(ds_config, groups)


def lora_pro_moment_bytes(shapes, world: int, moments_dtype: str = "float32") -> dict:
    """Memory of LoRA-Pro's full-size moments under the owner plan `LoRAPro` builds.

    shapes: (name, d_out, d_in) per adapted layer. Each layer's M and V (2·d_out·d_in elements of
    `moments_dtype`) sit on its LPT owner. Returns {"total": bytes over all ranks, "per_rank": list,
    "max_rank": the largest, "transient": the step's float32 full-size temporaries on a rank
    (3·d_out·d_in of its largest layer)}. The memory tool adds this to the optimizer states.
    """
    from .engine.plan import OwnerPlan, Unit

    size = torch.empty((), dtype=getattr(torch, moments_dtype)).element_size()
    shapes = list(shapes)
    plan = OwnerPlan.build([Unit(n, [n], float(o * i)) for n, o, i in shapes], world)
    per_rank = [0] * world
    largest = [0] * world
    for n, o, i in shapes:
        r = plan.owner[n]
        per_rank[r] += 2 * o * i * size
        largest[r] = max(largest[r], o * i)
    return {"total": sum(per_rank), "per_rank": per_rank, "max_rank": max(per_rank),
            "transient": 3 * 4 * max(largest)}
