"""Fixtures for the scaling tests: a synthetic study folder (see scaling_synth)."""
import pytest
from scaling_synth import CPT, SCRATCH, SIZES, write_run


@pytest.fixture(scope="session")
def study_dir(tmp_path_factory):
    """A study folder: scratch-<size>/ and cpt-<size>/ run directories for SIZES."""
    root = tmp_path_factory.mktemp("study")
    for i, N in enumerate(SIZES):
        write_run(root / "scratch" / f"scratch-{N:.0e}", N, "scratch", SCRATCH, seed=i)
        write_run(root / "cpt" / f"cpt-{N:.0e}", N, "cpt", CPT, seed=100 + i)
    return root
