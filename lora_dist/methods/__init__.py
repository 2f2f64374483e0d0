"""The method registry: `AdapterConfig.init` name -> Method."""
from .base import (INPUT_MOMENT, OUTPUT_GRAD_DIAG, OUTPUT_GRAD_FULL, STATISTICS, WEIGHT, WEIGHT_GRADIENT,
                   LayerProblem, LayerSolution, Method, fix_signs)
from .lora_da import LoRADA
from .svd import LoRAXSInit, MiLoRA, OLoRA, PiSSA
from ..config import ConfigError

METHODS = {m.name: m for m in (PiSSA(), MiLoRA(), OLoRA(), LoRAXSInit(), LoRADA())}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"init {name!r} has no solver in this build; available: {sorted(METHODS)}")
    return METHODS[name]
