"""Fused QKV split + rotary kernel vs the plain-torch reference (outputs and dqkv), and the
model's Attention routing through them.

On CPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py), so shapes stay
small except one wide (4016M-like, 22 heads x 128) case.
"""
import os

import pytest
import torch

from megacpt.kernels import qkv_rope, qkv_rope_ref
from megacpt.model.attention import rotary_tables

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (s, b, G, P, d): odd s and b, s = 1, b = 1, G = 1, P = 1 (one query head per group, MHA),
# head dims whose halves (8, 40, 48, 64) are not all powers of two (masked lanes)
SHAPES = [(5, 3, 2, 2, 16), (1, 2, 3, 1, 80), (7, 1, 1, 4, 128), (3, 5, 2, 1, 96),
          (4, 3, 1, 3, 80)]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _qkv(s, b, g, p, d, dtype, scale=2.0):
    return (torch.randn(s, b, g * (p + 2) * d, device=DEV) * scale).to(dtype).requires_grad_()


def _tables(s, d, extra=3):
    """The model's tables (rotary_tables), longer than s: the first s rows are used."""
    return rotary_tables(s + extra, d, 10000.0, DEV)


def _check(close, qkv, cos, sin, dims, grads="all"):
    """Outputs and dqkv of the kernel vs the reference; `grads` picks the outputs the loss uses
    ("all", "qk": dv is None, "v": dq and dk are None); upstream grads are random."""
    outs = qkv_rope(qkv, cos, sin, *dims)
    refs = qkv_rope_ref(qkv, cos, sin, *dims)
    for name, o, r in zip("qkv", outs, refs):
        close(o, r, name)
        assert o.is_contiguous(), name
    used = {"all": [0, 1, 2], "qk": [0, 1], "v": [2]}[grads]
    dys = [torch.randn_like(refs[i]) for i in used]
    (dqkv,) = torch.autograd.grad([outs[i] for i in used], [qkv], dys)
    (dqkv_ref,) = torch.autograd.grad([refs[i] for i in used], [qkv], dys)
    close(dqkv, dqkv_ref, "dqkv")
    assert dqkv.shape == qkv.shape and dqkv.dtype == qkv.dtype
    return outs, dqkv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda t: "s{}b{}G{}P{}d{}".format(*t))
def test_qkv_rope_matches_reference(close, shape, dtype):
    s, b, g, p, d = shape
    cos, sin = _tables(s, d)
    (q, k, v), _ = _check(close, _qkv(s, b, g, p, d, dtype), cos, sin, (g, p, d))
    assert q.shape == (b, s, g * p, d) and k.shape == v.shape == (b, s, g, d)
    assert q.dtype == k.dtype == v.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_4016m_heads(close, dtype):
    # 22 groups x (1 query + k + v) x 128: the paper's 4016M attention width, two tokens x 3
    _check(close, _qkv(2, 3, 22, 1, 128, dtype), *_tables(2, 128), (22, 1, 128))


def test_value_heads_copied_exactly_and_position_zero_unrotated():
    s, b, g, p, d = 3, 2, 2, 2, 16
    qkv = _qkv(s, b, g, p, d, torch.bfloat16)
    q, k, v = qkv_rope(qkv, *_tables(s, d), g, p, d)
    x = qkv.detach().view(s, b, g, p + 2, d).transpose(0, 1)  # [b, s, G, P+2, d]
    assert torch.equal(v, x[:, :, :, p + 1])
    assert torch.equal(k[:, 0], x[:, 0, :, p])  # cos = 1, sin = 0 at position 0
    assert torch.equal(q[:, 0], x[:, 0, :, :p].reshape(b, g * p, d))


