"""Test tiers: the CPU tier always runs; `@pytest.mark.gpu` tests are skipped without CUDA.

Without a GPU, Triton kernels run under TRITON_INTERPRET=1 (set before triton is imported),
so they are tested for real on CPU.
"""
import os
import sys

# `python -m pytest` from the repo root puts the root first on sys.path, where `kernels/`
# (installed as `megacpt.kernels`) would shadow the PyPI package `kernels` that transformers
# probes for and imports when it is installed; keep the root, but after site-packages
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_AT_ROOT = [p for p in sys.path if os.path.abspath(p or os.curdir) == _ROOT]
if _AT_ROOT:
    sys.path[:] = [p for p in sys.path if p not in _AT_ROOT] + [_ROOT]

# shared test helpers (`_harness`: the multi-process launcher, tiny models) live beside this
# file; spawned ranks inherit sys.path, so they import them by the same name
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def _import_pypi_kernels() -> None:
    """The checkout's `kernels/` folder (installed as `megacpt.kernels`) can shadow the PyPI
    package `kernels` that transformers imports when building a model: import the real one
    first, if there is one, while the checkout is off sys.path."""
    if "kernels" in sys.modules:
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
    try:
        import kernels  # noqa: F401
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


_import_pypi_kernels()

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
