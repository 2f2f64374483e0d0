"""The calibration-statistics engine: hooks on the adapted modules, never `.grad` of frozen weights.

A forward hook on each adapted module keeps its input x; a tensor hook on its output receives
δ = ∂L/∂y in backward, where L = Σ_i L_i (per-sample mean-token losses), so δ at a position of
sample i is ∂L_i/∂y_t. The statistics are accumulated there, once per real backward:
- with reentrant checkpointing the first forward runs without grad (skipped) and the recompute's
  output gets δ: counted once;
- with non-reentrant checkpointing the recompute's outputs are not in the graph and never get δ:
  counted once.
A forward-only method (input moments only) runs under no_grad and accumulates in the forward hook.

Sharded while collected (`Collector`): a unit's rows of a micro-step (x and each module's δ, in the
compute dtype) go to the unit's owner, which forms the products in the statistics dtype, rank by
rank, so no rank holds statistics it does not own (see Collector for the one exception).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..errors import ConfigError
from .methods.base import INPUT_MOMENT, OUTPUT_GRAD_DIAG, OUTPUT_GRAD_FULL, WEIGHT_GRADIENT

BATCH_FIELDS = ("input_ids", "attention_mask", "labels")


class StepContext:
    """What the hooks need about the current micro-batch, flattened to positions."""

    def __init__(self, position_mask: torch.Tensor, position_weight: torch.Tensor):
        self.mask = position_mask.reshape(-1)        # bool: positions the factors run over
        self.weight = position_weight.reshape(-1)    # per-position sample weight w_i for g
        self.shape = tuple(position_mask.shape)


class Collector:
    """Statistics of a set of units, sharded while they are collected.

    A unit (modules reading one input, plan.py) is collected in one of two modes, the same on every
    rank:
    - "rows": once a micro-step's hooks have produced all of a unit's rows (input x, T×d_in, and
      each module's δ, T×d_out, in the compute dtype), they go to the unit's owner in one gather;
      the owner forms the products in the statistics dtype and adds them, rank by rank, into its
      owned totals. No rank holds another rank's statistics; in flight: one unit's rows.
    - "local": every rank adds its own products into local sums, reduced to the owner after the
      pass (engine). Used on one rank, where the local sums are the totals (plan.collection_costs).

    `ctx` is this rank's StepContext; `peers` every rank's (mask, weight) for the step (rows mode).
    `peak` is the largest number of bytes of live statistics tensors seen (owned totals, local sums,
    rows in flight and the product temporaries), measured from the tensors themselves.
    """

    CHUNK = 512  # positions converted to the statistics dtype at a time (bounds the temporaries)

    def __init__(self, modules: Dict, units: Dict[str, List[str]], owner: Dict[str, int], rows_units: set,
                 stats: frozenset, dtype: torch.dtype, backward: bool, comm):
        self.modules, self.units, self.owner = modules, units, owner
        self.rows_units = rows_units
        self.stats, self.dtype, self.backward, self.comm = stats, dtype, backward, comm
        self.unit_of = {n: u for u, ms in units.items() for n in ms}
        self.ctx: Optional[StepContext] = None
        self.peers: List = []
        self.totals: Dict[str, Dict[str, torch.Tensor]] = {}   # owned units, rows mode: the totals
        self.sums: Dict[str, Dict[str, torch.Tensor]] = {}     # local mode: this rank's own sums
        self.pending: Dict[str, Dict[str, tuple]] = {}
        self.handles: List = []
        self.peak = 0
        self.inflight = 0
        device = None
        for u in sorted(rows_units):
            if owner[u] == comm.rank:
                for n in units[u]:
                    m = modules[n]
                    device = m.weight.ds_tensor.device if hasattr(m.weight, "ds_tensor") else m.weight.device
                    self.totals[n] = {k: torch.zeros(s, dtype=dtype, device=device)
                                      for k, s in slot_shapes(stats, m.out_features, m.in_features, n == u).items()}
        self.note()

    # -- hooks -----------------------------------------------------------------------------------
    def attach(self):
        for name, m in self.modules.items():
            self.handles.append(m.register_forward_hook(self._forward_hook(name)))

    def detach(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _forward_hook(self, name):
        def hook(mod, inputs, out):
            x = inputs[0]
            if self.backward:
                if torch.is_grad_enabled() and out.requires_grad:
                    out.register_hook(lambda d, x=x: self._arrive(name, x.detach(), d.detach()))
            elif not torch.is_grad_enabled():
                self._arrive(name, x.detach(), None)
        return hook

    def _arrive(self, name, x, delta):
        if x.reshape(-1, x.shape[-1]).shape[0] != self.ctx.mask.numel():
            raise RuntimeError(f"module {name!r}: its input has {x.reshape(-1, x.shape[-1]).shape[0]} positions "
                               f"but the batch has {self.ctx.mask.numel()} (input shape {tuple(x.shape)}, batch "
                               f"{self.ctx.shape}); statistics need one input row per token")
        unit = self.unit_of[name]
        if unit not in self.rows_units:
            self._products(self.sums, [name], x, {name: delta} if delta is not None else {},
                           self.ctx.mask, self.ctx.weight, own_input=(name == unit))
            return
        if not self.backward and name != unit:
            return  # forward-only: the unit's input, once
        pend = self.pending.setdefault(unit, {})
        pend[name] = (x, delta)
        if len(pend) == (len(self.units[unit]) if self.backward else 1):
            del self.pending[unit]
            self._ship(unit, pend)

    def finish_step(self) -> None:
        """After a micro-step's backward: every rows-mode unit has been shipped (same on all ranks)."""
        if self.pending:
            raise RuntimeError(f"units {sorted(self.pending)}: not every module received an output gradient "
                               "in this micro-step, so their rows were never sent")

    # -- rows mode -------------------------------------------------------------------------------
    def _ship(self, unit, pend):
        """Gather the unit's rows of this micro-step to its owner, which adds their products."""
        mods = self.units[unit]
        x = pend[unit][0] if unit in pend else next(iter(pend.values()))[0]
        parts = [x.reshape(-1, x.shape[-1])]
        if self.backward:
            parts += [pend[n][1].reshape(-1, pend[n][1].shape[-1]).to(x.dtype) for n in mods]
        buf = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].contiguous()
        rows = max(m.numel() for m, _ in self.peers)
        got = self.comm.gather_rows(buf, rows, self.owner[unit])
        self.inflight = _nb(buf) + (sum(_nb(t) for t in got) if got is not None else 0)
        self.note()
        del buf, parts, pend
        if got is not None:
            d_in = x.shape[-1]
            widths = [self.modules[n].out_features for n in mods] if self.backward else []
            for r, t in enumerate(got):
                mask, w = self.peers[r]
                t = t[: mask.numel()]
                cols = torch.split(t, [d_in] + widths, dim=1)
                self._products(self.totals, mods, cols[0], dict(zip(mods, cols[1:])), mask.to(t.device),
                               w.to(t.device), own_input=True)
                got[r] = None  # freed once added
        self.inflight = 0

    # -- products --------------------------------------------------------------------------------
    def _products(self, target, mods, x, deltas, mask_all, w_all, own_input):
        """Add Σxᵀx, Σx (the unit's first module) and each module's g = Σ w_t δ_tᵀx_t, Σδ², Σδᵀδ over
        the rows x (T×d_in), δ (T×d_out) into `target`, CHUNK positions at a time in the statistics dtype."""
        xf = x.reshape(-1, x.shape[-1])
        dev, d_in = xf.device, xf.shape[1]
        mask_all, w_all = mask_all.to(dev), w_all.to(device=dev, dtype=self.dtype)
        for s in range(0, xf.shape[0], self.CHUNK):
            x2 = xf[s:s + self.CHUNK].to(self.dtype)
            mask = mask_all[s:s + self.CHUNK]
            temp = _nb(x2)
            if INPUT_MOMENT in self.stats and own_input:
                xm = x2[mask]
                self._slot(target, mods[0], "second", (d_in, d_in), dev).addmm_(xm.T, xm)
                self._slot(target, mods[0], "sum", (d_in,), dev).add_(xm.sum(0))
                self.note(temp + 2 * _nb(xm))
                del xm
            for n, delta in deltas.items():
                d2 = delta.reshape(-1, delta.shape[-1])[s:s + self.CHUNK].to(self.dtype)
                d_out = d2.shape[1]
                if WEIGHT_GRADIENT in self.stats:
                    dw = d2 * w_all[s:s + self.CHUNK, None]
                    self._slot(target, n, "g", (d_out, d_in), dev).addmm_(dw.T, x2)
                    self.note(temp + _nb(d2) + _nb(dw))
                    del dw
                if OUTPUT_GRAD_DIAG in self.stats or OUTPUT_GRAD_FULL in self.stats:
                    dm = d2[mask]
                    if OUTPUT_GRAD_DIAG in self.stats:
                        self._slot(target, n, "G_diag", (d_out,), dev).add_((dm * dm).sum(0))
                    if OUTPUT_GRAD_FULL in self.stats:
                        self._slot(target, n, "G_full", (d_out, d_out), dev).addmm_(dm.T, dm)
                    self.note(temp + _nb(d2) + 2 * _nb(dm))
                del d2

    def _slot(self, target, name, key, shape, device):
        d = target.setdefault(name, {})
        if key not in d:
            d[key] = torch.zeros(shape, dtype=self.dtype, device=device)
        return d[key]

    # -- accounting ------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return _nbytes(self.totals) + _nbytes(self.sums)

    def note(self, temporaries: int = 0) -> None:
        """Record the bytes of live statistics tensors now (plus the caller's temporaries)."""
        self.peak = max(self.peak, self.nbytes() + self.inflight + temporaries)

    def take(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """This rank's local-mode sums, handed over (to be reduced to their owners)."""
        sums, self.sums = self.sums, {}
        return sums


def _nb(t) -> int:
    return t.numel() * t.element_size()


def _nbytes(d) -> int:
    return sum(_nb(t) for v in d.values() for t in v.values())


def slot_shapes(stats: frozenset, d_out: int, d_in: int, owns_input: bool) -> Dict[str, tuple]:
    """The accumulator shapes a module has, in a fixed order (so every rank reduces the same list)."""
    shapes = {}
    if INPUT_MOMENT in stats and owns_input:
        shapes["second"] = (d_in, d_in)
        shapes["sum"] = (d_in,)
    if WEIGHT_GRADIENT in stats:
        shapes["g"] = (d_out, d_in)
    if OUTPUT_GRAD_DIAG in stats:
        shapes["G_diag"] = (d_out,)
    if OUTPUT_GRAD_FULL in stats:
        shapes["G_full"] = (d_out, d_out)
    return shapes


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor):
    """(L_i, n_i): each sample's mean next-token cross-entropy over its loss-bearing tokens, and
    their count. Samples without loss tokens get L_i = 0."""
    shift_logits = logits[:, :-1]
    if shift_logits.dtype not in (torch.float32, torch.float64):  # bf16/fp16 logits: CE in fp32
        shift_logits = shift_logits.float()
    shift_labels = labels[:, 1:]
    valid = shift_labels != -100
    ce = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                           shift_labels.clamp(min=0).reshape(-1), reduction="none")
    ce = ce.view(shift_labels.shape) * valid
    n = valid.sum(1)
    return ce.sum(1) / n.clamp(min=1), n


