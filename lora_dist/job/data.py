"""Instruction-tuning data: loading, prompt templates, tokenization, sharding and GSM8K-style scoring.

Typical use in a training script::

    tok = load_tokenizer(model_dir)                      # pad token fixed if missing
    records = load_records("data.jsonl")                 # json / jsonl / parquet / datasets dir
    train_rec, eval_rec = train_eval_split(records, 0.05, seed=0)
    train_ds, report = build_dataset(train_rec, tok, max_seq_len=1024)
    print(report)                                        # truncated / dropped counts
    calib = train_ds.select(calibration_indices(len(train_ds), 256, seed=0))
    order = epoch_order(len(train_ds), rank, world_size, seed=0, epoch=epoch)
    for batch in batches(train_ds, order, micro_batch_size, tok.pad_token_id):
        ...                                              # input_ids / attention_mask / labels

Labels are -100 on prompt tokens and padding, so the loss covers the response (and its EOS) only.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from ..errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROW_COLUMN = "_row"  # added by train_eval_split: the row's index in the loaded file, used in error messages

# ----------------------------------------------------------------------------------------------
# Prompt templates
# ----------------------------------------------------------------------------------------------

_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def _instruction_prompt(instruction: str, input_text: str = "") -> str:
    if input_text.strip():
        return (
            f"{_HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
        )
    return f"{_HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class Template:
    """A dataset format: the fields it needs and how a row becomes (prompt, response).

    `reference(row)` is the gold answer used for exact-match evaluation (a number for math data).
    """

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    _prompt: Callable[[Mapping], str] = field(repr=False)
    _response: Callable[[Mapping], str] = field(repr=False)
    _reference: Callable[[Mapping], str] = field(repr=False)
    description: str = ""

    def prompt(self, row: Mapping) -> str:
        """The prompt text (everything before the response), ending with '### Response:\\n'."""
        return self._prompt(row)

    def response(self, row: Mapping) -> str:
        """The response text the model is trained to produce (EOS is added at tokenization)."""
        return self._response(row)

    def reference(self, row: Mapping) -> str:
        """The gold answer for exact-match evaluation."""
        return self._reference(row)


def _opt(row: Mapping, key: str) -> str:
    value = row.get(key)
    return value if isinstance(value, str) else ""


def _commonsense_response(row: Mapping) -> str:
    output = _opt(row, "output")
    return output if output.strip() else f"the correct answer is {row['answer']}"


TEMPLATES: dict[str, Template] = {
    "metamath": Template(
        name="metamath",
        required=("query", "response"),
        optional=(),
        _prompt=lambda r: _instruction_prompt(r["query"]),
        _response=lambda r: r["response"],
        _reference=lambda r: extract_final_number(r["response"]) or "",
        description='MetaMathQA: query/response, responses end with "The answer is: N"',
    ),
    "commonsense": Template(
        name="commonsense",
        required=("instruction", "answer"),
        optional=("input", "output"),
        _prompt=lambda r: _instruction_prompt(r["instruction"], _opt(r, "input")),
        _response=_commonsense_response,
        _reference=lambda r: r["answer"],
        description='Commonsense170K: instruction/input/output/answer, output "the correct answer is X"',
    ),
    "alpaca": Template(
        name="alpaca",
        required=("instruction", "output"),
        optional=("input",),
        _prompt=lambda r: _instruction_prompt(r["instruction"], _opt(r, "input")),
        _response=lambda r: r["output"],
        _reference=lambda r: r["output"],
        description="Alpaca: instruction/input/output (input may be empty)",
    ),
}

# Detection order matters: commonsense rows also carry alpaca's instruction/output.
_DETECTION_ORDER = ("metamath", "commonsense", "alpaca")


def _templates_help() -> str:
    return "; ".join(
        f"{t.name} (needs {', '.join(t.required)}"
        + (f"; optional {', '.join(t.optional)}" if t.optional else "")
        + ")"
        for t in TEMPLATES.values()
    )


def detect_format(columns: Iterable[str]) -> str:
    """Name of the first template whose required fields are all in `columns`.

    Raises DataError listing the templates, their fields and the columns present if none fits.
    """
    cols = set(columns) - {ROW_COLUMN}  # our own bookkeeping column is not the user's
    for name in _DETECTION_ORDER:
        if set(TEMPLATES[name].required) <= cols:
            return name
    raise DataError(
        f"dataset columns {sorted(cols)} fit no prompt template. Templates: {_templates_help()}. "
        "Rename the columns or pass template= explicitly."
    )


def get_template(template: str | Template, columns: Iterable[str] | None = None) -> Template:
    """Resolve "auto" (needs `columns`), a template name, or a Template to a Template."""
    if isinstance(template, Template):
        return template
    if template == "auto":
        if columns is None:
            raise DataError('template="auto" needs the dataset columns')
        return TEMPLATES[detect_format(columns)]
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; choose 'auto' or one of: {_templates_help()}")
    return TEMPLATES[template]


# ----------------------------------------------------------------------------------------------
# Loading records
# ----------------------------------------------------------------------------------------------

_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_records(path: str | os.PathLike, split: str = "train"):
    """Load raw rows as a `datasets.Dataset`.

    `path` is a .json / .jsonl / .parquet file, a directory written by `Dataset.save_to_disk` /
    `DatasetDict.save_to_disk` (the `split` is taken from a DatasetDict), or a directory of
    .json/.jsonl/.parquet files of one format.
    """
    import datasets

    p = check_data_path(path)
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            loaded = datasets.load_from_disk(str(p))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{p} holds splits {sorted(loaded)}, not {split!r}; pass split=")
                loaded = loaded[split]
            return loaded
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in _FILE_FORMATS)
        kinds = {_FILE_FORMATS[f.suffix] for f in files}
        if not files:
            raise DataError(
                f"directory {p} holds no saved dataset (dataset_info.json / dataset_dict.json) and no "
                f"{'/'.join(_FILE_FORMATS)} files"
            )
        if len(kinds) > 1:
            raise DataError(f"directory {p} mixes json and parquet files; keep one format per directory")
        return _load_files(kinds.pop(), files)
    if p.suffix not in _FILE_FORMATS:
        raise DataError(
            f"cannot load {p}: unsupported extension {p.suffix!r}; use .json, .jsonl, .parquet or a datasets directory"
        )
    return _load_files(_FILE_FORMATS[p.suffix], [p])


def check_data_path(path: str | os.PathLike) -> Path:
    """Cheap checks before any loading: `path` exists, and a file is readable and not empty (an
    empty file would otherwise end in a bare StopIteration from inside `datasets`)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"dataset path {str(p)!r} does not exist")
    if p.is_file():
        try:
            with open(p, "rb") as f:
                head = f.read(1 << 16)
        except OSError as e:
            raise DataError(f"dataset file {p} cannot be read: {e.strerror}") from None
        if not head.strip():
            raise DataError(f"dataset file {p} is empty: it holds no rows")
    return p


