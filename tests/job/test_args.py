"""lora_dist.job.args: TrainConfig from defaults < --config file < flags; every bad value a ConfigError."""
import dataclasses
import json

import pytest

from lora_dist.errors import ConfigError
from lora_dist.job.args import TrainConfig, parse_args
from lora_dist.job.demo import METAMATH_TINY

# the flags and defaults launch/train.py had before TrainConfig (they must not change)
OLD_DEFAULTS = dict(
    ds_config="ds_configs/zero3.json", model="tiny-llama", data=str(METAMATH_TINY), template="auto",
    adapter="lora_fa", init="lora_da", r=8, alpha=16.0, use_rslora=False, dropout=0.0,
    target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", init_samples=64,
    init_options={}, max_seq_len=128, overlength="truncate", epochs=1, max_steps=120,
    batch_size=16, micro_batch_size=8, lr=2e-3, warmup_ratio=0.03, weight_decay=0.0, max_grad_norm=1.0,
    bf16=False, gradient_checkpointing=False, eval_size=64, eval_every=40, eval_generate=16,
    save_every=40, output_dir="outputs/run", resume=False, seed=0, num_proc=None,
)


def test_defaults_are_the_old_flags_plus_overwrite_and_the_rule_flags():
    cfg = dataclasses.asdict(parse_args([]))
    assert cfg.pop("overwrite_output_dir") is False
    assert cfg.pop("init_memory_budget") is None
    assert (cfg.pop("update_rule"), cfg.pop("update_options"), cfg.pop("loraplus_lr_ratio")) == ("plain", {}, None)
    assert cfg == OLD_DEFAULTS


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("r: 4\nlr: 0.01\ninit_options: {beta: 0.5}\nbf16: true\n")
    cfg = parse_args(["--config", str(y), "--r", "16", "--deepspeed_config", "x.json", "--use_rslora",
                      "--local_rank", "1"])
    assert (cfg.r, cfg.lr, cfg.init_options, cfg.bf16, cfg.use_rslora, cfg.ds_config) == \
        (16, 0.01, {"beta": 0.5}, True, True, "x.json")
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"max_steps": 0, "epochs": 2}))
    cfg = parse_args(["--config", str(j)])
    assert (cfg.max_steps, cfg.epochs, cfg.batch_size) == (0, 2, 16)


@pytest.mark.parametrize("argv, match", [
    (["--r", "0"], "--r must be positive, got 0"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--warmup_ratio", "1"], r"--warmup_ratio must be in \[0, 1\)"),
    (["--dropout", "1.5"], r"--dropout must be in \[0, 1\)"),
    (["--init_options", "{beta"], "--init_options is not valid JSON"),
    (["--init_options", "[1]"], "--init_options must be a JSON object"),
    (["--update_options", "{moments"], "--update_options is not valid JSON"),
    (["--update_options", '"none"'], "--update_options must be a JSON object"),
    (["--update_rule", "lora_ga"], "argument --update_rule: invalid choice"),
    (["--loraplus_lr_ratio", "x"], "argument --loraplus_lr_ratio: invalid float value: 'x'"),
    (["--max_steps", "0", "--epochs", "0"], "--epochs must be positive"),
    (["--resume", "--overwrite_output_dir"], "contradict"),
    (["--r", "x"], "argument --r: invalid int value: 'x'"),
    (["--adapter", "lora_q"], "argument --adapter: invalid choice"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_are_config_errors_naming_the_flag(argv, match):
    with pytest.raises(ConfigError, match=match):  # never argparse's SystemExit (printed on every rank)
        parse_args(argv)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['lrr'\]"):
        parse_args(["--config", str(bad)])
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse_args(["--config", str(bad)])
    bad.write_text("r: [\n")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        parse_args(["--config", str(bad)])


def test_adapter_config_checks_the_kind_init_pair_and_names_the_flags():
    cfg = parse_args(["--adapter", "dora", "--init", "pissa"])  # flags alone are fine ...
    with pytest.raises(ConfigError, match=r"--adapter dora --init pissa: .*'dora' takes init in"):
        cfg.adapter_config()  # ... the pair is not
    ac = parse_args(["--target_modules", "all-linear", "--r", "4", "--init", "pissa"]).adapter_config()
    assert (ac.kind, ac.init, ac.r, ac.target_modules) == ("lora_fa", "pissa", 4, "all-linear")
    assert parse_args(["--adapter", "none"]).adapter_config().init == "none"


def test_every_field_is_a_flag():
    from lora_dist.job.args import _parser
    help_text = _parser("").format_help()
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in help_text, f.name


def test_rule_flags_reach_the_adapter_config_which_checks_them(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("update_rule: lora_pro\nupdate_options: {moments: none, delta: 1.0e-6}\nadapter: lora\n")
    cfg = parse_args(["--config", str(y), "--init", "kaiming"])
    ac = cfg.adapter_config()
    assert (ac.update_rule, ac.update_options, ac.loraplus_lr_ratio) == ("lora_pro", {"moments": "none", "delta": 1e-6}, None)
    assert cfg.given == {"update_rule", "update_options", "adapter", "init"}  # what a resume checks
    assert TrainConfig().given == frozenset()
    ac = parse_args(["--adapter", "dora", "--init", "kaiming", "--loraplus_lr_ratio", "16"]).adapter_config()
    assert ac.loraplus_lr_ratio == 16.0
    with pytest.raises(ConfigError, match=r"^--adapter lora_fa --init lora_da --update_rule lora_pro: AdapterConfig: "
                                          r"update_rule='lora_pro' needs kind in \['lora'\]"):
        parse_args(["--update_rule", "lora_pro"]).adapter_config()
    with pytest.raises(ConfigError, match=r"--loraplus_lr_ratio 16.0: .*cannot be combined with update_rule='lora_pro'"):
        parse_args(["--adapter", "lora", "--init", "kaiming", "--update_rule", "lora_pro",
                    "--loraplus_lr_ratio", "16"]).adapter_config()
    with pytest.raises(ConfigError, match=r"--loraplus_lr_ratio -1.0: .*must be a finite number > 0"):
        parse_args(["--loraplus_lr_ratio", "-1"]).adapter_config()
    with pytest.raises(ConfigError, match=r"--update_options \{'moments': 'some'\}: .*'full' or 'none'"):
        parse_args(["--adapter", "lora", "--init", "kaiming", "--update_rule", "lora_pro", "--update_options",
                    '{"moments": "some"}']).adapter_config()


def test_init_memory_budget_takes_bytes_with_units():
    assert TrainConfig().init_memory_budget is None  # from the device
    assert parse_args(["--init_memory_budget", "40GiB"]).init_memory_budget == 40 * 2 ** 30
    assert parse_args(["--init_memory_budget", "2.5e9"]).init_memory_budget == 2_500_000_000
    assert parse_args(["--init_memory_budget", "500 MB"]).init_memory_budget == 500_000_000
    for bad in ("lots", "40 GiBs", "0", "-1GiB"):
        with pytest.raises(ConfigError, match=r"--init_memory_budget"):
            parse_args(["--init_memory_budget", bad])
