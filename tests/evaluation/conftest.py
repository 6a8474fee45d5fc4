"""Session assets of the evaluation tests (the PyPI `kernels` guard is in tests/conftest.py)."""
import pytest

from _eval_helpers import build_assets


@pytest.fixture(scope="session")
def eval_assets(tmp_path_factory):
    """Tokenizer, trained tiny checkpoint, its HF export and en/zh demo tasks (~15 s)."""
    return build_assets(str(tmp_path_factory.mktemp("eval_assets")))
