"""tests/parallel: one intra-op thread per test (the CI machine's 2 cores are shared by the
spawned ranks and other test processes; more threads only oversubscribe them). Module-scoped
fixtures that compute use `_harness.torch_threads` themselves: they are set up before
this function-scoped fixture runs."""
import pytest

from _harness import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield
