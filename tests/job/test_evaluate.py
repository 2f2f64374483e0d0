"""Held-out evaluation against hand computations: eval_loss is the token-weighted mean NLL of the
response tokens (float64 reference, row by row, unpadded) for any micro-batch size; exact match
scores the final number of each greedy completion against hand-written references."""
import copy
import math

import pytest
import torch

from conftest import tiny_llama
from lora_dist.job.data import IGNORE_INDEX
from lora_dist.job.evaluate import eval_exact_match, eval_loss


def _rows():
    g = torch.Generator().manual_seed(3)
    rows = []
    for length, prompt in [(9, 4), (5, 2), (12, 7), (7, 0), (6, 5)]:
        ids = torch.randint(1, 128, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def _reference(model, rows):
    """Σ −log p(x_{t+1} | x_≤t) over response targets / their number, in float64, one row at a time."""
    m = copy.deepcopy(model).double().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            logp = torch.log_softmax(m(input_ids=torch.tensor([r["input_ids"]])).logits[0], dim=-1)
            for t in range(len(r["input_ids"]) - 1):
                if r["labels"][t + 1] != IGNORE_INDEX:
                    total -= logp[t, r["labels"][t + 1]].item()
                    count += 1
    return total / count, count


@pytest.mark.parametrize("micro", [1, 2, 3, 8])
def test_eval_loss_is_token_weighted_mean_nll_for_any_micro_batch(micro):
    model = tiny_llama().train()
    rows = _rows()
    loss, count = _reference(model, rows)
    assert count == 5 + 3 + 5 + 6 + 1  # response targets: length − max(prompt, 1)
    got = eval_loss(model, rows, pad_id=0, micro_batch_size=micro, device="cpu")
    assert got["eval_tokens"] == count
    assert got["eval_loss"] == pytest.approx(loss, rel=1e-6)
    assert got["eval_ppl"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert model.training  # mode restored


# ---------------------------------------------------------------------------------------------
# Exact match: a tiny model taught to answer six prompts; the references are written by hand.
# ---------------------------------------------------------------------------------------------
ANSWERS = {  # prompt -> the completion the model is trained to give
    "Q1": "The answer is: 1,234.50",   # ref "#### 1234.5": commas and trailing zero normalised -> hit
    "Q2": "The answer is: 7.0",        # ref "so the answer is 7": 7.0 == 7 -> hit
    "Q3": "#### 12",                   # ref "The answer is: 13" -> miss
    "Q4": "I think 3 then 5",          # no marker: the last number, 5 -> hit
    "Q5": "The answer is: none",       # no number after the marker -> miss
    "Q6": "#### 9 The answer is: -2",  # "The answer is" wins over "####": -2 -> hit
}
REFERENCES = ["#### 1234.5", "so the answer is 7", "The answer is: 13", "5", "The answer is: 0", "-2"]
HITS = 4


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for p, a in ANSWERS.items() for w in (p + " " + a).split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + words)}
    t = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _taught_model(tok):
    model = tiny_llama(vocab_size=len(tok))
    seqs = [tok(p + " " + a)["input_ids"] + [tok.eos_token_id] for p, a in ANSWERS.items()]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    labels = torch.tensor([s + [IGNORE_INDEX] * (width - len(s)) for s in seqs])
    mask = (labels != IGNORE_INDEX).long()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_exact_match_scores_final_numbers_against_hand_references():
    tok = _tokenizer()
    model = _taught_model(tok)
    for p, a in ANSWERS.items():  # precondition: the model says what it was taught
        enc = tok(p, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        assert tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True) == a, p
    got = eval_exact_match(model, tok, list(ANSWERS), REFERENCES, device="cpu", max_new_tokens=12)
    assert got["exact_match"] == HITS / len(ANSWERS) and got["generated"] == len(ANSWERS)
    assert got["example"] == ANSWERS["Q1"]
    # each hit is its own prompt's: references shifted by one match no completion (checked by hand)
    shifted = REFERENCES[1:] + REFERENCES[:1]
    got = eval_exact_match(model, tok, list(ANSWERS), shifted, device="cpu", max_new_tokens=12)
    assert got["exact_match"] == 0.0
