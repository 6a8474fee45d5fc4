"""Fixtures for the data-pipeline tests: the bundled corpus, a small tokenizer trained on it
through the CLI, and a helper writing tiny indexed datasets."""
import gzip
import os

import pytest

from _data_helpers import CORPUS, write_dataset


@pytest.fixture(scope="session")
def small_jsonl(tmp_path_factory) -> str:
    """Plain JSONL of the bundled en + zh validation documents (~330 KB)."""
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    with open(path, "wb") as out:
        for lang in ("en", "zh"):
            out.write(gzip.open(os.path.join(CORPUS, f"{lang}_valid.jsonl.gz")).read())
    return str(path)


@pytest.fixture(scope="session")
def spm_model(small_jsonl, tmp_path_factory) -> str:
    """A 1500-piece BPE model trained with tools' main on the small corpus."""
    from megacpt.data.tokenizer_train import main

    prefix = tmp_path_factory.mktemp("tok") / "small"
    main(["--input", small_jsonl, "--vocab-size", "1500", "--character-coverage", "0.98",
          "--model-prefix", str(prefix), "--num-threads", "1"])
    return str(prefix) + ".model"


@pytest.fixture
def make_dataset(tmp_path):
    def make(name: str, sequences, dtype=None) -> str:
        return write_dataset(str(tmp_path / name), sequences, dtype)
    return make
