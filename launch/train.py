"""Fine-tune a causal LM with LoRA-family adapters under DeepSpeed.

    deepspeed launch/train.py --ds_config ds_configs/zero3.json            # embedded demo defaults
    deepspeed launch/train.py --ds_config ds_configs/zero3.json --model /path/to/llama --data data.jsonl \
        --adapter lora_fa --init lora_da --r 8 --alpha 16 --epochs 1 --output_dir runs/x
    deepspeed launch/train.py --config run.yaml                            # the same flags as YAML/JSON

On CPU set DS_ACCELERATOR=cpu. Also runs under torchrun and `mpirun -np N python launch/train.py`.
Reads top to bottom: config, distributed setup, data, model + adapters, data-aware init, loop,
checkpoints, evaluation, adapter export. The library (lora_dist) does the heavy lifting.
"""
import argparse
import json
import math
import os
import sys
import time
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import lora_dist as ld  # noqa: E402
from lora_dist.job import checkpoint, data  # noqa: E402
from lora_dist.job.demo import METAMATH_TINY, resolve_model  # noqa: E402
from lora_dist.job.ds_config import DeepSpeedConfigError, prepare_ds_config, warmup_steps_from_ratio  # noqa: E402
from lora_dist.job.evaluate import eval_exact_match, eval_loss  # noqa: E402

