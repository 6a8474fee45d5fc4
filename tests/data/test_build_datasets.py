"""build_train_valid_datasets: names, splits, fixed validation sets, cache, blend resume."""
import os

import numpy as np
import pytest

from megacpt.data.build import build_train_valid_datasets
from megacpt.data.gpt_dataset import split_ranges

from _data_helpers import random_sequences


@pytest.fixture
def prefixes(make_dataset):
    out = {}
    for k, name in enumerate(("zh", "en")):
        seqs = [s % 500 + 500 * k for s in random_sequences(100, seed=10 + k, max_len=40)]
        out[name] = make_dataset(f"{name}_text_document", seqs)
        out[name + "_valid"] = make_dataset(f"{name}_valid_text_document", seqs[:30])
    return out


def build(prefixes, tmp_path, **kw):
    args = dict(data_path_words=["0.7", prefixes["zh"], "0.3", prefixes["en"]], split="90,10,0",
                valid_data_path=None, seq_length=16, train_samples=200, eval_samples=None,
                seed=1234, cache_dir=str(tmp_path / "cache"), rank_builds=True)
    args.update(kw)
    return build_train_valid_datasets(**args)


def test_names_split_and_origin(prefixes, tmp_path):
    train, valid = build(prefixes, tmp_path)
    assert train.names == ["zh", "en"] and len(train) == 200
    assert sorted(valid) == ["en", "zh"]
    (tr0, tr1), (va0, va1), _ = split_ranges("90,10,0", 100)
    assert list(train.datasets["zh"].documents) == list(range(tr0, tr1))
    assert list(valid["zh"].documents) == list(range(va0, va1))
    for i in range(0, 200, 7):
        sample = train[i]
        assert (sample["tokens"] >= 500).all() == (sample["dataset"] == "en")
    assert os.listdir(tmp_path / "cache")


def test_valid_data_path_sets_are_fixed(prefixes, tmp_path):
    named = {"zh": prefixes["zh_valid"], "en": prefixes["en_valid"]}
    _, v1 = build(prefixes, tmp_path, valid_data_path=named, seed=1)
    _, v2 = build(prefixes, tmp_path, valid_data_path=[f"zh={prefixes['zh_valid']}",
                                                       f"en={prefixes['en_valid']}"],
                  seed=2, eval_samples=5)
    assert sorted(v1) == ["en", "zh"] and len(v2["zh"]) == 5
    for name in ("zh", "en"):  # same held-out tokens whatever the seed; in document order
        np.testing.assert_array_equal(v1[name].shuffle_index, np.arange(len(v1[name])))
        for i in range(5):
            np.testing.assert_array_equal(v1[name][i]["tokens"], v2[name][i]["tokens"])


def test_resume_with_changed_replay_ratio(prefixes, tmp_path):
    first, _ = build(prefixes, tmp_path)
    state = first.state_dict(consumed_samples=120)
    second, _ = build(prefixes, tmp_path, data_path_words=["0.4", prefixes["zh"], "0.6",
                                                           prefixes["en"]], data_state=state)
    assert second.start == 120
    nxt = {n: state["consumed_samples_per_dataset"][n] for n in ("zh", "en")}
    for i in range(120, 200):
        sample = second[i]
        name = sample["dataset"]
        expect = second.datasets[name][nxt[name]]
        np.testing.assert_array_equal(sample["tokens"], expect["tokens"])
        nxt[name] += 1
    counts = second.state_dict(consumed_samples=200)["consumed_samples_per_dataset"]
    assert counts["en"] - state["consumed_samples_per_dataset"]["en"] == 48  # 0.6 * 80


def test_bad_inputs(prefixes, tmp_path):
    with pytest.raises(ValueError, match="--split"):
        build(prefixes, tmp_path, split="0,100,0")
    with pytest.raises(ValueError, match="file not found"):
        build(prefixes, tmp_path, data_path_words=["1", str(tmp_path / "nope"), "1",
                                                   prefixes["en"]])
