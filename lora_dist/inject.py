"""`inject_adapters`: find the target linear layers and wrap them in place."""
from __future__ import annotations

import fnmatch
from typing import List

import torch
import torch.nn as nn

from .adapters import (AdapterLinear, DoRALinear, LoRALinear, LoRAXSLinear, TiedLoRALinear,
                       VeRALinear, gaussian_A, generator_for, kaiming_A)
from .config import AdapterConfig, ConfigError, torch_dtype
from .zero import unwrap_engine


def _matches(name: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)
    return name == pattern or name.endswith("." + pattern)


def _output_head_names(model: nn.Module) -> set:
    names = set()
    head = None
    if hasattr(model, "get_output_embeddings"):
        try:
            head = model.get_output_embeddings()
        except NotImplementedError:
            # transformers' convention for "this model has no output embeddings": its own
            # get_output_embeddings returns None then, but a model may override it and raise
            # NotImplementedError (as get_input_embeddings does); then the name check below decides.
            head = None
    for n, m in model.named_modules():
        if head is not None and m is head:
            names.add(n)
        elif n.split(".")[-1] in ("lm_head", "classifier", "score") and isinstance(m, nn.Linear):
            names.add(n)
    return names


def linear_module_names(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, AdapterLinear)]


def _describe_linears(names: List[str], limit: int = 12) -> str:
    leaves = sorted({n.split(".")[-1] for n in names})
    shown = ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")
    return f"linear module names: {leaves}; e.g. {shown}"


def select_targets(model: nn.Module, config: AdapterConfig) -> List[str]:
    """Qualified names of the linear layers to adapt; a pattern that matches nothing is an error."""
    linears = linear_module_names(model)
    if not linears:
        raise ConfigError("the model has no nn.Linear modules to adapt")
    if config.target_modules == "all-linear":
        heads = _output_head_names(model)
        chosen = [n for n in linears if n not in heads]
    else:
        chosen = []
        all_names = dict(model.named_modules())
        for pat in config.target_modules:
            hit = [n for n in linears if _matches(n, pat)]
            if not hit:
                non_linear = [n for n in all_names if n and _matches(n, pat)]
                extra = (f" (it matches {non_linear[:4]}, which are not nn.Linear)" if non_linear else "")
                raise ConfigError(f"target_modules pattern {pat!r} matches no linear module{extra}; "
                                  f"{_describe_linears(linears)}")
            chosen.extend(h for h in hit if h not in chosen)
        chosen = [n for n in linears if n in set(chosen)]  # model order
    for pat in config.exclude_modules:
        if not any(_matches(n, pat) for n in linears):
            raise ConfigError(f"exclude_modules pattern {pat!r} matches no linear module; {_describe_linears(linears)}")
        chosen = [n for n in chosen if not _matches(n, pat)]
    if not chosen:
        raise ConfigError("target_modules and exclude_modules leave no module to adapt")
    return chosen


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def inject_adapters(model: nn.Module, config: AdapterConfig) -> List[str]:
    """Wrap the target linear layers of `model` in place; freeze every other parameter.

    Works on a plain model, a meta-device model, and a model built under `deepspeed.zero.Init`
    (parameters of shape (0,)): sizes come from the layer's in/out features. Call it before
    `deepspeed.initialize`, which turns the new adapter parameters into ZeRO parameters. Returns the
    qualified names of the adapted layers. With kind "none" nothing is wrapped and every parameter
    trains (full fine-tuning baseline); the list is empty.
    """
    config.validate()
    module, engine = unwrap_engine(model)
    if engine is not None:
        raise ConfigError("inject_adapters must run before deepspeed.initialize (it was given a "
                          "DeepSpeedEngine): the optimizer is built from the parameters that exist then")
    if any(isinstance(m, AdapterLinear) for m in module.modules()):
        raise ConfigError("inject_adapters: the model already has adapters")
    if config.kind == "none":
        for p in module.parameters():
            p.requires_grad_(True)
        return []
    targets = select_targets(module, config)
    layers = {n: module.get_submodule(n) for n in targets}
    r = config.r
    for n, lin in layers.items():
        if r > min(lin.in_features, lin.out_features):
            raise ConfigError(f"AdapterConfig.r={r} is larger than min(d_in, d_out) = "
                              f"{min(lin.in_features, lin.out_features)} of module {n!r} "
                              f"({lin.in_features}->{lin.out_features})")
    for p in module.parameters():
        p.requires_grad_(False)

    dtype = torch_dtype(config.adapter_dtype)
    s = config.scaling
    shared = _shared_factors(config, layers, dtype)
    for n, lin in layers.items():
        new = _wrap(n, lin, config, s, dtype, shared)
        new.needs_init = config.needs_initialize
        _set_submodule(module, n, new)
    module.lora_dist_config = config  # what export and initialize_adapters read back
    return targets


def _init_A(config: AdapterConfig, name: str, d_in: int) -> torch.Tensor:
    g = generator_for(config.seed, name)
    return gaussian_A(config.r, d_in, g) if config.init == "gaussian" else kaiming_A(config.r, d_in, g)


def _shared_factors(config, layers, dtype):
    """Factors shared across layers: VeRA's frozen pair, Tied-LoRA's pair per module type."""
    any_lin = next(iter(layers.values()))
    dev = any_lin.weight.device
    dt = dtype or any_lin.weight.dtype
    meta = dev.type == "meta"
    if config.kind == "vera":
        d_in = max(l.in_features for l in layers.values())
        d_out = max(l.out_features for l in layers.values())
        g = generator_for(config.seed, "vera")
        A = torch.empty(config.r, d_in) if meta else kaiming_A(config.r, d_in, g)
        # B is (max d_out × r), Kaiming-uniform with fan_in = r, as PEFT's VeRA draws it.
        B = torch.empty(d_out, config.r) if meta else kaiming_A(d_out, config.r, g)
        return {"A": A.to(device=dev, dtype=dt), "B": B.to(device=dev, dtype=dt)}
    if config.kind == "tied_lora":
        pairs = {}
        for n, lin in layers.items():
            leaf = n.split(".")[-1]
            if leaf in pairs:
                A, B = pairs[leaf]
                if A.shape[1] != lin.in_features or B.shape[0] != lin.out_features:
                    raise ConfigError(f"tied_lora ties every {leaf!r} layer, but {n!r} is "
                                      f"{lin.in_features}->{lin.out_features} while others are "
                                      f"{A.shape[1]}->{B.shape[0]}; exclude it or use kind 'lora'")
                continue
            A0 = torch.empty(config.r, lin.in_features) if meta else _init_A(config, "tied:" + leaf, lin.in_features)
            A = nn.Parameter(A0.to(device=dev, dtype=dt), requires_grad="A" in config.tied_trainable)
            B = nn.Parameter(torch.zeros(lin.out_features, config.r, device=dev, dtype=dt),
                             requires_grad="B" in config.tied_trainable)
            pairs[leaf] = (A, B)
        return pairs
    return None


def _wrap(name, lin, config, s, dtype, shared) -> AdapterLinear:
    p = config.dropout
    kind = config.kind
    meta = lin.weight.device.type == "meta"
    if kind in ("lora", "lora_fa", "dora"):
        A0 = None if meta or config.needs_initialize else _init_A(config, name, lin.in_features)
        if kind == "dora":
            return DoRALinear(lin, name, config.r, s, p, dtype, A0)
        return LoRALinear(lin, name, config.r, s, p, dtype, A0, freeze_A=(kind == "lora_fa"))
    if kind == "lora_xs":
        return LoRAXSLinear(lin, name, config.r, s, p, dtype)
    if kind == "vera":
        return VeRALinear(lin, name, config.r, p, dtype, shared["A"], shared["B"], config.vera_d_initial)
    if kind == "tied_lora":
        A, B = shared[name.split(".")[-1]]
        return TiedLoRALinear(lin, name, config.r, s, p, dtype, A, B, config.tied_trainable)
    raise ConfigError(f"unknown kind {kind!r}")
