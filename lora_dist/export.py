"""Save, load and merge adapters.

`save_adapter` writes a stock PEFT LoRA directory (adapter_config.json + adapter_model.safetensors,
PEFT key names) plus our own exact state (lora_dist_config.json + lora_dist_adapter.safetensors).
Every kind becomes something stock PEFT loads with the same logits:
- lora, lora_fa: native LoRA; dora: native LoRA with use_dora;
- lora_xs, vera, tied_lora: the exactly equivalent plain rank-r LoRA (B', A', s') (see
  `AdapterLinear.plain_factors`);
- an init that rewrote W (W = W0 − s·B0·A0) is written against the original W0 as the rank-2r LoRA
  [B | −B0]·[A; A0] at the same scale, like PEFT's `path_initial_model_for_weight_conversion`.
PEFT's scale is lora_alpha/r; we write lora_alpha = s'·r' per module (rank_pattern/alpha_pattern
where modules differ) and use_rslora = false, which is the same number whatever produced s'.

Only adapter parameters are gathered (one layer at a time under ZeRO-3), never the full model.
`save_adapter` never deletes what it did not write: the target is a new or empty directory or a
previous adapter's, anything else is refused. Rank 0 writes the files into a staging folder and
renames them into place, configs last: a crash leaves no half adapter.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from typing import Optional

import torch

from .adapters import AdapterLinear, adapter_modules, merge_module
from .comm import Comm
from .config import AdapterConfig, ConfigError
from .zero import gathered, is_partitioned, rank, unwrap_engine, write_params

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
OUR_CONFIG = "lora_dist_config.json"
OUR_WEIGHTS = "lora_dist_adapter.safetensors"
OWN_FILES = (PEFT_CONFIG, PEFT_WEIGHTS, OUR_CONFIG, OUR_WEIGHTS)  # all that save_adapter writes
STAGING = ".lora_dist_staging"  # prefix of save_adapter's temporary folder inside the target


def _model_name(module) -> Optional[str]:
    cfg = getattr(module, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(module, "name_or_path", None)
    return name or None


def _task_type(module) -> Optional[str]:
    cls = type(module).__name__
    if cls.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


def _module_state(m: AdapterLinear) -> dict:
    """Full CPU copies of one module's adapter tensors (collective under ZeRO-3)."""
    params = m.adapter_params()
    with gathered(list(params.values())):
        out = {k: p.detach().to("cpu", copy=True) for k, p in params.items()}
        if m.kind == "dora":
            peft = {"lora_A.weight": out["lora_A"], "lora_B.weight": out["lora_B"],
                    "lora_magnitude_vector": out["lora_magnitude"]}
            scale = m.scaling
        else:
            B, A, scale = m.plain_factors()
            B, A = B.detach().to("cpu", torch.float32), A.detach().to("cpu", torch.float32)
            if m.init_factors is not None:
                B0, A0 = (t.to("cpu", torch.float32) for t in m.init_factors)
                B, A = torch.cat([B, -B0], dim=1), torch.cat([A, A0], dim=0)
            peft = {"lora_A.weight": A.contiguous(), "lora_B.weight": B.contiguous()}
    if m.init_factors is not None:
        out["init_B0"], out["init_A0"] = (t.detach().cpu() for t in m.init_factors)
    return {"ours": out, "peft": peft, "scale": float(scale), "rank": peft["lora_A.weight"].shape[0]}


def _refusal(path: str) -> Optional[str]:
    """Why `path` cannot receive an adapter (None if it can): it must be new, an empty directory,
    or a directory holding only files `save_adapter` writes (a previous adapter, a crashed save)."""
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        return (f"save_adapter: {path!r} exists and is not a directory; give a new or empty directory "
                "(nothing was written)")
    foreign = sorted(e for e in os.listdir(path) if e not in OWN_FILES and not e.startswith(STAGING))
    if foreign:
        shown = foreign[:8] + (["..."] if len(foreign) > 8 else [])
        return (f"save_adapter: {path!r} holds files that are not a lora_dist adapter's: {shown}; save into a "
                "new or empty directory, or one holding only a previous adapter (nothing was written)")
    return None


def _gather_state(mods, config: AdapterConfig, writer: bool):
    """(our tensors, PEFT tensors, rank per module, alpha per module) as full CPU copies on the
    writer; the other ranks only take part in each layer's gather and return empty dicts
    (collective). At 70B (LoRA r=16 on every linear layer: 207M parameters, 0.83 GB in float32,
    plus the PEFT copy: up to 1.7 GB) this host memory is taken on rank 0 alone, not on each of
    the 8 ranks of every node."""
    ours, peft, ranks, alphas = {}, {}, {}, {}
    for name, m in mods:
        if not writer:
            with gathered(list(m.adapter_params().values())):
                continue
        st = _module_state(m)
        for k, v in st["ours"].items():
            ours[f"{name}.{k}"] = v
        for k, v in st["peft"].items():
            peft[f"base_model.model.{name}.{k}"] = v
        ranks[name] = st["rank"]
        alphas[name] = st["scale"] * st["rank"]
    if writer and config.kind == "vera":  # one frozen pair shared by every layer: stored once
        ours["vera.A"], ours["vera.B"] = mods[0][1].vera_A.cpu().clone(), mods[0][1].vera_B.cpu().clone()
    return ours, peft, ranks, alphas


