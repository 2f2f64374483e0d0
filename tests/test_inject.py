import pytest
import torch

import lora_dist as ld
from conftest import tiny_llama


def test_patterns_suffix_glob_and_exclude():
    m = tiny_llama()
    names = ld.inject_adapters(m, ld.AdapterConfig(target_modules=["q_proj", "mlp.*_proj"],
                                                   exclude_modules=["down_proj"]))
    assert "model.layers.0.self_attn.q_proj" in names
    assert "model.layers.1.mlp.gate_proj" in names and not any(n.endswith("down_proj") for n in names)
    assert len(names) == 2 * 3


def test_all_linear_excludes_output_head():
    m = tiny_llama()
    names = ld.inject_adapters(m, ld.AdapterConfig(target_modules="all-linear"))
    assert len(names) == 2 * 7 and "lm_head" not in names
    assert all(not p.requires_grad for n, p in m.named_parameters() if "lora" not in n)


def test_pattern_matching_nothing_lists_linear_modules():
    with pytest.raises(ld.ConfigError) as e:
        ld.inject_adapters(tiny_llama(), ld.AdapterConfig(target_modules=["q_proj", "query"]))
    msg = str(e.value)
    assert "'query'" in msg and "q_proj" in msg and "gate_proj" in msg


def test_pattern_matching_non_linear_says_so():
    with pytest.raises(ld.ConfigError, match="not nn.Linear"):
        ld.inject_adapters(tiny_llama(), ld.AdapterConfig(target_modules=["input_layernorm"]))


def test_rank_too_large_names_the_module():
    # k_proj/v_proj are 64 -> 32 here (2 kv heads of 16)
    with pytest.raises(ld.ConfigError, match=r"r=40 .*k_proj"):
        ld.inject_adapters(tiny_llama(), ld.AdapterConfig(r=40, target_modules=["k_proj"]))


def test_inject_twice_and_after_engine_refused():
    m = tiny_llama()
    ld.inject_adapters(m, ld.AdapterConfig())
    with pytest.raises(ld.ConfigError, match="already has adapters"):
        ld.inject_adapters(m, ld.AdapterConfig())


def test_meta_device_injection():
    with torch.device("meta"):
        m = tiny_llama()
    names = ld.inject_adapters(m, ld.AdapterConfig(kind="lora_fa", target_modules="all-linear"))
    q = m.get_submodule(names[0])
    assert q.lora_A.is_meta and q.lora_A.shape == (8, 64)


class _Head(torch.nn.Module):
    """A model with a head named `out` (not one of the usual head names) and a given
    get_output_embeddings behaviour."""

    def __init__(self, raise_exc=None):
        super().__init__()
        self.body = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 16)
        self.lm_head = torch.nn.Linear(8, 16)
        self.raise_exc = raise_exc

    def get_output_embeddings(self):
        if self.raise_exc is not None:
            raise self.raise_exc
        return self.out


def test_all_linear_output_head_from_get_output_embeddings():
    names = ld.inject_adapters(_Head(), ld.AdapterConfig(r=2, target_modules="all-linear"))
    assert names == ["body"]  # `out` is the declared head, `lm_head` is one by name


def test_output_head_not_implemented_falls_back_to_names_only():
    # NotImplementedError is transformers' "no output embeddings": only names decide
    names = ld.inject_adapters(_Head(NotImplementedError()), ld.AdapterConfig(r=2, target_modules="all-linear"))
    assert names == ["body", "out"]


def test_output_head_other_errors_propagate():
    with pytest.raises(AttributeError, match="broken model"):
        ld.inject_adapters(_Head(AttributeError("broken model")), ld.AdapterConfig(r=2, target_modules="all-linear"))
