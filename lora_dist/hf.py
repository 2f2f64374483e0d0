"""lora_dist from a transformers `Trainer` or TRL `SFTTrainer` script run with `--deepspeed ds.json`.

    args = SFTConfig(output_dir="out", deepspeed="ds_configs/zero3.json", ...)  # first: see below
    model = AutoModelForCausalLM.from_pretrained(path)
    config = lora_dist.AdapterConfig(kind="lora", init="lora_da", r=8, target_modules="all-linear")
    lora_dist.hf.prepare_model(model, config)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         callbacks=[lora_dist.hf.LoraDistCallback(config, calibration)])
    trainer.train()              # out/adapter: a stock PEFT adapter; out/checkpoint-N/adapter too

Order matters under ZeRO-3: building the TrainingArguments with `deepspeed=` keeps an
HfDeepSpeedConfig alive, and only then does `from_pretrained` build the model under `zero.Init`
(each rank holds 1/world of every weight; a 70B model on 16 GPUs: 8.75 GB of bf16 per rank instead
of 140 GB). `prepare_model` refuses a full model when ZeRO-3 is configured.

The callback runs the data-aware init at `on_train_begin`. That is the first point where the
Trainer's DeepSpeed engine exists: a `zero.Init` model has no parameter-fetch hooks before it, and
writing trainable values then must set both the working copy and the fp32 master (zero.write_params).
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Callable, Optional

import torch

from .adapters import adapter_modules
from .config import AdapterConfig
from .engine import initialize_adapters
from .errors import ConfigError, DataError
from .export import OUR_WEIGHTS, read_adapter_config, rewrite_base, save_adapter
from .inject import inject_adapters
from .zero import gathered, is_partitioned, rank, world_size

try:  # only the base class: the module imports without transformers, the callback needs it
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object

ADAPTER_DIR = "adapter"          # under output_dir and under every checkpoint-N
INIT_RECORD = "lora_dist_init.json"
CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def _check_update_rules(config: AdapterConfig) -> None:
    """LoRA-FA's projection is a gradient hook (inside backward): it works under any Trainer. LoRA-Pro
    acts between backward and step, which Accelerate runs inside `backward`: refused, rather than
    run as plain AdamW. LoRA+ needs `LoraDistTrainerMixin` (checked when training starts)."""
    if getattr(config, "update_rule", "plain") == "lora_pro":
        raise ConfigError("AdapterConfig.update_rule='lora_pro' cannot run from an HF Trainer: it acts between "
                          "backward and the optimizer step, and Accelerate steps DeepSpeed inside backward; "
                          "use launch/train.py")


class LoraDistTrainerMixin:
    """Trainer mixin for LoRA+: `class MyTrainer(LoraDistTrainerMixin, SFTTrainer): pass`.

    With `AdapterConfig.loraplus_lr_ratio` = ρ, `create_optimizer` builds the Trainer's optimizer class
    (args.optim) over `update_rules.param_groups`: A (and other trainables) at lr, B and 1-D adapter
    vectors at ρ·lr. Under DeepSpeed this needs a ds_config without an "optimizer" section: with one,
    HF hands DeepSpeed a flat parameter list and never calls `create_optimizer` (the callback then
    refuses to train). Schedulers scale each group's own LR (HF's, DeepSpeed's WarmupCosineLR);
    DeepSpeed schedulers that write one absolute LR into every group are refused
    (`update_rules.check_scheduler`). Without a ratio the Trainer's own optimizer is used.
    """

    def create_optimizer(self, model=None):
        config = getattr(self.model, "lora_dist_config", None)
        if config is None or getattr(config, "loraplus_lr_ratio", None) is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from .update_rules import param_groups
        groups = param_groups(self.model, config, self.args.learning_rate, self.args.weight_decay)
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        self.optimizer = cls(groups, **kwargs)
        return self.optimizer


def _check_loraplus(config: AdapterConfig, args, optimizer) -> None:
    """LoRA+ must have reached the optimizer the Trainer runs (ZeRO keeps each group's keys)."""
    ratio = getattr(config, "loraplus_lr_ratio", None)
    if ratio is None:
        return
    groups = getattr(optimizer, "param_groups", None) or []
    if not any(g.get("name") == "lora_B" and g.get("lr_ratio") == float(ratio) for g in groups):
        ds = "the ds_config's \"optimizer\" section replaced it with one group; remove that section and "
        raise ConfigError(f"AdapterConfig.loraplus_lr_ratio={ratio} did not reach the Trainer's optimizer "
                          f"({ds if _ds_config(args).get('optimizer') else ''}build the Trainer as "
                          "class MyTrainer(lora_dist.hf.LoraDistTrainerMixin, SFTTrainer)); B would train at A's LR")
    from .update_rules import check_scheduler
    check_scheduler(_ds_config(args), groups)


def _ds_config(args) -> dict:
    hf = getattr(args, "hf_deepspeed_config", None)
    return dict(getattr(hf, "config", None) or {})


def prepare_model(model, config: AdapterConfig) -> list:
    """Inject the adapters into a model fresh from `from_pretrained`, before the Trainer is built.

    Returns the adapted module names. Under a ZeRO-3 DeepSpeed config the model must come from
    `zero.Init` (build the TrainingArguments/SFTConfig with `deepspeed=` before `from_pretrained`).
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"prepare_model: config must be a lora_dist.AdapterConfig, got {type(config).__name__}")
    if type(model).__name__ in ("PeftModel", "PeftModelForCausalLM", "PeftMixedModel") or hasattr(model, "peft_config"):
        raise ConfigError("prepare_model: the model is already a PEFT model; pass the plain transformers model "
                          "(and no peft_config to the trainer)")
    if config.kind == "none":
        raise ConfigError("prepare_model: AdapterConfig.kind='none' (full fine-tuning) needs no lora_dist; "
                          "use the Trainer as it is")
    _check_update_rules(config)
    from transformers.integrations import is_deepspeed_zero3_enabled
    if is_deepspeed_zero3_enabled() and not any(is_partitioned(p) for p in model.parameters()):
        raise ConfigError("prepare_model: a ZeRO-3 DeepSpeed config is active but the model was loaded whole "
                          "(every rank holds all of it). Build TrainingArguments/SFTConfig(deepspeed=...) "
                          "before from_pretrained so the model is created under zero.Init")
    return inject_adapters(model, config)


def first_step_lr(scheduler, max_steps: int) -> float:
    """The learning rate of the first optimizer step that moves the weights (LoRA-SB's η).

    Read from the scheduler the Trainer built (a torch LRScheduler, DeepSpeed's WarmupLR family,
    or Accelerate's wrapper around either) by stepping it until the LR is positive, then restoring
    its state and the optimizer groups' LRs exactly. Uses the first parameter group.
    """
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate.scheduler.AcceleratedScheduler
    opt = getattr(inner, "optimizer", None)
    if opt is None or not hasattr(inner, "step"):
        raise ConfigError(f"LoraDistCallback: cannot read the learning rate from a {type(scheduler).__name__}; "
                          "pass lr= to LoraDistCallback")
    groups = opt.param_groups
    state = {k: copy.copy(v) for k, v in vars(inner).items() if k != "optimizer"}
    lrs = [g["lr"] for g in groups]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
            for _ in range(max(1, max_steps)):
                lr = float(groups[0]["lr"])
                if lr > 0:
                    return lr
                inner.step()
    finally:
        vars(inner).update(state)
        for g, lr0 in zip(groups, lrs):
            g["lr"] = lr0
    raise ConfigError(f"LoraDistCallback: the learning-rate schedule is 0 for all {max_steps} steps: no step would "
                      "move the weights (more steps, or a warm-up that starts above 0)")


def calibration_batches(calibration, micro_batch_size: int, pad_id: int,
                        collate_fn: Optional[Callable] = None) -> list:
    """This rank's shard of the calibration set as micro-batches.

    `calibration`: a DataLoader (or any iterable of batch dicts): rank r takes batches r, r+world, ...,
    or all of them when the loader's sampler is a DistributedSampler (already this rank's shard);
    or a dataset / list of tokenized samples (input_ids, labels): rank r takes samples r, r+world, ...,
    collated `micro_batch_size` at a time. Statistics are sums over samples with global normalizers,
    so the init does not depend on how samples fall to ranks or batches.
    """
    from torch.utils.data import DataLoader, DistributedSampler
    r, w = rank(), world_size()
    if isinstance(getattr(calibration, "sampler", None), DistributedSampler):
        mine = list(calibration)
    elif isinstance(calibration, DataLoader) or not hasattr(calibration, "__len__"):
        mine = [b for i, b in enumerate(calibration) if i % w == r]
    else:
        if len(calibration) < w:
            raise DataError(f"LoraDistCallback: {len(calibration)} calibration samples for {w} ranks; "
                            "every rank needs at least one")
        from .job.data import collate
        samples = [calibration[i] for i in range(r, len(calibration), w)]
        fn = collate_fn or (lambda b: collate(b, pad_id=pad_id))
        mine = [fn(samples[s:s + micro_batch_size]) for s in range(0, len(samples), micro_batch_size)]
    if not mine:
        raise DataError(f"LoraDistCallback: rank {r} got no calibration batch (the calibration loader yields "
                        f"fewer batches than the {w} ranks)")
    return mine


def _weights_in_checkpoint(ckpt_dir: str) -> Callable[[str], bool]:
    """name -> whether the Trainer's resume already restored that frozen weight.

    A DeepSpeed checkpoint holds a frozen weight in its module state dict (ZeRO-0/1/2) or, under
    ZeRO-3, as this rank's fragment (`frozen_param_fragments`, absent when it was saved with
    exclude_frozen_parameters=True). Without a DeepSpeed checkpoint the Trainer loaded the whole
    state dict. The file is memory-mapped: only the keys are read, not the fragments.
    """
    import glob
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(latest):
        return lambda name: not glob.glob(os.path.join(ckpt_dir, "global_step*"))
    with open(latest) as f:
        tag = f.read().strip()
    files = sorted(glob.glob(os.path.join(ckpt_dir, tag, f"*zero_pp_rank_{rank()}_*model_states.pt"))
                   or glob.glob(os.path.join(ckpt_dir, tag, "*model_states.pt")))
    if not files:
        raise ConfigError(f"resume: {ckpt_dir!r} names DeepSpeed tag {tag!r} but holds no model states file")
    state = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False)
    frag, module = state.get("frozen_param_fragments") or {}, state.get("module") or {}
    return lambda name: name in frag or (name in module and module[name].numel() > 0)


def restore_from_checkpoint(model, adapter_dir: str) -> None:
    """After the Trainer resumed a checkpoint: re-apply what the checkpoint does not hold.

    The trainable factors (and their fp32 masters) come from the Trainer's checkpoint. A frozen W
    that an init rewrote (W = W0 − s·B0·A0) does too unless the DeepSpeed checkpoint left frozen
    weights out; then it is re-applied from the saved B0, A0 in float64 and cast once, bit for bit
    as the init wrote it. The saved factors must equal the resumed ones exactly (else: a different
    run's checkpoint). `adapter_dir` is <checkpoint>/adapter. Collective.
    """
    from safetensors.torch import load_file
    meta = read_adapter_config(adapter_dir)
    saved = AdapterConfig.from_dict(meta["config"])
    have = model.lora_dist_config
    diff = [k for k in ("kind", "r", "alpha", "use_rslora", "init") if getattr(saved, k) != getattr(have, k)]
    if diff:
        raise ConfigError(f"resume: the checkpoint's adapter {adapter_dir!r} differs from this run's AdapterConfig "
                          f"in {diff} (saved {[getattr(saved, k) for k in diff]})")
    tensors = load_file(os.path.join(adapter_dir, OUR_WEIGHTS))
    mods = dict(adapter_modules(model))
    if set(meta["modules"]) != set(mods):
        raise ConfigError(f"resume: {adapter_dir!r} adapts other modules than this model "
                          f"({sorted(set(meta['modules']) ^ set(mods))[:4]})")
    restored = _weights_in_checkpoint(os.path.dirname(os.path.abspath(adapter_dir)))
    for n, m in mods.items():
        params = m.adapter_params()
        with gathered(list(params.values())):
            bad = [k for k, p in params.items()
                   if not torch.equal(p.detach().cpu().reshape(tensors[f"{n}.{k}"].shape), tensors[f"{n}.{k}"])]
        if bad:
            raise ConfigError(f"resume: module {n!r} {bad} in {adapter_dir!r} differ from the DeepSpeed checkpoint "
                              "the Trainer loaded (the adapter belongs to another checkpoint)")
        if f"{n}.init_B0" in tensors:
            B0, A0 = tensors[f"{n}.init_B0"], tensors[f"{n}.init_A0"]
            if not restored(f"{n}.weight"):
                rewrite_base(m, -m.scaling * (B0.double() @ A0.double()))
            m.init_factors = (B0, A0)
        m.needs_init = False


class LoraDistCallback(TrainerCallback):
    """Runs the data-aware init on the Trainer's DeepSpeed engine and writes PEFT adapters.

    config: the AdapterConfig given to `prepare_model` (default: the model's own).
    calibration: tokenized samples (a dataset or list of dicts with input_ids and labels) or a
        DataLoader of batches; each rank takes its shard (see `calibration_batches`). Needed when
        `config.needs_initialize`.
    n_train: LoRA-DA's N; default: the length of the dataset the Trainer's train dataloader reads.
    lr: LoRA-SB's η; default: the first positive LR of the scheduler the Trainer built.
    micro_batch_size: calibration micro-batch; default: args.per_device_train_batch_size.
    collate_fn: turns a list of samples into a batch; default: right-padding (lora_dist.job.data.collate).
    init_adapter_dir: also write the adapter right after the init there (a record of the start point).

    At `on_train_begin` (the engine exists, a resumed checkpoint is loaded):
      - fresh run: initialize_adapters(model, config, this rank's batches, n_train=N, lr=η), and
        N, η and the calibration sample count are written to output_dir/lora_dist_init.json;
      - resumed run (state.global_step > 0): no init; `restore_from_checkpoint` on
        output_dir/checkpoint-<step>/adapter (or `resume_adapter_dir`).
    At `on_save`: a stock PEFT adapter into output_dir/checkpoint-<step>/adapter. At `on_train_end`:
    into output_dir/adapter. Both gather one layer's factors at a time and rank 0 writes.
    """

    def __init__(self, config: Optional[AdapterConfig] = None, calibration=None, *, n_train: Optional[int] = None,
                 lr: Optional[float] = None, micro_batch_size: Optional[int] = None,
                 collate_fn: Optional[Callable] = None, init_adapter_dir: Optional[str] = None,
                 resume_adapter_dir: Optional[str] = None, base_model_name_or_path: Optional[str] = None,
                 **init_kwargs):
        if config is not None:
            if not isinstance(config, AdapterConfig):
                raise ConfigError(f"LoraDistCallback: config must be an AdapterConfig, got {type(config).__name__}")
            _check_update_rules(config)
            if config.needs_initialize and calibration is None:
                raise ConfigError(f"LoraDistCallback: init {config.init!r} needs calibration samples "
                                  "(calibration=a tokenized dataset or a DataLoader)")
        for key, v in (("n_train", n_train), ("micro_batch_size", micro_batch_size)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"LoraDistCallback: {key} must be a positive integer, got {v!r}")
        if lr is not None and not lr > 0:
            raise ConfigError(f"LoraDistCallback: lr must be > 0, got {lr!r}")
        self.config, self.calibration = config, calibration
        self.n_train, self.lr, self.micro_batch_size, self.collate_fn = n_train, lr, micro_batch_size, collate_fn
        self.init_adapter_dir, self.resume_adapter_dir = init_adapter_dir, resume_adapter_dir
        self.base_model_name_or_path = base_model_name_or_path
        self.init_kwargs = init_kwargs
        self.report = None

    def _model(self, model):
        if model is None or getattr(model, "lora_dist_config", None) is None:
            raise ConfigError("LoraDistCallback: the Trainer's model has no lora_dist adapters; call "
                              "lora_dist.hf.prepare_model(model, config) before building the Trainer")
        if self.config is not None and self.config.to_dict() != model.lora_dist_config.to_dict():
            raise ConfigError("LoraDistCallback: its config differs from the one given to prepare_model")
        return model

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, processing_class=None, **kwargs):
        model = self._model(model)
        config = model.lora_dist_config
        if any(is_partitioned(p) for p in model.parameters()) and "DeepSpeed" not in type(optimizer).__name__:
            raise ConfigError("LoraDistCallback: the model is ZeRO-3 partitioned but the Trainer is not running "
                              f"DeepSpeed (its optimizer is a {type(optimizer).__name__}); pass deepspeed= to the "
                              "TrainingArguments that loaded the model")
        _check_loraplus(config, args, optimizer)
        if state.global_step > 0:
            path = self.resume_adapter_dir or os.path.join(
                args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}", ADAPTER_DIR)
            if not os.path.isdir(path):
                raise ConfigError(f"resume at step {state.global_step}: no lora_dist adapter at {path!r}; pass "
                                  "LoraDistCallback(resume_adapter_dir=<the checkpoint>/adapter)")
            restore_from_checkpoint(model, path)
        elif config.needs_initialize:
            self._initialize(args, model, config, lr_scheduler, train_dataloader, processing_class, state.max_steps)
        if getattr(config, "update_rule", "plain") == "lora_fa":  # A is final now
            from .update_rules import attach_update_rule
            attach_update_rule(model, config)

    def _initialize(self, args, model, config, lr_scheduler, train_dataloader, processing_class, max_steps):
        n = self.n_train
        if n is None:
            dataset = getattr(train_dataloader, "dataset", None)
            try:
                n = len(dataset)
            except TypeError:
                raise ConfigError("LoraDistCallback: the training set has no length (an IterableDataset); "
                                  "pass n_train=<training-set size>") from None
        lr = self.lr if self.lr is not None else first_step_lr(lr_scheduler, max_steps)
        pad = getattr(processing_class, "pad_token_id", None)
        if pad is None:  # a processor wraps the tokenizer
            pad = getattr(getattr(processing_class, "tokenizer", None), "pad_token_id", None)
        batches = calibration_batches(self.calibration, self.micro_batch_size or args.per_device_train_batch_size,
                                      pad if pad is not None else 0, self.collate_fn)
        self.report = initialize_adapters(model, config, batches, n_train=n, lr=lr, **self.init_kwargs)
        if rank() == 0:
            print(self.report.summary(), flush=True)
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, INIT_RECORD), "w") as f:
                json.dump({"init": config.init, "n_train": n, "lr": lr, "samples": self.report.n_samples,
                           "world": world_size()}, f, indent=1)
        if self.init_adapter_dir:
            save_adapter(model, self.init_adapter_dir, self.base_model_name_or_path)

    def on_save(self, args, state, control, model=None, **kwargs):
        ckpt = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
        save_adapter(self._model(model), os.path.join(ckpt, ADAPTER_DIR), self.base_model_name_or_path)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        save_adapter(self._model(model), os.path.join(args.output_dir, ADAPTER_DIR), self.base_model_name_or_path)
