"""Fine-tune a causal LM with LoRA-family adapters under DeepSpeed.

    deepspeed launch/train.py --ds_config ds_configs/zero3.json            # embedded demo defaults
    deepspeed launch/train.py --ds_config ds_configs/zero3.json --model /path/to/llama --data data.jsonl \
        --adapter lora_fa --init lora_da --r 8 --alpha 16 --epochs 1 --output_dir runs/x
    deepspeed launch/train.py --config run.yaml                            # the same flags as YAML/JSON

On CPU set DS_ACCELERATOR=cpu. Also runs under torchrun and `mpirun -np N python launch/train.py`.
Reads top to bottom: config, distributed setup, data, model + adapters, data-aware init, loop,
checkpoints, evaluation, adapter export. The library (lora_dist) does the heavy lifting.

Every input is checked before anything is tokenized or loaded; a bad one ends the job with one
`error: ...` line per problem from rank 0 and exit code 2 on every rank. An --output_dir holding a
previous run is refused unless --resume (continue it) or --overwrite_output_dir (replace it).

The objective of an optimizer step is the token-weighted mean L = Σ ℓ_t / N over all N response
tokens of the step (every micro-batch on every rank), and the logged step loss is that L: the
trajectory does not depend on world size or micro-batch size (lora_dist/job/loss.py).
"""
import json
import os
import shutil
import sys
import time
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import lora_dist as ld  # noqa: E402
from lora_dist import update_rules  # noqa: E402
from lora_dist.comm import Comm  # noqa: E402
from lora_dist.config import AdapterConfig  # noqa: E402
from lora_dist.errors import ConfigError, DataError, DeepSpeedConfigError, LoraDistError  # noqa: E402
from lora_dist.export import read_adapter_config  # noqa: E402
from lora_dist.job import checkpoint, data  # noqa: E402
from lora_dist.job.args import TrainConfig, parse_args  # noqa: E402
from lora_dist.job.demo import demo_presets, resolve_model  # noqa: E402
from lora_dist.job.distributed import collectively, init_distributed, launch_rank, shutdown  # noqa: E402
from lora_dist.job.ds_config import first_moving_lr, load_ds_config, prepare_ds_config, warmup_steps_from_ratio  # noqa: E402
from lora_dist.job.evaluate import eval_exact_match, eval_loss  # noqa: E402
from lora_dist.job.loss import loss_tokens, step_scaled  # noqa: E402
from lora_dist.presets import preset_config  # noqa: E402

PREVIOUS_RUN = ("checkpoints/latest", "metrics.jsonl", "adapter")  # what a finished or killed run leaves
PRO_STATE = "lora_pro"  # LoRA-Pro's t and moments in a checkpoint: lora_pro_rank<r>.pt, as each rank holds them


def log(*a):
    if ld.zero.rank() == 0:
        print(*a, flush=True)


def main(argv=None):
    """Every bad input is a LoraDistError: rank 0 prints its message once, every rank exits with 2."""
    try:
        train(parse_args(argv, description=__doc__))
    except LoraDistError as e:
        if launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        shutdown()


