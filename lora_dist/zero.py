"""ZeRO-3 helpers: one code path for plain tensors and for DeepSpeed-partitioned parameters.

Facts these rely on (checked on this machine, see shared/design/zero3-facts.md):
- a partitioned parameter has `.shape == (0,)`; its true shape is `ds_shape`;
- `GatheredParameters(ps, modifier_rank=k)` broadcasts rank k's edits on exit; with
  `modifier_rank=None` edits are dropped;
- after `deepspeed.initialize`, a trainable parameter has two copies: the working copy that forward
  reads and the fp32 master in the optimizer. Writing one alone is undone or ignored, so
  `write_trainable` writes both.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (it carries a `ds_id`)."""
    return hasattr(p, "ds_id")


def full_shape(p: torch.Tensor) -> torch.Size:
    return torch.Size(p.ds_shape) if is_partitioned(p) else p.shape


def full_numel(p: torch.Tensor) -> int:
    return int(p.ds_numel) if is_partitioned(p) else p.numel()


def unwrap_engine(model_or_engine):
    """(module, engine-or-None). Accepts a DeepSpeedEngine or a plain nn.Module."""
    from deepspeed import DeepSpeedEngine  # a hard dependency: a broken install must show, not pass
    if isinstance(model_or_engine, DeepSpeedEngine):
        return model_or_engine.module, model_or_engine
    return model_or_engine, None


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def gathered(params: Sequence[torch.Tensor], modifier_rank: Optional[int] = None):
    """Full parameters inside the block; a no-op for unpartitioned tensors.

    With `modifier_rank=k`, rank k's in-place edits are kept (broadcast and re-partitioned on exit).
    Collective when any parameter is partitioned: every rank must enter with the same list.
    """
    zero = [p for p in params if is_partitioned(p)]
    if not zero:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(zero, modifier_rank=modifier_rank):
        yield


def has_master_copy(p: torch.Tensor) -> bool:
    """True once an optimizer holds an fp32 master of `p` (ZeRO-3, or ZeRO-1/2 and bf16)."""
    if not p.requires_grad:
        return False
    return hasattr(p, "_z3_optimizer") or hasattr(p, "_hp_mapping")


def write_params(values: dict, src_rank: int = 0) -> None:
    """Set parameters to full values, keeping working copy and fp32 master in step.

    `values` maps parameter -> full tensor. For partitioned parameters the values need only be valid
    on `src_rank` for the working copy, but the fp32 master is written from each rank's own `value`
    (DeepSpeed's `safe_set_full_fp32_param` slices it locally), so pass the same values on every rank.
    Collective under ZeRO-3: all ranks call it with the same parameters in the same order.
    """
    params = list(values)
    with gathered(params, modifier_rank=src_rank):
        if not any(is_partitioned(p) for p in params) or rank() == src_rank:
            with torch.no_grad():
                for p, v in values.items():
                    p.data.copy_(v.reshape(full_shape(p)).to(p.dtype))
    masters = [p for p in params if has_master_copy(p)]
    if masters:
        from deepspeed.utils import safe_set_full_fp32_param
        for p in masters:
            v = values[p].reshape(full_shape(p)).to(device=_master_device(p), dtype=torch.float32)
            if hasattr(p, "_z3_optimizer"):
                _set_z3_master(p, v)
            else:
                safe_set_full_fp32_param(p, v)


def _set_z3_master(p: torch.Tensor, value: torch.Tensor) -> None:
    """Write this rank's slice of the full `value` into `p`'s ZeRO-3 fp32 master partition.

    Rank k's partition holds flat elements [k·n, (k+1)·n), n = ⌈numel/N⌉, zero-padded past numel.
    DeepSpeed 0.19.8's set_full_hp_param narrows the unpadded value at k·n for n elements, which
    overruns on the last rank whenever N does not divide numel (e.g. r = 4 adapters on 3 ranks);
    here the slice is clipped and the padding set to zero, as ZeRO-3's own partitioning leaves it.
    """
    opt = p._z3_optimizer
    part, group_idx = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False)
    n = part.numel()
    k = opt._get_param_partition_rank(p)
    mine = value.reshape(-1)[k * n: (k + 1) * n]
    with torch.no_grad():
        part[: mine.numel()].copy_(mine)
        part[mine.numel():].zero_()
    if opt._swappable_optimizer_subgroup(group_idx):  # NVMe/CPU-swapped optimizer states: write back
        opt._optimizer_states_and_gradient_swap_out(group_idx)


def _master_device(p):
    """Device of `p`'s fp32 master partition (CPU under optimizer offload), else of its data.

    No exception is caught: `_get_fp32_opt_state_partition` fails (KeyError) only for a trainable
    parameter the optimizer does not hold, and `safe_set_full_fp32_param` would fail on it next.
    """
    opt = getattr(p, "_z3_optimizer", None)
    if opt is not None:
        part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False)
        return part.device
    return p.device if not is_partitioned(p) else p.ds_tensor.device


def read_full(params: Iterable[torch.Tensor]) -> list:
    """Full CPU copies of the given parameters, on every rank (collective under ZeRO-3)."""
    params = list(params)
    with gathered(params):
        return [p.detach().to("cpu", copy=True).reshape(full_shape(p)) for p in params]
