"""The training objective of one optimizer step: a token-weighted mean, independent of how the
step's samples are split into micro-batches and ranks.

An optimizer step sees micro-batches m = 1..accum on each of `world` ranks. With ℓ_t the
cross-entropy of response token t, n_m the number of response tokens of micro-batch m and
N = Σ_{ranks, m} n_m the step's total, the objective is

    L = Σ_{all tokens t of the step} ℓ_t / N.

The model returns the per-micro-batch mean L_m = Σ_{t∈m} ℓ_t / n_m; DeepSpeed divides the loss
passed to `engine.backward` by accum and averages the reduced gradients over the data-parallel
world. So micro-batch m backpropagates

    L_m · n_m · world · accum / N,

and the gradient DeepSpeed ends with is (1/(world·accum)) Σ_m ∇(L_m n_m world accum / N) = ∇L.
A plain mean of micro-batch means would weight a token by 1/n_m instead: a different gradient for
each world size or micro-batch size.
"""
from __future__ import annotations

import torch

from lora_dist.errors import DataError
from lora_dist.job.data import IGNORE_INDEX


def loss_tokens(labels: torch.Tensor) -> int:
    """The tokens a causal LM's loss averages over: labels are shifted inside the model (position i
    predicts labels[i+1]), so the first column never counts; -100 marks the ignored ones."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def step_scaled(micro_mean: torch.Tensor, n_micro: int, n_step: float, world: int, accum: int) -> torch.Tensor:
    """L_m · n_m · world · accum / N in fp32 (a bf16 loss would round the factor): the loss to pass to
    `engine.backward` so that the step's gradient is that of the token-weighted mean L."""
    if n_micro == 0:  # the model's mean is 0/0 (NaN gradients); build_dataset drops such examples
        raise DataError("a training micro-batch has no response tokens after the label shift")
    return micro_mean.float() * (n_micro * world * accum / n_step)