def test_backward_formula_with_general_tables(close):
    """dx1 = dy1*c1 + dy2*s2, dx2 = dy2*c2 - dy1*s1 (the transpose of the rotation), checked
    with random tables whose two halves differ, against the kernel and torch autograd."""
    s, b, g, p, d = 4, 3, 2, 1, 16
    cos, sin = torch.randn(s, d, device=DEV), torch.randn(s, d, device=DEV)
    qkv = _qkv(s, b, g, p, d, torch.float32)
    _check(close, qkv, cos, sin, (g, p, d))
    outs = qkv_rope(qkv, cos, sin, g, p, d)
    dys = [torch.randn_like(o) for o in outs]
    (dqkv,) = torch.autograd.grad(outs, [qkv], dys)
    # the formula, head by head, in [s, b, G, P+2, d]
    dq = dys[0].view(b, s, g, p, d)
    dy = torch.cat([dq, dys[1][:, :, :, None]], dim=3).transpose(0, 1)  # [s, b, G, P+1, d]
    h = d // 2
    c, sn = cos[:, None, None, None, :], sin[:, None, None, None, :]
    dx1 = dy[..., :h] * c[..., :h] + dy[..., h:] * sn[..., h:]
    dx2 = dy[..., h:] * c[..., h:] - dy[..., :h] * sn[..., :h]
    rot = torch.cat([dx1, dx2], dim=-1)
    expect = torch.cat([rot, dys[2].transpose(0, 1)[:, :, :, None]], dim=3).reshape(s, b, -1)
    close(dqkv, expect, "dqkv formula")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_only_some_outputs_used(close, dtype):
    s, b, g, p, d = 3, 3, 2, 2, 16
    cos, sin = _tables(s, d)
    qkv = _qkv(s, b, g, p, d, dtype)
    _, dqkv = _check(close, qkv, cos, sin, (g, p, d), grads="qk")  # dv arrives as None
    x = dqkv.view(s, b, g, p + 2, d)
    assert torch.count_nonzero(x[:, :, :, p + 1]) == 0 and torch.count_nonzero(x[..., :p, :]) > 0
    _, dqkv = _check(close, qkv, cos, sin, (g, p, d), grads="v")  # dq, dk arrive as None
    x = dqkv.view(s, b, g, p + 2, d)
    assert torch.count_nonzero(x[:, :, :, : p + 1]) == 0


def test_non_contiguous_inputs_and_grads(close):
    s, b, g, p, d = 3, 5, 2, 1, 80
    w = g * (p + 2) * d
    cos, sin = _tables(s, d)
    # slice of a wider projection output: strided s and b dims, read in place
    wide = torch.randn(s, b, w + 32, device=DEV)
    _check(close, wide[..., 16:16 + w].requires_grad_(), cos, sin, (g, p, d))
    # [b, s, W] storage seen as [s, b, W]
    _check(close, torch.randn(b, s, w, device=DEV).transpose(0, 1).requires_grad_(), cos, sin,
           (g, p, d))
    # last dim not unit-stride (copied), and column-strided tables
    qkv_t = torch.randn(w, s, b, device=DEV).permute(1, 2, 0).requires_grad_()
    cos_t, sin_t = cos.t().contiguous().t(), sin.t().contiguous().t()
    assert cos_t.stride(-1) != 1
    _check(close, qkv_t, cos_t, sin_t, (g, p, d))
    # upstream grads that are expanded (zero strides) or transposed
    qkv = _qkv(s, b, g, p, d, torch.float32)
    outs = qkv_rope(qkv, cos, sin, g, p, d)
    refs = qkv_rope_ref(qkv, cos, sin, g, p, d)
    dys = [torch.ones(1, device=DEV).expand(b, s, g * p, d),
           torch.randn(s, b, g, d, device=DEV).transpose(0, 1),
           torch.randn(b, s, d, g, device=DEV).transpose(2, 3)]
    (dqkv,) = torch.autograd.grad(outs, [qkv], dys)
    (dqkv_ref,) = torch.autograd.grad(refs, [qkv], dys)
    close(dqkv, dqkv_ref, "dqkv strided grads")


def test_empty_sequence():
    qkv = torch.randn(0, 2, 2 * 3 * 16, device=DEV, requires_grad=True)
    q, k, v = qkv_rope(qkv, *_tables(1, 16), 2, 1, 16)
    assert q.shape == (2, 0, 2, 16) and k.shape == v.shape == (2, 0, 2, 16)
    (q.sum() + k.sum() + v.sum()).backward()
    assert qkv.grad.shape == qkv.shape