def _load_files(kind: str, files: list[Path]):
    import datasets

    for f in files:
        check_data_path(f)
    try:
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception:
        if kind == "json":
            for f in files:
                _raise_on_bad_json(f)
        raise
    if len(ds) == 0:
        raise DataError(f"dataset {', '.join(map(str, files))} holds no rows")
    return ds


def _raise_on_bad_json(path: Path) -> None:
    """Raise DataError naming the file and line of the first JSON syntax error, or an empty array."""
    import json

    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):  # JSON lines (any extension)
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON line ({exc.msg}): {line[:200]}") from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON ({exc.msg})") from None
        if rows == []:
            raise DataError(f"dataset file {path} holds no rows (an empty JSON array)")


def _as_dataset(records):
    import datasets
    import pyarrow

    if isinstance(records, datasets.Dataset):
        return records
    rows = _as_rows(records)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    data = {k: [row.get(k) for row in rows] for k in columns}
    try:
        return datasets.Dataset.from_dict(data)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as exc:
        for key, values in data.items():
            kinds = {}
            for i, v in enumerate(values):
                if v is not None:
                    kinds.setdefault(type(v).__name__, i)
            if len(kinds) > 1:
                seen = ", ".join(f"{kind} in row {i}" for kind, i in kinds.items())
                raise DataError(f"field {key!r} mixes value types ({seen}); make them all one type") from exc
        raise


