"""lora_dist.job.data on real datasets / transformers / tokenizers objects built locally."""

import json
import logging
import shutil

import datasets
import pytest
import torch

from lora_dist.errors import ConfigError, DataError
from lora_dist.job import demo as assets
from lora_dist.job.data import (
    IGNORE_INDEX,
    ROW_COLUMN,
    TEMPLATES,
    batches,
    build_dataset,
    calibration_indices,
    check_model_dir,
    collate,
    detect_format,
    ensure_pad_token,
    epoch_order,
    exact_match,
    extract_final_number,
    load_records,
    load_tokenizer,
    train_eval_split,
    validate_records,
)

MATH_ROWS = assets.read_jsonl(assets.METAMATH_TINY)[:60]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A directory with the demo sentencepiece model and its fast LlamaTokenizer (tokenizer.json)."""
    out = tmp_path_factory.mktemp("spm_tok")
    (out / "tokenizer.model").write_bytes(assets.train_sentencepiece(assets.tokenizer_corpus(), vocab_size=1024))
    assets.tokenizer_from_sentencepiece(out / "tokenizer.model").save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def llama_tok(spm_dir):
    return load_tokenizer(spm_dir)


@pytest.fixture(scope="module")
def bytelevel_dir(tmp_path_factory):
    """A GPT-2-style byte-level BPE tokenizer: no BOS, no pad, EOS only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(assets.tokenizer_corpus(MATH_ROWS)), trainer)
    out = tmp_path_factory.mktemp("bytelevel_tok")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(str(out))
    return out


# ---------------------------------------------------------------------------------------------- templates


def test_detect_format_each_template():
    assert detect_format(["query", "response", "type"]) == "metamath"
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["instruction", "input", "output", "answer"]) == "commonsense"


def test_detect_format_error_lists_templates_and_columns():
    with pytest.raises(ValueError) as err:
        detect_format(["question", "solution"])
    msg = str(err.value)
    assert "['question', 'solution']" in msg
    for name, template in TEMPLATES.items():
        assert name in msg
        for f in template.required:
            assert f in msg


def test_metamath_prompt_text():
    row = {"query": "What is 2 + 3?", "response": "2 + 3 = 5\nThe answer is: 5"}
    t = TEMPLATES["metamath"]
    assert t.prompt(row) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWhat is 2 + 3?\n\n### Response:\n"
    )
    assert t.response(row) == row["response"]
    assert t.reference(row) == "5"