def test_bad_inputs_raise_clear_errors():
    cos, sin = _tables(4, 16)
    qkv = torch.randn(4, 2, 2 * 3 * 16, device=DEV)
    with pytest.raises(ValueError, match=r"qkv has shape \(4, 2, 96\); expected \[s, b, .*"
                                         r"= \[s, b, 128\] \(2 groups x \(2 query"):
        qkv_rope(qkv, cos, sin, 2, 2, 16)
    with pytest.raises(ValueError, match="qkv has shape"):
        qkv_rope(qkv[0], cos, sin, 2, 1, 16)
    with pytest.raises(ValueError, match="head_dim must be even"):
        qkv_rope(torch.randn(4, 2, 45, device=DEV), torch.zeros(4, 15), torch.zeros(4, 15),
                 1, 1, 15)
    with pytest.raises(ValueError, match="num_groups must be a positive int, got 0"):
        qkv_rope(qkv, cos, sin, 0, 1, 16)
    with pytest.raises(ValueError, match=r"cos has shape \(3, 16\); expected \[>= s, head_dim\] "
                                         r"= \[>= 4, 16\]"):
        qkv_rope(qkv, cos[:3], sin, 2, 1, 16)
    with pytest.raises(ValueError, match=r"sin has shape \(7, 8\)"):
        qkv_rope(qkv, cos, sin[:, :8], 2, 1, 16)
    with pytest.raises(TypeError, match="qkv has dtype torch.int64"):
        qkv_rope(qkv.long(), cos, sin, 2, 1, 16)
    with pytest.raises(TypeError, match="cos has dtype torch.float64"):
        qkv_rope(qkv, cos.double(), sin, 2, 1, 16)


@pytest.mark.parametrize("use_kernels", [False, True])
@pytest.mark.parametrize("groups,heads,dtype", [(2, 6, torch.float32), (3, 3, torch.bfloat16)])
def test_attention_forward_uses_qkv_rope(close, groups, heads, dtype, use_kernels):
    """megacpt.model.llama.Attention splits and rotates through qkv_rope (kernels on) or
    qkv_rope_ref (off): the q, k, v reaching attention and the gradient reaching the qkv
    projection output equal the reference's, with the model's rotary_tables."""
    from megacpt.config import ModelConfig
    from megacpt.model import llama
    from megacpt.parallel.context import ParallelContext

    d, s, b = 16, 5, 3
    cfg = ModelConfig(hidden_size=32, num_attention_heads=heads, num_query_groups=groups,
                      kv_channels=d, seq_length=s)
    att = llama.Attention(cfg, ParallelContext.single(DEV), "eager", use_kernels, dtype, DEV)
    with torch.no_grad():
        for w in att.parameters():  # created uninitialised (torch.empty)
            w.normal_(0.0, 0.3)
    seen = {}
    att.qkv.register_forward_hook(lambda mod, inp, out: seen.update(qkv=out))

    def fake_attention(q, k, v, backend):
        seen.update(q=q, k=k, v=v)
        return torch.zeros_like(q)

    cos, sin = rotary_tables(s, d, cfg.rotary_base, DEV)
    mp = pytest.MonkeyPatch()
    mp.setattr(llama, "attention", fake_attention)
    try:
        att(torch.randn(s, b, 32, device=DEV, dtype=dtype), cos, sin)
    finally:
        mp.undo()
    qkv = seen["qkv"]
    assert torch.isfinite(qkv).all() and qkv.shape == (s, b, (heads + 2 * groups) * d)
    refs = qkv_rope_ref(qkv, cos, sin, groups, heads // groups, d)
    model = [seen[n] for n in "qkv"]
    for name, r, m in zip("qkv", refs, model):
        close(m, r, name)
    dys = [torch.randn_like(r) for r in refs]
    (g_model,) = torch.autograd.grad(model, [qkv], dys, retain_graph=True)
    (g_ref,) = torch.autograd.grad(refs, [qkv], dys)
    close(g_model, g_ref, "dqkv")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2048, 4, 14, 1, 128), (2048, 4, 22, 1, 128),
                                   (1024, 2, 4, 8, 128), (513, 3, 12, 1, 64), (77, 5, 3, 2, 80)])
def test_gpu_large_shapes(close, shape, dtype):
    s, b, g, p, d = shape
    _check(close, _qkv(s, b, g, p, d, dtype), *_tables(s, d), (g, p, d))
