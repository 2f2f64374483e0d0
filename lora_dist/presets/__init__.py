"""Model config presets: `presets/<name>.json`, LlamaConfig dicts (no weights).

The small ones (tiny-llama, small-llama) are built into random-weight checkpoints for the demo and
tests (`lora_dist.job.demo`); the Llama-2 ones feed the memory accounting.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

from ..errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent


def list_presets() -> List[str]:
    """Names of every preset shipped in this folder."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name!r}; built-in presets: {', '.join(list_presets())}")
    return path


def preset_config(name: str) -> dict:
    """The config dict of preset `name` (with its `model_type`)."""
    return json.loads(preset_path(name).read_text())
