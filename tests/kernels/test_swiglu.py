"""SwiGLU kernels (separate and fused gate|up) vs the plain-torch references, every gradient.

On CPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py), so shapes stay
small except one wide (16384) case.
"""
import pytest
import torch

from megacpt.kernels import swiglu, swiglu_fused, swiglu_fused_ref, swiglu_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1792), (3, 2688), (17, 2816), (40,), (2, 3, 24), (17, 5)]


def _check_pair(close, gate, up, dc=None):
    c = swiglu(gate, up)
    c_ref = swiglu_ref(gate, up)
    close(c, c_ref, "c")
    if dc is None:
        dc = torch.randn_like(c_ref)
    dg, du = torch.autograd.grad(c, [gate, up], dc)
    dg_ref, du_ref = torch.autograd.grad(c_ref, [gate, up], dc)
    close(dg, dg_ref, "dgate")
    close(du, du_ref, "dup")
    return c


def _check_fused(close, gate_up, dc=None):
    c = swiglu_fused(gate_up)
    c_ref = swiglu_fused_ref(gate_up)
    close(c, c_ref, "c")
    if dc is None:
        dc = torch.randn_like(c_ref)
    (dgu,) = torch.autograd.grad(c, [gate_up], dc)
    (dgu_ref,) = torch.autograd.grad(c_ref, [gate_up], dc)
    close(dgu, dgu_ref, "dgate_up")
    return c


def _rand(shape, dtype, scale=2.0):
    return (torch.randn(shape, device=DEV) * scale).to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_reference(close, shape, dtype):
    c = _check_pair(close, _rand(shape, dtype), _rand(shape, dtype))
    assert c.dtype == dtype and c.shape == shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_fused_matches_reference(close, shape, dtype):
    gate_up = _rand(shape[:-1] + (2 * shape[-1],), dtype)
    c = _check_fused(close, gate_up)
    assert c.dtype == dtype and c.shape == shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_ffn_16384(close, dtype):
    _check_pair(close, _rand((2, 16384), dtype), _rand((2, 16384), dtype))
    _check_fused(close, _rand((1, 2 * 16384), dtype))


def test_paper_ffn_size_with_ragged_column_block(close):
    # 4608 = 4.5 x 1024: the tile picker uses 512-wide blocks; 7168 uses 1024-wide ones
    from megacpt.kernels.swiglu import _tiles

    assert _tiles(2, 4608)[1] == 512 and _tiles(2, 7168)[1] == 1024
    _check_pair(close, _rand((2, 4608), torch.bfloat16), _rand((2, 4608), torch.bfloat16))


def test_fused_equals_separate_exactly():
    gate, up = torch.randn(5, 3, 96, device=DEV), torch.randn(5, 3, 96, device=DEV)
    a = swiglu(gate, up)
    b = swiglu_fused(torch.cat([gate, up], dim=-1))
    assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter: exp(120) = inf
def test_saturated_gate_is_finite(close):
    gate = torch.tensor([[-120.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 120.0]], device=DEV)
    gate.requires_grad_()
    up = _rand((1, 7), torch.float32)
    _check_pair(close, gate, up)
    c = swiglu(gate, up)
    assert torch.isfinite(c).all()


def test_non_contiguous_inputs(close):
    # row-strided slices of a wider buffer (read in place with their row stride)
    buf = torch.randn(7, 400, device=DEV)
    gate = buf[:, :128].clone().requires_grad_()  # contiguous leaf ...
    gate_view = buf[:, 200:328].requires_grad_()  # ... and a strided leaf view
    assert not gate_view.is_contiguous()
    _check_pair(close, gate_view, gate)
    # transposed (last dim not unit-stride) and strided leading dims
    gt = torch.randn(64, 9, device=DEV).t().requires_grad_()
    ut = torch.randn(4, 9, 64, device=DEV)[::2][0].requires_grad_()
    _check_pair(close, gt, ut)
    # fused input that is a strided slice of a wider projection output
    proj = torch.randn(2, 3, 2 * 80 + 16, device=DEV)
    gate_up = proj[..., 16:].requires_grad_()
    assert not gate_up.is_contiguous()
    _check_fused(close, gate_up)
    # expanded upstream gradient (all-zero strides), as from c.sum().backward()
    _check_fused(close, gate_up, dc=torch.ones(1, device=DEV).expand(2, 3, 80))
    _check_pair(close, gt, ut, dc=torch.ones(1, device=DEV).expand(9, 64))


def test_empty_rows():
    gate = torch.randn(0, 32, device=DEV, requires_grad=True)
    c = swiglu(gate, gate.detach().clone())
    assert c.shape == (0, 32)
    c.sum().backward()
    assert gate.grad.shape == (0, 32)
    assert swiglu(torch.randn(4, 0, device=DEV), torch.randn(4, 0, device=DEV)).shape == (4, 0)
    gu = torch.randn(3, 0, 64, device=DEV, requires_grad=True)
    swiglu_fused(gu).sum().backward()
    assert gu.grad.shape == (3, 0, 64)


def test_bad_inputs_raise_clear_errors():
    a = torch.randn(2, 8, device=DEV)
    with pytest.raises(ValueError, match=r"gate \(2, 8\) and up \(2, 7\) must have the same shape"):
        swiglu(a, torch.randn(2, 7, device=DEV))
    with pytest.raises(ValueError, match="must share dtype"):
        swiglu(a, a.to(torch.bfloat16))
    with pytest.raises(TypeError, match="up has dtype torch.int32"):
        swiglu(a, a.to(torch.int32))
    with pytest.raises(ValueError, match=r"gate_up has shape \(2, 7\); expected an even last dim"):
        swiglu_fused(torch.randn(2, 7, device=DEV))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,ffn", [(4096, 4608), (2048, 11264), (1000, 14848), (3, 7168)])
def test_gpu_large_shapes(close, rows, ffn, dtype):
    _check_pair(close, _rand((rows, ffn), dtype), _rand((rows, ffn), dtype))
    _check_fused(close, _rand((rows, 2 * ffn), dtype))