# -- statistic semantics: which positions, which weights, which normalizers -----------------------
def check_batches(batches: list, needs_labels: bool) -> list:
    """The batches, validated: dicts with input_ids and attention_mask (and labels when a gradient
    statistic is needed), of one shape."""
    if not batches:
        raise ConfigError("initialize_adapters: no calibration batches on this rank; every rank needs its "
                          "shard of the calibration samples (e.g. from a DistributedSampler)")
    fields = BATCH_FIELDS if needs_labels else BATCH_FIELDS[:2]
    for i, b in enumerate(batches):
        if not isinstance(b, dict):
            raise ConfigError(f"calibration batch {i} is a {type(b).__name__}; expected a dict with {list(fields)}")
        for f in fields:
            if f not in b:
                raise ConfigError(f"calibration batch {i} lacks field {f!r} (has {sorted(b)}); "
                                  f"batches need {list(fields)}")
        shapes = [tuple(b[f].shape) for f in BATCH_FIELDS if f in b]
        if len(set(shapes)) != 1:
            raise ConfigError(f"calibration batch {i}: input_ids {tuple(b['input_ids'].shape)}, attention_mask "
                              f"{tuple(b['attention_mask'].shape)} and labels must have one shape")
    return batches


def split_batch(b: dict, k: int) -> list:
    """Sub-batches of at most k rows, each cut after its last attended column."""
    out = []
    n = b["input_ids"].shape[0]
    for s in range(0, n, k):
        sub = {key: (v[s:s + k] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v)
               for key, v in b.items()}
        cols = sub["attention_mask"].bool().any(0).nonzero()
        width = int(cols.max()) + 1 if len(cols) else 1
        out.append({key: (v[:, :width] if torch.is_tensor(v) and v.dim() == 2 else v) for key, v in sub.items()})
    return out


