"""Shared helpers for the kernel tests: dtype tolerances and a scale-aware closeness check.

Tolerances: the kernels compute in fp32 and round once or twice to the output dtype, as the
references do, so fp32 agrees to ~1e-6 and half types to about one or two ulps. On CPU the
Triton interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to nearest even), which
the bf16 tolerance absorbs. Gradients that sum over rows (dweight) are compared relative to
their largest magnitude.
"""
import pytest
import torch

TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def _check_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "",
                 tol_dtype: torch.dtype | None = None) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    rtol, atol = TOL[tol_dtype or expected.dtype]
    scale = max(1.0, expected.float().abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{name}: {m}")


@pytest.fixture
def close():
    """`close(actual, expected, name, tol_dtype=None)`: shape, dtype and values within TOL.

    `tol_dtype` picks the tolerance of another dtype (an fp32 result of half-precision math).
    """
    return _check_close


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
