"""Fused cross-entropy kernels vs `cross_entropy_ref`: loss and logits gradient, every dtype.

Covers padded vocabularies (columns >= vocab_size), targets on the first and the last valid
column, non-uniform per-token upstream gradients (zeros included), [b, s, V] and strided
inputs, the in-place gradient (same storage, same values as out of place), no-grad calls that
leave the logits alone, the shard primitives (`ce_shard_stats`, `ce_grad_`) with targets in
another shard (-1), invalid targets (NaN, not a silent number) and the benchmark's smoke run.
On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py): shapes stay small except
one paper-sized (36152) vocabulary.
"""
import os

import pytest
import torch

from megacpt.kernels import (ce_grad_, ce_scale_rows_, ce_shard_stats, cross_entropy,
                             cross_entropy_ref)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading dims, padded vocab V_pad, vocab_size)
CASES = [((1,), 5, 5), ((7,), 257, 257), ((33,), 1000, 1000), ((7,), 300, 257),
         ((2, 3), 264, 250)]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _logits(lead, v_pad, dtype, scale=3.0):
    return (torch.randn(*lead, v_pad, device=DEV) * scale).to(dtype)


def _targets(lead, vocab):
    t = torch.randint(0, vocab, lead, device=DEV)
    flat = t.view(-1)
    flat[0] = 0  # first column ...
    flat[-1] = vocab - 1  # ... and the last valid one (next to the padding)
    return t


def _upstream(lead):
    g = torch.rand(lead, device=DEV) * 2  # per-token loss weights, some zero
    g.view(-1)[::3] = 0.0
    return g


def _check(close, logits, target, vocab, dloss, inplace):
    """Kernel loss and gradient vs the reference on a private copy of `logits`."""
    ref_in = logits.detach().clone().requires_grad_()
    loss_ref = cross_entropy_ref(ref_in, target, vocab)
    (g_ref,) = torch.autograd.grad(loss_ref, ref_in, dloss)
    x = logits.detach().clone().requires_grad_()
    loss = cross_entropy(x, target, vocab, inplace=inplace)
    close(loss, loss_ref.detach(), "loss", tol_dtype=logits.dtype)
    (g,) = torch.autograd.grad(loss, x, dloss)
    close(g, g_ref, "dlogits")
    assert not g[..., vocab:].any(), "padding columns must get a zero gradient"
    return loss.detach(), g, x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,v_pad,vocab", CASES)
def test_matches_reference_inplace_or_not(close, lead, v_pad, vocab, dtype):
    logits, target, dloss = _logits(lead, v_pad, dtype), _targets(lead, vocab), _upstream(lead)
    loss, g, _ = _check(close, logits, target, vocab, dloss, inplace=False)
    loss_i, g_i, x_i = _check(close, logits, target, vocab, dloss, inplace=True)
    assert loss.dtype == torch.float32 and loss.shape == lead and g.dtype == dtype
    assert torch.equal(loss, loss_i) and torch.equal(g, g_i)
    assert g_i.data_ptr() == x_i.data_ptr(), "inplace=True must return the logits' storage"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paper_vocab_36152(close, dtype):
    lead, v_pad, vocab = (3,), 36152, 36100  # several 4096-column blocks, ragged tail + padding
    _check(close, _logits(lead, v_pad, dtype), _targets(lead, vocab), vocab, _upstream(lead),
           inplace=True)


def test_model_layout_and_strided_logits(close):
    # the LM head's [s, b, V] logits with labels.t() targets (non-contiguous)
    s, b, v = 5, 2, 130
    labels = torch.randint(0, 120, (b, s), device=DEV)
    _check(close, _logits((s, b), v, torch.bfloat16), labels.t(), 120, _upstream((s, b)), True)
    # rows that are a strided slice of a wider buffer: read (and written) in place
    buf = _logits((6,), 200, torch.float32)
    x = buf[:, 10:150].requires_grad_()
    t = _targets((6,), 140)
    ref_in = x.detach().clone().requires_grad_()
    loss_ref = cross_entropy_ref(ref_in, t)
    (g_ref,) = torch.autograd.grad(loss_ref.sum(), ref_in)
    outside = torch.cat([buf[:, :10], buf[:, 150:]], 1)  # [6, 60], must stay as it is
    loss = cross_entropy(x, t, inplace=True)
    close(loss, loss_ref.detach(), "loss")
    (g,) = torch.autograd.grad(loss.sum(), x)  # expanded (zero-stride) upstream gradient
    close(g, g_ref, "dlogits")
    assert g.data_ptr() == x.data_ptr()
    assert torch.equal(torch.cat([buf[:, :10], buf[:, 150:]], 1), outside)


