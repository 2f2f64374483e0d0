"""Exact accounting of the activation memory a training step keeps for backward.

Two instruments, both usable on real tensors and on the meta device:

* `SavedActivationTracker` counts the bytes *saved for backward* during a forward pass. It installs
  `torch.autograd.graph.saved_tensors_hooks`: every tensor autograd saves is packed into a small
  holder object, and the holder lives exactly as long as the autograd node that saved it. A storage
  is counted once (keyed by its `StorageImpl`, so views and repeated saves of one buffer count
  once, at the storage's full size) while at least one holder refers to it; storages owned by the
  model's parameters or buffers are model state and are excluded. Tensors saved and released again
  inside the forward (a graph that is built and then detached, e.g. DoRA's weight norm) are not
  counted: the figure is what is alive when the forward returns, i.e. what the backward starts
  with. Each storage is attributed to the module whose forward was running when it was first
  saved (innermost module with a category, see `module_category`).

  With non-reentrant activation checkpointing (the transformers default), the checkpointed layer's
  positional inputs are saved through the same hooks; its keyword inputs (RoPE cos/sin and
  position_ids in Llama) are kept alive by the recompute closure instead, so the tracker adds
  them too (category "checkpoint").

* `LiveTensorTracker` is a `TorchDispatchMode` that follows every storage an operator creates until
  it is freed (storage weak references), and records the peak of live bytes. Run on the meta
  device it replays a whole training step (forward, backward, optimizer step) without data and
  predicts the step's tensor memory peak.

Meta-device runs go through `meta_shims()`, which removes the two places where a Hugging Face Llama
forward depends on data or on the device: the packed-sequence probe in mask creation (taken to be
"one sequence per row", the same as the real runs) and the choice of SDPA kernel (routed to the
flash-attention kernel, `aten._scaled_dot_product_flash_attention_for_cpu`, the kernel PyTorch
picks on CPU; it saves q, k, v (k and v not repeated under GQA), the output and a float32
log-sum-exp of shape (b, heads, s) - the same set CUDA FlashAttention-2 saves, up to 16 bytes of
RNG state).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..errors import MemoryConfigError
from ..presets import list_presets, preset_path

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_MODES = ("lora", "lora_fa", "lora_xs", "vera", "tied_lora", "dora")
MODES = ("full", "frozen") + ADAPTER_MODES
MODE_LABELS = {"full": "full FT", "frozen": "frozen base", "lora": "LoRA", "lora_fa": "LoRA-FA",
               "lora_xs": "LoRA-XS", "vera": "VeRA", "tied_lora": "Tied-LoRA", "dora": "DoRA"}
CATEGORIES = ("embedding", "attention", "mlp", "norm", "adapters", "logits_loss", "checkpoint", "other")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}

# --------------------------------------------------------------------------------------------------
# presets and specs
# --------------------------------------------------------------------------------------------------

def load_preset(name: str):
    """A `transformers` config from a preset name (e.g. "llama2-70b") or a path to a config JSON."""
    from transformers import AutoConfig

    if isinstance(name, str) and name.endswith(".json") and os.path.isfile(name):
        path = name
    else:
        known = list_presets()
        if name not in known:
            raise MemoryConfigError(f"unknown preset {name!r}; known presets: {known} "
                                    f"(or give a path to a config .json)")
        path = str(preset_path(name))
    with open(path) as fh:
        d = json.load(fh)
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise MemoryConfigError(f"{path}: config JSON has no 'model_type'")
    return AutoConfig.for_model(model_type, **d)


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MemoryConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class TrainSpec:
    """What is trained, on which micro-batch.

    mode: "full" (every parameter trains), "frozen" (no parameter trains, no adapters, but the
        embedding output requires grad so the backward flows through every layer, as in adapter
        training) or an adapter kind of `lora_dist.AdapterConfig` (lora, lora_fa, lora_xs, vera,
        tied_lora, dora), injected on `target_modules` with rank r.
    dtype: the training precision of the model (bfloat16 or float32).
    adapter_dtype: None = adapters compute in the model dtype; "float32" = fp32 adapter compute.
    checkpointing: activation checkpointing of every decoder layer (non-reentrant).
    """

    mode: str = "lora"
    batch_size: int = 1
    seq_len: int = 1024
    dtype: str = "bfloat16"
    checkpointing: bool = False
    r: int = 16
    alpha: float = 32.0
    target_modules: Tuple[str, ...] = ALL_PROJ
    adapter_dtype: Optional[str] = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainSpec":
        if self.mode not in MODES:
            raise MemoryConfigError(f"unknown mode {self.mode!r}; choose one of {list(MODES)}")
        _check_int("batch_size", self.batch_size)
        _check_int("seq_len", self.seq_len)
        _check_int("r", self.r)
        if self.dtype not in DTYPES:
            raise MemoryConfigError(f"unknown dtype {self.dtype!r}; choose one of {sorted(DTYPES)}")
        if self.adapter_dtype is not None and self.adapter_dtype not in DTYPES:
            raise MemoryConfigError(f"unknown adapter_dtype {self.adapter_dtype!r}; "
                                    f"choose None or one of {sorted(DTYPES)}")
        if self.mode in ADAPTER_MODES and (not self.target_modules or not all(
                isinstance(t, str) and t for t in self.target_modules)):
            raise MemoryConfigError(f"target_modules must name at least one module for mode {self.mode!r}, "
                                    f"got {self.target_modules!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise MemoryConfigError(f"alpha must be > 0, got {self.alpha!r}")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def replace(self, **kw) -> "TrainSpec":
        return dataclasses.replace(self, **kw)

    def label(self) -> str:
        s = MODE_LABELS[self.mode]
        if self.mode in ADAPTER_MODES and self.adapter_dtype not in (None, self.dtype):
            s += f" ({self.adapter_dtype} adapters)"
        return s + (" +ckpt" if self.checkpointing else "")


# --------------------------------------------------------------------------------------------------
# building the model
# --------------------------------------------------------------------------------------------------

def _is_adapter_module(m: nn.Module) -> bool:
    try:
        from ..adapters import AdapterLinear
        if isinstance(m, AdapterLinear):
            return True
    except ImportError:  # pragma: no cover - the adapters ship with the package
        pass
    # PEFT-style wrappers (lora_A submodule or parameter), VeRA/DoRA parameters.
    return any(hasattr(m, a) for a in ("lora_A", "vera_lambda_b", "lora_magnitude"))


def build_model(config, spec: TrainSpec, device="meta", construct_ctx=None) -> nn.Module:
    """A causal LM from `config` on `device`, in `spec.dtype`, prepared for `spec.mode`.

    Real devices get the model's random init (the memory does not depend on the values). On the
    meta device nothing is allocated. Adapter modes use `lora_dist.inject_adapters`; inits that
    need data or an SVD (LoRA-XS) are marked done, since values do not change memory.
    construct_ctx: a context for the base model's construction only (deepspeed.zero.Init, with
    device=None); adapters are injected after it, as in training.
    """
    from transformers import AutoModelForCausalLM

    spec.validate()
    cfg = copy.deepcopy(config)
    cfg.use_cache = False
    cfg._attn_implementation = "sdpa"
    if construct_ctx is not None:
        # transformers' init zeroes the padding row by indexing the weight, which zero.Init has
        # already partitioned to shape (0,); the padding row does not change memory.
        cfg.pad_token_id = None
    # device=None: no device context (zero.Init places the parameters itself)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        with construct_ctx if construct_ctx is not None else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(cfg, dtype=spec.torch_dtype)
    model.train()
    if spec.mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif spec.mode == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        from ..config import AdapterConfig
        from ..inject import inject_adapters

        acfg = AdapterConfig(kind=spec.mode, r=spec.r, alpha=spec.alpha,
                             target_modules=list(spec.target_modules), adapter_dtype=spec.adapter_dtype)
        inject_adapters(model, acfg)
        for m in model.modules():
            if getattr(m, "needs_init", False):
                m.needs_init = False
    if spec.mode != "full":
        # The backward flows from the first layer on, as in adapter training (and as non-reentrant
        # checkpointing of layer 0 needs).
        model.enable_input_require_grads()
    if spec.checkpointing:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:  # transformers < 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return model


def make_batch(spec: TrainSpec, vocab_size: int, device="meta", seed: int = 0):
    """(input_ids, labels) of shape (batch_size, seq_len); labels = input_ids (causal LM loss)."""
    shape = (spec.batch_size, spec.seq_len)
    if torch.device(device).type == "meta":
        ids = torch.empty(shape, dtype=torch.long, device="meta")
    else:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, shape, generator=g).to(device)
    return ids, ids


# --------------------------------------------------------------------------------------------------
# meta-device shims
# --------------------------------------------------------------------------------------------------

def _flash_sdpa_for_meta(original):
    """F.scaled_dot_product_attention that routes meta tensors to the flash-attention kernel.

    On the meta device PyTorch's kernel choice falls back to the math path (which materializes the
    (s × s) attention matrix); real CPU and CUDA runs use flash attention. Other devices go to the
    original function unchanged.
    """

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        if not query.is_meta:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        out, _lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, float(dropout_p), bool(is_causal), attn_mask=attn_mask, scale=scale)
        return out

    sdpa.__wrapped__ = original
    return sdpa


_shim_depth = 0


@contextlib.contextmanager
def meta_shims():
    """Make a Hugging Face decoder forward runnable on the meta device (see the module docstring).

    Patches, for the duration of the context, `transformers.masking_utils.find_packed_sequence_indices`
    and `torch.nn.functional.scaled_dot_product_attention`; both behave as before on real tensors.
    (A function-level patch rather than a TorchFunctionMode: checkpoint recomputation in the
    backward does not see torch-function modes.)
    """
    global _shim_depth
    import transformers.masking_utils as mu

    if _shim_depth:
        yield
        return
    original_find = mu.find_packed_sequence_indices
    original_sdpa = F.scaled_dot_product_attention

    def find_packed(position_ids):
        if position_ids.is_meta:
            return None  # one sequence per row: what the real runs feed
        return original_find(position_ids)

    mu.find_packed_sequence_indices = find_packed
    F.scaled_dot_product_attention = _flash_sdpa_for_meta(original_sdpa)
    _shim_depth += 1
    try:
        yield
    finally:
        _shim_depth -= 1
        mu.find_packed_sequence_indices = original_find
        F.scaled_dot_product_attention = original_sdpa


# --------------------------------------------------------------------------------------------------
# saved-for-backward accounting
# --------------------------------------------------------------------------------------------------

def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (its StorageImpl address); the same for all its views."""
    return t.untyped_storage()._cdata