def _as_rows(records) -> list:
    if isinstance(records, Sequence) and not isinstance(records, (str, bytes)):
        for i, row in enumerate(records):
            if not isinstance(row, Mapping):
                raise DataError(f"row {i} is a {type(row).__name__}, not a dict")
        return list(records)
    raise DataError(f"records must be a datasets.Dataset or a list of dicts, not {type(records).__name__}")


def validate_records(records, template: str | Template = "auto") -> Template:
    """Check every row has the template's required fields as strings; return the Template.

    `records` is a `datasets.Dataset` or a list of dicts. Raises DataError naming the field, the
    row (its index in the loaded file when the rows came from `train_eval_split`) and the columns
    present.
    """
    import datasets

    if isinstance(records, datasets.Dataset):
        column_names = list(records.column_names)
        column = lambda name: records[name]  # noqa: E731
    else:
        rows_list = _as_rows(records)
        column_names = list(dict.fromkeys(k for row in rows_list for k in row))
        column = lambda name: [row.get(name) for row in rows_list]  # noqa: E731
    tmpl = get_template(template, column_names)
    present = [c for c in column_names if c != ROW_COLUMN]
    for name in tmpl.required:
        if name not in column_names:
            raise DataError(
                f"dataset has no field {name!r}, which template {tmpl.name!r} needs "
                f"(needs {', '.join(tmpl.required)}); columns present: {', '.join(present)}"
            )
    rows = list(column(ROW_COLUMN)) if ROW_COLUMN in column_names else None
    for name in tmpl.required + tuple(o for o in tmpl.optional if o in column_names):
        for i, value in enumerate(column(name)):
            if isinstance(value, str) or (value is None and name in tmpl.optional):
                continue
            row = rows[i] if rows is not None else i
            if value is None:
                raise DataError(
                    f"row {row} has no value for field {name!r} (template {tmpl.name!r} needs "
                    f"{', '.join(tmpl.required)}); columns present: {', '.join(present)}"
                )
            raise DataError(f"row {row}: field {name!r} is {type(value).__name__} {value!r}, expected a string")
    return tmpl


