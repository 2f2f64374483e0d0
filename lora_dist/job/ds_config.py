"""DeepSpeed JSON configs: load with clear errors, validate, and fill "auto" values from flags.

"auto" is filled as the HF Trainer fills it:

=================================================  ==================================================
config key                                         filled from
=================================================  ==================================================
train_batch_size                                   micro batch x gradient accumulation x world size
train_micro_batch_size_per_gpu                     micro_batch_size (or derived from the other two)
gradient_accumulation_steps                        gradient_accumulation_steps (or derived)
gradient_clipping                                  gradient_clipping
optimizer.params.lr / weight_decay / betas / eps   lr / weight_decay / betas / eps
scheduler.params.warmup_min_lr                     0
scheduler.params.warmup_max_lr                     lr
scheduler.params.warmup_num_steps                  warmup_steps (at least 1; WarmupCosineLR uses >= 2)
scheduler.params.total_num_steps                   total_steps
bf16.enabled / fp16.enabled                        bf16 / fp16 (fp16 off when not given)
zero_optimization.reduce_bucket_size               hidden_size * hidden_size
zero_optimization.stage3_prefetch_bucket_size      0.9 * hidden_size * hidden_size
zero_optimization.stage3_param_persistence_thr...  10 * hidden_size
=================================================  ==================================================

A value set both in the config (as a number, not "auto") and as an argument must agree; every
disagreement is listed in one DeepSpeedConfigError. An argument left as None means "not given".
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError, DeepSpeedConfigError  # noqa: F401  (re-exported)

AUTO = "auto"
_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest")
_OFFLOAD_DEVICES = ("cpu", "nvme", "none")


def _where(source: str | os.PathLike | None) -> str:
    return f" in {source}" if source else ""


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise DeepSpeedConfigError(f"duplicate key {key!r}")
        out[key] = value
    return out


def load_ds_config(path: str | os.PathLike) -> dict:
    """Parse a DeepSpeed JSON file and validate it (see `validate_ds_config`).

    Invalid JSON raises DeepSpeedConfigError naming the file, line and column and quoting the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DeepSpeedConfigError(f"DeepSpeed config {path} does not exist") from None
    try:
        config = json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as exc:
        lines = text.splitlines()
        line = lines[exc.lineno - 1] if 0 < exc.lineno <= len(lines) else ""
        hint = ""
        if line.lstrip().startswith(("//", "#", "/*")):
            hint = " (JSON has no comments: remove the comment line)"
        elif "'" in line:
            hint = " (JSON strings need double quotes)"
        elif exc.msg.startswith(("Expecting property name", "Expecting value")) and line.strip() in ("}", "]", ""):
            hint = " (is there a trailing comma on the line before?)"
        raise DeepSpeedConfigError(
            f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}{hint}\n"
            f"    {line}\n    {' ' * (exc.colno - 1)}^"
        ) from None
    except DeepSpeedConfigError as exc:
        raise DeepSpeedConfigError(f"{path}: {exc}") from None
    validate_ds_config(config, source=path)
    return config


