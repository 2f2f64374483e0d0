"""lora_dist: DeepSpeed-ZeRO-3-aware LoRA-family adapters and distributed data-aware initializations."""
from .config import AdapterConfig, ConfigError, KINDS, INITS, COMPATIBLE_INITS
from .adapters import AdapterLinear, adapter_modules
from .inject import inject_adapters
from .export import save_adapter, load_adapter, merge_adapters
from .engine import initialize_adapters, InitReport
from .engine.plan import OwnerPlan

__all__ = ["AdapterConfig", "ConfigError", "KINDS", "INITS", "COMPATIBLE_INITS", "AdapterLinear",
           "adapter_modules", "inject_adapters", "save_adapter", "load_adapter", "merge_adapters",
           "initialize_adapters", "InitReport", "OwnerPlan"]
