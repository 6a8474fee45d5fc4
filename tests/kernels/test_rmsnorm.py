"""RMSNorm kernel vs the plain-torch reference: output, dx and dweight, every dtype.

On CPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py), so shapes stay
small except one wide (16384) case.
"""
import pytest
import torch

from megacpt.kernels import rms_norm, rms_norm_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, w_dtype=None, scale=1.0):
    x = (torch.randn(shape, device=DEV) * scale).to(dtype).requires_grad_()
    w = (1.0 + 0.3 * torch.randn(shape[-1], device=DEV)).to(w_dtype or dtype).requires_grad_()
    return x, w


def _check(close, x, w, eps=1e-5, dy=None):
    """Run kernel and reference on the same inputs and upstream grad; compare y, dx, dw."""
    y = rms_norm(x, w, eps)
    y_ref = rms_norm_ref(x, w, eps)
    tol = x.dtype  # the normalised value is rounded to x.dtype, whatever the output dtype
    close(y, y_ref, "y", tol)
    if dy is None:
        dy = torch.randn_like(y_ref)
    dx, dw = torch.autograd.grad(y, [x, w], dy)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, [x, w], dy)
    close(dx, dx_ref, "dx", tol)
    close(dw, dw_ref, "dweight", tol)
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [
    (1, 1792), (3, 2688), (17, 2816),  # odd rows x non-power-of-two hidden (one row per program)
    (64,), (2, 3, 96), (17, 40),  # rank 1-3 and narrow rows (several rows per program)
])
def test_matches_reference(close, shape, dtype):
    x, w = _inputs(shape, dtype)
    y = _check(close, x, w)
    assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_hidden_16384(close, dtype):
    x, w = _inputs((2, 16384), dtype)
    _check(close, x, w)


def test_wide_non_power_of_two_beyond_16384(close):
    x, w = _inputs((1, 20000), torch.float32)
    _check(close, x, w)


def test_large_and_small_magnitudes(close):
    """Stats in fp32: large fp16 inputs must not overflow x**2, tiny ones must not vanish."""
    x, w = _inputs((3, 256), torch.float16, scale=1000.0)
    _check(close, x, w)
    x, w = _inputs((3, 256), torch.float32, scale=1e-4)
    _check(close, x, w, eps=1e-12)


def test_eps_and_zero_rows(close):
    x, w = _inputs((4, 128), torch.float32)
    with torch.no_grad():
        x[1].zero_()
    y = _check(close, x, w, eps=0.5)
    assert torch.all(y[1] == 0)


def test_fp32_weight_with_half_input_promotes_like_reference(close):
    x, w = _inputs((5, 192), torch.bfloat16, w_dtype=torch.float32)
    y = _check(close, x, w)
    assert y.dtype == torch.float32


def test_non_contiguous_inputs(close):
    # row-strided slice: the kernel reads it in place with the row stride
    base = torch.randn(6, 300, device=DEV, dtype=torch.bfloat16)
    x = base[:, 7:7 + 256].requires_grad_()
    w = torch.randn(256, device=DEV, dtype=torch.bfloat16).requires_grad_()
    assert not x.is_contiguous()
    _check(close, x, w)
    # transposed (last dim not unit-stride) and a strided leading dim (not collapsible)
    xt = torch.randn(96, 5, device=DEV).t().requires_grad_()
    x3 = torch.randn(4, 3, 96, device=DEV)[::2].requires_grad_()
    wt = torch.randn(96, device=DEV).requires_grad_()
    _check(close, xt, wt)
    _check(close, x3, wt)
    # expanded upstream gradient (all-zero strides), as from y.sum().backward()
    y = rms_norm(xt, wt)
    y.sum().backward()
    xr, wr = xt.detach().clone().requires_grad_(), wt.detach().clone().requires_grad_()
    rms_norm_ref(xr, wr).sum().backward()
    close(xt.grad, xr.grad, "dx (expanded dy)")
    close(wt.grad, wr.grad, "dweight (expanded dy)")


@pytest.mark.parametrize("programs", [1, 3, 5])
@pytest.mark.parametrize("hidden", [100, 2816])
def test_backward_persistent_grid_partial_sums(close, programs, hidden):
    """Several rows per program (ragged last program): per-program dW partials must sum right."""
    from megacpt.kernels.rmsnorm import rms_norm_bwd, rms_norm_fwd

    x = torch.randn(37, hidden, device=DEV)
    w = torch.randn(hidden, device=DEV)
    dy = torch.randn(37, hidden, device=DEV)
    y, rstd = rms_norm_fwd(x, w, 1e-5, torch.float32)
    close(rstd, torch.rsqrt(x.pow(2).mean(-1) + 1e-5), "rstd")
    dx, dw = rms_norm_bwd(dy, x, w, rstd, programs=programs)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    dx_ref, dw_ref = torch.autograd.grad(rms_norm_ref(xr, wr), [xr, wr], dy)
    close(dx, dx_ref, "dx")
    close(dw, dw_ref, "dweight")


def test_only_weight_or_only_input_requires_grad(close):
    x, w = _inputs((3, 64), torch.float32)
    dx, = torch.autograd.grad(rms_norm(x, w.detach()), [x], torch.ones(3, 64, device=DEV))
    dx_ref, = torch.autograd.grad(rms_norm_ref(x, w.detach()), [x], torch.ones(3, 64, device=DEV))
    close(dx, dx_ref, "dx")
    dw, = torch.autograd.grad(rms_norm(x.detach(), w), [w], torch.ones(3, 64, device=DEV))
    dw_ref, = torch.autograd.grad(rms_norm_ref(x.detach(), w), [w], torch.ones(3, 64, device=DEV))
    close(dw, dw_ref, "dweight")


def test_empty_rows():
    x = torch.randn(0, 64, device=DEV, requires_grad=True)
    w = torch.randn(64, device=DEV, requires_grad=True)
    y = rms_norm(x, w)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.all(w.grad == 0)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 8, device=DEV)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\); expected \(8,\)"):
        rms_norm(x, torch.ones(7, device=DEV))
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        rms_norm(torch.ones(2, 8, dtype=torch.long, device=DEV), torch.ones(8, device=DEV))
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
        rms_norm(x, torch.ones(8, dtype=torch.float64, device=DEV))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        rms_norm(x, torch.ones(8, device=DEV), eps=-1.0)
    with pytest.raises(ValueError, match=r"expected \[..., hidden\] with hidden >= 1"):
        rms_norm(torch.randn(3, 0, device=DEV), torch.ones(0, device=DEV))
    with pytest.raises(ValueError, match="hidden size 65537 exceeds"):
        rms_norm(torch.randn(1, 65537, device=DEV), torch.ones(65537, device=DEV))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", [(4096, 1792), (4096, 4096), (1000, 8192), (257, 16384),
                                         (8192, 2688)])
def test_gpu_large_shapes(close, rows, hidden, dtype):
    x, w = _inputs((rows, hidden), dtype)
    _check(close, x, w)
