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
