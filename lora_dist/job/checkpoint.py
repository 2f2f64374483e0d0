"""Crash-safe training checkpoints around DeepSpeed's `save_checkpoint`.

Layout under `<output_dir>/checkpoints/`:
    step<N>/            DeepSpeed's per-rank model/optimizer shards (frozen parameters excluded),
    step<N>/adapter/    a PEFT adapter export of that step (+ our exact state, used to resume inits
                        that rewrote W, since the frozen base is not in the DeepSpeed shards),
    step<N>/rng_rank<r>.pt   each rank's RNG states: torch CPU, every visible CUDA device's (when
                        CUDA is available), numpy's global generator, Python's `random`,
    step<N>/<key>_rank<r>.pt  per-rank state held outside DeepSpeed (`rank_states`, e.g. LoRA-Pro's
                        moments, sharded over the ranks as they are held),
    latest              the tag of the newest complete checkpoint, written last and atomically.
A run killed at any point, mid-save included, leaves `latest` naming a complete checkpoint, and a
resume draws the same random numbers (dropout masks, shuffles) as the uninterrupted run would.
"""
from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch

from ..comm import Comm
from ..errors import DistributedError
from ..export import save_adapter

LATEST = "latest"


def latest_tag(ckpt_dir: str) -> Optional[str]:
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag or None


def rng_state() -> dict:
    """This process's RNG states, as tensors and Python numbers only (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():  # a few bytes per device (seed + offset)
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, where: str) -> None:
    """Restore `rng_state()`'s states. A checkpoint with CUDA states needs the same number of
    visible devices (else dropout would silently draw different masks); one without restores the
    CPU generators only."""
    if "cuda" in state:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have != len(state["cuda"]):
            raise DistributedError(f"{where} holds CUDA RNG states of {len(state['cuda'])} devices, this "
                                   f"process sees {have}: resume with the same devices per process")
        torch.cuda.set_rng_state_all(state["cuda"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def _write_latest(ckpt_dir: str, tag: str) -> None:
    tmp = os.path.join(ckpt_dir, f".{LATEST}.tmp")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, LATEST))


def save(engine, ckpt_dir: str, step: int, client_state: dict, with_adapter: bool,
         rank_states: Optional[dict] = None) -> str:
    """Save a checkpoint of `engine` at `step` (collective); returns the tag. `rank_states`
    ({key: state dict}) are this rank's own states, written as <key>_rank<r>.pt before `latest` moves."""
    comm = Comm()
    tag = f"step{step}"
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=with_adapter)
    if with_adapter:
        save_adapter(engine, os.path.join(ckpt_dir, tag, "adapter"))
    torch.save(rng_state(), os.path.join(ckpt_dir, tag, f"rng_rank{comm.rank}.pt"))
    for key, state in (rank_states or {}).items():
        torch.save(state, rank_state_path(ckpt_dir, tag, key, comm.rank))
    comm.barrier()
    if comm.rank == 0:  # only now is the checkpoint complete: point `latest` at it, atomically
        _write_latest(ckpt_dir, tag)
    comm.barrier()
    return tag


def load(engine, ckpt_dir: str, tag: str) -> dict:
    """Restore engine state and this rank's RNG states; returns the client state (collective)."""
    comm = Comm()
    path, client = engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    rng = os.path.join(ckpt_dir, tag, f"rng_rank{comm.rank}.pt")
    missing = None
    if path is None:
        missing = f"DeepSpeed could not load checkpoint {tag!r} from {ckpt_dir!r}"
    elif not os.path.isfile(rng):
        missing = f"checkpoint {tag!r} in {ckpt_dir!r} has no {os.path.basename(rng)} (saved with fewer ranks?)"
    comm.raise_if_any(missing, DistributedError)
    set_rng_state(torch.load(rng, weights_only=True), rng)
    return client or {}


def rank_state_path(ckpt_dir: str, tag: str, key: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"{key}_rank{rank}.pt")


def load_rank_state(ckpt_dir: str, tag: str, key: str) -> dict:
    """This rank's `rank_states[key]` of checkpoint `tag` (collective: a missing file on any rank is a
    DistributedError on every rank)."""
    comm = Comm()
    path = rank_state_path(ckpt_dir, tag, key, comm.rank)
    missing = None if os.path.isfile(path) else f"checkpoint {tag!r} in {ckpt_dir!r} has no {os.path.basename(path)}"
    comm.raise_if_any(missing, DistributedError)
    return torch.load(path, weights_only=True)