def _get(config: dict, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def validate_ds_config(config: Any, source: str | os.PathLike | None = None) -> None:
    """Check the structure lora_dist relies on; raise DeepSpeedConfigError naming the key."""
    where = _where(source)
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"DeepSpeed config{where} must be a JSON object, got {type(config).__name__}")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = config.get(key)
        if value is not None and value != AUTO and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise DeepSpeedConfigError(f"{key}{where} must be a positive integer or \"auto\", got {value!r}")
    clip = config.get("gradient_clipping")
    if clip is not None and clip != AUTO and (not isinstance(clip, (int, float)) or isinstance(clip, bool) or clip < 0):
        raise DeepSpeedConfigError(f"gradient_clipping{where} must be a number >= 0 or \"auto\", got {clip!r}")
    for section in ("optimizer", "scheduler", "zero_optimization", "bf16", "fp16"):
        if section in config and not isinstance(config[section], dict):
            raise DeepSpeedConfigError(f"{section}{where} must be an object, got {config[section]!r}")
    for section in ("optimizer", "scheduler"):
        if section in config:
            if not isinstance(config[section].get("type"), str):
                raise DeepSpeedConfigError(f"{section}.type{where} must be a string naming the {section}")
            if not isinstance(config[section].get("params", {}), dict):
                raise DeepSpeedConfigError(f"{section}.params{where} must be an object")
    sched = _get(config, "scheduler.type")
    if sched is not None and sched not in _SCHEDULERS:
        raise DeepSpeedConfigError(f"scheduler.type{where} is {sched!r}; DeepSpeed has {', '.join(_SCHEDULERS)}")
    stage = _get(config, "zero_optimization.stage", 0)
    if stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"zero_optimization.stage{where} must be 0, 1, 2 or 3, got {stage!r}")
    for offload in ("offload_optimizer", "offload_param"):
        node = _get(config, f"zero_optimization.{offload}")
        if node is None:
            continue
        if not isinstance(node, dict):
            raise DeepSpeedConfigError(f"zero_optimization.{offload}{where} must be an object")
        device = node.get("device", "none")
        if device not in _OFFLOAD_DEVICES:
            raise DeepSpeedConfigError(
                f"zero_optimization.{offload}.device{where} is {device!r}; use one of {', '.join(_OFFLOAD_DEVICES)}"
            )
        if device == "nvme" and not node.get("nvme_path"):
            raise DeepSpeedConfigError(f"zero_optimization.{offload}{where} offloads to nvme but sets no nvme_path")
        if offload == "offload_param" and device != "none" and stage != 3:
            raise DeepSpeedConfigError(
                f"zero_optimization.offload_param{where} needs zero_optimization.stage 3 (it is {stage})"
            )
    if _get(config, "bf16.enabled") is True and _get(config, "fp16.enabled") is True:
        raise DeepSpeedConfigError(f"bf16.enabled and fp16.enabled are both true{where}; enable at most one")