def test_alpaca_prompt_with_and_without_input():
    t = TEMPLATES["alpaca"]
    with_input = t.prompt({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"})
    assert "paired with an input" in with_input
    assert with_input.endswith("### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\n")
    without = t.prompt({"instruction": "Say hi.", "input": "", "output": "Hi"})
    assert "### Input" not in without and "paired with" not in without
    assert without.endswith("### Instruction:\nSay hi.\n\n### Response:\n")


def test_commonsense_response_from_output_or_answer():
    t = TEMPLATES["commonsense"]
    row = {"instruction": "Is ice cold? Answer format: true/false", "input": "", "output": "", "answer": "true"}
    assert t.response(row) == "the correct answer is true"
    assert t.response(dict(row, output="the correct answer is true")) == "the correct answer is true"
    assert t.reference(row) == "true"
    assert "### Instruction:\nIs ice cold?" in t.prompt(row)


# ---------------------------------------------------------------------------------------------- loading


def _rows():
    return [{"query": f"q{i}?", "response": f"r{i}\nThe answer is: {i}"} for i in range(5)]


def test_load_records_every_format(tmp_path):
    rows = _rows()
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    js = tmp_path / "d.json"
    js.write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (shards / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    for path in (jsonl, js, tmp_path / "d.parquet", tmp_path / "saved", tmp_path / "saved_dict", shards):
        loaded = load_records(path)
        assert isinstance(loaded, datasets.Dataset), path
        assert loaded.to_list() == rows, path
    assert load_records(tmp_path / "saved_dict", split="test").to_list() == rows[:1]


def test_load_records_errors(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"unsupported extension '\.csv'"):
        load_records(tmp_path / "d.csv")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows())}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"splits \['train'\], not 'validation'"):
        load_records(tmp_path / "dd", split="validation")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "response": "b"}\n{"query": "c", "response": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON line"):
        load_records(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no saved dataset"):
        load_records(tmp_path / "empty")


def test_missing_field_names_field_row_and_columns(tmp_path, llama_tok):
    rows = _rows()
    del rows[3]["response"]
    rows[3]["type"] = "GSM_AnsAug"
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(path)
    with pytest.raises(ValueError) as err:
        build_dataset(records, llama_tok)
    msg = str(err.value)
    assert "row 3" in msg and "'response'" in msg and "query, response, type" in msg


def test_missing_field_after_split_names_the_file_row(llama_tok):
    rows = _rows() * 4
    rows = [dict(r) for r in rows]
    rows[13]["response"] = None
    train, evaluation = train_eval_split(rows, 0.25, seed=0)
    part = train if 13 in list(train[ROW_COLUMN]) else evaluation
    with pytest.raises(ValueError, match=r"row 13 has no value for field 'response'"):
        build_dataset(part, llama_tok)


def test_mixed_types_in_a_jsonl_column(tmp_path, llama_tok):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"query": "a", "response": "b"}\n{"query": "c", "response": 7}\n')
    with pytest.raises(ValueError, match=r"row 1: field 'response' is int 7, expected a string"):
        build_dataset(load_records(path), llama_tok)


def test_absent_column_and_wrong_type():
    with pytest.raises(ValueError, match=r"no field 'response'.*columns present: query, answer_text"):
        validate_records([{"query": "a", "answer_text": "b"}], template="metamath")
    with pytest.raises(ValueError, match=r"row 1: field 'response' is int 7, expected a string"):
        validate_records([{"query": "a", "response": "b"}, {"query": "c", "response": 7}])
    with pytest.raises(ValueError, match="unknown template 'gsm'"):
        validate_records(_rows(), template="gsm")


def test_alpaca_optional_input_may_be_missing():
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": None, "output": "d"}]
    assert validate_records(rows).name == "alpaca"


# ---------------------------------------------------------------------------------------------- tokenizers


def test_tiny_llama_tokenizer_loads_with_pad(llama_tok):
    assert type(llama_tok).__name__ == "LlamaTokenizer" and llama_tok.is_fast
    assert llama_tok.pad_token == "<unk>" and llama_tok.pad_token_id == 0
    assert llama_tok("a b")["input_ids"][0] == llama_tok.bos_token_id == 1


def test_tokenizer_without_pad_gets_eos(bytelevel_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="lora_dist.job.data"):
        tok = load_tokenizer(bytelevel_dir)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id
    assert "no pad token" in caplog.text


def test_tokenizer_without_pad_eos_unk_is_a_clear_error(bytelevel_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bytelevel_dir))
    tok.eos_token = None
    assert tok.pad_token is None and tok.unk_token is None
    with pytest.raises(ValueError, match=r"no pad, eos or unk token.*add_special_tokens"):
        ensure_pad_token(tok)


