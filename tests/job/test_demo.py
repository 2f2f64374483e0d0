"""lora_dist.job.demo: the committed math set, the presets, and the built tiny-llama directory."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from lora_dist.errors import ConfigError
from lora_dist.job import demo as assets
from lora_dist.job.data import TEMPLATES, extract_final_number, load_tokenizer

EQUATION = re.compile(r"(\d+(?: [-+*/] \d+)+) = (\d+)")


def test_committed_dataset_is_the_generator_output():
    rows = assets.generate_metamath()
    text = "".join(json.dumps(r) + "\n" for r in rows)
    assert assets.METAMATH_TINY.read_text(encoding="utf-8") == text
    assert assets.METAMATH_TINY.stat().st_size < 2 * 1024 * 1024
    assert len(rows) == assets.METAMATH_ROWS
    assert assets.generate_metamath(50, seed=1) == assets.generate_metamath(50, seed=1)
    assert assets.generate_metamath(50, seed=1) != assets.generate_metamath(50, seed=2)


def test_dataset_rows_are_metamath_and_arithmetic_is_right():
    rows = assets.read_jsonl(assets.METAMATH_TINY)
    assert len({r["query"] for r in rows}) == len(rows)
    assert {r["type"] for r in rows} == {"GSM_AnsAug", "GSM_Rephrased"}
    for row in rows:
        assert set(row) == {"query", "response", "type"}
        last = row["response"].splitlines()[-1]
        assert re.fullmatch(r"The answer is: \d+", last), row
        equations = EQUATION.findall(row["response"])
        assert equations, row
        for lhs, rhs in equations:
            assert eval(lhs) == int(rhs), (lhs, rhs, row)  # noqa: S307 - digits and + - * / only
        # the final answer is the result of the last equation
        assert extract_final_number(row["response"]) == equations[-1][1]


def test_presets():
    assert {"tiny-llama", "small-llama"} <= set(assets.demo_presets()) <= set(assets.list_presets())
    for name in assets.demo_presets():
        cfg = assets.preset_config(name)
        assert cfg["model_type"] == "llama" and cfg["vocab_size"] == 1024  # the demo tokenizer's size
        assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*tiny-llama"):
        assets.preset_config("huge")
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        assets.ensure_preset("huge")


def test_sentencepiece_training_is_deterministic():
    lines = list(assets.tokenizer_corpus())
    assert assets.train_sentencepiece(lines, 1024) == assets.train_sentencepiece(lines, 1024)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return assets.ensure_preset("tiny-llama", cache / "tiny-llama")


def test_built_directory_files(built):
    names = {p.name for p in built.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
            assets.MARKER} <= names
    assert not any(p.name.startswith(".") for p in built.parent.iterdir())  # no temporary build left behind


def test_tokenizer_loads_through_autotokenizer_and_matches_sentencepiece(built):
    tok = load_tokenizer(built)
    assert type(tok).__name__ == "LlamaTokenizer" and tok.is_fast
    assert len(tok) == assets.preset_config("tiny-llama")["vocab_size"]
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<unk>", "<s>", "</s>")
    sp = spm.SentencePieceProcessor(model_file=str(built / "tokenizer.model"))
    lines = list(assets.tokenizer_corpus())[:3000]
    assert [tok(line)["input_ids"] for line in lines] == [sp.encode(line, add_bos=True) for line in lines]
    row = assets.read_jsonl(assets.METAMATH_TINY)[0]
    text = TEMPLATES["metamath"].prompt(row) + row["response"]
    ids = tok(text)["input_ids"]
    assert ids == sp.encode(text, add_bos=True)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < 200  # whole words, not characters


def test_model_loads_with_from_pretrained_and_is_the_seeded_init(built):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(built))
    preset = assets.preset_config("tiny-llama")
    assert type(model).__name__ == "LlamaForCausalLM"
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert getattr(model.config, key) == preset[key]
    assert model.dtype == torch.float32
    torch.manual_seed(assets.MODEL_SEED)
    fresh = LlamaForCausalLM(LlamaConfig.from_dict(preset))
    loaded = model.state_dict()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    tok = load_tokenizer(built)
    batch = tok(["Ava has 3 apples.", "The answer is: 7"], return_tensors="pt", padding=True)
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    assert abs(out.loss.item() - torch.log(torch.tensor(1024.0)).item()) < 0.5  # untrained: near uniform


def test_ensure_preset_reuses_and_rebuilds(built, tmp_path):
    marker = json.loads((built / assets.MARKER).read_text())
    mtime = (built / "model.safetensors").stat().st_mtime_ns
    assert assets.ensure_preset("tiny-llama", built) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == mtime

    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / assets.MARKER).write_text(json.dumps(dict(marker, fingerprint="old")))
    assert assets.ensure_preset("tiny-llama", stale) == stale
    assert json.loads((stale / assets.MARKER).read_text())["fingerprint"] == marker["fingerprint"]
    assert (stale / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    assert (stale / "tokenizer.json").read_bytes() == (built / "tokenizer.json").read_bytes()


def test_ensure_preset_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a lora_dist asset directory"):
        assets.ensure_preset("tiny-llama", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_resolve_model(built, monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_DIST_CACHE", str(built.parent))
    assert assets.default_cache_dir() == built.parent
    assert assets.resolve_model("tiny-llama") == built
    assert assets.resolve_model(str(built)) == built
    with pytest.raises(ConfigError, match="neither a local model directory nor a buildable preset"):
        assets.resolve_model(str(tmp_path / "llama-7b"))
    config_only = [p for p in assets.list_presets() if p not in assets.demo_presets()]
    if config_only:  # e.g. llama2-13b: a config for memory planning, no weights to build
        with pytest.raises(ValueError, match="config-only preset"):
            assets.ensure_preset(config_only[0], tmp_path / "x")


@pytest.mark.slow
def test_concurrent_builds_end_with_one_complete_directory(tmp_path):
    target = tmp_path / "tiny-llama"
    code = "import sys; from lora_dist.job import demo as assets; print(assets.ensure_preset('tiny-llama', sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert Path(out.strip()) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]
    tok = load_tokenizer(target)
    assert len(tok) == 1024
    assert assets._is_current(target, assets._fingerprint("tiny-llama"))


def test_cli_dataset_command(tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    assets.main(["dataset", "--out", str(out), "--rows", "20", "--seed", "5"])
    assert capsys.readouterr().out.strip() == str(out)
    assert assets.read_jsonl(out) == assets.generate_metamath(20, seed=5)
