"""The method registry: `AdapterConfig.init` name -> Method, and the documentation tables generated from it."""
from .base import (INPUT_MOMENT, OUTPUT_GRAD_DIAG, OUTPUT_GRAD_FULL, STATISTICS, WEIGHT, WEIGHT_GRADIENT,
                   COMMON_OPTIONS, LayerProblem, LayerSolution, Method, fix_signs)
from .corda import CorDA
from .eva import EVA
from .gradient import LoRAGA, LoRAOne, LoRASB
from .lora_da import LoRADA
from .svd import LoRAXSInit, MiLoRA, OLoRA, PiSSA
from ...config import COMPATIBLE_INITS, DATA_FREE_INITS, INITS, KINDS, ConfigError

METHODS = {m.name: m for m in (PiSSA(), MiLoRA(), OLoRA(), LoRAXSInit(), LoRADA(), EVA(), CorDA(),
                               LoRAGA(), LoRAOne(), LoRASB())}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"init {name!r} has no solver in this build; available: {sorted(METHODS)}")
    return METHODS[name]


_STAT_NAMES = {WEIGHT_GRADIENT: "g", INPUT_MOMENT: "A_in, μ", OUTPUT_GRAD_DIAG: "diag G",
               OUTPUT_GRAD_FULL: "G", WEIGHT: "W"}
_DATA_FREE_DOC = {"kaiming": ("seeded generator", "Hu et al. 2021 (LoRA); PEFT default"),
                  "gaussian": ("seeded generator", "PEFT init_lora_weights='gaussian'"),
                  "none": ("—", "full fine-tuning baseline")}


def compatibility_table() -> str:
    """Markdown table (init × kind) generated from config.COMPATIBLE_INITS: docs/methods.md embeds it
    verbatim and tests/engine/test_methods.py checks that it does."""
    head = "| init | " + " | ".join(f"`{k}`" for k in KINDS) + " |"
    sep = "|---|" + "|".join(":-:" for _ in KINDS) + "|"
    rows = [f"| `{i}` | " + " | ".join("✓" if i in COMPATIBLE_INITS[k] else "" for k in KINDS) + " |"
            for i in INITS]
    return "\n".join([head, sep, *rows])


def summary_table() -> str:
    """Markdown table of every init: statistics, whether it writes W, options with defaults, reference.
    Generated from the registry (docs/methods.md embeds it verbatim; a test checks it)."""
    lines = ["| init | statistics | writes W | options (defaults) | reference |", "|---|---|:-:|---|---|"]
    for i in INITS:
        if i in DATA_FREE_INITS:
            stats, ref = _DATA_FREE_DOC[i]
            lines.append(f"| `{i}` | {stats} | no | — | {ref} |")
            continue
        m = get_method(i)
        stats = ", ".join(_STAT_NAMES[s] for s in sorted(m.needs, key=list(_STAT_NAMES).index))
        opts = ", ".join(f"`{k}={v!r}`" for k, v in m.options.items()) or "—"
        lines.append(f"| `{i}` | {stats} | {'**yes**' if m.writes_weight else 'no'} | {opts} | {m.reference} |")
    common = ", ".join(f"`{k}={v!r}`" for k, v in COMMON_OPTIONS.items())
    lines.append("")
    lines.append(f"Every data-aware init also takes {common}.")
    return "\n".join(lines)