def test_no_grad_leaves_logits_alone(close):
    x = _logits((9,), 70, torch.bfloat16).requires_grad_()
    t = _targets((9,), 64)
    before = x.detach().clone()
    with torch.no_grad():
        loss = cross_entropy(x, t, 64, inplace=True)
    close(loss, cross_entropy_ref(before, t, 64), "loss", tol_dtype=torch.bfloat16)
    assert torch.equal(x.detach(), before) and x._version == 0
    loss = cross_entropy(before, t, 64, inplace=True)  # grad mode on, logits need no grad
    assert not loss.requires_grad and torch.equal(x.detach(), before)


def test_inplace_bumps_version_so_other_uses_fail():
    x = _logits((4,), 40, torch.float32).requires_grad_()
    w = torch.randn(4, 40, device=DEV, requires_grad=True)
    other = (x * w).sum()  # saves x for w's gradient
    loss = cross_entropy(x, _targets((4,), 40), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (other + loss.sum()).backward()


def test_second_backward_is_refused():
    x = _logits((3,), 33, torch.float32).requires_grad_()
    loss = cross_entropy(x, _targets((3,), 33)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True is not supported"):
        loss.backward()


def test_invalid_targets_give_nan_not_a_number():
    x = _logits((4,), 20, torch.float32)
    t = torch.tensor([3, 16, -1, 25], device=DEV)  # 16: padding column, -1 / 25: out of range
    loss = cross_entropy(x, t, vocab_size=16)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()


def _stats_ref(x, t, n_valid):
    xv = x[:, :n_valid].float()
    m = xv.max(1).values if n_valid else torch.full((x.shape[0],), float("-inf"), device=DEV)
    s = torch.exp(xv - m[:, None]).sum(1)
    here = (t >= 0) & (t < n_valid)
    tgt = x.float().gather(1, t.clamp(min=0)[:, None])[:, 0] * here
    return m, s, tgt


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shard_primitives(close, dtype):
    buf = _logits((6,), 300, dtype)
    x = buf[:, :260]  # row stride 300: read in place
    t = torch.tensor([0, -1, 199, 57, -1, 3], device=DEV)
    for n_valid in (200, 260, 0):
        t_here = torch.where(t < n_valid, t, -1)
        got = ce_shard_stats(x, t_here, n_valid)
        for name, a, b in zip(("row_max", "sum_exp", "target_logit"), got,
                              _stats_ref(x, t_here, n_valid)):
            if n_valid == 0 and name == "row_max":
                assert torch.isneginf(a).all()
                continue
            close(a, b, name, tol_dtype=torch.float32)
    n_valid = 200
    lse = torch.logsumexp(x[:, :n_valid].float(), 1) + 0.25  # any lse, not only the true one
    expect = torch.exp(x[:, :n_valid].float() - lse[:, None])
    expect[torch.arange(6)[t >= 0], t[t >= 0]] -= 1.0
    expect = torch.cat([expect, torch.zeros(6, 60, device=DEV)], 1).to(dtype)
    out = torch.full_like(x, 7.0)
    assert ce_grad_(x, lse, t, n_valid, out=out) is out
    close(out, expect, "grad out")
    beyond = buf[:, 260:].clone()
    ce_grad_(x, lse, t, n_valid)  # in place: the slice of buf, its neighbours untouched
    close(x, expect, "grad in place")
    assert torch.equal(buf[:, 260:], beyond)
    scale = torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0, 1e-3], device=DEV)
    close(ce_scale_rows_(out, scale), (expect.float() * scale[:, None]).to(dtype), "scaled")
    bad = torch.tensor([-2, 0, 0, 0, 0, 200], device=DEV)  # invalid, or a padding column
    tgt = ce_shard_stats(x, bad, n_valid)[2]
    assert torch.isnan(tgt[[0, 5]]).all() and torch.isfinite(tgt[1:5]).all()


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(3, 10, device=DEV)
    with pytest.raises(TypeError, match="target must be an int64 tensor"):
        cross_entropy(x, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"target \(4,\) must match the logits' leading dims"):
        cross_entropy(x, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, 10\]"):
        cross_entropy(x, torch.zeros(3, dtype=torch.int64), vocab_size=11)
    with pytest.raises(TypeError, match="logits has dtype torch.int64"):
        cross_entropy(x.long(), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"n_valid must be in \[0, 10\]"):
        ce_shard_stats(x, torch.zeros(3, dtype=torch.int64), 11)
    with pytest.raises(ValueError, match="unit column stride"):
        ce_shard_stats(x.t(), torch.zeros(10, dtype=torch.int64), 3)
