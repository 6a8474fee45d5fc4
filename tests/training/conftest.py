"""Fixtures of the trainer tests: one torch thread, a tiny on-disk corpus."""
import pytest
from _harness import torch_threads
from _train_helpers import build_corpus


@pytest.fixture(autouse=True)
def _one_thread():
    """The machine is small and shared: one intra-op thread keeps tiny steps fast."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """{"zh", "en", "zh_valid", "en_valid"} -> dataset prefix."""
    return build_corpus(str(tmp_path_factory.mktemp("corpus")))