def model_state_keys(model: nn.Module) -> set:
    """Storage keys of every parameter and buffer of `model` (model state, not activations)."""
    keys = set()
    for t in list(model.parameters()) + list(model.buffers()):
        keys.add(storage_key(t))
    return keys


def _is_checkpointed_layer(module: nn.Module) -> bool:
    """A layer that transformers checkpoints itself (not the model that holds the flag for them)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers < 4.52
        GradientCheckpointingLayer = ()
    from transformers import PreTrainedModel

    if isinstance(module, PreTrainedModel):
        return False
    if GradientCheckpointingLayer and not isinstance(module, GradientCheckpointingLayer):
        return False
    return bool(getattr(module, "gradient_checkpointing", False))


def module_category(model: nn.Module, module: nn.Module) -> Optional[str]:
    """The breakdown category of one module, or None (then its parent's category applies).

    adapters: an adapter wrapper (everything it saves: the base path of a frozen layer saves only
    the frozen weight, which is excluded). embedding: nn.Embedding. norm: *Norm classes.
    attention / mlp: *Attention / *MLP classes. logits_loss: the output head and the top-level
    model's own code (the loss). checkpoint: a checkpointed decoder layer's own frame (its inputs).
    other: the base model's and a decoder layer's own code (residual adds save nothing).
    """
    if module is model:
        return "logits_loss"
    if _is_adapter_module(module):
        return "adapters"
    if isinstance(module, nn.Embedding):
        return "embedding"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and module is head:
        return "logits_loss"
    name = type(module).__name__
    if name.endswith("Norm") or "LayerNorm" in name or "RMSNorm" in name:
        return "norm"
    if "Attention" in name:
        return "attention"
    if "MLP" in name:
        return "mlp"
    if _is_checkpointed_layer(module):
        return "checkpoint"
    if hasattr(module, "gradient_checkpointing") or module is getattr(model, "base_model", None):
        return "other"
    return None


@dataclass
class ActivationReport:
    """Bytes saved for backward after one forward: total and per category."""

    total_bytes: int
    by_category: Dict[str, int]
    num_storages: int
    device: str
    spec: Optional[TrainSpec] = None
    adapter_input_bytes: int = 0  # part of "adapters": the adapters' inputs x (or x cast to adapter_dtype)

    @property
    def adapter_other_bytes(self) -> int:
        """The rest of "adapters": narrow intermediates such as x·Aᵀ (r wide) kept for B's gradient."""
        return self.by_category.get("adapters", 0) - self.adapter_input_bytes

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "by_category": dict(self.by_category),
                "adapter_input_bytes": self.adapter_input_bytes,
                "num_storages": self.num_storages, "device": self.device,
                "spec": dataclasses.asdict(self.spec) if self.spec else None}

    def format(self) -> str:
        parts = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in self.by_category.items() if v)
        return f"saved for backward: {self.total_bytes / 2**20:.2f} MiB ({parts})"