def auto_keys(config: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every value that is "auto" in `config`."""
    found = []
    if isinstance(config, dict):
        for key, value in config.items():
            found += auto_keys(value, f"{prefix}{key}.")
    elif isinstance(config, list):
        for i, value in enumerate(config):
            found += auto_keys(value, f"{prefix}{i}.")
    elif config == AUTO:
        found.append(prefix[:-1])
    return found


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _examples(values: list[int], limit: int = 6) -> str:
    return ", ".join(str(v) for v in values[:limit]) + (", ..." if len(values) > limit else "")


_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def check_batch_flags(batch_size: int, micro_batch_size: int, world_size: int) -> None:
    """Raise ConfigError unless --batch_size = --micro_batch_size x accumulation x world size for a whole
    accumulation count; the message names both flags and values that work."""
    step = micro_batch_size * world_size
    if batch_size % step == 0:
        return
    lower, upper = (batch_size // step) * step, (batch_size // step + 1) * step
    fixes = f"--batch_size {' or '.join(str(v) for v in (lower, upper) if v > 0)}"
    if batch_size % world_size == 0:
        per_rank = batch_size // world_size
        fixes += f", or --micro_batch_size {_examples(_divisors(per_rank))} (divisors of {batch_size} / {world_size})"
    raise ConfigError(
        f"--batch_size {batch_size} is not a multiple of --micro_batch_size {micro_batch_size} x {world_size} "
        f"rank(s) = {step} (a step is micro-batch x accumulation steps x ranks samples): use {fixes}"
    )


def resolve_batch_sizes(train_batch_size: int | None, micro_batch_size: int | None,
                        gradient_accumulation_steps: int | None, world_size: int,
                        source: str | os.PathLike | None = None) -> tuple[int, int, int]:
    """(train_batch_size, micro_batch_size, gradient_accumulation_steps) with
    train_batch_size == micro x accumulation x world_size, deriving unknowns (None) as DeepSpeed does.

    Raises DeepSpeedConfigError that says which value to change when they cannot agree.
    """
    where = _where(source)
    tbs, mbs, gas, w = train_batch_size, micro_batch_size, gradient_accumulation_steps, world_size
    if not isinstance(w, int) or w < 1:
        raise DeepSpeedConfigError(f"world size must be a positive integer, got {w!r}")
    if tbs is not None:
        if tbs % w:
            lower, upper = (tbs // w) * w, (tbs // w + 1) * w
            options = " or ".join(str(v) for v in (lower, upper) if v > 0)
            raise DeepSpeedConfigError(
                f"train_batch_size {tbs}{where} cannot be split evenly over world size {w}: set train_batch_size "
                f"to a multiple of {w} (e.g. {options}) or \"auto\", or run on a world size that divides {tbs} "
                f"({_examples(_divisors(tbs))})"
            )
        per_rank = tbs // w
        if mbs is not None and per_rank % mbs:
            raise DeepSpeedConfigError(
                f"train_micro_batch_size_per_gpu {mbs}{where} does not divide the per-GPU batch {per_rank} "
                f"(train_batch_size {tbs} / world size {w}): set it to one of {_examples(_divisors(per_rank))} "
                f"or \"auto\", or change train_batch_size"
            )
        if gas is not None and per_rank % gas:
            raise DeepSpeedConfigError(
                f"gradient_accumulation_steps {gas}{where} does not divide the per-GPU batch {per_rank} "
                f"(train_batch_size {tbs} / world size {w}): set it to one of {_examples(_divisors(per_rank))} "
                f"or \"auto\""
            )
        if mbs is None and gas is None:
            mbs, gas = per_rank, 1
        elif mbs is None:
            mbs = per_rank // gas
        elif gas is None:
            gas = per_rank // mbs
        if mbs * gas * w != tbs:
            raise DeepSpeedConfigError(
                f"train_batch_size {tbs}{where} != train_micro_batch_size_per_gpu {mbs} x "
                f"gradient_accumulation_steps {gas} x world size {w} = {mbs * gas * w}: set "
                f"gradient_accumulation_steps to {per_rank // mbs} (or \"auto\"), or train_batch_size to "
                f"{mbs * gas * w} (or \"auto\")"
            )
        return tbs, mbs, gas
    mbs = 1 if mbs is None else mbs
    gas = 1 if gas is None else gas
    return mbs * gas * w, mbs, gas


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


class _Filler:
    def __init__(self, config: dict, source: str | os.PathLike | None):
        self.config = config
        self.source = source
        self.mismatches: list[str] = []

    def fill(self, dotted: str, value: Any, flag: str, required: bool = True, must_match: bool = True) -> None:
        """Set `dotted` to `value` if it is "auto"; record a mismatch if it is set to something else."""
        parts = dotted.split(".")
        node = self.config
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                return
        key = parts[-1]
        if key not in node:
            return
        current = node[key]
        if current == AUTO:
            if value is None:
                if required:
                    raise DeepSpeedConfigError(
                        f"{dotted} is \"auto\"{_where(self.source)} but no {flag} was given: pass {flag} or "
                        f"write a value in the config"
                    )
                return
            node[key] = list(value) if isinstance(value, tuple) else value
        elif must_match and value is not None and not _close(current, value):
            self.mismatches.append(f"{dotted} is {current!r} in the config but {flag} is {value!r}")


def fill_auto(
    config: dict,
    *,
    world_size: int,
    train_batch_size: int | None = None,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    betas: Sequence[float] | None = None,
    eps: float | None = None,
    warmup_steps: int | None = None,
    total_steps: int | None = None,
    bf16: bool | None = None,
    fp16: bool | None = None,
    gradient_clipping: float | None = None,
    hidden_size: int | None = None,
    source: str | os.PathLike | None = None,
) -> dict:
    """A copy of `config` with every "auto" replaced (table in the module docstring).

    Raises DeepSpeedConfigError if an "auto" has no value to take, if a config value disagrees with
    a given argument, if the batch sizes cannot match `world_size`, or if any "auto" is left over.
    """
    validate_ds_config(config, source)
    cfg = copy.deepcopy(config)
    filler = _Filler(cfg, source)

    def batch_value(key: str, flag: int | None, flag_name: str) -> int | None:
        value = cfg.get(key)
        if value is None or value == AUTO:
            return flag
        if flag is not None and flag != value:
            filler.mismatches.append(f"{key} is {value!r} in the config but {flag_name} is {flag!r}")
        return value

    tbs = batch_value("train_batch_size", train_batch_size, "train_batch_size (--batch_size)")
    mbs = batch_value("train_micro_batch_size_per_gpu", micro_batch_size, "micro_batch_size (--micro_batch_size)")
    gas = batch_value("gradient_accumulation_steps", gradient_accumulation_steps, "gradient_accumulation_steps")
    if filler.mismatches:
        raise DeepSpeedConfigError(_mismatch_message(filler.mismatches, source))
    if all(cfg.get(k, AUTO) == AUTO for k in _BATCH_KEYS) and tbs is not None and mbs is not None:
        check_batch_flags(tbs, mbs, world_size)  # the sizes are the flags': name them, not the file
    tbs, mbs, gas = resolve_batch_sizes(tbs, mbs, gas, world_size, source)
    cfg["train_batch_size"] = tbs
    cfg["train_micro_batch_size_per_gpu"] = mbs
    cfg["gradient_accumulation_steps"] = gas

    filler.fill("gradient_clipping", gradient_clipping, "gradient_clipping (--max_grad_norm)")
    filler.fill("optimizer.params.lr", lr, "lr (--lr)")
    filler.fill("optimizer.params.weight_decay", weight_decay, "weight_decay (--weight_decay)")
    filler.fill("optimizer.params.betas", tuple(betas) if betas is not None else None, "betas")
    filler.fill("optimizer.params.eps", eps, "eps")
    filler.fill("scheduler.params.warmup_min_lr", 0, "warmup_min_lr", must_match=False)
    filler.fill("scheduler.params.warmup_max_lr", lr, "lr (--lr)")
    if warmup_steps is not None:
        warmup_steps = max(1, int(warmup_steps))  # DeepSpeed's warmup schedulers need at least one step
    filler.fill("scheduler.params.warmup_num_steps", warmup_steps, "warmup_steps (from --warmup_ratio)")
    filler.fill("scheduler.params.total_num_steps", total_steps, "total_steps (from --epochs/--max_steps)")
    filler.fill("bf16.enabled", bf16, "bf16 (--bf16)")
    filler.fill("fp16.enabled", bool(fp16), "fp16 (--fp16)", must_match=fp16 is not None)  # "auto" -> off unless asked
    if hidden_size is not None:
        hidden_size = int(hidden_size)
    h2 = hidden_size * hidden_size if hidden_size else None
    zero = "zero_optimization"
    filler.fill(f"{zero}.reduce_bucket_size", h2, "hidden_size (from the model config)", must_match=False)
    filler.fill(f"{zero}.stage3_prefetch_bucket_size", int(0.9 * h2) if h2 else None,
                "hidden_size (from the model config)", must_match=False)
    filler.fill(f"{zero}.stage3_param_persistence_threshold", 10 * hidden_size if hidden_size else None,
                "hidden_size (from the model config)", must_match=False)
    if filler.mismatches:
        raise DeepSpeedConfigError(_mismatch_message(filler.mismatches, source))
    left = auto_keys(cfg)
    if left:
        raise DeepSpeedConfigError(
            f"lora_dist cannot fill \"auto\" for {', '.join(left)}{_where(source)}: write values for them"
        )
    validate_ds_config(cfg, source)
    return cfg


def _mismatch_message(mismatches: list[str], source: str | os.PathLike | None) -> str:
    lines = "\n".join(f"  - {m}" for m in mismatches)
    return (
        f"DeepSpeed config{_where(source)} disagrees with the training arguments:\n{lines}\n"
        "Set these config values to \"auto\" or make them equal to the arguments."
    )


def warmup_steps_from_ratio(total_steps: int, warmup_ratio: float) -> int:
    """ceil(total_steps * warmup_ratio), as the HF Trainer counts warmup steps."""
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ConfigError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    return math.ceil(total_steps * warmup_ratio)


def prepare_ds_config(path: str | os.PathLike, **kwargs: Any) -> dict:
    """`load_ds_config(path)` then `fill_auto(config, source=path, **kwargs)`."""
    return fill_auto(load_ds_config(path), source=path, **kwargs)


def first_moving_lr(engine, limit: int = 100_000) -> float:
    """The learning rate of the first optimizer step whose LR is nonzero, read from the scheduler
    DeepSpeed built (LoRA-SB's η).

    Step t uses the LR the scheduler set after step t - 1; the first step uses the optimizer's LR at
    initialize time. DeepSpeed's WarmupCosineLR clamps warm-up to >= 2 steps and starts at ratio 0,
    so with a 1-step warm-up η = lr / 2, not lr: read the schedule instead of re-deriving it. The
    scheduler's iteration counter is probed and restored; nothing is stepped.
    """
    lr = float(engine.get_lr()[0])
    sched = engine.lr_scheduler
    if lr > 0 or sched is None:
        return lr
    start = sched.last_batch_iteration
    try:
        for it in range(start + 1, start + 1 + limit):
            sched.last_batch_iteration = it
            lr = float(sched.get_lr()[0])
            if lr > 0:
                return lr
    finally:
        sched.last_batch_iteration = start
    raise ConfigError(f"the DeepSpeed scheduler {type(sched).__name__} keeps the LR at 0 for {limit} steps")