def train_eval_split(records, eval_size: int | float, seed: int = 0):
    """Split rows into (train, eval) `datasets.Dataset`s, deterministically for a given seed.

    `eval_size` is a row count (int) or a fraction in [0, 1). Both splits keep file order and get a
    `_row` column holding each row's index in `records` (used to name rows in error messages).
    """
    ds = _as_dataset(records)
    n = len(ds)
    if isinstance(eval_size, float) and not isinstance(eval_size, bool):
        if not 0.0 <= eval_size < 1.0:
            raise ConfigError(f"eval_size fraction must be in [0, 1), got {eval_size}")
        n_eval = int(round(n * eval_size))
    else:
        n_eval = int(eval_size)
    if n_eval < 0 or n_eval >= n:
        raise ConfigError(f"eval_size {eval_size} leaves no training rows out of {n}")
    if ROW_COLUMN not in ds.column_names:
        ds = ds.add_column(ROW_COLUMN, list(range(n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    eval_idx = sorted(perm[:n_eval])
    train_idx = sorted(perm[n_eval:])
    return ds.select(train_idx), ds.select(eval_idx)


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def ensure_pad_token(tokenizer) -> int:
    """Give `tokenizer` a pad token if it has none (EOS, else UNK) and return the pad id.

    Padding positions are masked by attention_mask and labels, so reusing EOS/UNK is safe.
    Raises DataError if the tokenizer has no pad, EOS or UNK token.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    for attr in ("eos_token", "unk_token"):
        token = getattr(tokenizer, attr)
        if token is not None:
            tokenizer.pad_token = token
            logger.warning("tokenizer has no pad token; using its %s %r (id %d) for padding", attr, token, tokenizer.pad_token_id)
            return tokenizer.pad_token_id
    raise DataError(
        f"tokenizer {type(tokenizer).__name__} has no pad, eos or unk token, so batches cannot be padded. "
        "Add one, e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'}) and "
        "model.resize_token_embeddings(len(tokenizer)), then save both."
    )


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_model_dir(path: str | os.PathLike, flag: str = "--model") -> Path:
    """Raise ConfigError naming the directory and what it lacks unless it holds a config.json,
    weights (one of WEIGHT_FILES) and a tokenizer (one of TOKENIZER_FILES)."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{flag} {str(p)!r} is not a directory")
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        missing.append(f"weights ({' / '.join(WEIGHT_FILES)})")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"a tokenizer ({' / '.join(TOKENIZER_FILES)})")
    if missing:
        raise ConfigError(f"{flag} directory {p} is incomplete: it lacks {', '.join(missing)}")
    return p


def load_tokenizer(path: str | os.PathLike):
    """`AutoTokenizer.from_pretrained(path)` with a pad token ensured (see `ensure_pad_token`)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"model directory {p} holds no tokenizer ({' / '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p))
    except Exception as exc:
        only_spm = p.is_dir() and (p / "tokenizer.model").exists() and not (p / "tokenizer.json").exists()
        if only_spm:
            try:
                import google.protobuf  # noqa: F401
            except ImportError:
                raise ConfigError(
                    f"{p} has a sentencepiece tokenizer.model but no tokenizer.json; transformers needs the "
                    "'protobuf' package to convert it: pip install protobuf (or save a tokenizer.json next to it)"
                ) from exc
        raise
    ensure_pad_token(tokenizer)
    return tokenizer


def _special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before a text when add_special_tokens=True (e.g. [BOS] for Llama)."""
    probe = "a"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    without = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return list(with_special[:start])
    return []


# ----------------------------------------------------------------------------------------------
# Tokenized dataset
# ----------------------------------------------------------------------------------------------


@dataclass
class DataReport:
    """What `build_dataset` did to the rows."""

    template: str
    rows: int
    kept: int
    truncated: int  # kept, cut to max_seq_len (response partly lost)
    dropped_overlength: int  # over max_seq_len with overlength="filter"
    dropped_no_response: int  # the prompt alone fills max_seq_len: nothing left to learn
    max_seq_len: int
    longest: int  # longest example before truncation, in tokens
    mean_tokens: float  # mean length of kept examples
    loss_tokens: int  # label tokens (response + EOS) over kept examples
    retokenized: int  # examples whose prompt/response boundary merged into one token (re-encoded apart)

    def __str__(self) -> str:
        return (
            f"data[{self.template}]: {self.rows} rows -> {self.kept} examples; "
            f"{self.truncated} truncated to {self.max_seq_len} tokens, "
            f"{self.dropped_overlength} dropped as longer than {self.max_seq_len}, "
            f"{self.dropped_no_response} dropped with no response tokens left; "
            f"length mean {self.mean_tokens:.1f} max {self.longest}; {self.loss_tokens} loss tokens"
        )


def build_dataset(
    records,
    tokenizer,
    *,
    template: str | Template = "auto",
    max_seq_len: int = 1024,
    overlength: str = "truncate",
    add_eos: bool = True,
    num_proc: int | None = None,
):
    """Tokenize rows into (`datasets.Dataset`, DataReport).

    Each example is special-prefix (BOS) + prompt + response + EOS; `labels` copies `input_ids` with
    -100 over the prefix and prompt. The prompt and response are tokenized together, and the prompt
    length is taken from the prompt tokenized alone; if the two disagree at the boundary the response
    is tokenized on its own. Over-long examples are cut to `max_seq_len` (overlength="truncate") or
    dropped ("filter"); an example left with no response token is dropped either way. Columns:
    input_ids, labels, length (and `_row` when present in `records`). `num_proc` tokenizes in that
    many processes (worth it for hundreds of thousands of rows).
    """
    if overlength not in ("truncate", "filter"):
        raise ConfigError(f"overlength must be 'truncate' or 'filter', got {overlength!r}")
    if max_seq_len < 2:
        raise ConfigError(f"max_seq_len must be at least 2, got {max_seq_len}")
    tmpl = validate_records(records, template)
    ds = _as_dataset(records)
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    if add_eos and not eos:
        logger.warning("tokenizer has no EOS token: examples end without one and generation will not learn to stop")
    encode = functools.partial(_encode_batch, tmpl=tmpl, tokenizer=tokenizer, prefix=_special_prefix(tokenizer),
                               eos=eos, max_seq_len=max_seq_len, overlength=overlength)
    keep_cols = [ROW_COLUMN] if ROW_COLUMN in ds.column_names else []
    encoded = ds.map(
        encode,
        batched=True,
        batch_size=1000,
        num_proc=num_proc,
        remove_columns=[c for c in ds.column_names if c not in keep_cols],
        desc="tokenizing",
    )
    result, report = _summarize(encoded, tmpl.name, max_seq_len)
    logger.info("%s", report)
    return result, report


def _encode_one(p_ids, f_ids, response, tokenizer, prefix, eos, max_seq_len, overlength):
    """One example: (input_ids, labels, full length, status). The response tokens are the tail of
    prompt+response tokenized together, unless the boundary merged (then re-encoded on its own)."""
    p_ids, f_ids = list(p_ids), list(f_ids)
    if f_ids[: len(p_ids)] == p_ids:
        r_ids, status = f_ids[len(p_ids) :], "ok"
    else:
        r_ids, status = list(tokenizer(response, add_special_tokens=False)["input_ids"]), "retokenized"
    ids = prefix + p_ids + r_ids + eos
    labels = [IGNORE_INDEX] * (len(prefix) + len(p_ids)) + r_ids + eos
    full_length = len(ids)
    if full_length > max_seq_len:
        if overlength == "filter":
            status = "overlength"
        else:
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            status = "truncated" if any(t != IGNORE_INDEX for t in labels) else "no_response"
    elif not any(t != IGNORE_INDEX for t in labels):
        status = "no_response"
    return ids, labels, full_length, status


def _encode_batch(batch: dict, *, tmpl, tokenizer, prefix, eos, max_seq_len, overlength) -> dict:
    rows = [{k: batch[k][i] for k in batch} for i in range(len(next(iter(batch.values()))))]
    prompts = [tmpl.prompt(r) for r in rows]
    responses = [tmpl.response(r) for r in rows]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer([p + r for p, r in zip(prompts, responses)], add_special_tokens=False)["input_ids"]
    out = {"input_ids": [], "labels": [], "length": [], "full_length": [], "loss_tokens": [], "status": []}
    for p_ids, f_ids, response in zip(prompt_ids, full_ids, responses):
        ids, labels, full_length, status = _encode_one(p_ids, f_ids, response, tokenizer, prefix, eos,
                                                       max_seq_len, overlength)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["full_length"].append(full_length)
        out["loss_tokens"].append(sum(1 for t in labels if t != IGNORE_INDEX))
        out["status"].append(status)
    return out


def _summarize(encoded, template: str, max_seq_len: int):
    """Keep the usable examples; count what happened to the others."""
    status = list(encoded["status"])
    full_length = list(encoded["full_length"])
    loss_tokens = list(encoded["loss_tokens"])
    keep = [i for i, s in enumerate(status) if s in ("ok", "retokenized", "truncated")]
    result = encoded.select(keep).remove_columns(["status", "full_length", "loss_tokens"])
    lengths = list(result["length"])
    report = DataReport(
        template=template,
        rows=len(encoded),
        kept=len(result),
        truncated=status.count("truncated"),
        dropped_overlength=status.count("overlength"),
        dropped_no_response=status.count("no_response"),
        max_seq_len=max_seq_len,
        longest=max(full_length, default=0),
        mean_tokens=(sum(lengths) / len(lengths)) if lengths else 0.0,
        loss_tokens=sum(loss_tokens[i] for i in keep),
        retokenized=status.count("retokenized"),
    )
    return result, report


# ----------------------------------------------------------------------------------------------
# Batching, sharding, sampling
# ----------------------------------------------------------------------------------------------


def collate(batch: Sequence[Mapping], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad examples into LongTensors `input_ids`, `attention_mask`, `labels` (-100 on padding)."""
    if not batch:
        raise DataError("collate got an empty batch")
    if pad_id is None:
        raise DataError("collate needs a pad id; call ensure_pad_token(tokenizer) first")
    width = max(len(ex["input_ids"]) for ex in batch)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(batch):
        ids = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        lab = torch.as_tensor(ex["labels"], dtype=torch.long)
        if ids.shape != lab.shape:
            raise DataError(f"example {i}: {len(ids)} input_ids but {len(lab)} labels")
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(lab)] = lab
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_order(n: int, rank: int, world_size: int, seed: int = 0, epoch: int = 0) -> list[int]:
    """This rank's example indices for one epoch: torch's DistributedSampler (shuffled with
    seed + epoch via set_epoch, padded to a multiple of world_size by repeating the first indices),
    dealt round-robin, so micro-batch i of rank r holds permutation positions (i*m + j)*world + r.

    A global step of B = m x accumulation x world samples therefore covers permutation positions
    [k*B, (k+1)*B) whatever the world size and micro-batch size.
    """
    from torch.utils.data import DistributedSampler

    if n < 1:
        raise DataError("cannot order an empty training set")
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def calibration_indices(n: int, k: int, seed: int = 0) -> list[int]:
    """k distinct indices of range(n) drawn with a seeded generator, sorted; all n if k >= n."""
    if n < 1:
        raise DataError("cannot draw calibration samples from an empty dataset")
    if k < 1:
        raise ConfigError(f"need at least one calibration sample, got {k}")
    if k >= n:
        if k > n:
            logger.warning("asked for %d calibration samples but the training set has %d; using all", k, n)
        return list(range(n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:k].tolist())


def batches(dataset, indices: Sequence[int], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of `dataset` rows at `indices`, in order; the last may be smaller.

    `dataset` is a `datasets.Dataset` from `build_dataset` or a list of {input_ids, labels} dicts.
    """
    import datasets

    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(indices), batch_size):
        chunk = [int(i) for i in indices[start : start + batch_size]]
        if isinstance(dataset, datasets.Dataset):
            cols = dataset.select_columns(["input_ids", "labels"])[chunk]
            rows = [{"input_ids": ids, "labels": lab} for ids, lab in zip(cols["input_ids"], cols["labels"])]
        else:
            rows = [dataset[i] for i in chunk]
        yield collate(rows, pad_id)


# ----------------------------------------------------------------------------------------------
# GSM8K-style scoring
# ----------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)


def _normalize_number(text: str) -> str | None:
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_final_number(text: str) -> str | None:
    """The answer number of `text`, normalised ("1,234.50" -> "1234.5", "7.0" -> "7"), or None.

    Taken from after the last "The answer is" (MetaMath), else after the last "####" (GSM8K),
    else the last number in the text.
    """
    if not text:
        return None
    for marker in (_ANSWER_IS, re.compile(r"####")):
        found = list(marker.finditer(text))
        if found:
            match = _NUMBER.search(text, found[-1].end())
            return _normalize_number(match.group()) if match else None
    numbers = _NUMBER.findall(text)
    return _normalize_number(numbers[-1]) if numbers else None


def exact_match(prediction: str, reference: str) -> bool:
    """True if both texts have a final number and the numbers are equal (GSM8K scoring)."""
    pred, ref = extract_final_number(prediction), extract_final_number(reference)
    return pred is not None and pred == ref
