"""--data-path parsing, exact greedy ratios, and resuming with the same or a new blend."""
import json

import numpy as np
import pytest

from megacpt.data import blend as blend_mod
from megacpt.data.blend import (BlendedDataset, blend_indices, parse_data_path,
                                parse_named_data_path, required_samples)


class Counter:
    """Stand-in member dataset: sample i is {"tokens": [i]}."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {"tokens": np.array([i]), "labels": np.array([i])}


def stream(blend, begin=None, end=None):
    begin = blend.start if begin is None else begin
    return [(s["dataset"], int(s["tokens"][0]))
            for s in (blend[i] for i in range(begin, len(blend) if end is None else end))]


def assert_exact_ratios(names, weights, picks):
    counts = {n: 0 for n in names}
    for k, name in enumerate(picks, start=1):
        counts[name] += 1
        for n in names:
            assert abs(counts[n] - weights[n] * k) < 1, (k, counts)


def test_parse_weighted_and_named(make_dataset):
    assert parse_data_path("0.7 /d/zh_text_document 0.3 /d/en_text_document") == \
        [(0.7, "/d/zh_text_document"), (0.3, "/d/en_text_document")]
    assert parse_data_path(["7", "a.bin", "3", "b"]) == [(0.7, "a"), (0.3, "b")]
    named = parse_named_data_path(["1", "fr=/x/y_text_document", "1", "/x/zh_text_document"])
    assert named == [("fr", 0.5, "/x/y_text_document"), ("zh", 0.5, "/x/zh_text_document")]
    a = make_dataset("a_text_document", [[1] * 30])
    b = make_dataset("b_text_document", [[1] * 10, [2] * 50])
    assert parse_data_path([a, b]) == [(30 / 90, a), (60 / 90, b)]  # weighted by tokens


@pytest.mark.parametrize("words,match", [
    (["0.7", "zh", "0.3"], "weight/prefix pairs"),
    (["-1", "zh", "2", "en"], ">= 0"),
    (["0", "zh", "0", "en"], "sum to 0"),
    (["1", "/a/zh", "1", "/b/zh"], "name=PREFIX"),
    ([], "no datasets"),
])
def test_parse_errors(words, match):
    with pytest.raises(ValueError, match=match):
        parse_data_path(words)


def test_greedy_is_exact_in_every_prefix_and_jit_matches_python():
    rng = np.random.default_rng(0)
    for trial in range(20):
        w = rng.dirichlet(np.ones(rng.integers(2, 5)))
        d_jit, s_jit = blend_indices(w, 3000)
        d_py, s_py = blend_indices(w, 3000, use_jit=False)
        np.testing.assert_array_equal(d_jit, d_py)
        np.testing.assert_array_equal(s_jit, s_py)
        counts = np.zeros(len(w))
        for k, d in enumerate(d_jit, start=1):
            assert s_jit[k - 1] == counts[d]  # each dataset's samples in order 0, 1, 2, ...
            counts[d] += 1
            assert np.all(np.abs(counts - w * k) < 1)


def test_replay_ratio_every_step():
    members = {"zh": Counter(1000), "en": Counter(1000)}
    blend = BlendedDataset(members, {"zh": 0.7, "en": 0.3}, 500)
    picks = [name for name, _ in stream(blend)]
    assert_exact_ratios(["zh", "en"], {"zh": 0.7, "en": 0.3}, picks)
    assert picks.count("en") == 150 and picks[:10].count("en") == 3


def test_resume_same_blend_is_identical_to_uninterrupted():
    weights = {"zh": 0.6, "en": 0.25, "fr": 0.15}
    members = {n: Counter(400) for n in weights}
    full = BlendedDataset(members, weights, 600)
    state = json.loads(json.dumps(full.state_dict(consumed_samples=232)))
    resumed = BlendedDataset(members, weights, 600, state=state)
    assert stream(resumed, 232) == stream(full, 232)
    assert state["consumed_samples_per_dataset"] == {
        n: sum(1 for name, _ in stream(full, 0, 232) if name == n) for n in weights}


def test_resume_with_new_blend_continues_each_dataset():
    members = {"zh": Counter(2000), "en": Counter(2000)}
    first = BlendedDataset(members, {"zh": 0.9, "en": 0.1}, 1000)
    first.set_consumed_samples(300)  # as the loader reports it
    state = first.state_dict()
    before = stream(first, 0, 300)
    second = BlendedDataset(members, {"zh": 0.5, "en": 0.5}, 1000, state=state)
    assert second.start == 300
    with pytest.raises(IndexError, match="resumed at global sample 300"):
        second[299]
    after = stream(second)
    for name in members:  # every dataset continues where it stopped: no repeat, no gap
        ids = [i for n, i in before + after if n == name]
        assert ids == list(range(len(ids)))
    assert_exact_ratios(["zh", "en"], {"zh": 0.5, "en": 0.5}, [n for n, _ in after])
    # a third segment dropping "en" keeps its counter for a later run that adds it back
    third = BlendedDataset({"zh": members["zh"]}, {"zh": 1.0}, 1000,
                           state=second.state_dict(consumed_samples=600))
    state3 = third.state_dict(consumed_samples=700)
    en_used = sum(1 for n, _ in stream(second, 300, 600) if n == "en") + 30
    assert state3["consumed_samples_per_dataset"]["en"] == en_used


def test_undersized_member_and_required_samples():
    weights = {"zh": 0.7, "en": 0.3}
    state = BlendedDataset({n: Counter(5000) for n in weights}, {"zh": 0.2, "en": 0.8},
                           2000).state_dict(consumed_samples=1000)
    need = required_samples(weights, 2000, state)
    BlendedDataset({n: Counter(need[n]) for n in weights}, weights, 2000, state=state)
    with pytest.raises(ValueError, match="dataset 'en' has 10 samples but the blend needs"):
        BlendedDataset({"zh": Counter(5000), "en": Counter(10)}, weights, 100)
    with pytest.raises(ValueError, match="mismatched names"):
        BlendedDataset({"zh": Counter(5)}, weights, 2)


def test_python_fallback_when_numba_missing(monkeypatch):
    monkeypatch.setattr(blend_mod, "_greedy_jit", None)
    members = {"a": Counter(100), "b": Counter(100)}
    picks = [n for n, _ in stream(BlendedDataset(members, {"a": 1, "b": 3}, 80))]
    assert_exact_ratios(["a", "b"], {"a": 0.25, "b": 0.75}, picks)
