"""Demo assets built offline and deterministically.

* `generate_metamath` writes the committed math-word-problem set `assets/metamath_tiny.jsonl`
  (MetaMathQA format: query / response / type, responses end with "The answer is: N").
* `ensure_preset` builds, once, a directory holding a randomly initialised
  Llama checkpoint from `presets/<name>.json` (config.json + model.safetensors via save_pretrained)
  and a sentencepiece BPE tokenizer trained on that data set (tokenizer.model, plus tokenizer.json
  so `AutoTokenizer.from_pretrained(dir)` loads it as a fast LlamaTokenizer with pad = <unk>).

Command line::

    python -m lora_dist.job.demo dataset            # regenerate assets/metamath_tiny.jsonl
    python -m lora_dist.job.demo build [--preset tiny-llama] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import ConfigError
from ..presets import list_presets, preset_config
from .data import check_model_dir

logger = logging.getLogger(__name__)

BUILD_VERSION = 1  # bump when the build recipe changes, so cached directories are rebuilt
MARKER = "lora_dist_asset.json"
METAMATH_ROWS = 3000
METAMATH_SEED = 1234
MODEL_SEED = 0
DEMO_VOCAB_SIZE = 1024  # the sentencepiece vocabulary trained on the demo corpus
PACKAGE_DIR = Path(__file__).resolve().parent.parent
METAMATH_TINY = PACKAGE_DIR / "assets" / "metamath_tiny.jsonl"

# ----------------------------------------------------------------------------------------------
# Math word problems (MetaMathQA format)
# ----------------------------------------------------------------------------------------------

_NAMES = [
    ("Ava", "she"), ("Liam", "he"), ("Maya", "she"), ("Noah", "he"), ("Zoe", "she"), ("Omar", "he"),
    ("Lucy", "she"), ("Ethan", "he"), ("Nina", "she"), ("Jack", "he"), ("Sofia", "she"), ("Leo", "he"),
    ("Emma", "she"), ("Ravi", "he"), ("Chloe", "she"), ("Mateo", "he"), ("Aisha", "she"), ("Ben", "he"),
    ("Grace", "she"), ("Hugo", "he"), ("Iris", "she"), ("Felix", "he"), ("Julia", "she"), ("Kenji", "he"),
    ("Lena", "she"), ("Marco", "he"), ("Nora", "she"), ("Oscar", "he"), ("Priya", "she"), ("Sam", "he"),
]
_ITEMS = [
    "apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "stamps", "cards", "flowers",
    "oranges", "balloons", "crayons", "coins", "eggs", "candies", "toy cars", "beads", "lemons", "buttons",
    "cupcakes", "postcards", "pebbles", "ribbons", "muffins", "plums", "kites", "puzzles", "socks", "tickets",
]
_CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"), ("crate", "crates"),
               ("shelf", "shelves"), ("tray", "trays"), ("pack", "packs")]
_GOODS = [("notebook", "notebooks"), ("sandwich", "sandwiches"), ("ticket", "tickets"), ("toy", "toys"),
          ("plant", "plants"), ("mug", "mugs"), ("scarf", "scarves"), ("lamp", "lamps"), ("pizza", "pizzas"),
          ("bracelet", "bracelets"), ("poster", "posters"), ("hat", "hats")]
_VEHICLES = ["train", "bus", "car", "truck", "boat", "scooter"]
_GAMES = ["basketball", "soccer", "chess", "bowling", "darts", "trivia"]


def _poss(pronoun: str) -> str:
    return {"she": "her", "he": "his"}[pronoun]


def _obj(pronoun: str) -> str:
    return {"she": "her", "he": "him"}[pronoun]


def _d_add(rng):
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    return dict(a=a, b=b, ans=a + b)


def _d_sub(rng):
    a = rng.randint(10, 80)
    b = rng.randint(1, a - 1)
    return dict(a=a, b=b, ans=a - b)


def _d_mul(rng):
    n, k = rng.randint(2, 12), rng.randint(2, 15)
    c, cs = rng.choice(_CONTAINERS)
    return dict(n=n, k=k, c=c, cs=cs, ans=n * k)


def _d_div(rng):
    n, k = rng.randint(2, 9), rng.randint(2, 12)
    return dict(n=n, t=n * k, ans=k)


def _d_change(rng):
    g, gs = rng.choice(_GOODS)
    n, p = rng.randint(2, 6), rng.randint(2, 15)
    bill = next(b for b in (10, 20, 50, 100) if b >= n * p)
    return dict(gs=gs, n=n, p=p, cost=n * p, bill=bill, ans=bill - n * p)


def _d_rate(rng):
    p, w = rng.randint(3, 25), rng.randint(1, 4)
    return dict(p=p, w=w, d=7 * w, ans=p * 7 * w)


def _d_twostep(rng):
    a, b = rng.randint(5, 40), rng.randint(5, 40)
    c = rng.randint(1, a + b - 1)
    return dict(a=a, b=b, ab=a + b, c=c, ans=a + b - c)


def _d_compare(rng):
    a, k = rng.randint(2, 20), rng.randint(2, 5)
    return dict(a=a, k=k, b=a * k, ans=a + a * k)


def _d_percent(rng):
    g, _ = rng.choice(_GOODS)
    pct = rng.choice([10, 20, 25, 50])
    price = rng.randint(2, 20) * (100 // math.gcd(100, pct))  # so the discount is whole dollars
    return dict(g=g, pct=pct, price=price, off=price * pct // 100, ans=price - price * pct // 100)


def _d_average(rng):
    game = rng.choice(_GAMES)
    mean = rng.randint(5, 30)
    a, b = mean + rng.randint(-4, 4), mean + rng.randint(-4, 4)
    return dict(game=game, a=a, b=b, c=3 * mean - a - b, total=3 * mean, ans=mean)


def _d_distance(rng):
    vehicle = rng.choice(_VEHICLES)
    v, h = rng.randint(5, 60), rng.randint(2, 6)
    return dict(vehicle=vehicle, v=v, h=h, ans=v * h)


# family: (draw, rephrased question, plain question, worked solution); the text is str.format'ed with
# the draw and name/pron/Pron/obj/poss/other/items, and "\nThe answer is: {ans}" is appended.
_FAMILY_TEXT = {
    "add": (_d_add,
            "If {name} has {a} {items} and {other} gives {obj} {b} more, how many {items} does {name} have now?",
            "{name} has {a} {items}. {other} gives {obj} {b} more {items}. How many {items} does {name} have now?",
            "{name} starts with {a} {items}.\nAfter getting {b} more, {pron} has {a} + {b} = {ans} {items}."),
    "sub": (_d_sub,
            "After giving {b} of {poss} {a} {items} to {other}, how many {items} does {name} have left?",
            "{name} had {a} {items}. {Pron} gave {b} of them to {other}. How many {items} does {name} have left?",
            "{name} had {a} {items} and gave away {b}.\n{Pron} has {a} - {b} = {ans} {items} left."),
    "mul": (_d_mul,
            "If there are {n} {cs} and each {c} holds {k} {items}, what is the total number of {items}?",
            "{name} has {n} {cs}. Each {c} holds {k} {items}. How many {items} does {name} have in total?",
            "There are {n} {cs} with {k} {items} in each.\nSo there are {n} * {k} = {ans} {items} in total."),
    "div": (_d_div,
            "If {name} shares {t} {items} equally among {n} friends, how many {items} does each friend get?",
            "{name} has {t} {items} to share equally among {n} friends. How many {items} does each friend get?",
            "{name} splits {t} {items} into {n} equal groups.\nEach friend gets {t} / {n} = {ans} {items}."),
    "change": (_d_change,
               "If {name} buys {n} {gs} at ${p} each and pays with a ${bill} bill, how much change does {pron} get?",
               "{name} buys {n} {gs} that cost ${p} each. {Pron} pays with a ${bill} bill. "
               "How much change does {name} get?",
               "The {gs} cost {n} * {p} = {cost} dollars.\n{name} gets {bill} - {cost} = {ans} dollars in change."),
    "rate": (_d_rate,
             "If {name} reads {p} pages every day, how many pages will {pron} read in {w} weeks?",
             "{name} reads {p} pages of a book every day. How many pages does {pron} read in {w} weeks?",
             "A week has 7 days, so {w} weeks have 7 * {w} = {d} days.\n{name} reads {p} * {d} = {ans} pages."),
    "twostep": (_d_twostep,
                "If {name} collects {a} {items} in the morning and {b} in the afternoon, and then loses {c}, "
                "how many {items} does {pron} have?",
                "{name} collects {a} {items} in the morning and {b} {items} in the afternoon. "
                "{Pron} loses {c} of them on the way home. How many {items} does {pron} have now?",
                "{name} collects {a} + {b} = {ab} {items}.\nAfter losing {c}, {pron} has {ab} - {c} = {ans} {items}."),
    "compare": (_d_compare,
                "If {name} has {a} {items} and {other} has {k} times as many, how many {items} do they have together?",
                "{name} has {a} {items}. {other} has {k} times as many {items} as {name}. "
                "How many {items} do they have together?",
                "{other} has {k} * {a} = {b} {items}.\nTogether they have {a} + {b} = {ans} {items}."),
    "percent": (_d_percent,
                "If a {g} that costs ${price} is sold at {pct}% off, what is the sale price?",
                "A {g} costs ${price}. The store takes {pct}% off the price. How much does the {g} cost now?",
                "The discount is {pct} / 100 * {price} = {off} dollars.\n"
                "The new price is {price} - {off} = {ans} dollars."),
    "average": (_d_average,
                "If {name} scored {a}, {b} and {c} points in three {game} games, what was {poss} average score?",
                "{name} played three {game} games and scored {a}, {b} and {c} points. "
                "What is {poss} average score per game?",
                "{name} scored {a} + {b} + {c} = {total} points in total.\n"
                "The average is {total} / 3 = {ans} points per game."),
    "distance": (_d_distance,
                 "If a {vehicle} goes {v} miles per hour for {h} hours, how far does it go?",
                 "A {vehicle} travels at {v} miles per hour. How many miles does it travel in {h} hours?",
                 "In {h} hours the {vehicle} travels {v} * {h} = {ans} miles."),
}


def _problem(rng: random.Random, family: str) -> tuple[str, str]:
    """One (query, response) of `family`; the draws happen in a fixed order so a seed fixes the set."""
    name, pron = rng.choice(_NAMES)
    other, _ = rng.choice([n for n in _NAMES if n[0] != name])
    items = rng.choice(_ITEMS)
    rephrased = rng.random() < 0.5
    if family not in _FAMILY_TEXT:
        raise ConfigError(f"unknown problem family {family!r}")
    draw, rephrased_q, plain_q, working = _FAMILY_TEXT[family]
    v = dict(draw(rng), name=name, pron=pron, Pron=pron.capitalize(), obj=_obj(pron), poss=_poss(pron),
             other=other, items=items)
    q = (rephrased_q if rephrased else plain_q).format(**v)
    return q, working.format(**v) + f"\nThe answer is: {v['ans']}"


FAMILIES = ("add", "sub", "mul", "div", "change", "rate", "twostep", "compare", "percent", "average", "distance")


def generate_metamath(n_rows: int = METAMATH_ROWS, seed: int = METAMATH_SEED) -> list[dict]:
    """`n_rows` distinct math word problems as MetaMathQA rows {query, response, type}.

    `type` is "GSM_AnsAug" for plainly worded questions and "GSM_Rephrased" for "If ..., ...?"
    rewordings, as in MetaMathQA. The same (n_rows, seed) always gives the same rows.
    """
    rng = random.Random(seed)
    rows: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n_rows:
        attempts += 1
        if attempts > 50 * n_rows:
            raise RuntimeError(f"could not generate {n_rows} distinct problems")
        family = FAMILIES[len(rows) % len(FAMILIES)]
        query, response = _problem(rng, family)
        if query in seen:
            continue
        seen.add(query)
        kind = "GSM_Rephrased" if query.startswith(("If ", "After ")) else "GSM_AnsAug"
        rows.append({"query": query, "response": response, "type": kind})
    return rows


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write rows as JSON lines (ASCII, '\\n' line ends) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")
    return path


def write_metamath(path: str | os.PathLike = METAMATH_TINY, n_rows: int = METAMATH_ROWS,
                   seed: int = METAMATH_SEED) -> Path:
    """Generate the math set and write it to `path` (default: the committed asset)."""
    return write_jsonl(generate_metamath(n_rows, seed), path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

_EXTRA_CORPUS = [
    # Alpaca / Commonsense170K-style text, so those templates tokenize into whole words too.
    {"instruction": "Please answer the following question with true or false. Question: is the sky blue?",
     "input": "", "output": "the correct answer is true", "answer": "true"},
    {"instruction": "Please choose the correct solution to the question. Question: how do you dry a wet towel?\n"
                    "Solution1: hang it in the sun\nSolution2: put it in the freezer\n"
                    "Answer format: solution1/solution2",
     "input": "", "output": "the correct answer is solution1", "answer": "solution1"},
    {"instruction": "Please choose the correct answer to the question.\nAnswer1: a river Answer2: a desert "
                    "Answer3: a forest\nAnswer format: answer1/answer2/answer3",
     "input": "", "output": "the correct answer is answer2", "answer": "answer2"},
    {"instruction": "Please choose the correct ending to complete the given sentence.\nEnding1: Ending2: Ending3: "
                    "Ending4:\nAnswer format: ending1/ending2/ending3/ending4",
     "input": "", "output": "the correct answer is ending4", "answer": "ending4"},
    {"instruction": "Please choose the correct answer to fill in the blank.\nOption1: Option2:\n"
                    "Answer format: option1/option2",
     "input": "", "output": "the correct answer is option1", "answer": "option1"},
    {"instruction": "Summarize the text in one sentence.", "input": "A short story about a cat and a dog.",
     "output": "A cat and a dog become friends."},
]


def tokenizer_corpus(rows: Iterable[dict] | None = None) -> Iterator[str]:
    """Text lines the tokenizer is trained on: the math rows and a few Alpaca/Commonsense rows,
    each rendered with its prompt template, split at newlines."""
    from .data import TEMPLATES

    if rows is None:
        rows = read_jsonl(METAMATH_TINY)
    examples = [(TEMPLATES["metamath"], row) for row in rows]
    examples += [(TEMPLATES["commonsense" if "answer" in row else "alpaca"], row) for row in _EXTRA_CORPUS]
    for template, row in examples:
        for line in (template.prompt(row) + template.response(row)).split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(lines: Iterable[str], vocab_size: int) -> bytes:
    """Train a Llama-style sentencepiece BPE model (byte fallback, split digits, <unk>/<s>/</s> =
    0/1/2, no pad piece) on `lines` and return the serialized model."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    return buf.getvalue()