def _configs(module, mods, config: AdapterConfig, ranks: dict, alphas: dict, name_or_path) -> tuple:
    """adapter_config.json (PEFT) and lora_dist_config.json contents.

    PEFT's per-module scale is alpha/r: the most common (r, alpha) pair is the default and the others
    go into rank_pattern / alpha_pattern (regexes of the exact module names)."""
    r0, a0 = Counter(zip(ranks.values(), alphas.values())).most_common(1)[0][0]
    peft_cfg = {
        "peft_type": "LORA", "task_type": _task_type(module),
        "base_model_name_or_path": name_or_path, "r": int(r0), "lora_alpha": float(a0),
        "target_modules": [n for n, _ in mods], "lora_dropout": float(config.dropout),
        "use_rslora": False, "use_dora": config.kind == "dora", "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {re.escape(n): int(r) for n, r in ranks.items() if r != r0},
        "alpha_pattern": {re.escape(n): float(a) for n, a in alphas.items() if (ranks[n], a) != (r0, a0)},
    }
    ours_cfg = {
        "format": 1, "config": config.to_dict(),
        "modules": {n: [m.out_features, m.in_features] for n, m in mods},
        "base_model": {"class": type(module).__name__, "name_or_path": name_or_path},
        "base_rewritten": any(m.init_factors is not None for _, m in mods),
    }
    return peft_cfg, ours_cfg


def _write_files(path: str, contents: dict) -> None:
    """Write {file name: writer(target path)} into `path`, crash-safe, touching no other entry.

    Every file is written and fsynced in a staging folder first. Then the two config files (which
    make the directory an adapter for PEFT and for us) are removed, the weights renamed into place,
    and the configs renamed last, ours the very last. A crash at any point leaves the old adapter,
    a directory that neither PEFT nor `load_adapter` takes for an adapter, or the new adapter; never
    new weights under an old config."""
    os.makedirs(path, exist_ok=True)
    for e in os.listdir(path):  # staging left by a crashed save of ours
        if e.startswith(STAGING):
            shutil.rmtree(os.path.join(path, e), ignore_errors=True)
    stage = os.path.join(path, f"{STAGING}{os.getpid()}")
    os.makedirs(stage)
    for name, write in contents.items():
        write(os.path.join(stage, name))
        with open(os.path.join(stage, name), "rb") as f:
            os.fsync(f.fileno())
    for name in (PEFT_CONFIG, OUR_CONFIG):
        if os.path.lexists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    for name in (PEFT_WEIGHTS, OUR_WEIGHTS, PEFT_CONFIG, OUR_CONFIG):
        os.replace(os.path.join(stage, name), os.path.join(path, name))
    os.rmdir(stage)


def _json_writer(obj):
    def write(target):
        with open(target, "w") as f:
            json.dump(obj, f, indent=2)
    return write


def save_adapter(model_or_engine, path: str, base_model_name_or_path: Optional[str] = None) -> None:
    """Write the adapters of `model_or_engine` to `path` (collective; rank 0 writes).

    `path` must be new, an empty directory, or a previous adapter's directory (its four files are
    replaced); anything else raises ConfigError on every rank before any parameter is gathered.
    """
    from safetensors.torch import save_file

    module, _ = unwrap_engine(model_or_engine)
    mods = adapter_modules(module)
    config: Optional[AdapterConfig] = getattr(module, "lora_dist_config", None)
    if not mods or config is None:
        raise ConfigError("save_adapter: the model has no adapters (call inject_adapters first)")
    if any(m.merged for _, m in mods):
        raise ConfigError("save_adapter: the adapters were merged into the base weights; save before merging")
    if any(m.needs_init for _, m in mods):
        raise ConfigError("save_adapter: initialize_adapters has not run for this config's init "
                          f"{config.init!r}; the adapters hold no trained or initialized values")
    comm = Comm()
    # rank 0 alone looks at the (possibly shared) file system, and decides for every rank
    comm.raise_from_rank0(_refusal(path) if comm.rank == 0 else None, ConfigError)
    ours, peft, ranks, alphas = _gather_state(mods, config, writer=comm.rank == 0)
    failed = None
    if comm.rank == 0:
        name_or_path = base_model_name_or_path or _model_name(module)
        peft_cfg, ours_cfg = _configs(module, mods, config, ranks, alphas, name_or_path)
        try:
            _write_files(path, {
                PEFT_CONFIG: _json_writer(peft_cfg), OUR_CONFIG: _json_writer(ours_cfg),
                PEFT_WEIGHTS: lambda t: save_file({k: v.contiguous() for k, v in peft.items()}, t),
                OUR_WEIGHTS: lambda t: save_file({k: v.contiguous() for k, v in ours.items()}, t),
            })
        except OSError as e:  # disk full, no permission...: every rank must hear of it, not wait
            failed = f"save_adapter: writing the adapter to {path!r} failed: {e}"
    # also the barrier: the adapter is complete on disk when any rank returns
    comm.raise_if_any(failed, ConfigError)