def sample_token_counts(labels: torch.Tensor):
    """(valid, n_i): which next-token labels carry loss (label t+1 ≠ −100), and their count per sample."""
    valid = labels[:, 1:] != -100
    return valid, valid.sum(1)


def position_mask(b: dict, opts: Dict) -> torch.Tensor:
    """Positions the input/output-gradient factors run over: attention-mask positions, or the
    loss-bearing ones (input position t predicts label t+1)."""
    if opts["factor_positions"] == "loss":
        if "labels" not in b:
            raise ConfigError("init_options.factor_positions='loss' needs labels in the calibration batches")
        valid, _ = sample_token_counts(b["labels"])
        return torch.nn.functional.pad(valid, (0, 1), value=False) & b["attention_mask"].bool()
    return b["attention_mask"].bool()


def local_counts(batches: List[dict], opts: Dict) -> List[float]:
    """This rank's [samples, loss tokens, factor positions]. A sample counts when it has a loss token;
    label-less batches (forward-only statistics) count every sample with an attended position."""
    local = [0.0, 0.0, 0.0]
    for b in batches:
        pos = position_mask(b, opts)
        if "labels" in b:
            _, n_i = sample_token_counts(b["labels"])
            local[0] += float((n_i > 0).sum())
            local[1] += float(n_i.sum())
        else:
            local[0] += float(b["attention_mask"].bool().any(1).sum())
        local[2] += float(pos.sum())
    return local


