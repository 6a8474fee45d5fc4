"""kernels_available() and the errors raised where the Triton kernels cannot run."""
import importlib
import sys

import pytest
import torch

import megacpt
import megacpt.kernels as K


def test_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = K.kernels_available("cpu")
    assert not ok and "TRITON_INTERPRET=1" in reason
    x = torch.randn(2, 8)
    with pytest.raises(K.KernelUnavailableError, match=r"rms_norm: .*TRITON_INTERPRET=1"):
        K.rms_norm(x, torch.ones(8))
    with pytest.raises(K.KernelUnavailableError, match=r"swiglu: .*TRITON_INTERPRET=1"):
        K.swiglu(x, x)
    with pytest.raises(K.KernelUnavailableError, match=r"swiglu_fused: .*TRITON_INTERPRET=1"):
        K.swiglu_fused(x)


def test_cpu_with_interpreter_is_available(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.kernels_available("cpu") == (True, "")
    assert K.kernels_available(torch.device("cpu")) == (True, "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda():
    ok, reason = K.kernels_available("cuda")
    assert not ok and "torch.cuda.is_available() is False" in reason


def test_unsupported_device_type():
    ok, reason = K.kernels_available("meta")
    assert not ok and "'meta' is not supported" in reason
    with pytest.raises(K.KernelUnavailableError, match="'meta' is not supported"):
        K.swiglu(torch.empty(2, 4, device="meta"), torch.empty(2, 4, device="meta"))


def test_import_and_clear_error_without_triton(monkeypatch):
    """With triton unimportable the package still imports, references work, kernels explain."""
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "triton", None)
    for name in [m for m in sys.modules if m.startswith("megacpt.kernels")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(megacpt, "kernels", K)  # restored after the fresh import below
    fresh = importlib.import_module("megacpt.kernels")
    assert fresh is not K
    ok, reason = fresh.kernels_available("cpu")
    assert not ok and reason.startswith("triton is not installed: pip install triton")
    x = torch.randn(2, 8)
    torch.testing.assert_close(fresh.swiglu_ref(x, x), torch.nn.functional.silu(x) * x)
    with pytest.raises(fresh.KernelUnavailableError,
                       match="triton is not installed: pip install triton, or disable --use-kernels"):
        fresh.rms_norm(x, torch.ones(8))


def test_non_tensor_argument():
    with pytest.raises(TypeError, match="expected a torch.Tensor, got list"):
        K.rms_norm([1.0, 2.0], torch.ones(2))


def test_triton_imported_compiled_before_interpreter_flag(monkeypatch):
    """Interpreter mode is fixed when triton is imported; a late TRITON_INTERPRET is reported."""
    fake_lang = type(sys)("triton.language")
    fake_lang.sum = lambda *a, **k: None  # a compiled-mode triton has JITFunction objects here
    monkeypatch.setitem(sys.modules, "triton.language", fake_lang)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, reason = K.kernels_available("cpu")
    assert not ok and "imported before TRITON_INTERPRET=1 was set" in reason


def test_public_names_survive_the_lazy_imports():
    """Importing a Triton submodule (swiglu.py, cross_entropy.py, ...) sets the package
    attribute of its name to the module; every public kernel must still be the function."""
    ok, why = K.kernels_available("cpu" if not torch.cuda.is_available() else "cuda")
    if not ok:
        pytest.skip(why)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 8, device=dev)
    K.swiglu(x, x)
    K.swiglu_fused(x)
    K.rms_norm(x, torch.ones(8, device=dev))
    K.cross_entropy(x, torch.zeros(2, dtype=torch.int64, device=dev))
    K.qkv_rope(torch.randn(1, 1, 3 * 4, device=dev), torch.ones(1, 4, device=dev),
               torch.zeros(1, 4, device=dev), 1, 1, 4)
    for name in K.__all__:
        obj = getattr(K, name)
        assert callable(obj) and not isinstance(obj, type(K)), name
    assert K.swiglu.__module__ == "megacpt.kernels" and K.cross_entropy.__module__ == "megacpt.kernels"