def read_adapter_config(path: str) -> dict:
    f = os.path.join(path, OUR_CONFIG)
    if not os.path.isfile(f):
        raise ConfigError(f"load_adapter: {path!r} has no {OUR_CONFIG} (not a lora_dist adapter directory)")
    with open(f) as fh:
        return json.load(fh)


def load_adapter(model_or_engine, path: str) -> list:
    """Restore adapters saved by `save_adapter` (collective).

    On a model without adapters, the saved config is injected first (before deepspeed.initialize);
    on a model with adapters, the saved config must match. An init that rewrote W is re-applied to
    a fresh base (W ← W0 − s·B0·A0), so the result equals the saved model exactly. Reads safetensors
    only. Returns the adapted module names.
    """
    from safetensors.torch import load_file
    from .inject import inject_adapters

    module, engine = unwrap_engine(model_or_engine)
    meta = read_adapter_config(path)
    config = AdapterConfig.from_dict(meta["config"])
    cls = meta["base_model"]["class"]
    if cls != type(module).__name__:
        raise ConfigError(f"load_adapter: adapter in {path!r} was saved on a {cls}, "
                          f"this model is a {type(module).__name__}")
    saved = meta["modules"]
    for n, (o, i) in saved.items():  # checked before anything is injected or written
        try:
            lin = module.get_submodule(n)
        except AttributeError:
            raise ConfigError(f"load_adapter: the adapter targets {n!r}, which this model does not have "
                              f"(a different base model?)") from None
        if (lin.out_features, lin.in_features) != (o, i):
            raise ConfigError(f"load_adapter: module {n!r} is {lin.in_features}->{lin.out_features} in the "
                              f"model but {i}->{o} in the adapter (a different base model?)")
    fresh = not adapter_modules(module)
    if fresh:
        if engine is not None:
            raise ConfigError("load_adapter: the engine has no adapters; inject_adapters (or load_adapter) "
                              "must run before deepspeed.initialize")
        inject_adapters(module, config)
    else:
        have = getattr(module, "lora_dist_config", None)
        mismatch = [k for k in ("kind", "r", "alpha", "use_rslora")
                    if have is None or getattr(have, k) != getattr(config, k)]
        if mismatch:
            raise ConfigError(f"load_adapter: the model's adapters differ from the saved ones in {mismatch} "
                              f"(saved {[getattr(config, k) for k in mismatch]})")
    mods = dict(adapter_modules(module))
    if set(saved) != set(mods):
        missing, extra = sorted(set(saved) - set(mods)), sorted(set(mods) - set(saved))
        raise ConfigError(f"load_adapter: adapted modules differ; in the file only: {missing[:5]}, "
                          f"in the model only: {extra[:5]}")
    tensors = load_file(os.path.join(path, OUR_WEIGHTS))
    for n, m in mods.items():
        values = {}
        for k, p in m.adapter_params().items():
            key = f"{n}.{k}"
            if key not in tensors:
                raise ConfigError(f"load_adapter: {path!r} lacks tensor {key!r}")
            values[p] = tensors[key]
        if m.kind == "vera":
            m.vera_A.copy_(tensors["vera.A"])
            m.vera_B.copy_(tensors["vera.B"])
        if f"{n}.init_B0" in tensors:
            B0, A0 = tensors[f"{n}.init_B0"], tensors[f"{n}.init_A0"]
            if fresh or m.needs_init:
                rewrite_base(m, -m.scaling * (B0.double() @ A0.double()))
            elif m.init_factors is None or not all(torch.equal(a.cpu(), b) for a, b in zip(m.init_factors, (B0, A0))):
                raise ConfigError(f"load_adapter: module {n!r}'s base weight was rewritten by a different init "
                                  "than the saved adapter's; load onto the original base model instead")
            m.init_factors = (B0, A0)
        write_params(values)
        m.needs_init = False
    return list(mods)


def rewrite_base(m: AdapterLinear, delta: torch.Tensor, owner: int = 0) -> None:
    """W ← W + delta for one layer, computed in float64 and cast once (collective under ZeRO-3).

    Only `owner`'s delta is used."""
    with gathered([m.weight], modifier_rank=owner):
        if not is_partitioned(m.weight) or rank() == owner:
            with torch.no_grad():
                m.weight.data.copy_((m.weight.double() + delta.to(m.weight.device)).to(m.weight.dtype))


def merge_adapters(model_or_engine) -> list:
    """Merge every adapter into its base weight in place, exactly, for every kind (collective).

    After merging the wrappers compute the base layer only. Under ZeRO-3 each layer is gathered with
    the owner rank 0 as modifier and re-partitioned, one layer at a time; this works after
    deepspeed.initialize too (frozen base weights have no optimizer master to keep in step).
    """
    module, _ = unwrap_engine(model_or_engine)
    mods = adapter_modules(module)
    if not mods:
        raise ConfigError("merge_adapters: the model has no adapters")
    for _, m in mods:
        merge_module(m)
    return [n for n, _ in mods]
