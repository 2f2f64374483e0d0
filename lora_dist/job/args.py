"""The training job's flags: one `TrainConfig` dataclass, read from defaults, then an optional
YAML/JSON `--config` file, then the command line (each overriding the one before).

Every bad value is a `ConfigError` naming the flag, raised before anything expensive runs, and the
command-line parser raises instead of printing usage and exiting, so the job prints it once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import INITS, KINDS, UPDATE_RULES, AdapterConfig
from ..errors import ConfigError
from .demo import METAMATH_TINY

_DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _f(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every flag of launch/train.py; the defaults are the embedded demo (minutes on 2 CPU cores)."""

    ds_config: str = _f("ds_configs/zero3.json", "DeepSpeed JSON config; \"auto\" values are filled from these flags")
    model: str = _f("tiny-llama", "local HF model directory, or a built-in preset (tiny-llama, small-llama)")
    data: str = _f(str(METAMATH_TINY), "json, jsonl, parquet file or a `datasets` save_to_disk directory")
    template: str = _f("auto", "auto, metamath, alpaca or commonsense")
    adapter: str = _f("lora_fa", "adapter kind", choices=KINDS)
    init: str = _f("lora_da", "adapter initialization", choices=INITS)
    r: int = _f(8, "adapter rank")
    alpha: float = _f(16.0, "adapter scale numerator (s = alpha / r)")
    use_rslora: bool = _f(False, "s = alpha / sqrt(r)")
    dropout: float = _f(0.0, "dropout on the adapter input")
    target_modules: str = _f(_DEFAULT_TARGETS, "comma-separated name patterns, or all-linear")
    init_samples: int = _f(64, "calibration samples for data-aware inits")
    init_options: Any = _f("{}", 'JSON object, e.g. \'{"beta": 0.03}\'')
    init_memory_budget: Any = _f(None, "bytes per rank the init may hold (statistics, solve workspace, W, rows in "
                                 "flight, on top of the model), e.g. 40GiB or 2.5e10; default: from the device")
    update_rule: str = _f("plain", "how gradients become updates: plain, lora_fa (--adapter lora_fa: projected g_B), "
                          "lora_pro (--adapter lora; full moments: the ds_config optimizer is replaced by SGD, with "
                          "a warning, and --max_grad_norm clips the raw gradients)", choices=UPDATE_RULES)
    update_options: Any = _f("{}", 'JSON object of the rule\'s options, e.g. \'{"moments": "none"}\' (LoRA-Pro light)')
    loraplus_lr_ratio: Optional[float] = _f(None, "LoRA+: B (and 1-D adapter vectors) train at lr x this ratio")
    max_seq_len: int = _f(128, "tokens per example")
    overlength: str = _f("truncate", "what to do with longer examples", choices=("truncate", "filter"))
    epochs: int = _f(1, "passes over the training set (when --max_steps <= 0)")
    max_steps: int = _f(120, "optimizer steps (<= 0: run --epochs)")
    batch_size: int = _f(16, "global batch size (samples per optimizer step)")
    micro_batch_size: int = _f(8, "per-rank micro-batch")
    lr: float = _f(2e-3, "peak learning rate")
    warmup_ratio: float = _f(0.03, "fraction of the steps spent in linear warm-up")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping")
    bf16: bool = _f(False, "train in bfloat16")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass")
    eval_size: int = _f(64, "held-out examples")
    eval_every: int = _f(40, "steps between held-out evaluations")
    eval_generate: int = _f(16, "held-out prompts scored by greedy generation (math)")
    save_every: int = _f(40, "steps between checkpoints")
    output_dir: str = _f("outputs/run", "metrics, checkpoints, final.json and the adapter go here")
    resume: bool = _f(False, "continue from output_dir's latest checkpoint")
    overwrite_output_dir: bool = _f(False, "replace a previous run in output_dir (its checkpoints, metrics, adapter)")
    seed: int = _f(0, "global seed")
    num_proc: Optional[int] = _f(None, "tokenizer processes")
    given = frozenset()  # not a field: the names set by --config or the command line (parse_args fills it)

    def __post_init__(self):
        for key in ("r", "init_samples", "max_seq_len", "batch_size", "micro_batch_size", "eval_every", "save_every"):
            if getattr(self, key) is None or getattr(self, key) <= 0:
                raise ConfigError(f"--{key} must be positive, got {getattr(self, key)}")
        for key in ("lr", "alpha"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"--{key} must be positive, got {getattr(self, key)}")
        for key in ("eval_size", "eval_generate", "weight_decay", "max_grad_norm"):
            if getattr(self, key) < 0:
                raise ConfigError(f"--{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError(f"--epochs must be positive when --max_steps <= 0, got {self.epochs}")
        if self.resume and self.overwrite_output_dir:
            raise ConfigError("--resume and --overwrite_output_dir contradict each other: pass one")
        for key in ("init_options", "update_options"):
            setattr(self, key, _json_object(key, getattr(self, key)))
        self.init_memory_budget = parse_bytes("init_memory_budget", self.init_memory_budget)

    def adapter_config(self) -> AdapterConfig:
        """The AdapterConfig these flags describe; its constructor checks the kind/init pair and init_options."""
        targets = "all-linear" if self.target_modules == "all-linear" else self.target_modules.split(",")
        rule = "".join(f" --{k} {v}" for k, v in self.rule_flags().items() if v not in (None, "plain", {}))
        try:
            return self._adapter_config(targets)
        except ConfigError as e:
            raise ConfigError(f"--adapter {self.adapter} --init {self.init}{rule}: {e}") from None

    def rule_flags(self) -> dict:
        """The update-rule flags, named as the AdapterConfig fields they set."""
        return {"update_rule": self.update_rule, "update_options": self.update_options,
                "loraplus_lr_ratio": self.loraplus_lr_ratio}

    def _adapter_config(self, targets) -> AdapterConfig:
        return AdapterConfig(kind=self.adapter, init=None if self.adapter == "none" else self.init, r=self.r,
                             alpha=self.alpha, use_rslora=self.use_rslora, dropout=self.dropout,
                             target_modules=targets, init_options=dict(self.init_options),
                             init_samples=self.init_samples, seed=self.seed, update_rule=self.update_rule,
                             update_options=dict(self.update_options), loraplus_lr_ratio=self.loraplus_lr_ratio)


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
               "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(key: str, value) -> Optional[int]:
    """A byte count from an int, or a string: a number with an optional unit (B, KB, MB, GB, TB
    decimal; KiB, MiB, GiB, TiB binary), e.g. "40GiB" = 40·2³⁰. None stays None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "auto")):
        return None
    text = str(value).strip().replace("_", "")
    num = text.rstrip("BbKkMmGgTtIi ")
    unit = text[len(num):].strip().lower()
    try:
        n = float(num) * _BYTE_UNITS[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"--{key} must be bytes, optionally with a unit (e.g. 40GiB, 500MB), got {value!r}") from None
    if not n >= 1 or n != n or n == float("inf"):
        raise ConfigError(f"--{key} must be at least 1 byte, got {value!r}")
    return int(n)


def _json_object(key: str, value) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--{key} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--{key} must be a JSON object, got {value!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a ConfigError the job prints once, instead of usage + exit on every rank
        raise ConfigError(f"{message} (see --help)")


def _parser(description: str) -> argparse.ArgumentParser:
    p = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML or JSON file of flag values (flags given here override it)")
    for f in dataclasses.fields(TrainConfig):
        names = [f"--{f.name}"] + (["--deepspeed_config"] if f.name == "ds_config" else [])
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.type == "bool":
            p.add_argument(*names, dest=f.name, action="store_true", help=help_text)
            continue
        kind = {"int": int, "float": float, "Optional[int]": int, "Optional[float]": float}.get(f.type, str)
        p.add_argument(*names, dest=f.name, type=kind, choices=f.metadata.get("choices"), help=help_text)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def load_config_file(path: str) -> dict:
    """Flag values from a YAML (.yaml/.yml) or JSON file: a mapping of TrainConfig field names."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as e:
        raise ConfigError(f"--config {path!r} cannot be parsed: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path!r} must hold a mapping of flag names to values")
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"--config {path!r} has unknown keys {unknown}; known: {sorted(known)}")
    return values


def parse_args(argv=None, description: str = "") -> TrainConfig:
    """TrainConfig from defaults < `--config` file < command-line flags."""
    ns = vars(_parser(description).parse_args(argv))
    ns.pop("local_rank", None)
    values = load_config_file(ns.pop("config")) if "config" in ns else {}
    values.update(ns)
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:  # a value of the wrong type from the config file
        raise ConfigError(f"--config: {e}") from None
    cfg.given = frozenset(values)  # what was set explicitly (a resume checks these against the checkpoint)
    return cfg