def step_context(b: dict, opts: Dict, n_samples: float, n_tok: float, dummy: bool) -> StepContext:
    """Masks and weights of one micro-batch: w_i = 1/N_c ("sample_mean", samples with a loss token)
    or n_i/N_tok ("token_mean"); a dummy step (this rank ran out of batches) gets all zeros."""
    mask = position_mask(b, opts)
    if "labels" in b:
        _, n_i = sample_token_counts(b["labels"])
        if opts["gradient_weighting"] == "token_mean":
            w = n_i.double() / max(n_tok, 1)
        else:
            w = (n_i > 0).double() / max(n_samples, 1)
    else:
        w = torch.zeros(mask.shape[0], dtype=torch.float64)
    if dummy:
        mask = torch.zeros_like(mask)
        w = torch.zeros_like(w)
    return StepContext(mask, w[:, None].expand(mask.shape).to(torch.float64))


def normalized(name: str, totals: Dict, input_owner: Dict[str, str], stats: frozenset, n_pos: float) -> dict:
    """A module's statistics as the methods see them (base.py): moments divided by the position count."""
    out = {}
    if name not in totals and not (INPUT_MOMENT in stats and input_owner[name] in totals):
        return out
    t = totals.get(name, {})
    if INPUT_MOMENT in stats:
        src = totals[input_owner[name]]
        out[INPUT_MOMENT] = {"second": src["second"] / n_pos, "mean": src["sum"] / n_pos, "count": n_pos}
    if WEIGHT_GRADIENT in stats:
        out[WEIGHT_GRADIENT] = t["g"]  # already weighted by w_i (global normalizers)
    if OUTPUT_GRAD_DIAG in stats:
        out[OUTPUT_GRAD_DIAG] = t["G_diag"] / n_pos
    if OUTPUT_GRAD_FULL in stats:
        out[OUTPUT_GRAD_FULL] = t["G_full"] / n_pos
    return out


# -- the model in calibration ---------------------------------------------------------------------
@contextlib.contextmanager
def calibration_mode(module: nn.Module, mods: Dict, backward: bool):
    """Train mode (so gradient checkpointing applies) with every dropout off, nothing trainable,
    adapters bypassed, inputs requiring grad; everything restored on exit."""
    modes = {m: m.training for m in module.modules()}
    grads = {p: p.requires_grad for p in module.parameters()}
    handles = []
    try:
        module.train()
        for m in module.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
        for p in grads:
            p.requires_grad_(False)
        for m in mods.values():
            m.calibrating = True
        if backward:
            emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
            if emb is None:
                emb = next((m for m in module.modules() if isinstance(m, nn.Embedding)), None)
            if emb is None:
                raise ConfigError("initialize_adapters: cannot find the input embedding to start backward from")
            handles.append(emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True)))
        yield
    finally:
        for h in handles:
            h.remove()
        for m in mods.values():
            m.calibrating = False
        for p, g in grads.items():
            p.requires_grad_(g)
        for m, t in modes.items():
            m.training = t


def input_groups(module: nn.Module, mods: Dict, batch: dict) -> Dict[str, str]:
    """module -> the first module (model order) that reads the very same input tensor (one forward)."""
    seen, keep, handles = {}, [], []

    def hook(name):
        def f(mod, inputs, out):
            x = inputs[0]
            keep.append(x)  # hold it: no address reuse while probing
            seen.setdefault(name, (x.data_ptr(), tuple(x.shape), x.stride(), x.storage_offset()))
        return f

    for n, m in mods.items():
        handles.append(m.register_forward_hook(hook(n)))
    try:
        with torch.no_grad():
            module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    first, owner = {}, {}
    for n in mods:
        key = seen.get(n)
        owner[n] = first.setdefault(key, n) if key is not None else n
    return owner
