"""Which tokenizer made a dataset (the `.tokenizer.json` sidecar) and the newcomer errors of
the data tools: a missing tokenizer, a wrong --json-keys, a vocabulary with no room for
merges."""
import json
import random

import pytest

from megacpt.config import ConfigError
from megacpt.data import sidecar
from megacpt.data.indexed import IndexedDataset
from megacpt.data.preprocess import main as preprocess_main
from megacpt.data.tokenizer_train import main as train_tokenizer_main
from megacpt.training.checks import check_tokenizer_sidecar


def _preprocess(inp, out, model):
    preprocess_main(["--input", inp, "--json-keys", "text", "--tokenizer-model", model,
                     "--output-prefix", out, "--workers", "1"])
    return out + "_text_document"


@pytest.fixture(scope="module")
def dense_tokenizer(tmp_path_factory):
    """A tokenizer whose vocabulary is nearly all single characters (2,000 CJK characters,
    vocabulary 2,400 at the default coverage), and its training output."""
    root = tmp_path_factory.mktemp("dense")
    rng = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(2000)]
    with open(root / "zh.jsonl", "w", encoding="utf-8") as f:
        for _ in range(400):
            f.write(json.dumps({"text": "".join(rng.choices(chars, k=200))},
                               ensure_ascii=False) + "\n")
    return str(root / "zh.jsonl"), str(root / "dense")


def test_preprocess_writes_sidecar_and_trainer_checks_it(small_jsonl, spm_model, tmp_path,
                                                         dense_tokenizer, capsys):
    prefix = _preprocess(small_jsonl, str(tmp_path / "small"), spm_model)
    record = json.load(open(prefix + ".tokenizer.json"))
    ds = IndexedDataset(prefix)
    assert record["tokenizer_sha256"] == sidecar.fingerprint(spm_model)
    assert record["tokenizer_vocab_size"] == 1500
    assert (record["documents"], record["sequences"], record["num_tokens"]) == \
        (len(ds.document_indices) - 1, len(ds), ds.num_tokens)
    check_tokenizer_sidecar("--data-path", "zh", prefix, spm_model)  # the same: fine
    inp, model_prefix = dense_tokenizer
    train_tokenizer_main(["--input", inp, "--vocab-size", "2400", "--model-prefix",
                          model_prefix, "--num-threads", "1"])
    err = capsys.readouterr().err
    assert "only" in err and "merges" in err and "--character-coverage" in err, err
    other = model_prefix + ".model"
    with pytest.raises(ConfigError, match=rf"--data-path: dataset 'zh': {prefix}.bin was "
                                          r"tokenized with another tokenizer"):
        check_tokenizer_sidecar("--data-path", "zh", prefix, other)


def test_preprocess_missing_tokenizer_is_exit_2(small_jsonl, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _preprocess(small_jsonl, str(tmp_path / "x"), str(tmp_path / "nope.model"))
    assert e.value.code == 2
    assert "--tokenizer-model" in capsys.readouterr().err


def test_train_tokenizer_wrong_json_keys_is_exit_2(small_jsonl, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_tokenizer_main(["--input", small_jsonl, "--json-keys", "body", "--vocab-size",
                              "500", "--model-prefix", str(tmp_path / "t")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{small_jsonl}:1: missing key 'body'" in err and "--json-keys" in err
