"""engine/stats.py on its own: the Collector's statistics for one nn.Linear (as local sums and as
rows shipped to the owner) against a float64 hand computation (Σxᵀx and Σx over the position mask, g = Σ_t w_t δ_tᵀx_t over every position, diag and
full Σδᵀδ over the mask), and the position/weight semantics of step_context."""
import torch
import torch.nn as nn

from lora_dist.comm import Comm
from lora_dist.engine.methods import INPUT_MOMENT, OUTPUT_GRAD_DIAG, OUTPUT_GRAD_FULL, WEIGHT_GRADIENT
from lora_dist.engine.stats import Collector, StepContext, local_counts, position_mask, step_context

ALL = frozenset({INPUT_MOMENT, WEIGHT_GRADIENT, OUTPUT_GRAD_DIAG, OUTPUT_GRAD_FULL})


def _run(stats, backward, chunk=None, rows=False):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(7, 5, bias=False).double()
    lin.weight.data = torch.randn(5, 7, generator=g, dtype=torch.float64)
    x = torch.randn(2, 9, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 9, generator=g) > 0.3
    w = torch.tensor([[0.25], [0.5]], dtype=torch.float64).expand(2, 9)
    target = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    coll = Collector({"lin": lin}, {"lin": ["lin"]}, {"lin": 0}, {"lin"} if rows else set(), stats,
                     torch.float64, backward, Comm())
    if chunk:
        coll.CHUNK = chunk
    coll.ctx = StepContext(mask, w)
    coll.peers = [(coll.ctx.mask, coll.ctx.weight)]  # rows mode: every rank's masks and weights
    coll.attach()
    try:
        xin = x.clone().requires_grad_(backward)
        if backward:
            y = lin(xin)
            ((y - target) ** 2).sum().backward()
        else:
            with torch.no_grad():
                lin(xin)
        coll.finish_step()
    finally:
        coll.detach()
    delta = 2 * (x @ lin.weight.T - target)          # ∂L/∂y by hand
    xf, df, m, wf = x.reshape(-1, 7), delta.reshape(-1, 5), mask.reshape(-1), w.reshape(-1)
    ref = {"second": xf[m].T @ xf[m], "sum": xf[m].sum(0), "g": (df * wf[:, None]).T @ xf,
           "G_diag": (df[m] ** 2).sum(0), "G_full": df[m].T @ df[m]}
    assert not lin._forward_hooks
    got = coll.totals["lin"] if rows else coll.take()["lin"]
    assert coll.peak >= sum(t.numel() * t.element_size() for t in got.values())  # live tensors, measured
    return got, ref


def test_collector_matches_hand_float64_statistics():
    # local sums, and rows shipped to the owner (a one-rank Comm: the owner is this process)
    for chunk, rows in ((None, False), (4, False), (None, True), (4, True)):  # chunks: the same sums
        got, ref = _run(ALL, backward=True, chunk=chunk, rows=rows)
        assert set(got) == set(ref)
        for k in ref:
            assert torch.allclose(got[k], ref[k], rtol=1e-12, atol=1e-12), k


def test_forward_only_collects_input_moments_in_the_forward_hook():
    got, ref = _run(frozenset({INPUT_MOMENT}), backward=False, rows=True)
    assert set(got) == {"second", "sum"}
    assert torch.allclose(got["second"], ref["second"], rtol=1e-12) and torch.allclose(got["sum"], ref["sum"])


def test_position_masks_and_weights():
    ids = torch.ones(2, 5, dtype=torch.long)
    att = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, -100, -100, -100, -100]])
    b = {"input_ids": ids, "attention_mask": att, "labels": labels}
    opts = {"factor_positions": "attention", "gradient_weighting": "sample_mean"}
    assert torch.equal(position_mask(b, opts), att.bool())
    # input position t predicts label t+1: sample 0's loss positions are 1 and 2
    loss = position_mask(b, {**opts, "factor_positions": "loss"})
    assert loss.tolist() == [[False, True, True, False, False], [False] * 5]
    assert local_counts([b], opts) == [1.0, 2.0, 9.0]
    ctx = step_context(b, opts, n_samples=4, n_tok=10, dummy=False)
    assert ctx.weight.view(2, 5)[0].tolist() == [0.25] * 5 and ctx.weight.view(2, 5)[1].tolist() == [0.0] * 5
    tok = step_context(b, {**opts, "gradient_weighting": "token_mean"}, 4, 10, False)
    assert torch.allclose(tok.weight.view(2, 5)[0], torch.full((5,), 0.2, dtype=torch.float64))
    dummy = step_context(b, opts, 4, 10, True)
    assert not dummy.mask.any() and not dummy.weight.any()
    del b["labels"]
    assert local_counts([b], opts) == [2.0, 0.0, 9.0]  # label-less: every attended sample counts
