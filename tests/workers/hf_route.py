"""The HF route on real ranks (ZeRO-3, CPU, gloo), several Trainer runs in one launch.

    deepspeed --num_gpus 2 tests/workers/hf_route.py OUT MODEL_DIR

Runs, each a fresh SFTConfig + zero.Init model + SFTTrainer in this process:
  da/           launch/train_hf.py, LoRA-DA, 5 steps, checkpoint at 3; logits of the trained model
                on a fixed batch in da/logits.pt;
  pissa/        launch/train_hf.py, PiSSA (rewrites W), 4 steps, checkpoint at 2; logits likewise;
  pissa_resume/ the pissa run's checkpoint-2 copied in, then `--resume`;
  pissa_nofrozen/ the same with the frozen weights taken out of DeepSpeed's files, then `--resume`;
  fa/           update_rule='lora_fa' from the library API, then DeepSpeed's reduced B gradients
                of one more backward on a fixed batch (fa/grads.pt);
  snippet/      the README's "From an HF Trainer or TRL script" code block, exec'd as written
                (DeepSpeed's process group is already up: on CPU ranks Accelerate would count a world
                of one otherwise; a GPU script needs nothing).
The pytest side (tests/test_hf.py) checks the files against independent computations.
"""
import glob
import os
import re
import shutil
import sys

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "launch"))
sys.path.insert(0, REPO)

import train_hf  # noqa: E402
from lora_dist.job.distributed import init_distributed  # noqa: E402

COMMON = ["--ds_config", os.path.join(REPO, "ds_configs", "zero3.json"), "--batch_size", "4",
          "--micro_batch_size", "2", "--eval_size", "8", "--eval_every", "100", "--init_samples", "16",
          "--max_seq_len", "64", "--adapter", "lora", "--r", "4", "--alpha", "8",
          "--target_modules", "q_proj,v_proj,down_proj"]


def probe_batch(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(1, vocab, (2, 12), generator=g)


def save_logits(trainer, path):
    model = trainer.model
    model.eval()
    ids = probe_batch(model.config.vocab_size)
    with torch.no_grad():  # every rank runs the forward: ZeRO-3 gathers each layer for it
        logits = model(input_ids=ids).logits.float()
    if dist.get_rank() == 0:
        torch.save({"input_ids": ids, "logits": logits}, path)


def run(out, model_dir, name, *extra):
    return train_hf.main([*COMMON, "--model", model_dir, "--output_dir", os.path.join(out, name), *extra])


def small_train_set(model_dir):
    """The tokenizer and 64 tokenized training samples for the library-API phases."""
    from lora_dist.job import data
    from lora_dist.job.demo import METAMATH_TINY
    tok = data.load_tokenizer(model_dir)
    train, _ = data.build_dataset(data.load_records(METAMATH_TINY), tok, max_seq_len=64)
    return tok, train.select_columns(["input_ids", "labels"]).select(range(64))


def lora_fa_phase(out, model_dir):
    """update_rule='lora_fa' through the library API on a plain SFTTrainer, then one more backward on
    the Trainer's engine: DeepSpeed's reduced gradient of every B, saved for the pytest side."""
    import lora_dist as ld
    import lora_dist.hf  # noqa: F401
    from deepspeed.utils import safe_get_full_grad
    from lora_dist.job import data
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    d = os.path.join(out, "fa")
    tok, train = small_train_set(model_dir)
    args = SFTConfig(output_dir=d, deepspeed=COMMON[1], max_steps=3, per_device_train_batch_size=2,
                     max_length=None, report_to="none", bf16=False, use_cpu=True, save_strategy="no")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = ld.AdapterConfig(kind="lora_fa", init="lora_da", r=4, alpha=8.0, init_samples=16,
                              target_modules=["q_proj", "v_proj", "down_proj"], update_rule="lora_fa")
    ld.hf.prepare_model(model, config)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok,
                         callbacks=[ld.hf.LoraDistCallback(config, train.select(range(16)))])
    trainer.train()
    engine = trainer.model_wrapped
    batch = data.collate([train[i] for i in range(2)], pad_id=tok.pad_token_id)  # the same on both ranks
    engine.train()
    engine.backward(engine(**batch).loss)
    grads = {n: safe_get_full_grad(m.lora_B).cpu() for n, m in ld.adapter_modules(trainer.model)}
    if dist.get_rank() == 0:
        torch.save({"batch": batch, "grads": grads}, os.path.join(d, "grads.pt"))
    engine.zero_grad()