_COPY_NODES = ("ToCopyBackward", "ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward",
               "AliasBackward", "CloneBackward", "TBackward", "TransposeBackward", "ExpandBackward")


def _is_copy_of(t: torch.Tensor, key: int, x_info) -> bool:
    """Whether saved tensor t is the adapter input x itself, a view of it, or a cast/copy of it."""
    if x_info is None:
        return False
    x_key, x_fn = x_info
    if key == x_key:
        return True
    fn = t.grad_fn
    for _ in range(6):
        if fn is None or not type(fn).__name__.startswith(_COPY_NODES):
            return False
        nxt = fn.next_functions
        if not nxt:
            return False
        fn = nxt[0][0]
        if x_fn is not None and fn is x_fn:
            return True
    return False


class _Holder:
    """What the pack hook returns: keeps the tensor, and tells the tracker when autograd drops it."""

    __slots__ = ("tensor", "key", "tracker", "__weakref__")

    def __init__(self, tensor, key, tracker):
        self.tensor = tensor
        self.key = key
        self.tracker = tracker

    def __del__(self):
        tr = self.tracker
        if tr is not None:
            tr._release(self.key)


class SavedActivationTracker:
    """Context manager: bytes saved for backward by the forward run inside it.

    Usage::

        with SavedActivationTracker(model) as tr:
            loss = model(input_ids=ids, labels=ids).loss
        print(tr.report.total_bytes, tr.report.by_category)

    The report is taken when the context exits (the forward is done, the graph is alive).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._excluded = model_state_keys(model)
        self._live: Dict[int, list] = {}  # key -> [holder count, nbytes, category, adapter input?]
        self._adapter_in: Dict[int, tuple] = {}  # id(adapter module) -> (storage key, grad_fn) of its input x
        self._pinned: Dict[int, Tuple[torch.Tensor, str]] = {}  # kept by checkpoint closures
        self._stack: List[nn.Module] = []
        self._cat = {id(m): module_category(model, m) for m in model.modules()}
        self._ckpt = {id(m) for m in model.modules() if _is_checkpointed_layer(m)}
        self._handles = []
        self._hooks_ctx = None
        self.report: Optional[ActivationReport] = None

    # -- module stack --------------------------------------------------------------------------------
    def _pre(self, module, args, kwargs):
        self._stack.append(module)
        if self._cat.get(id(module)) == "adapters" and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            self._adapter_in[id(module)] = (storage_key(x), x.grad_fn)
        if id(module) in self._ckpt and module.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing keeps the layer's inputs for the recompute.
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            for t in tensors:
                k = storage_key(t)
                if k not in self._excluded and k not in self._pinned:
                    self._pinned[k] = (t, "checkpoint")
        return None

    def _post(self, module, args, kwargs, output):
        if self._stack and self._stack[-1] is module:
            self._stack.pop()
        elif module in self._stack:  # an exception unwound inner modules
            while self._stack and self._stack.pop() is not module:
                pass
        return None

    def _category(self) -> Tuple[str, Optional[nn.Module]]:
        for m in reversed(self._stack):
            c = self._cat.get(id(m))
            if c is not None:
                return c, m
        return "other", None

    # -- saved tensors hooks -------------------------------------------------------------------------
    def _pack(self, t):
        k = storage_key(t)
        if k in self._excluded:
            return t
        entry = self._live.get(k)
        if entry is None:
            cat, owner = self._category()
            is_input = cat == "adapters" and _is_copy_of(t, k, self._adapter_in.get(id(owner)))
            self._live[k] = [1, t.untyped_storage().nbytes(), cat, is_input]
        else:
            entry[0] += 1
        # detach(): the holder must not reference the saving node (an op's saved output carries
        # its grad_fn; keeping it would make a cycle through C++ that is never freed)
        return _Holder(t.detach(), k, self)

    @staticmethod
    def _unpack(obj):
        return obj.tensor if isinstance(obj, _Holder) else obj

    def _release(self, key):
        entry = self._live.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] <= 0:
                del self._live[key]

    # -- context -------------------------------------------------------------------------------------
    def __enter__(self):
        for m in self.model.modules():
            self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post, with_kwargs=True, always_call=True))
        self._hooks_ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks_ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks_ctx.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles = []
        self.report = self.snapshot()
        self._pinned = {}
        return False

    def snapshot(self) -> ActivationReport:
        by_cat = {c: 0 for c in CATEGORIES}
        total = 0
        n = 0
        adapter_inputs = 0
        for k, (count, nbytes, cat, is_input) in self._live.items():
            by_cat[cat] += nbytes
            total += nbytes
            n += 1
            adapter_inputs += nbytes if is_input else 0
        for k, (t, cat) in self._pinned.items():
            if k in self._live:
                continue
            nbytes = t.untyped_storage().nbytes()
            by_cat[cat] += nbytes
            total += nbytes
            n += 1
        dev = next(self.model.parameters()).device.type
        return ActivationReport(total, by_cat, n, dev, adapter_input_bytes=adapter_inputs)


def measure_saved_activations(model: nn.Module, input_ids: torch.Tensor,
                              labels: Optional[torch.Tensor] = None) -> ActivationReport:
    """Run one training forward of a causal LM and return the bytes it saved for backward."""
    ctx = meta_shims() if input_ids.is_meta else contextlib.nullcontext()
    with ctx:
        with SavedActivationTracker(model) as tr:
            out = model(input_ids=input_ids, labels=labels)
        del out
    return tr.report


def account_activations(config, spec: TrainSpec, device="meta", seed: int = 0) -> ActivationReport:
    """Saved-for-backward bytes of one forward of `config` trained as `spec`.

    device="meta" predicts without allocating (seconds for a 70B config); device="cpu" measures.
    """
    model = build_model(config, spec, device)
    ids, labels = make_batch(spec, config.vocab_size, device, seed)
    rep = measure_saved_activations(model, ids, labels)
    rep.spec = spec
    return rep


# --------------------------------------------------------------------------------------------------
# live tensor bytes over a whole step
# --------------------------------------------------------------------------------------------------

class LiveTensorTracker(TorchDispatchMode):
    """Follows every storage created by an operator inside the mode until it is freed.

    `current` and `peak` are in bytes; storages registered with `track()` (parameters, inputs that
    existed before the mode) count from then on. Allocations made inside a kernel (workspaces) are
    invisible to it. `mark(name)` records the current value under a name (phase boundaries).
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: Dict[int, int] = {}
        self.marks: Dict[str, int] = {}
        self.phase_peaks: Dict[str, int] = {}
        self._phase: Optional[str] = None

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        k = st._cdata
        if k in self._live:
            return
        n = st.nbytes()
        self._live[k] = n
        self.current += n
        if self.current > self.peak:
            self.peak = self.current
        if self._phase is not None and self.current > self.phase_peaks.get(self._phase, 0):
            self.phase_peaks[self._phase] = self.current
        weakref.finalize(st, self._free, k)

    def _free(self, k: int) -> None:
        n = self._live.pop(k, None)
        if n is not None:
            self.current -= n

    def phase(self, name: str) -> None:
        """Start a named phase; `phase_peaks[name]` is the peak reached while it lasts."""
        self._phase = name
        self.phase_peaks[name] = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


