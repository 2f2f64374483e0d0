"""`AdapterConfig`: what to adapt, with which adapter kind, and how to initialize it.

The config is a plain dataclass with a JSON round trip. Every check that can be made without the
model is made in `validate()`; checks that need the model (a pattern that matches nothing, a rank
larger than a layer) are made by `inject_adapters`, and name the module.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import ConfigError  # noqa: F401  (re-exported)

KINDS = ("lora", "lora_fa", "lora_xs", "vera", "tied_lora", "dora", "none")

INITS = (
    "kaiming", "gaussian", "pissa", "milora", "olora", "eva", "corda",
    "lora_ga", "lora_one", "lora_sb", "lora_xs", "lora_da", "none",
)

# Which initializations make sense for which adapter kind. The reasons an entry is missing:
# - data-aware and SVD inits produce a plain pair (B, A); they fit `lora` and `lora_fa` (frozen A),
#   not kinds whose factors are shared across layers (vera, tied_lora) or carry a magnitude (dora);
# - `lora_xs` needs frozen orthonormal-ish factors around an r×r core: only the LoRA-XS SVD init
#   and LoRA-SB produce those;
# - `none` is full fine-tuning: there is nothing to initialize.
COMPATIBLE_INITS = {
    "lora": ("kaiming", "gaussian", "pissa", "milora", "olora", "eva", "corda",
             "lora_ga", "lora_one", "lora_da"),
    "lora_fa": ("kaiming", "gaussian", "pissa", "milora", "olora", "eva", "corda",
                "lora_ga", "lora_one", "lora_da"),
    "dora": ("kaiming", "gaussian"),
    "tied_lora": ("kaiming", "gaussian"),
    "vera": ("kaiming",),
    "lora_xs": ("lora_xs", "lora_sb"),
    "none": ("none",),
}

DEFAULT_INIT = {"lora": "kaiming", "lora_fa": "kaiming", "dora": "kaiming", "tied_lora": "kaiming",
                "vera": "kaiming", "lora_xs": "lora_xs", "none": "none"}

# Inits that need nothing but a seeded generator: `inject_adapters` completes them.
DATA_FREE_INITS = ("kaiming", "gaussian", "none")

DTYPES = ("float32", "float16", "bfloat16", "float64")

UPDATE_RULES = ("plain", "lora_fa", "lora_pro")
# Which adapter kind each update rule needs (see docs/update_rules.md): LoRA-FA's projection assumes a
# frozen A; LoRA-Pro adjusts a trainable plain pair (B, A). None = any kind.
RULE_KINDS = {"plain": None, "lora_fa": ("lora_fa",), "lora_pro": ("lora",)}
# The update_options each rule reads, with their defaults (the reference values of LoRA-Pro / PEFT).
RULE_OPTIONS = {
    "plain": {},
    "lora_fa": {"delta": 1e-8},
    "lora_pro": {"delta": 1e-8, "betas": [0.9, 0.999], "eps": 1e-8, "moments_dtype": "float32",
                 "moments": "full"},
}


@dataclass
class AdapterConfig:
    """Adapter configuration.

    kind: one of KINDS. `none` means no adapters (full fine-tuning baseline).
    r, alpha: rank and scale; the update is scaled by s = alpha/r, or alpha/sqrt(r) with use_rslora.
    dropout: dropout on the adapter's input (the base path never sees it).
    target_modules: list of name patterns, or "all-linear" (every nn.Linear but the output head).
        A pattern matches a module whose qualified name equals it or ends with "." + pattern; a
        pattern with `*`, `?` or `[` is a glob on the qualified name or on any dotted suffix of it.
    exclude_modules: patterns (same rules) removed from the match.
    init: one of INITS (None = the kind's default); init_options: method options (see docs/methods.md).
    init_samples: number of calibration samples for data-aware inits.
    seed: the global seed; every random factor is drawn from a generator seeded by (seed, module name).
    adapter_dtype: None = the base weight's dtype (the training precision); "float32" = fp32 adapter
        compute (costs activation memory: the adapter input is kept in fp32).
    tied_trainable: for kind tied_lora, which of A, B, u, v train ("ABuv" = TL6, all four).
    vera_d_initial: VeRA's initial lambda_d.
    update_rule: how gradients become updates (docs/update_rules.md): "plain" (the optimizer as
        configured), "lora_fa" (kind lora_fa: g̃_B = s⁻²·g_B·(AAᵀ+δI)⁻¹ inside backward), "lora_pro"
        (kind lora, rsLoRA too: LoRA-Pro's adjusted gradients under an SGD inner step).
    update_options: the rule's options: lora_fa {delta}; lora_pro {delta, betas, eps, moments_dtype,
        moments: "full" | "none"}. Missing keys take RULE_OPTIONS' defaults.
    loraplus_lr_ratio: LoRA+ (None = off): B and 1-D adapter vectors train at lr·ratio, A at lr.
    """

    kind: str = "lora"
    r: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    dropout: float = 0.0
    target_modules: Union[str, list] = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude_modules: list = field(default_factory=list)
    init: Optional[str] = None
    init_options: dict = field(default_factory=dict)
    init_samples: int = 256
    seed: int = 0
    adapter_dtype: Optional[str] = None
    tied_trainable: str = "ABuv"
    vera_d_initial: float = 0.1
    update_rule: str = "plain"
    update_options: dict = field(default_factory=dict)
    loraplus_lr_ratio: Optional[float] = None

    def __post_init__(self):
        if self.init is None:
            self.init = DEFAULT_INIT.get(self.kind, self.init)
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.validate()

    # ---- derived -------------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def update_option(self, key: str):
        """The rule's option `key`: the given value, or the rule's default."""
        return self.update_options.get(key, RULE_OPTIONS[self.update_rule][key])

    @property
    def needs_initialize(self) -> bool:
        """True when `initialize_adapters` must run (the init needs W or calibration data)."""
        return self.init not in DATA_FREE_INITS

    # ---- checks --------------------------------------------------------------------------------
    def validate(self) -> "AdapterConfig":
        if self.kind not in KINDS:
            raise ConfigError(f"AdapterConfig.kind={self.kind!r} is unknown; choose one of {list(KINDS)}")
        if self.init not in INITS:
            raise ConfigError(f"AdapterConfig.init={self.init!r} is unknown; choose one of {list(INITS)}")
        allowed = COMPATIBLE_INITS[self.kind]
        if self.init not in allowed:
            raise ConfigError(
                f"AdapterConfig: init={self.init!r} does not apply to kind={self.kind!r}; "
                f"kind {self.kind!r} takes init in {list(allowed)}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"AdapterConfig.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"AdapterConfig.alpha must be > 0, got {self.alpha!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ConfigError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout!r}")
        tm = self.target_modules
        if isinstance(tm, str):
            if tm != "all-linear":
                raise ConfigError(
                    f"AdapterConfig.target_modules={tm!r}: give a list of name patterns or 'all-linear'")
        elif not isinstance(tm, list) or not tm or not all(isinstance(p, str) and p for p in tm):
            raise ConfigError(
                f"AdapterConfig.target_modules must be a non-empty list of name patterns or "
                f"'all-linear', got {tm!r}")
        if not isinstance(self.exclude_modules, list):
            raise ConfigError(f"AdapterConfig.exclude_modules must be a list, got {self.exclude_modules!r}")
        if not isinstance(self.init_options, dict):
            raise ConfigError(f"AdapterConfig.init_options must be a dict, got {self.init_options!r}")
        if not isinstance(self.init_samples, int) or self.init_samples < 1:
            raise ConfigError(f"AdapterConfig.init_samples must be a positive integer, got {self.init_samples!r}")
        if self.adapter_dtype is not None and self.adapter_dtype not in DTYPES:
            raise ConfigError(f"AdapterConfig.adapter_dtype={self.adapter_dtype!r}; choose None or one of {list(DTYPES)}")
        if not self.tied_trainable or set(self.tied_trainable) - set("ABuv"):
            raise ConfigError(
                f"AdapterConfig.tied_trainable={self.tied_trainable!r}: use letters from 'ABuv' (TL6 = 'ABuv')")
        self._validate_update_rule()
        return self

    def _validate_update_rule(self) -> None:
        rule = self.update_rule
        if rule not in UPDATE_RULES:
            raise ConfigError(f"AdapterConfig.update_rule={rule!r} is unknown; choose one of {list(UPDATE_RULES)}")
        kinds = RULE_KINDS[rule]
        if kinds is not None and self.kind not in kinds:
            raise ConfigError(f"AdapterConfig: update_rule={rule!r} needs kind in {list(kinds)}, got "
                              f"kind={self.kind!r}")
        _check_update_options(rule, self.update_options)
        ratio = self.loraplus_lr_ratio
        if ratio is None:
            return
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0 or not math.isfinite(ratio):
            raise ConfigError(f"AdapterConfig.loraplus_lr_ratio must be a finite number > 0 or None, got {ratio!r}")
        has_B = self.kind in ("lora", "lora_fa", "dora") or (self.kind == "tied_lora" and "B" in self.tied_trainable)
        if not has_B:
            raise ConfigError(f"AdapterConfig.loraplus_lr_ratio needs a trainable B; kind={self.kind!r}"
                              + (f" with tied_trainable={self.tied_trainable!r}" if self.kind == "tied_lora" else "")
                              + " has none")
        if rule == "lora_pro":
            # LoRA-Pro's adjustment is the optimum for one step size shared by A and B.
            raise ConfigError("AdapterConfig.loraplus_lr_ratio cannot be combined with update_rule='lora_pro' "
                              "(its adjusted gradients assume one learning rate for A and B)")

    # ---- JSON round trip -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"AdapterConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"AdapterConfig: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"AdapterConfig JSON is invalid at line {e.lineno} column {e.colno}: {e.msg}") from None
        return cls.from_dict(d)


def _check_update_options(rule: str, opts) -> None:
    """update_options: known keys for the rule, each of the right type and range."""
    if not isinstance(opts, dict):
        raise ConfigError(f"AdapterConfig.update_options must be a dict, got {opts!r}")
    known = RULE_OPTIONS[rule]
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ConfigError(f"AdapterConfig.update_options: {unknown} do not apply to update_rule={rule!r}; "
                          f"it takes {sorted(known) or 'none'}")
    for key in ("delta", "eps"):
        v = opts.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1):
            raise ConfigError(f"AdapterConfig.update_options[{key!r}] must be a number in (0, 1), got {v!r}")
    if "betas" in opts:
        b = opts["betas"]
        ok = isinstance(b, (list, tuple)) and len(b) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in b)
        if not ok:
            raise ConfigError(f"AdapterConfig.update_options['betas'] must be two numbers in [0, 1), got {b!r}")
        opts["betas"] = [float(x) for x in b]  # a JSON round trip gives a list: keep one form
    if opts.get("moments_dtype", "float32") not in ("float32", "bfloat16", "float64"):
        raise ConfigError(f"AdapterConfig.update_options['moments_dtype']={opts['moments_dtype']!r}; "
                          "choose float32, bfloat16 or float64")
    if opts.get("moments", "full") not in ("full", "none"):
        raise ConfigError(f"AdapterConfig.update_options['moments']={opts['moments']!r}; choose 'full' or 'none'")


def torch_dtype(name: Optional[str]):
    import torch
    return None if name is None else getattr(torch, name)
