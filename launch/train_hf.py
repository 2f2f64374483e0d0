"""Fine-tune a causal LM with lora_dist adapters from a TRL `SFTTrainer` under DeepSpeed.

    deepspeed launch/train_hf.py --ds_config ds_configs/zero3.json --model /path/to/llama --data data.jsonl \
        --adapter lora --init lora_da --r 8 --alpha 16 --max_steps 100 --output_dir runs/hf
    deepspeed launch/train_hf.py ... --resume          # continue from output_dir's last checkpoint-N

The same model, data, adapter and init flags as launch/train.py (run it with --help). What lora_dist
adds to a stock SFTTrainer script is marked `# lora_dist`. Outputs in --output_dir: adapter/ (stock
PEFT), checkpoint-N/ (Trainer checkpoints, each with an adapter/), adapter_init/ (the adapter right
after the data-aware init), lora_dist_init.json (N, LR), log_history.json (the Trainer's log).
On CPU set DS_ACCELERATOR=cpu.
"""
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import lora_dist as ld  # noqa: E402
import lora_dist.hf  # noqa: E402,F401
from lora_dist.job import data  # noqa: E402
from lora_dist.job.demo import resolve_model  # noqa: E402
from lora_dist.job.ds_config import warmup_steps_from_ratio  # noqa: E402
from lora_dist.job.args import parse_args  # noqa: E402  (launch/train.py's flags)


def main(argv=None):
    args = parse_args(argv, description=__doc__)
    from trl import SFTConfig, SFTTrainer
    from transformers import AutoModelForCausalLM

    # -----------------------------------------------------------------------------------------
    # data: records -> held-out split -> tokenized examples (input_ids, labels; -100 on the prompt)
    # -----------------------------------------------------------------------------------------
    model_dir = str(resolve_model(args.model))  # a preset is built once per machine (concurrent ranks are safe)
    tokenizer = data.load_tokenizer(model_dir)
    train_rec, eval_rec = data.train_eval_split(data.load_records(args.data), args.eval_size, seed=args.seed)
    kw = dict(max_seq_len=args.max_seq_len, overlength=args.overlength)
    train_ds, report = data.build_dataset(train_rec, tokenizer, template=args.template, num_proc=args.num_proc, **kw)
    eval_ds, _ = data.build_dataset(eval_rec, tokenizer, template=report.template, **kw)
    train_ds = train_ds.select_columns(["input_ids", "labels"])
    eval_ds = eval_ds.select_columns(["input_ids", "labels"])
    # lora_dist: calibration samples for the data-aware init, drawn from the training set like train.py
    calibration = train_ds.select(data.calibration_indices(len(train_ds), args.init_samples, seed=args.seed))

    # -----------------------------------------------------------------------------------------
    # trainer arguments: built BEFORE the model, so that under ZeRO-3 from_pretrained runs in zero.Init
    # -----------------------------------------------------------------------------------------
    # DeepSpeed's process group first: on CPU ranks Accelerate would otherwise count a world of one
    from lora_dist.job.distributed import init_distributed
    init_distributed()
    world = ld.zero.world_size()
    if args.batch_size % (args.micro_batch_size * world):
        raise SystemExit(f"--batch_size {args.batch_size} is not a multiple of --micro_batch_size "
                         f"{args.micro_batch_size} x {world} ranks")
    steps_per_epoch = max(1, len(train_ds) // args.batch_size)
    total_steps = args.max_steps if args.max_steps and args.max_steps > 0 else steps_per_epoch * args.epochs
    sft_args = SFTConfig(
        output_dir=args.output_dir, deepspeed=args.ds_config, max_steps=total_steps,
        per_device_train_batch_size=args.micro_batch_size, per_device_eval_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // (args.micro_batch_size * world),
        learning_rate=args.lr, warmup_steps=warmup_steps_from_ratio(total_steps, args.warmup_ratio),
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, bf16=bool(args.bf16),
        gradient_checkpointing=bool(args.gradient_checkpointing), seed=args.seed, data_seed=args.seed,
        logging_steps=1, save_steps=args.save_every, eval_strategy="steps", eval_steps=args.eval_every,
        max_length=None,  # build_dataset already applied --max_seq_len / --overlength
        report_to="none", dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),  # CPU ranks (DS_ACCELERATOR=cpu)
    )

    # -----------------------------------------------------------------------------------------
    # model + adapters
    # -----------------------------------------------------------------------------------------
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    config = args.adapter_config()  # lora_dist: the AdapterConfig the flags describe
    ld.hf.prepare_model(model, config)  # lora_dist
    callback = ld.hf.LoraDistCallback(  # lora_dist: init at train begin, PEFT adapters at every save
        config, calibration, init_adapter_dir=os.path.join(args.output_dir, "adapter_init"),
        base_model_name_or_path=os.path.abspath(model_dir))

    # -----------------------------------------------------------------------------------------
    # train
    # -----------------------------------------------------------------------------------------
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=[callback])
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f, indent=1)
        print(f"PEFT adapter: {os.path.join(os.path.abspath(args.output_dir), 'adapter')} "
              f"(base model {os.path.abspath(model_dir)})", flush=True)
    return trainer


if __name__ == "__main__":
    main()
