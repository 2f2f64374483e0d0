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
        return self

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


def torch_dtype(name: Optional[str]):
    import torch
    return None if name is None else getattr(torch, name)
