import pytest

import lora_dist as ld
from lora_dist.config import COMPATIBLE_INITS


def test_json_round_trip():
    c = ld.AdapterConfig(kind="lora_fa", r=16, alpha=32, use_rslora=True, target_modules="all-linear",
                         exclude_modules=["lm_head"], init="lora_da", init_options={"beta": 0.03}, seed=7)
    assert ld.AdapterConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize("kw,needle", [
    (dict(kind="loraa"), "kind='loraa'"),
    (dict(init="svd"), "init='svd'"),
    (dict(kind="lora", init="lora_sb"), "does not apply to kind='lora'"),
    (dict(kind="vera", init="eva"), "does not apply to kind='vera'"),
    (dict(r=0), "r must be"),
    (dict(alpha=-1), "alpha"),
    (dict(dropout=1.0), "dropout"),
    (dict(target_modules="q_proj"), "target_modules"),
    (dict(target_modules=[]), "target_modules"),
    (dict(adapter_dtype="fp8"), "adapter_dtype"),
    (dict(tied_trainable="AX"), "tied_trainable"),
])
def test_bad_values_name_the_key(kw, needle):
    with pytest.raises(ld.ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        ld.AdapterConfig(**kw)


def test_unknown_key_and_bad_json():
    with pytest.raises(ld.ConfigError, match="unknown key.*'rank'"):
        ld.AdapterConfig.from_dict({"rank": 8})
    with pytest.raises(ld.ConfigError, match="line 1"):
        ld.AdapterConfig.from_json("{bad")


def test_defaults_per_kind_and_compatibility_table_is_consistent():
    assert ld.AdapterConfig(kind="lora_xs").init == "lora_xs"
    assert ld.AdapterConfig(kind="lora").init == "kaiming"
    for kind, inits in COMPATIBLE_INITS.items():
        assert kind in ld.KINDS
        for init in inits:
            assert init in ld.INITS
            ld.AdapterConfig(kind=kind, init=init)  # every listed pair validates


def test_scaling():
    assert ld.AdapterConfig(r=8, alpha=16).scaling == 2.0
    assert ld.AdapterConfig(r=16, alpha=16, use_rslora=True).scaling == 4.0


def test_update_rule_round_trip_and_defaults():
    c = ld.AdapterConfig(kind="lora", use_rslora=True, update_rule="lora_pro",
                         update_options={"betas": (0.8, 0.99), "moments": "none"})
    back = ld.AdapterConfig.from_json(c.to_json())
    assert back == c and back.update_options["betas"] == [0.8, 0.99]
    assert back.update_option("eps") == 1e-8 and back.update_option("moments") == "none"
    fa = ld.AdapterConfig(kind="lora_fa", update_rule="lora_fa", loraplus_lr_ratio=4)
    assert ld.AdapterConfig.from_dict(fa.to_dict()) == fa and fa.update_option("delta") == 1e-8
    assert ld.AdapterConfig().update_rule == "plain" and ld.AdapterConfig().loraplus_lr_ratio is None
    # a config written before these fields existed still loads, as plain
    old = {k: v for k, v in ld.AdapterConfig().to_dict().items()
           if k not in ("update_rule", "update_options", "loraplus_lr_ratio")}
    assert ld.AdapterConfig.from_dict(old).update_rule == "plain"


@pytest.mark.parametrize("kw,needle", [
    (dict(update_rule="adam"), "update_rule='adam' is unknown"),
    (dict(kind="lora", update_rule="lora_fa"), "update_rule='lora_fa' needs kind in \\['lora_fa'\\]"),
    (dict(kind="dora", update_rule="lora_pro"), "update_rule='lora_pro' needs kind in \\['lora'\\]"),
    (dict(kind="lora_fa", update_rule="lora_pro"), "needs kind"),
    (dict(update_options={"delta": 1e-8}), "update_options: \\['delta'\\] do not apply to update_rule='plain'"),
    (dict(kind="lora_fa", update_rule="lora_fa", update_options={"betas": [0.9, 0.99]}), "\\['betas'\\]"),
    (dict(update_rule="lora_pro", update_options={"delta": 0}), "update_options\\['delta'\\]"),
    (dict(update_rule="lora_pro", update_options={"eps": "1e-8"}), "update_options\\['eps'\\]"),
    (dict(update_rule="lora_pro", update_options={"betas": [0.9]}), "update_options\\['betas'\\]"),
    (dict(update_rule="lora_pro", update_options={"betas": [0.9, 1.0]}), "update_options\\['betas'\\]"),
    (dict(update_rule="lora_pro", update_options={"moments_dtype": "int8"}), "moments_dtype"),
    (dict(update_rule="lora_pro", update_options={"moments": "half"}), "'moments'"),
    (dict(update_options=[1]), "update_options must be a dict"),
    (dict(loraplus_lr_ratio=0), "loraplus_lr_ratio must be"),
    (dict(loraplus_lr_ratio=True), "loraplus_lr_ratio must be"),
    (dict(loraplus_lr_ratio=float("inf")), "loraplus_lr_ratio must be"),
    (dict(kind="vera", loraplus_lr_ratio=16), "kind='vera' has none"),
    (dict(kind="lora_xs", loraplus_lr_ratio=16), "kind='lora_xs' has none"),
    (dict(kind="tied_lora", tied_trainable="Auv", loraplus_lr_ratio=16), "tied_trainable='Auv' has none"),
    (dict(update_rule="lora_pro", loraplus_lr_ratio=16), "cannot be combined with update_rule='lora_pro'"),
])
def test_impossible_update_rule_combinations(kw, needle):
    with pytest.raises(ld.ConfigError, match=needle):
        ld.AdapterConfig(**kw)


@pytest.mark.parametrize("kind", ["lora", "lora_fa", "dora", "tied_lora"])
def test_loraplus_allowed_for_kinds_with_B(kind):
    assert ld.AdapterConfig(kind=kind, loraplus_lr_ratio=16).loraplus_lr_ratio == 16