def tokenizer_from_sentencepiece(model_file: str | os.PathLike):
    """A fast `LlamaTokenizer` equivalent to the sentencepiece BPE model at `model_file`.

    Vocabulary and merges are read with the sentencepiece library (no protobuf needed); BOS is
    added, EOS is not, and pad = <unk>, as for Llama-2.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab),
        unk_token=sp.id_to_piece(sp.unk_id()),
        bos_token=sp.id_to_piece(sp.bos_id()),
        eos_token=sp.id_to_piece(sp.eos_id()),
        pad_token=sp.id_to_piece(sp.unk_id()),
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
    )
    tokenizer.vocab_file = str(model_file)
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Model presets and the cached build
# ----------------------------------------------------------------------------------------------


def demo_presets() -> list[str]:
    """Presets that `ensure_preset` can build: small configs sized for the demo tokenizer's vocabulary."""
    return [name for name in list_presets() if preset_config(name).get("vocab_size") == DEMO_VOCAB_SIZE]


def default_cache_dir() -> Path:
    """$LORA_DIST_CACHE, else $XDG_CACHE_HOME/lora_dist, else ~/.cache/lora_dist."""
    if os.environ.get("LORA_DIST_CACHE"):
        return Path(os.environ["LORA_DIST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lora_dist"


def _fingerprint(preset: str) -> str:
    h = hashlib.sha256()
    h.update(f"build={BUILD_VERSION};preset={preset};seed={MODEL_SEED}\n".encode())
    h.update(json.dumps(preset_config(preset), sort_keys=True).encode())
    h.update(METAMATH_TINY.read_bytes())
    return h.hexdigest()


def _is_current(path: Path, fingerprint: str) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("fingerprint") == fingerprint and all(
        (path / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer.model")
    )


def build_preset_dir(preset: str, out_dir: str | os.PathLike) -> Path:
    """Build preset `preset` into `out_dir` (created if needed): model, tokenizer and marker file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = preset_config(preset)
    model_bytes = train_sentencepiece(tokenizer_corpus(), vocab_size=cfg["vocab_size"])
    (out / "tokenizer.model").write_bytes(model_bytes)
    tokenizer = tokenizer_from_sentencepiece(out / "tokenizer.model")
    if len(tokenizer) != cfg["vocab_size"]:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens but preset {preset} has vocab_size {cfg['vocab_size']}")
    tokenizer.save_pretrained(str(out))

    config = LlamaConfig.from_dict(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(out))
    (out / MARKER).write_text(json.dumps({"preset": preset, "fingerprint": _fingerprint(preset),
                                          "build_version": BUILD_VERSION}, indent=2) + "\n")
    os.chmod(out, 0o755)  # mkdtemp makes 0700 directories; a shared cache must be readable
    for f in out.iterdir():
        os.chmod(f, 0o644)
    return out


def ensure_preset(preset: str = "tiny-llama", dir: str | os.PathLike | None = None) -> Path:
    """Directory holding the built preset; built on first use, reused while its recipe is unchanged.

    `dir` defaults to default_cache_dir()/<preset>. The build goes to a temporary sibling directory
    that is renamed into place, so concurrent callers (several ranks) all end with one complete copy.
    Raises FileExistsError if `dir` is a non-empty directory that this module did not build.
    """
    if preset not in demo_presets():
        preset_config(preset)  # unknown name: lists the presets
        raise ConfigError(
            f"preset {preset!r} is a config-only preset (no weights, vocab_size "
            f"{preset_config(preset).get('vocab_size')}); buildable demo presets: {', '.join(demo_presets())}"
        )
    final = Path(dir) if dir is not None else default_cache_dir() / preset
    fingerprint = _fingerprint(preset)
    if _is_current(final, fingerprint):
        return final
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not (final / MARKER).exists())):
        raise FileExistsError(f"{final} exists and is not a lora_dist asset directory; pass an empty or new path")
    final.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building model preset %s in %s", preset, final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.build-", dir=final.parent))
    try:
        build_preset_dir(preset, tmp)
        for _ in range(5):
            try:
                os.rename(tmp, final)  # atomic; succeeds if `final` is absent or an empty directory
                return final
            except OSError:
                if _is_current(final, fingerprint):  # another process installed the same build
                    return final
                stale = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex}")
                try:
                    os.rename(final, stale)
                except FileNotFoundError:
                    continue
                shutil.rmtree(stale, ignore_errors=True)
        raise RuntimeError(f"could not install the built preset at {final}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A complete local model directory (config, weights, tokenizer), or the built directory of a preset
    name; ConfigError naming --model otherwise."""
    path = Path(name_or_path)
    if path.is_dir():
        return check_model_dir(path)
    if str(name_or_path) in demo_presets():
        return ensure_preset(str(name_or_path))
    raise ConfigError(
        f"--model {str(name_or_path)!r} is neither a local model directory nor a buildable preset "
        f"({', '.join(demo_presets())})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_dist.job.demo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_data = sub.add_parser("dataset", help="regenerate the math data set")
    p_data.add_argument("--out", default=str(METAMATH_TINY))
    p_data.add_argument("--rows", type=int, default=METAMATH_ROWS)
    p_data.add_argument("--seed", type=int, default=METAMATH_SEED)
    p_build = sub.add_parser("build", help="build (or reuse) a model preset directory and print its path")
    p_build.add_argument("--preset", default="tiny-llama", choices=demo_presets())
    p_build.add_argument("--dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "dataset":
        print(write_metamath(args.out, args.rows, args.seed))
    else:
        print(ensure_preset(args.preset, args.dir))


if __name__ == "__main__":
    main()
