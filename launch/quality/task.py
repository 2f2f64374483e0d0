"""The generated causal-LM task: a small Llama pretrained on arithmetic, then fine-tuned on a shift.

Tokens are characters: PAD, BOS, EOS, the ten digits and the operator symbols. Every sequence is
`BOS prompt answer EOS`, e.g. `^123+45=168$`.

- Pretraining corpus (the "pretrained model"): a+b (addition), a-b (a ≥ b), r a (digit reversal),
  a, b uniform in [0, 10^D), loss on every token. `pretrained_base` trains it once and caches it
  with `save_pretrained`, keyed by the hash of its recipe.
- Target task (the shift): a#b = a+b with an operator symbol `#` that pretraining never showed (its
  embedding is still the random init). The base adds at about 36% exact match with `+`; on `#` it
  starts at 0. A pilot at 300 steps, batch 32: full fine-tuning 21%, LoRA r=8 17%, LoRA r=1 15%
  exact match, far from saturated. (Harder variants, the sum reversed or digit-mapped, stayed
  below 2% exact match for every method: nothing to compare.) Loss is on the answer and EOS only.
- Splits: disjoint sets of (a, b) pairs: train (`n_train`, the N of LoRA-DA), val, test.
- Exact match = every answer token (and EOS) is the argmax under teacher forcing. That is the same
  as greedy decoding returning the answer: greedy follows the argmax, so it reproduces the gold
  sequence iff every step's argmax is the gold token. One forward pass per batch.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from typing import Dict, List

import torch

CHARS = "0123456789+-r#="
PAD, BOS, EOS = 0, 1, 2
VOCAB = 3 + len(CHARS)
_ID = {c: 3 + i for i, c in enumerate(CHARS)}


def encode(text: str) -> List[int]:
    return [_ID[c] for c in text]


@dataclass(frozen=True)
class Recipe:
    """Everything that defines the pretrained base model (its hash names the cache entry)."""
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    digits: int = 3
    steps: int = 3000
    batch: int = 64
    lr: float = 3e-3
    seed: int = 1234

    @classmethod
    def quick(cls) -> "Recipe":
        """The --quick base: small enough to pretrain in seconds."""
        return cls(hidden=64, layers=2, intermediate=128, steps=1200, batch=64)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _pretrain_example(rng: random.Random, digits: int) -> str:
    hi = 10 ** digits
    a, b = rng.randrange(hi), rng.randrange(hi)
    op = rng.randrange(3)
    if op == 0:
        return f"{a}+{b}={a + b}"
    if op == 1:
        a, b = max(a, b), min(a, b)
        return f"{a}-{b}={a - b}"
    return f"r{a}={str(a)[::-1]}"


def _pad(rows: List[List[int]], labels: List[List[int]]) -> Dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 where no loss)."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), PAD, dtype=torch.long)
    lab = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, :len(r)] = torch.tensor(r)
        lab[i, :len(l)] = torch.tensor(l)
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def _build_llama(recipe: Recipe):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
                      num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                      num_key_value_heads=recipe.heads, max_position_embeddings=64, pad_token_id=PAD,
                      bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(cfg)


def pretrained_base(cache_dir: str, recipe: Recipe = Recipe(), log=print) -> str:
    """The pretrained base model's directory: trained on the arithmetic corpus on first use, then
    reused (written to a temporary name and renamed, so an interrupted pretraining is never reused)."""
    path = os.path.join(cache_dir, f"base-{recipe.key()}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same base, bit for bit, wherever it is rebuilt
    try:
        model = _pretrain(recipe, log)
    finally:
        torch.set_num_threads(threads)
    tmp = path + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "pretraining.json"), "w") as f:
        json.dump({"recipe": asdict(recipe), "exact_match": base_skills(model, recipe)}, f, indent=1)
    os.replace(tmp, path)
    return path


def _pretrain(recipe: Recipe, log):
    """AdamW, one-cycle LR, LM loss on every token of fresh corpus batches."""
    model = _build_llama(recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.05)
    rng = random.Random(recipe.seed)
    for step in range(1, recipe.steps + 1):
        rows = [[BOS] + encode(_pretrain_example(rng, recipe.digits)) + [EOS] for _ in range(recipe.batch)]
        batch = _pad(rows, rows)
        loss = model(**batch).loss
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % 500 == 0 or step == recipe.steps:
            log(f"pretraining the base model: step {step}/{recipe.steps}, loss {loss.item():.4f}")
    return model


@torch.no_grad()
def base_skills(model, recipe: Recipe, n: int = 512) -> Dict[str, float]:
    """The pretrained model's exact match on fresh examples of each pretraining operation (the
    answer after `=`, teacher-forced argmax; see the module doc)."""
    rng = random.Random(recipe.seed + 1)
    out = {}
    for op, want in (("add", "+"), ("sub", "-"), ("rev", "r")):
        ex = []
        while len(ex) < n:
            text = _pretrain_example(rng, recipe.digits)
            if want in text:
                prompt, ans = text.split("=")
                ex.append(([BOS] + encode(prompt + "="), encode(ans) + [EOS]))
        out[op] = _score(model, _answer_batch(ex))[2] / n
    return out


def _score(model, batch) -> tuple:
    """(Σ answer-token CE, answer tokens, exact matches) of one padded batch (see the module doc)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    gold = batch["labels"][:, 1:]
    valid = gold != -100
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), gold.clamp(min=0), reduction="none")
    right = (logits.argmax(-1) == gold) | ~valid
    return float((ce * valid).sum()), int(valid.sum()), int(right.all(dim=1).sum())


