import os
import sys

import pytest

from _eval_helpers import build_assets

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _import_pypi_kernels() -> None:
    """`python -m pytest` from the checkout puts its `kernels/` folder (installed as
    `megacpt.kernels`) first on sys.path, where it shadows the PyPI package `kernels` that
    transformers imports when installed: import the real one first, if there is one."""
    if "kernels" in sys.modules:
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _REPO]
    try:
        import kernels  # noqa: F401
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


_import_pypi_kernels()


@pytest.fixture(scope="session")
def eval_assets(tmp_path_factory):
    """Tokenizer, trained tiny checkpoint, its HF export and en/zh demo tasks (~15 s)."""
    return build_assets(str(tmp_path_factory.mktemp("eval_assets")))