def loraplus_phase(out, model_dir, name, with_optimizer_section):
    """loraplus_lr_ratio=4 through LoraDistTrainerMixin; records the ZeRO-3 optimizer's groups, or the
    error the callback raises when the ds_config's "optimizer" section bypasses create_optimizer."""
    import json
    import lora_dist as ld
    import lora_dist.hf  # noqa: F401
    from lora_dist.errors import ConfigError
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    d = os.path.join(out, name)
    ds = json.load(open(COMMON[1]))
    if not with_optimizer_section:
        del ds["optimizer"]
    tok, train = small_train_set(model_dir)
    args = SFTConfig(output_dir=d, deepspeed=ds, max_steps=3, per_device_train_batch_size=2, learning_rate=2e-3,
                     max_length=None, report_to="none", bf16=False, use_cpu=True, save_strategy="no")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = ld.AdapterConfig(kind="lora", r=4, alpha=8.0, target_modules=["q_proj", "v_proj"], loraplus_lr_ratio=4.0)
    ld.hf.prepare_model(model, config)

    class Trainer(ld.hf.LoraDistTrainerMixin, SFTTrainer):
        pass

    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tok,
                      callbacks=[ld.hf.LoraDistCallback(config)])
    os.makedirs(d, exist_ok=True)
    try:
        trainer.train()
    except ConfigError as e:
        if dist.get_rank() == 0:
            open(os.path.join(d, "error.txt"), "w").write(str(e))
        return
    zero = trainer.model_wrapped.optimizer
    parts = [torch.tensor([p.numel()]) for p in zero.fp32_partitioned_groups_flat]
    sizes = [[int(t) for t in _all_gather(x)] for x in parts]
    if dist.get_rank() == 0:
        groups = [{"name": g["name"], "lr": base, "partition_numel": n}
                  for g, base, n in zip(zero.param_groups, trainer.model_wrapped.lr_scheduler.org_lrs, sizes)]
        json.dump({"groups": groups, "scheduler_base_lrs": list(trainer.model_wrapped.lr_scheduler.org_lrs)},
                  open(os.path.join(d, "groups.json"), "w"))


def _all_gather(x):
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return out


def readme_snippet() -> str:
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split("## From an HF Trainer or TRL script", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def main():
    out, model_dir = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    init_distributed()
    rank = dist.get_rank()

    trainer = run(out, model_dir, "da", "--init", "lora_da", "--max_steps", "5", "--save_every", "3")
    save_logits(trainer, os.path.join(out, "da", "logits.pt"))

    trainer = run(out, model_dir, "pissa", "--init", "pissa", "--max_steps", "4", "--save_every", "2")
    save_logits(trainer, os.path.join(out, "pissa", "logits.pt"))

    if rank == 0:  # a run that stopped after its step-2 checkpoint
        shutil.copytree(os.path.join(out, "pissa", "checkpoint-2"), os.path.join(out, "pissa_resume", "checkpoint-2"))
    dist.barrier()
    trainer = run(out, model_dir, "pissa_resume", "--init", "pissa", "--max_steps", "4", "--save_every", "2",
                  "--resume")
    save_logits(trainer, os.path.join(out, "pissa_resume", "logits.pt"))

    # the same checkpoint without frozen weights (as `save_checkpoint(exclude_frozen_parameters=True)`
    # leaves ZeRO-3 shards): the callback must rewrite W itself this time
    ckpt = os.path.join(out, "pissa_nofrozen", "checkpoint-2")
    if rank == 0:
        shutil.copytree(os.path.join(out, "pissa", "checkpoint-2"), ckpt)
        for f in glob.glob(os.path.join(ckpt, "global_step2", "*model_states.pt")):
            state = torch.load(f, map_location="cpu", weights_only=False)
            state["frozen_param_fragments"] = state["frozen_param_shapes"] = None
            torch.save(state, f)
    dist.barrier()
    run(out, model_dir, "pissa_nofrozen", "--init", "pissa", "--max_steps", "4", "--save_every", "2", "--resume")

    lora_fa_phase(out, model_dir)
    loraplus_phase(out, model_dir, "loraplus", with_optimizer_section=False)
    loraplus_phase(out, model_dir, "loraplus_refused", with_optimizer_section=True)

    # the README snippet, in a directory holding the ds_configs/ it names
    snippet_dir = os.path.join(out, "snippet")
    if rank == 0:
        shutil.copytree(os.path.join(REPO, "ds_configs"), os.path.join(snippet_dir, "ds_configs"))
    dist.barrier()
    os.chdir(snippet_dir)
    exec(compile(readme_snippet(), "README.md snippet", "exec"), {"__name__": "__snippet__"})
    dist.barrier()


if __name__ == "__main__":
    main()