def train(args: TrainConfig):
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    # -----------------------------------------------------------------------------------------
    # distributed setup (deepspeed / torchrun env vars, or MPI discovery through mpi4py)
    # -----------------------------------------------------------------------------------------
    import deepspeed
    init_distributed()
    comm = Comm()
    rank, world = comm.rank, comm.world
    device = torch.device(deepspeed.get_accelerator().device_name(), int(os.environ.get("LOCAL_RANK", 0))) \
        if deepspeed.get_accelerator().device_name() != "cpu" else torch.device("cpu")
    torch.manual_seed(args.seed)
    out_dir = os.path.abspath(args.output_dir)
    ckpt_dir = os.path.join(out_dir, "checkpoints")

    # -----------------------------------------------------------------------------------------
    # every cheap check before tokenizing or loading weights; rank 0 alone judges the output dir
    # -----------------------------------------------------------------------------------------
    records, config = collectively(comm, lambda: check_inputs(args, out_dir, world, rank == 0))
    if rank == 0:
        if args.overwrite_output_dir:
            _remove_previous_run(out_dir)
        os.makedirs(ckpt_dir, exist_ok=True)
    comm.barrier()
    resume_tag = comm.broadcast_object(checkpoint.latest_tag(ckpt_dir) if args.resume and rank == 0 else None, 0)

    # -----------------------------------------------------------------------------------------
    # data: records -> held-out split -> tokenized examples (loss on response tokens only)
    # -----------------------------------------------------------------------------------------
    # rank 0 builds a preset once; the others wait for its path
    model_dir = collectively(comm, lambda: str(resolve_model(args.model)) if rank == 0 else None)
    model_dir = comm.broadcast_object(model_dir, 0)

    def tokenize():
        tokenizer = data.load_tokenizer(model_dir)
        train_rec, eval_rec = data.train_eval_split(records, args.eval_size, seed=args.seed)
        train_ds, report = data.build_dataset(train_rec, tokenizer, template=args.template,
                                              max_seq_len=args.max_seq_len, overlength=args.overlength,
                                              num_proc=args.num_proc)
        eval_ds, _ = data.build_dataset(eval_rec, tokenizer, template=report.template, max_seq_len=args.max_seq_len,
                                        overlength=args.overlength)
        return tokenizer, eval_rec, train_ds, eval_ds, report
    tokenizer, eval_rec, train_ds, eval_ds, report = collectively(comm, tokenize)
    log(report)
    pad_id = tokenizer.pad_token_id

    # -----------------------------------------------------------------------------------------
    # schedule and DeepSpeed config ("auto" values filled from the flags)
    # -----------------------------------------------------------------------------------------
    total_steps = _total_steps(args, len(train_ds))
    ds_config = collectively(comm, lambda: _ds_config(args, world, total_steps, _hidden_size(model_dir)))
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    accum = ds_config["gradient_accumulation_steps"]

    # -----------------------------------------------------------------------------------------
    # model + adapters (under zero.Init for ZeRO-3: no rank ever holds the full model)
    # -----------------------------------------------------------------------------------------
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    dschf = HfDeepSpeedConfig(ds_config) if zero3 else None  # noqa: F841  (must stay alive)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if resume_tag and args.adapter != "none":  # re-applies an init that rewrote W (frozen W is not checkpointed)
        names = ld.load_adapter(model, os.path.join(ckpt_dir, resume_tag, "adapter"))
    else:
        names = ld.inject_adapters(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the update rule's parameter groups (LoRA+), ds_config edits and inner optimizer (LoRA-Pro)
    config = getattr(model, "lora_dist_config", config)  # on resume: the checkpoint's own config
    groups, ds_config, optimizer = _update_rule_setup(args, config, model, ds_config)
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                                   config=ds_config)
    n_train = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable)
    log(f"model {model_dir}: {len(names)} adapted layers ({args.adapter}, r={args.r}), {n_train:,} trainable "
        f"parameters; {world} rank(s), batch {args.batch_size} = {args.micro_batch_size} x {accum} x {world}; "
        f"{total_steps} steps")

    # -----------------------------------------------------------------------------------------
    # data-aware init: calibration samples drawn deterministically from the training set, sharded
    # -----------------------------------------------------------------------------------------
    if config.needs_initialize and not resume_tag:
        calib = data.calibration_indices(len(train_ds), args.init_samples, seed=args.seed)
        mine = calib[rank::world]
        # LoRA-SB's η: the LR of the first step that moves the weights, as the built scheduler gives it
        eta = first_moving_lr(engine)
        init_report = ld.initialize_adapters(engine, config, data.batches(train_ds, mine, args.micro_batch_size, pad_id),
                                             n_train=len(train_ds), lr=eta, memory_budget=args.init_memory_budget)
        log(init_report.summary())
    # the rule acts on the final A (after the init, or as load_adapter restored it)
    pro = _attach_rule(engine, config, args) if args.adapter != "none" else None

    # -----------------------------------------------------------------------------------------
    # resume: engine, optimizer, LR schedule, RNG and the position in the data order
    # -----------------------------------------------------------------------------------------
    step, epoch, micro_pos = 0, 0, 0
    if resume_tag:
        state = checkpoint.load(engine, ckpt_dir, resume_tag)
        step, epoch, micro_pos = state["step"], state["epoch"], state["micro_pos"]
        if pro is not None:
            pro.load_state_dict(checkpoint.load_rank_state(ckpt_dir, resume_tag, PRO_STATE))
        log(f"resumed from {resume_tag}: step {step}, epoch {epoch}")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")

    def evaluate():
        out = eval_loss(engine.module, eval_ds, pad_id, args.micro_batch_size, device)
        if zero3:  # an eval pass outside the engine may leave prefetched parameters in flight: release them
            engine.empty_partition_cache()
        return out
    if rank == 0:
        _truncate_metrics(metrics_path, step)
    if step == 0:  # the held-out loss before training, the baseline every later eval is read against
        start = evaluate()
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": 0, **start}) + "\n")

    # -----------------------------------------------------------------------------------------
    # training loop
    # -----------------------------------------------------------------------------------------
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=rank != 0)
    engine.train()
    t0 = time.time()
    while step < total_steps:
        order = data.epoch_order(len(train_ds), rank, world, seed=args.seed, epoch=epoch)
        n_micro = (len(order) // (args.micro_batch_size * accum)) * accum  # whole optimizer steps only
        for start in range(micro_pos, n_micro, accum):  # one optimizer step: accum micro-batches per rank
            micro = [next(data.batches(train_ds, order[pos * args.micro_batch_size:(pos + 1) * args.micro_batch_size],
                                       args.micro_batch_size, pad_id)) for pos in range(start, start + accum)]
            # The objective is the token-weighted mean over the whole step (lora_dist/job/loss.py): a mean
            # of micro-batch means would change with world size and micro-batch size. N_step costs one
            # scalar all-reduce per step, before the first forward.
            counts = [loss_tokens(b["labels"]) for b in micro]
            n_step = comm.sum(float(sum(counts)))
            token_loss_sum = 0.0  # Σ ℓ over this rank's tokens of the step
            for b, n in zip(micro, counts):
                b = {k: v.to(device) for k, v in b.items()}
                micro_mean = engine(**b).loss
                engine.backward(step_scaled(micro_mean, n, n_step, world, accum))
                if pro is not None and engine.is_gradient_accumulation_boundary():
                    pro.adjust_gradients()  # LoRA-Pro's full rule: reduced gradients in, adjusted ones out
                engine.step()
                token_loss_sum += micro_mean.item() * n
            step += 1
            step_loss = comm.sum(token_loss_sum) / n_step  # the same L the gradient is taken of
            lrs = scheduler.get_lr() if scheduler is not None else [g["lr"] for g in groups]
            lr = lrs[0]
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            record = {"step": step, "loss": step_loss, "lr": lr, "time": round(time.time() - t0, 2)}
            if len(groups) > 1:  # LoRA+: each group's LR, named
                record["lr_groups"] = {g["name"]: float(v) for g, v in zip(groups, lrs)}
            last_step = step == total_steps
            if step % args.eval_every == 0 or last_step:
                record.update(evaluate())
                engine.train()
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if step % args.save_every == 0 and not last_step:
                checkpoint.save(engine, ckpt_dir, step, {"step": step, "epoch": epoch, "micro_pos": start + accum},
                                with_adapter=args.adapter != "none",
                                rank_states={PRO_STATE: pro.state_dict()} if pro is not None else None)
            if last_step:
                break
        if step >= total_steps:
            break
        epoch, micro_pos = epoch + 1, 0
    bar.close()

    # -----------------------------------------------------------------------------------------
    # held-out evaluation and the PEFT adapter
    # -----------------------------------------------------------------------------------------
    final = evaluate()
    if report.template == "metamath" and args.eval_generate > 0:
        tmpl = data.get_template(report.template)
        rows = [eval_rec[i] for i in range(min(args.eval_generate, len(eval_rec)))]
        final.update(eval_exact_match(engine.module, tokenizer, [tmpl.prompt(r) for r in rows],
                                      [tmpl.reference(r) for r in rows], device))
        if zero3:
            engine.empty_partition_cache()
    log(f"final: step {step}, held-out loss {final['eval_loss']:.4f}, perplexity {final['eval_ppl']:.2f}"
        + (f", exact match {final['exact_match']:.3f} on {final['generated']} prompts" if "exact_match" in final else ""))
    if args.adapter != "none":
        adapter_dir = os.path.join(out_dir, "adapter")
        ld.save_adapter(engine, adapter_dir, base_model_name_or_path=os.path.abspath(model_dir))
        log(f"PEFT adapter: {adapter_dir}  (base model {os.path.abspath(model_dir)})")
    if rank == 0:
        with open(os.path.join(out_dir, "final.json"), "w") as f:
            json.dump({"step": step, **{k: v for k, v in final.items()}}, f, indent=1)


def check_inputs(args: TrainConfig, out_dir: str, world: int, judge_output: bool):
    """Every check that needs no tokenizing and no weights; returns (records, AdapterConfig).

    All problems found are reported together, one per line, so a user fixes them in one go."""
    problems = []

    def check(fn):
        try:
            return fn()
        except LoraDistError as e:
            problems.append(str(e))

    if judge_output:
        check(lambda: _check_output_dir(args, out_dir))
    config = check(args.adapter_config)
    if args.resume and args.adapter != "none":  # the checkpoint's adapter config (and rule) wins
        saved = check(lambda: _saved_config(out_dir))
        if saved is not None:
            check(lambda: _check_resumed_config(args, saved, out_dir, world))
            config = saved
    records = check(lambda: _load_data(args.data))
    model_ok = check(lambda: _check_model(args.model)) is not None
    n_train = len(records) - args.eval_size if records is not None else args.batch_size
    hidden = (_hidden_size(args.model) if os.path.isdir(args.model) else preset_config(args.model)["hidden_size"]) \
        if model_ok else None
    check(lambda: _ds_config(args, world, _total_steps(args, max(1, n_train)), hidden or 1))
    if problems:
        raise LoraDistError("\nerror: ".join(problems))
    return records, config


def _saved_config(out_dir: str):
    """The adapter config of the latest checkpoint; None when there is none (reported elsewhere)."""
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    tag = checkpoint.latest_tag(ckpt_dir)
    if tag is None:
        return None
    return AdapterConfig.from_dict(read_adapter_config(os.path.join(ckpt_dir, tag, "adapter"))["config"])


def _check_resumed_config(args: TrainConfig, saved, out_dir: str, world: int) -> None:
    """On --resume the checkpoint's adapter config (kind, shape, init, update rule) continues: an
    adapter flag set explicitly to another value is an error, never silently overridden, and so is
    a LoRA-Pro checkpoint without every rank's moments."""
    given = {f"--{flag}": (value, getattr(saved, field)) for flag, field, value in _adapter_flags(args)
             if flag in args.given and value != getattr(saved, field)}
    problems = [f"--resume: the checkpoint's adapter config decides the adapter and its update rule; drop "
                f"or match {', '.join(f'{k} {v!r} (the checkpoint has {c!r})' for k, (v, c) in given.items())}"] \
        if given else []
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    tag = checkpoint.latest_tag(ckpt_dir)
    if saved.update_rule == "lora_pro" and saved.update_option("moments") == "full":
        lost = [r for r in range(world) if not os.path.isfile(checkpoint.rank_state_path(ckpt_dir, tag, PRO_STATE, r))]
        if lost:
            problems.append(f"--resume: checkpoint {tag!r} lacks LoRA-Pro's moments of rank(s) {lost} "
                            f"({PRO_STATE}_rank<r>.pt); resume on the world size it was saved with")
    if problems:
        raise ConfigError("\nerror: ".join(problems))


def _adapter_flags(args: TrainConfig):
    """(flag, AdapterConfig field, the flag's value as that field holds it) for the adapter flags."""
    targets = "all-linear" if args.target_modules == "all-linear" else args.target_modules.split(",")
    plain = [("adapter", "kind", args.adapter), ("init", "init", args.init), ("r", "r", args.r),
             ("alpha", "alpha", args.alpha), ("use_rslora", "use_rslora", args.use_rslora),
             ("dropout", "dropout", args.dropout), ("target_modules", "target_modules", targets)]
    return plain + [(k, k, v) for k, v in args.rule_flags().items()]


def _load_data(path: str):
    try:
        data.check_data_path(path)
        return data.load_records(path)
    except DataError as e:
        raise DataError(f"--data: {e}") from None


def _check_model(model: str) -> bool:
    if os.path.isdir(model):
        data.check_model_dir(model)
    elif model not in demo_presets():  # a preset is built (once, by rank 0) after every check passed
        raise ConfigError(f"--model {model!r} is neither a local model directory nor a buildable preset "
                          f"({', '.join(demo_presets())})")
    return True


def _check_output_dir(args: TrainConfig, out_dir: str) -> None:
    """Writable; holding no previous run unless --resume (which needs one) or --overwrite_output_dir."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--output_dir {args.output_dir!r} is not writable: {e}") from None
    found = [name for name in PREVIOUS_RUN if os.path.exists(os.path.join(out_dir, name))]
    if args.resume:
        if checkpoint.latest_tag(os.path.join(out_dir, "checkpoints")) is None:
            raise ConfigError(f"--resume: no checkpoint in {os.path.join(out_dir, 'checkpoints')} "
                              f"(its 'latest' file is missing)")
    elif found and not args.overwrite_output_dir:
        raise ConfigError(f"--output_dir {args.output_dir!r} holds a previous run ({', '.join(found)}): pass "
                          f"--resume to continue it, --overwrite_output_dir to replace it, or another --output_dir")


def _remove_previous_run(out_dir: str) -> None:
    """--overwrite_output_dir: remove what a run writes, and nothing else."""
    for name in ("checkpoints", "adapter"):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    for name in ("metrics.jsonl", "final.json"):
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def _total_steps(args: TrainConfig, n_train: int) -> int:
    steps_per_epoch = max(1, n_train // args.batch_size)
    return args.max_steps if args.max_steps > 0 else steps_per_epoch * args.epochs


def _hidden_size(model_dir: str):
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f).get("hidden_size")


def _ds_config(args: TrainConfig, world: int, total_steps: int, hidden) -> dict:
    return prepare_ds_config(args.ds_config, world_size=world, train_batch_size=args.batch_size,
                             micro_batch_size=args.micro_batch_size, lr=args.lr, weight_decay=args.weight_decay,
                             betas=(0.9, 0.999), eps=1e-8, total_steps=total_steps,
                             warmup_steps=warmup_steps_from_ratio(total_steps, args.warmup_ratio), bf16=args.bf16,
                             gradient_clipping=args.max_grad_norm, hidden_size=hidden)


def _update_rule_setup(args: TrainConfig, config, model, ds_config: dict):
    """(param groups, ds_config, client optimizer or None) for the adapter config's update rule.

    LoRA+: B's group at lr·ratio; the scheduler LRs the filling wrote from "auto" become per-group
    values (value × group ratio); one written in the ds_config file itself stays, and a scheduler that
    would set it on every group is refused. LoRA-Pro's full rule: its moments make the update
    Adam-like, so the inner step is plain SGD: the ds_config's optimizer section is replaced (a stated
    warning) and gradient_clipping set to 0, --max_grad_norm clipping the raw reduced gradients
    inside the rule instead (an adjusted gradient's norm is not the raw one's)."""
    groups = update_rules.param_groups(model, config, args.lr, args.weight_decay)
    optimizer = None
    if config.loraplus_lr_ratio:
        ds_config = _per_group_scheduler(args, ds_config, groups)
        log(f"LoRA+: lr {args.lr:g} for {', '.join(g['name'] for g in groups)} x {[g['lr_ratio'] for g in groups]}")
    if config.update_rule == "lora_pro" and config.update_option("moments") == "full":
        old = (ds_config.get("optimizer") or {}).get("type")
        ds_config = {k: v for k, v in ds_config.items() if k != "optimizer"}
        ds_config.update(gradient_clipping=0, zero_allow_untested_optimizer=True)
        optimizer = update_rules.inner_optimizer(groups)
        log(f"warning: update_rule lora_pro: the ds_config optimizer {old!r} is replaced by plain SGD on LoRA-Pro's "
            f"adjusted gradients (Adam's betas/eps come from update_options: {config.update_option('betas')}, "
            f"{config.update_option('eps')}); gradient_clipping set to 0, --max_grad_norm {args.max_grad_norm:g} "
            f"clips the raw gradients before the rule")
    update_rules.check_ds_config(ds_config, config, groups)
    return groups, ds_config, optimizer


def _per_group_scheduler(args: TrainConfig, ds_config: dict, groups: list) -> dict:
    """LoRA+: per-group scheduler LRs for the keys that were "auto" in the ds_config file."""
    raw = ((load_ds_config(args.ds_config).get("scheduler") or {}).get("params") or {})
    out = update_rules.per_group_scheduler(ds_config, groups)
    params = (out.get("scheduler") or {}).get("params")
    if params is not None:
        params.update({k: v for k, v in raw.items() if v != "auto"})  # written by hand: kept as written
    try:
        update_rules.check_scheduler(out, groups)
    except DeepSpeedConfigError as e:
        raise DeepSpeedConfigError(f"--loraplus_lr_ratio with --ds_config {args.ds_config}: {e}; or write \"auto\" "
                                   f"there and train.py gives each group its LR") from None
    return out


def _attach_rule(engine, config, args: TrainConfig):
    """LoRA-FA and LoRA-Pro light act inside backward (hooks); LoRA-Pro's full rule is returned, to
    run between backward and step."""
    if config.update_rule == "lora_pro" and config.update_option("moments") == "full":
        return update_rules.LoRAPro(engine, max_grad_norm=args.max_grad_norm or None)
    update_rules.attach_update_rule(engine)
    return None


def _truncate_metrics(path: str, step: int) -> None:
    """On resume, drop metric lines past the resumed step so the log reads as one run."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


if __name__ == "__main__":
    main()