# ---------------------------------------------------------------------------------------------
# config: embedded defaults (a few minutes on a 2-core CPU), overridden by --config, then by flags
# ---------------------------------------------------------------------------------------------
DEFAULTS = dict(
    ds_config="ds_configs/zero3.json", model="tiny-llama", data=str(METAMATH_TINY), template="auto",
    adapter="lora_fa", init="lora_da", r=8, alpha=16.0, use_rslora=False, dropout=0.0,
    target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", init_samples=64,
    init_options="{}", max_seq_len=128, overlength="truncate", epochs=1, max_steps=120,
    batch_size=16, micro_batch_size=8, lr=2e-3, warmup_ratio=0.03, weight_decay=0.0, max_grad_norm=1.0,
    bf16=False, gradient_checkpointing=False, eval_size=64, eval_every=40, eval_generate=16,
    save_every=40, output_dir="outputs/run", resume=False, seed=0, num_proc=None,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML or JSON file of flag values (flags given here override it)")
    p.add_argument("--ds_config", "--deepspeed_config", dest="ds_config")
    p.add_argument("--model", help="local HF model directory, or a built-in preset (tiny-llama, small-llama)")
    p.add_argument("--data", help="json, jsonl, parquet file or a `datasets` save_to_disk directory")
    p.add_argument("--template", help="auto, metamath, alpaca or commonsense")
    p.add_argument("--adapter", choices=ld.KINDS)
    p.add_argument("--init", choices=ld.INITS)
    p.add_argument("--r", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--use_rslora", action="store_true", default=None)
    p.add_argument("--dropout", type=float)
    p.add_argument("--target_modules", help="comma-separated name patterns, or all-linear")
    p.add_argument("--init_samples", type=int, help="calibration samples for data-aware inits")
    p.add_argument("--init_options", help='JSON object, e.g. \'{"beta": 0.03}\'')
    p.add_argument("--max_seq_len", type=int)
    p.add_argument("--overlength", choices=["truncate", "filter"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--max_steps", type=int, help="optimizer steps (<= 0: run --epochs)")
    p.add_argument("--batch_size", type=int, help="global batch size (samples per optimizer step)")
    p.add_argument("--micro_batch_size", type=int, help="per-rank micro-batch")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup_ratio", type=float)
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--max_grad_norm", type=float)
    p.add_argument("--bf16", action="store_true", default=None)
    p.add_argument("--gradient_checkpointing", action="store_true", default=None)
    p.add_argument("--eval_size", type=int, help="held-out examples")
    p.add_argument("--eval_every", type=int)
    p.add_argument("--eval_generate", type=int, help="held-out prompts scored by greedy generation (math)")
    p.add_argument("--save_every", type=int)
    p.add_argument("--output_dir")
    p.add_argument("--resume", action="store_true", default=None, help="continue from output_dir's latest checkpoint")
    p.add_argument("--seed", type=int)
    p.add_argument("--num_proc", type=int, help="tokenizer processes")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = dict(DEFAULTS)
    if args.config:
        cfg.update(load_config_file(args.config, p))
    cfg.update({k: v for k, v in vars(args).items() if v is not None and k not in ("config", "local_rank")})
    for key in ("r", "init_samples", "max_seq_len", "batch_size", "micro_batch_size", "eval_every", "save_every"):
        if cfg[key] is None or cfg[key] <= 0:
            p.error(f"--{key} must be positive, got {cfg[key]}")
    for key in ("lr", "alpha"):
        if cfg[key] <= 0:
            p.error(f"--{key} must be positive, got {cfg[key]}")
    if not 0 <= cfg["warmup_ratio"] < 1:
        p.error(f"--warmup_ratio must be in [0, 1), got {cfg['warmup_ratio']}")
    try:
        cfg["init_options"] = json.loads(cfg["init_options"]) if isinstance(cfg["init_options"], str) else cfg["init_options"]
    except json.JSONDecodeError as e:
        p.error(f"--init_options is not valid JSON: {e}")
    return argparse.Namespace(**cfg)


def load_config_file(path, parser):
    if not os.path.isfile(path):
        parser.error(f"--config {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as e:
        parser.error(f"--config {path!r} cannot be parsed: {e}")
    if not isinstance(values, dict):
        parser.error(f"--config {path!r} must hold a mapping of flag names to values")
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        parser.error(f"--config {path!r} has unknown keys {unknown}; known: {sorted(DEFAULTS)}")
    return values


def log(*a):
    if ld.zero.rank() == 0:
        print(*a, flush=True)


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    # -----------------------------------------------------------------------------------------
    # distributed setup (deepspeed / torchrun env vars, or MPI discovery through mpi4py)
    # -----------------------------------------------------------------------------------------
    import deepspeed
    from lora_dist.job.distributed import init_distributed
    init_distributed()
    rank, world = ld.zero.rank(), ld.zero.world_size()
    device = torch.device(deepspeed.get_accelerator().device_name(), int(os.environ.get("LOCAL_RANK", 0))) \
        if deepspeed.get_accelerator().device_name() != "cpu" else torch.device("cpu")
    torch.manual_seed(args.seed)
    out_dir = os.path.abspath(args.output_dir)
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if rank == 0:  # fail now, not after an hour of training
        try:
            os.makedirs(ckpt_dir, exist_ok=True)
            probe = os.path.join(out_dir, ".write_test")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            raise SystemExit(f"--output_dir {args.output_dir!r} is not writable: {e}")
    resume_tag = checkpoint.latest_tag(ckpt_dir) if args.resume else None
    if args.resume and resume_tag is None:
        raise SystemExit(f"--resume: no checkpoint in {ckpt_dir} (its 'latest' file is missing)")

    # -----------------------------------------------------------------------------------------
    # data: records -> held-out split -> tokenized examples (loss on response tokens only)
    # -----------------------------------------------------------------------------------------
    model_dir = str(resolve_model(args.model)) if rank == 0 else None
    model_dir = _broadcast(model_dir)  # rank 0 builds a preset once; the others wait for its path
    tokenizer = data.load_tokenizer(model_dir)
    records = data.load_records(args.data)
    train_rec, eval_rec = data.train_eval_split(records, args.eval_size, seed=args.seed)
    train_ds, report = data.build_dataset(train_rec, tokenizer, template=args.template, max_seq_len=args.max_seq_len,
                                          overlength=args.overlength, num_proc=args.num_proc)
    eval_ds, _ = data.build_dataset(eval_rec, tokenizer, template=report.template, max_seq_len=args.max_seq_len,
                                    overlength=args.overlength)
    log(report)
    pad_id = tokenizer.pad_token_id

    # -----------------------------------------------------------------------------------------
    # schedule and DeepSpeed config ("auto" values filled from the flags)
    # -----------------------------------------------------------------------------------------
    steps_per_epoch = max(1, len(train_ds) // args.batch_size)
    total_steps = args.max_steps if args.max_steps and args.max_steps > 0 else steps_per_epoch * args.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    from transformers import AutoConfig
    hidden = getattr(AutoConfig.from_pretrained(model_dir), "hidden_size", None)
    warmup_steps = warmup_steps_from_ratio(total_steps, args.warmup_ratio)
    try:
        ds_config = prepare_ds_config(args.ds_config, world_size=world, train_batch_size=args.batch_size,
                                      micro_batch_size=args.micro_batch_size, lr=args.lr,
                                      weight_decay=args.weight_decay, betas=(0.9, 0.999), eps=1e-8,
                                      total_steps=total_steps,
                                      warmup_steps=warmup_steps,
                                      bf16=args.bf16, gradient_clipping=args.max_grad_norm, hidden_size=hidden)
    except DeepSpeedConfigError as e:
        raise SystemExit(str(e))
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
    targets = "all-linear" if args.target_modules == "all-linear" else args.target_modules.split(",")
    config = ld.AdapterConfig(kind=args.adapter, init=None if args.adapter == "none" else args.init, r=args.r,
                              alpha=args.alpha, use_rslora=args.use_rslora, dropout=args.dropout,
                              target_modules=targets, init_options=args.init_options,
                              init_samples=args.init_samples, seed=args.seed)
    if resume_tag and args.adapter != "none":  # re-applies an init that rewrote W (frozen W is not checkpointed)
        names = ld.load_adapter(model, os.path.join(ckpt_dir, resume_tag, "adapter"))
    else:
        names = ld.inject_adapters(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
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
        # LoRA-SB's η: the LR of the first warm-up step that moves the weights (linear warm-up from 0)
        first_lr = args.lr / max(1, warmup_steps)
        init_report = ld.initialize_adapters(engine, config, data.batches(train_ds, mine, args.micro_batch_size, pad_id),
                                             n_train=len(train_ds), lr=first_lr)
        log(init_report.summary())

    # -----------------------------------------------------------------------------------------
    # resume: engine, optimizer, LR schedule, RNG and the position in the data order
    # -----------------------------------------------------------------------------------------
    step, epoch, micro_pos = 0, 0, 0
    if resume_tag:
        state = checkpoint.load(engine, ckpt_dir, resume_tag)
        step, epoch, micro_pos = state["step"], state["epoch"], state["micro_pos"]
        log(f"resumed from {resume_tag}: step {step}, epoch {epoch}")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if rank == 0:
        _truncate_metrics(metrics_path, step)

    # -----------------------------------------------------------------------------------------
    # training loop
    # -----------------------------------------------------------------------------------------
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=rank != 0)
    engine.train()
    t0, micro_losses = time.time(), []
    while step < total_steps:
        order = data.shard_indices(len(train_ds), rank, world, seed=args.seed, epoch=epoch)
        n_micro = (len(order) // (args.micro_batch_size * accum)) * accum  # whole optimizer steps only
        for pos in range(micro_pos, n_micro):
            idx = order[pos * args.micro_batch_size:(pos + 1) * args.micro_batch_size]
            b = next(data.batches(train_ds, idx, args.micro_batch_size, pad_id))
            b = {k: v.to(device) for k, v in b.items()}
            loss = engine(**b).loss
            engine.backward(loss)
            engine.step()
            micro_losses.append(loss.item())
            if (pos + 1) % accum:
                continue
            step += 1
            step_loss = _mean_over_ranks(sum(micro_losses) / len(micro_losses))
            micro_losses = []
            lr = scheduler.get_lr()[0] if scheduler is not None else args.lr
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            record = {"step": step, "loss": step_loss, "lr": lr, "time": round(time.time() - t0, 2)}
            last_step = step == total_steps
            if step % args.eval_every == 0 or last_step:
                record.update(eval_loss(engine.module, eval_ds, pad_id, args.micro_batch_size, device))
                engine.train()
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if step % args.save_every == 0 and not last_step:
                checkpoint.save(engine, ckpt_dir, step, {"step": step, "epoch": epoch, "micro_pos": pos + 1},
                                with_adapter=args.adapter != "none")
            if last_step:
                break
        if step >= total_steps:
            break
        epoch, micro_pos = epoch + 1, 0
    bar.close()

    # -----------------------------------------------------------------------------------------
    # held-out evaluation and the PEFT adapter
    # -----------------------------------------------------------------------------------------
    final = eval_loss(engine.module, eval_ds, pad_id, args.micro_batch_size, device)
    if report.template == "metamath" and args.eval_generate > 0:
        tmpl = data.get_template(report.template)
        rows = [eval_rec[i] for i in range(min(args.eval_generate, len(eval_rec)))]
        final.update(eval_exact_match(engine.module, tokenizer, [tmpl.prompt(r) for r in rows],
                                      [tmpl.reference(r) for r in rows], device))
    log(f"final: step {step}, held-out loss {final['eval_loss']:.4f}, perplexity {final['eval_ppl']:.2f}"
        + (f", exact match {final['exact_match']:.3f} on {final['generated']} prompts" if "exact_match" in final else ""))
    if args.adapter != "none":
        adapter_dir = os.path.join(out_dir, "adapter")
        ld.save_adapter(engine, adapter_dir, base_model_name_or_path=os.path.abspath(model_dir))
        log(f"PEFT adapter: {adapter_dir}  (base model {os.path.abspath(model_dir)})")
    if rank == 0:
        with open(os.path.join(out_dir, "final.json"), "w") as f:
            json.dump({"step": step, **{k: v for k, v in final.items()}}, f, indent=1)


def _broadcast(obj):
    if ld.zero.world_size() == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _mean_over_ranks(x: float) -> float:
    if ld.zero.world_size() == 1:
        return x
    import torch.distributed as dist
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / ld.zero.world_size()


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