def _answer_batch(examples) -> Dict[str, torch.Tensor]:
    """(prompt ids, answer ids) pairs, padded, with loss on the answer only."""
    return _pad([p + a for p, a in examples], [[-100] * len(p) + a for p, a in examples])


class ArithmeticShift:
    """The fine-tuning task the runner drives (same interface as encoder.EncoderTask)."""

    name = "arith-shift"
    metric_name = "exact match"

    def __init__(self, cache_dir: str, quick: bool = False, recipe: Recipe = Recipe(), log=print):
        self.recipe = recipe
        self.base = pretrained_base(cache_dir, recipe, log)
        sizes = (1024, 256, 256) if quick else (4096, 384, 768)
        self.splits = self._splits(*sizes)
        self.n_train = sizes[0]
        from .methods import METHODS
        self.methods = tuple(METHODS)  # every method applies to a causal LM
        self.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def _splits(self, n_train: int, n_val: int, n_test: int) -> Dict[str, list]:
        """Disjoint (a, b) pairs, drawn once from a fixed seed; each example is (prompt, answer) ids."""
        rng = random.Random(2026)
        hi = 10 ** self.recipe.digits
        pairs = set()
        while len(pairs) < n_train + n_val + n_test:
            pairs.add((rng.randrange(hi), rng.randrange(hi)))
        pairs = sorted(pairs)
        rng.shuffle(pairs)

        def example(a, b):
            ans = str(a + b)
            return [BOS] + encode(f"{a}#{b}="), encode(ans) + [EOS]
        ex = [example(a, b) for a, b in pairs]
        return {"train": ex[:n_train], "val": ex[n_train:n_train + n_val], "test": ex[n_train + n_val:]}

    def load_model(self):
        from transformers import LlamaForCausalLM
        return LlamaForCausalLM.from_pretrained(self.base, dtype=torch.float32)

    def trainable_extra(self, model) -> list:
        return []  # the LM head is pretrained: only the adapters train

    def train_batch(self, step: int, seed: int, batch_size: int) -> Dict[str, torch.Tensor]:
        """Batch `step` (from 1) of epoch-wise shuffles seeded by (seed, epoch): the same order for
        every method at one seed."""
        per_epoch = self.n_train // batch_size
        epoch, k = divmod(step - 1, per_epoch)
        order = torch.randperm(self.n_train, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        idx = order[k * batch_size:(k + 1) * batch_size].tolist()
        return _answer_batch([self.splits["train"][i] for i in idx])

    def loss(self, model, batch) -> torch.Tensor:
        return model(**batch).loss

    def calibration(self, n: int, batch_size: int = 64) -> list:
        """The first n training examples (fixed, whatever the seed), in batches."""
        ex = self.splits["train"][:n]
        return [_answer_batch(ex[i:i + batch_size]) for i in range(0, len(ex), batch_size)]

    @torch.no_grad()
    def evaluate(self, model, split: str, batch_size: int = 256) -> dict:
        """Token-mean loss over answer tokens, and exact match (see the module doc)."""
        ex = self.splits[split]
        tot, tokens, hits = 0.0, 0, 0
        for i in range(0, len(ex), batch_size):
            loss, n, right = _score(model, _answer_batch(ex[i:i + batch_size]))
            tot, tokens, hits = tot + loss, tokens + n, hits + right
        return {"loss": tot / tokens, "metric": hits / len(ex)}