def test_sentencepiece_only_directory(spm_dir, tmp_path):
    only = tmp_path / "only_spm"
    only.mkdir()
    shutil.copy(spm_dir / "tokenizer.model", only / "tokenizer.model")
    (only / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install protobuf"):
            load_tokenizer(only)
    else:
        tok = load_tokenizer(only)
        assert tok("Ava has 3 apples.", add_special_tokens=False)["input_ids"] == load_tokenizer(spm_dir)(
            "Ava has 3 apples.", add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------- build_dataset


def _check_example(tok, row, ex, template="metamath"):
    t = TEMPLATES[template]
    prompt, response = t.prompt(row), t.response(row)
    full = tok(prompt + response, add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    prefix = [tok.bos_token_id] if tok("x")["input_ids"][0] == tok.bos_token_id else []
    assert ex["input_ids"] == prefix + full + [tok.eos_token_id]
    n_masked = len(prefix) + n_prompt
    assert ex["labels"][:n_masked] == [IGNORE_INDEX] * n_masked
    assert ex["labels"][n_masked:] == ex["input_ids"][n_masked:]
    if tok.is_fast:  # the generic sentencepiece backend decodes byte pieces as "<0x0A>"
        assert tok.decode(ex["labels"][n_masked:-1]) == response
    assert ex["length"] == len(ex["input_ids"])


def test_build_dataset_masks_prompt_llama(llama_tok):
    ds, report = build_dataset(MATH_ROWS, llama_tok, max_seq_len=1024)
    assert len(ds) == report.kept == report.rows == len(MATH_ROWS)
    assert report.truncated == report.dropped_overlength == report.dropped_no_response == 0
    assert report.template == "metamath"
    for row, ex in zip(MATH_ROWS[:20], ds.select(range(20))):
        _check_example(llama_tok, row, ex)
    assert report.loss_tokens == sum(sum(t != IGNORE_INDEX for t in ex["labels"]) for ex in ds)
    assert report.longest == max(ds["length"])


def test_build_dataset_bytelevel_no_bos(bytelevel_dir):
    tok = load_tokenizer(bytelevel_dir)
    rows = [{"instruction": "Add the numbers.", "input": "4 and 5", "output": "4 + 5 = 9"},
            {"instruction": "Say hello.", "input": "", "output": "Hello there."}]
    ds, report = build_dataset(rows, tok)
    assert report.template == "alpaca"
    for row, ex in zip(rows, ds):
        _check_example(tok, row, ex, "alpaca")


def test_build_dataset_sentencepiece_backend(spm_dir):
    """A slow (python) tokenizer backed directly by the sentencepiece library."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    tok = SentencePieceBackend(vocab_file=str(spm_dir / "tokenizer.model"), bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>")
    assert not tok.is_fast
    ds, report = build_dataset(MATH_ROWS[:5], tok)
    assert report.kept == 5
    for row, ex in zip(MATH_ROWS[:5], ds):
        _check_example(tok, row, ex)


def test_truncate_and_filter_reports(llama_tok):
    full, _ = build_dataset(MATH_ROWS, llama_tok, max_seq_len=4096)
    lengths = list(full["length"])
    prompt_lens = [1 + len(llama_tok(TEMPLATES["metamath"].prompt(r), add_special_tokens=False)["input_ids"])
                   for r in MATH_ROWS]
    limit = sorted(lengths)[len(lengths) // 2]
    over = sum(n > limit for n in lengths)
    no_resp = sum(p >= limit for p in prompt_lens)
    assert over > 0

    ds, report = build_dataset(MATH_ROWS, llama_tok, max_seq_len=limit, overlength="truncate")
    assert report.truncated == over - no_resp
    assert report.dropped_no_response == no_resp
    assert report.kept == len(ds) == len(MATH_ROWS) - no_resp
    assert max(ds["length"]) <= limit
    assert report.longest == max(lengths)
    assert f"{report.truncated} truncated to {limit} tokens" in str(report)

    ds_f, report_f = build_dataset(MATH_ROWS, llama_tok, max_seq_len=limit, overlength="filter")
    assert report_f.dropped_overlength == over and report_f.truncated == 0
    assert len(ds_f) == len(MATH_ROWS) - over
    assert all(any(t != IGNORE_INDEX for t in lab) for lab in ds_f["labels"])

    with pytest.raises(ValueError, match="overlength must be"):
        build_dataset(MATH_ROWS, llama_tok, overlength="cut")


def test_every_prompt_too_long(llama_tok):
    ds, report = build_dataset(MATH_ROWS[:3], llama_tok, max_seq_len=8)
    assert len(ds) == 0 and report.dropped_no_response == 3


# ---------------------------------------------------------------------------------------------- batching


def test_collate_right_pads():
    batch = [{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]}, {"input_ids": [1, 9], "labels": [-100, 9]}]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 5, 6, 7], [1, 9, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 6, 7], [-100, 9, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())
    assert collate(batch, pad_id=2, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError, match="2 input_ids but 1 labels"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_id=0)
    with pytest.raises(ValueError, match="pad id"):
        collate(batch, pad_id=None)


def test_batches_follow_indices(llama_tok):
    ds, _ = build_dataset(MATH_ROWS[:7], llama_tok)
    order = [6, 0, 3, 2, 5, 1, 4]
    got = list(batches(ds, order, 3, llama_tok.pad_token_id))
    assert [b["input_ids"].shape[0] for b in got] == [3, 3, 1]
    first = got[0]
    for j, idx in enumerate(order[:3]):
        n = ds[idx]["length"]
        assert first["input_ids"][j, :n].tolist() == ds[idx]["input_ids"]
        assert first["labels"][j, n:].eq(IGNORE_INDEX).all()


@pytest.mark.parametrize("world,micro", [(1, 8), (1, 2), (2, 4), (2, 1), (4, 2), (8, 1)])
def test_epoch_order_steps_do_not_depend_on_world_or_micro_batch(world, micro):
    """The job takes micro-batch i of rank r as epoch_order(...)[i*m:(i+1)*m]; global step k then
    holds permutation positions [k*B, (k+1)*B) of torch.randperm(n) seeded with seed + epoch,
    whatever the world size and micro-batch size (B = 8 here)."""
    n, B, seed = 100, 8, 7
    accum = B // (micro * world)
    for epoch in (0, 3):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        orders = [epoch_order(n, r, world, seed=seed, epoch=epoch) for r in range(world)]
        assert len({len(o) for o in orders}) == 1 and set().union(*map(set, orders)) == set(range(n))
        for k in range(n // B):
            step = [i for o in orders for m in range(k * accum, (k + 1) * accum) for i in o[m * micro:(m + 1) * micro]]
            assert sorted(step) == sorted(perm[k * B:(k + 1) * B]), (epoch, k)
    assert epoch_order(n, 0, world, seed=seed, epoch=0) != epoch_order(n, 0, world, seed=seed, epoch=1)
    with pytest.raises(DataError, match="empty"):
        epoch_order(0, 0, world)


def test_calibration_indices():
    a = calibration_indices(1000, 256, seed=0)
    assert a == calibration_indices(1000, 256, seed=0)
    assert len(set(a)) == 256 and a == sorted(a) and 0 <= a[0] and a[-1] < 1000
    assert a != calibration_indices(1000, 256, seed=1)
    assert calibration_indices(10, 256) == list(range(10))
    with pytest.raises(ValueError):
        calibration_indices(10, 0)


def test_train_eval_split():
    rows = [{"query": f"q{i}", "response": f"r{i}"} for i in range(40)]
    train, ev = train_eval_split(rows, 0.25, seed=3)
    assert len(train) == 30 and len(ev) == 10
    train_rows, ev_rows = list(train[ROW_COLUMN]), list(ev[ROW_COLUMN])
    assert set(train_rows).isdisjoint(ev_rows)
    assert sorted(train_rows + ev_rows) == list(range(40))
    assert all(rows[r]["query"] == q for r, q in zip(ev_rows, ev["query"]))
    assert list(train_eval_split(rows, 10, seed=3)[1][ROW_COLUMN]) == ev_rows
    assert list(train_eval_split(rows, 10, seed=4)[1][ROW_COLUMN]) != ev_rows
    with pytest.raises(ValueError, match="no training rows"):
        train_eval_split(rows, 40)


# ---------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("text,expected", [
    ("He has 3 + 4 = 7 apples.\nThe answer is: 7", "7"),
    ("The answer is: 1,234", "1234"),
    ("The answer is $1,000.00.", "1000"),
    ("The answer is: 7.0", "7"),
    ("The answer is: 0.50", "0.5"),
    ("The answer is: -12", "-12"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("so 5 then 6 and finally 18.", "18"),
    ("the answer is 12 not 13", "12"),
    ("No digits here.", None),
    ("The answer is: x", None),
    ("", None),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_exact_match():
    assert exact_match("so the total is 1,200.\nThe answer is: 1200", "1200")
    assert exact_match("The answer is: 18.0", "#### 18")
    assert not exact_match("The answer is: 17", "18")
    assert not exact_match("I don't know", "The answer is: 5")
    assert not exact_match("nothing", "nothing")


def test_build_dataset_num_proc_gives_the_same_rows(llama_tok):
    one, report_one = build_dataset(MATH_ROWS, llama_tok, max_seq_len=100)
    two, report_two = build_dataset(MATH_ROWS, llama_tok, max_seq_len=100, num_proc=2)
    assert one.to_list() == two.to_list()
    assert report_one == report_two


# ---------------------------------------------------------------------------------------------- new-user messages


def test_empty_data_file_is_a_data_error_not_stop_iteration(tmp_path):
    """An empty file used to end in a bare StopIteration from inside `datasets`."""
    for name, text in (("empty.jsonl", ""), ("blank.json", "\n  \n"), ("none.json", "[]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=rf"{name}.* (is empty|holds no rows)"):
            load_records(tmp_path / name)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.jsonl").write_text("")
    with pytest.raises(DataError, match=r"a\.jsonl is empty"):
        load_records(tmp_path / "dir")


def test_empty_model_directory_names_the_directory_and_what_it_lacks(tmp_path, spm_dir):
    """It used to be a tokenizer-backend error that named no directory."""
    empty = tmp_path / "llama"
    empty.mkdir()
    with pytest.raises(ConfigError, match=rf"--model directory {empty} is incomplete: it lacks config\.json, "
                                          r"weights \(model\.safetensors.*\), a tokenizer \(tokenizer\.json"):
        check_model_dir(empty)
    with pytest.raises(ConfigError, match=rf"model directory {empty} holds no tokenizer"):
        load_tokenizer(empty)
    with pytest.raises(ConfigError, match=rf"--model {empty} is incomplete|--model directory {empty}"):
        assets.resolve_model(empty)
    (empty / "config.json").write_text("{}")
    (empty / "model.safetensors").write_bytes(b"")
    shutil.copy(spm_dir / "tokenizer.json", empty / "tokenizer.json")
    assert check_model_dir(empty) == empty and assets.resolve_model(empty) == empty


def test_no_template_message_does_not_show_the_internal_row_column():
    train, _ = train_eval_split([{"question": "q", "answer_text": "a"}] * 4, 1, seed=0)
    assert ROW_COLUMN in train.column_names
    with pytest.raises(DataError, match="fit no prompt template") as e:
        validate_records(train)
    assert ROW_COLUMN not in str(e.value) and "['answer_text', 'question']" in str(e.value)
