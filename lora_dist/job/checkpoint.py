"""Crash-safe training checkpoints around DeepSpeed's `save_checkpoint`.

Layout under `<output_dir>/checkpoints/`:
    step<N>/            DeepSpeed's per-rank model/optimizer shards (frozen parameters excluded),
    step<N>/adapter/    a PEFT adapter export of that step (+ our exact state, used to resume inits
                        that rewrote W, since the frozen base is not in the DeepSpeed shards),
    step<N>/rng_rank<r>.pt   each rank's RNG states,
    latest              the tag of the newest complete checkpoint, written last and atomically.
A run killed at any point, mid-save included, leaves `latest` naming a complete checkpoint.
"""
from __future__ import annotations

import os
import random
from typing import Optional

import torch
import torch.distributed as dist

from ..export import save_adapter
from ..zero import rank, world_size

LATEST = "latest"


def _barrier():
    if world_size() > 1:
        dist.barrier()


def latest_tag(ckpt_dir: str) -> Optional[str]:
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag or None


def save(engine, ckpt_dir: str, step: int, client_state: dict, with_adapter: bool) -> str:
    """Save a checkpoint of `engine` at `step` (collective); returns the tag."""
    tag = f"step{step}"
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=with_adapter)
    if with_adapter:
        save_adapter(engine, os.path.join(ckpt_dir, tag, "adapter"))
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()},
               os.path.join(ckpt_dir, tag, f"rng_rank{rank()}.pt"))
    _barrier()
    if rank() == 0:  # only now is the checkpoint complete: point `latest` at it, atomically
        tmp = os.path.join(ckpt_dir, f".{LATEST}.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(ckpt_dir, LATEST))
    _barrier()
    return tag


def load(engine, ckpt_dir: str, tag: str) -> dict:
    """Restore engine state, RNG states and return the client state (collective)."""
    path, client = engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag!r} from {ckpt_dir!r}")
    rng = os.path.join(ckpt_dir, tag, f"rng_rank{rank()}.pt")
    if os.path.isfile(rng):
        state = torch.load(rng, weights_only=True)
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
    return client or {}
