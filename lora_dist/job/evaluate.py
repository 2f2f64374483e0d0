"""Held-out evaluation that works on one process and under ZeRO-3.

- loss / perplexity: token-mean cross-entropy over the response tokens of the eval set, each rank
  scoring its shard, sums reduced across ranks;
- exact match (math data): greedy generation of each eval prompt, scored on the final number as
  GSM8K is. Under ZeRO-3 every rank must run the same number of forwards, so generation uses
  `synced_gpus=True` and ranks with fewer prompts run padding prompts whose results are discarded.
"""
from __future__ import annotations

import math

import torch

from .data import IGNORE_INDEX, batches, exact_match
from ..comm import Comm


@torch.no_grad()
def eval_loss(module, dataset, pad_id: int, micro_batch_size: int, device) -> dict:
    """Token-weighted mean NLL over every response token of `dataset` (collective):

        eval_loss = Σ_rows Σ_{t: label_{t+1} ≠ ignore} −log p(x_{t+1} | x_≤t) / #(such tokens),
        eval_ppl = exp(eval_loss)   (exponent capped at 50),

    the same whatever the world size or micro-batch size (sums, not means, are reduced)."""
    was = module.training
    module.eval()
    comm = Comm()
    n = len(dataset)
    mine = list(range(comm.rank, n, comm.world))
    steps = math.ceil(math.ceil(n / comm.world) / micro_batch_size)
    total, count = 0.0, 0.0
    it = batches(dataset, mine, micro_batch_size, pad_id) if mine else iter(())
    for _ in range(steps):  # every rank runs the same number of forwards (ZeRO-3 gathers are collective)
        b = next(it, None)
        dummy = b is None
        if dummy:
            b = next(batches(dataset, [0], 1, pad_id))
        b = {k: v.to(device) for k, v in b.items()}
        logits = module(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        labels = b["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        if not dummy:
            total += ce.item()
            count += float((labels != IGNORE_INDEX).sum())
    total, count = comm.sum_scalars([total, count])
    module.train(was)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(count)}


@torch.no_grad()
def eval_exact_match(module, tokenizer, prompts, references, device, max_new_tokens: int = 48) -> dict:
    """Greedy generation on this rank's share of prompts; exact match on the final number:
    exact_match = #{i: final number of completion_i == final number of references[i]} / #prompts
    (collective)."""
    was = module.training
    module.eval()
    comm = Comm()
    n = len(prompts)
    mine = list(range(comm.rank, n, comm.world))
    steps = math.ceil(n / comm.world)
    synced = comm.on
    hits, seen, example = 0.0, 0.0, None
    for k in range(steps):
        i = mine[k] if k < len(mine) else None
        text = prompts[i if i is not None else 0]
        enc = tokenizer(text, return_tensors="pt")
        enc = {key: v.to(device) for key, v in enc.items()}
        out = module.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        if i is None:
            continue
        completion = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += float(exact_match(completion, references[i]))
        seen += 1
        if example is None:
            example = completion
    hits, seen = comm.sum_scalars([hits, seen])
    module.train(was)
    return {"exact_match": hits / max(seen, 1.0), "generated": int(seen), "example": example}