@dataclass
class StepProfile:
    """Tensor memory of one training step (bytes).

    params: parameters + buffers. saved: saved for backward at the end of the forward.
    peak_fwd_bwd / peak_step: peak live tensor bytes during forward+backward / the whole step.
    act_peak: peak of (live - params) over forward+backward with gradients dropped as soon as they
        are accumulated (what ZeRO does: they go to the reduce bucket) - the activation part of the
        per-GPU peak. Only set by `simulate_step(..., drop_grads=True)`.
    """

    spec: TrainSpec
    params: int
    trainable_params: int
    saved: ActivationReport
    peak_fwd_bwd: int
    peak_step: int
    act_peak: Optional[int] = None
    phases: Dict[str, int] = field(default_factory=dict)


def simulate_step(config, spec: TrainSpec, device="meta", drop_grads: bool = False,
                  optimizer: bool = True, seed: int = 0, model: Optional[nn.Module] = None) -> StepProfile:
    """Replay one training step (forward with the loss, backward, AdamW step) and follow its memory.

    On the meta device this is a prediction; on CPU it is a tensor-level measurement. The optimizer
    is `torch.optim.AdamW(foreach=False)` over the trainable parameters, as in `measure.run_cpu_step`.
    With drop_grads=True each parameter's gradient is freed as soon as it is accumulated and the
    optimizer step is skipped (the ZeRO view, see `StepProfile.act_peak`).
    `model`: a model already built by `build_model(config, spec, device)` (any batch size), reused
    as is; only with drop_grads=True, which leaves it unchanged.
    """
    if model is None:
        model = build_model(config, spec, device)
    elif not drop_grads:
        raise MemoryConfigError("simulate_step reuses a model only with drop_grads=True (an optimizer step changes it)")
    ids, labels = make_batch(spec, config.vocab_size, device, seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    handles = []
    if drop_grads:
        for p in trainable:
            handles.append(p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None)))
    tracker = LiveTensorTracker()
    state = list(model.parameters()) + list(model.buffers())
    tracker.track(state)
    tracker.track([ids, labels])
    params_bytes = tracker.current
    ctx = meta_shims() if torch.device(device).type == "meta" else contextlib.nullcontext()
    use_opt = optimizer and not drop_grads and bool(trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-4, foreach=False) if use_opt else None
    with ctx, tracker:
        tracker.phase("forward")
        with SavedActivationTracker(model) as sat:
            out = model(input_ids=ids, labels=labels)
        loss = out.loss
        del out
        tracker.phase("backward")
        loss.backward()
        del loss
        peak_fwd_bwd = tracker.peak
        if opt is not None:
            tracker.phase("optimizer")
            opt.step()
            opt.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    rep = sat.report
    rep.spec = spec
    prof = StepProfile(spec=spec, params=params_bytes, trainable_params=sum(p.numel() for p in trainable),
                       saved=rep, peak_fwd_bwd=peak_fwd_bwd, peak_step=tracker.peak,
                       phases=dict(tracker.phase_peaks))
    if drop_grads:
        prof.act_peak = peak_fwd_bwd - params_bytes
    return prof
