import contextlib
import glob
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: the launched ranks share the 2 cores with this process, and small solves run far
# slower with oversubscribed BLAS threads.
torch.set_num_threads(1)

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY, **overrides})).eval()


def perturb_trainable(model, seed=0, scale=0.05):
    """Add seeded noise to every trainable parameter: adapters as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


SHM_GLOB = "/dev/shm/deepspeed_allreduce_buffer_*"
TORCH_LINEAR = torch.nn.functional.linear


@pytest.fixture(autouse=True)
def _restore_torch_linear():
    """deepspeed.initialize with ZeRO-3 on a model built outside zero.Init replaces
    torch.nn.functional.linear process-wide with its own autograd Function and never puts it back;
    later in-process tests (the memory tool counts the tensors linear saves) would measure that one."""
    yield
    torch.nn.functional.linear = TORCH_LINEAR


@pytest.fixture(autouse=True)
def _remove_deepspeed_shm_buffers():
    """DeepSpeed's CPU shared-memory all-reduce never unlinks its /dev/shm buffers (about 66 MB per
    rank per launch); over a suite of launches they fill the RAM. Remove those a test's launches made,
    once the test (and so its ranks) has finished."""
    before = set(glob.glob(SHM_GLOB))
    yield
    for path in set(glob.glob(SHM_GLOB)) - before:
        with contextlib.suppress(FileNotFoundError):  # a concurrent test removed it first
            os.remove(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A real safetensors checkpoint of a random tiny Llama (save_pretrained)."""
    d = str(tmp_path_factory.mktemp("tiny_llama"))
    tiny_llama().save_pretrained(d)
    return d
