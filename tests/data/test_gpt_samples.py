"""GPTDataset indices vs Megatron's and a slow reference; sample contents; splits; cache."""
import os
import pickle

import numpy as np
import pytest

from megacpt.data import gpt_dataset
from megacpt.data.gpt_dataset import (GPTDataset, build_indices, build_sample_index,
                                      split_ranges)
from megacpt.data.indexed import IndexedDataset

from _data_helpers import load_megatron, random_sequences


def reference_sample_index(sizes, doc_index, seq_length):
    """Token-by-token walk: sample j starts where j * seq_length tokens were consumed."""
    rows, pos_doc, offset = [(0, 0)], 0, 0
    total = int(sum(sizes[d] for d in doc_index))
    for _ in range((total - 1) // seq_length):
        need = seq_length
        while True:
            left = sizes[doc_index[pos_doc]] - offset
            if need < left:
                offset += need
                break
            need -= left
            pos_doc, offset = pos_doc + 1, 0
        rows.append((pos_doc, offset))
    return np.array(rows)


def random_case(rs):
    n = rs.randint(1, 25)
    sizes = rs.randint(0, 15, size=n).astype(np.int32)
    sizes[rs.randint(n)] += 3  # at least a few tokens; zero-length documents stay in
    return sizes, rs.randint(2, 10)


def test_sample_index_matches_slow_reference():
    rs = np.random.RandomState(0)
    for _ in range(300):
        sizes, seq = random_case(rs)
        doc_index = rs.permutation(np.tile(np.arange(len(sizes)), rs.randint(1, 4)))
        got = build_sample_index(sizes, doc_index.astype(np.int32), seq)
        np.testing.assert_array_equal(got, reference_sample_index(sizes, doc_index, seq))


def test_indices_identical_to_megatron():
    mc = load_megatron()
    if mc is None:
        pytest.skip("megatron-core is not importable")
    rs = np.random.RandomState(1)
    for trial in range(150):
        sizes, seq = random_case(rs)
        docs = np.arange(rs.randint(0, len(sizes) // 2 + 1), len(sizes), dtype=np.int32)
        tokens = int(sizes[docs].sum())
        if tokens < 2:
            continue
        num_samples = rs.randint(1, 4 * tokens // seq + 2)
        ours = build_indices(sizes, docs, num_samples, seq, seed=trial)
        epochs = gpt_dataset.num_epochs_needed(tokens, num_samples, seq)
        head = ((epochs - 1) * tokens - 1) // seq
        separate = epochs > 1 and num_samples - head < int(0.8 * ((tokens - 1) // seq))
        rng = np.random.RandomState(trial)
        doc_index = mc.build_document_index(docs, epochs, rng, separate)
        sample_index = mc.helpers_cpp.build_sample_idx_int32(sizes, doc_index, seq, epochs,
                                                             tokens, True, 1)
        total = sample_index.shape[0] - 1
        shuffle = mc.build_shuffle_index(head if separate else total, total, rng)
        for a, b in zip(ours, (doc_index, sample_index, shuffle)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shuffle", [False, True])
def test_samples_are_overlapping_windows_of_the_stream(make_dataset, shuffle):
    seqs = random_sequences(30, seed=2, max_len=25)
    ds = IndexedDataset(make_dataset("g", seqs))
    gds = GPTDataset(ds, "g", (5, 30), num_samples=60, seq_length=8, seed=3, shuffle=shuffle)
    stream = np.concatenate([seqs[d] for d in gds.document_index])  # epochs concatenated
    assert len(gds) >= 60
    assert len(gds.document_index) % 25 == 0 and set(gds.document_index) == set(range(5, 30))
    seen = set()
    for i in range(len(gds)):
        j = int(gds.shuffle_index[i])
        seen.add(j)
        sample = gds[i]
        window = stream[j * 8: j * 8 + 9]
        assert sample["tokens"].dtype == np.int64 and sample["tokens"].shape == (8,)
        np.testing.assert_array_equal(sample["tokens"], window[:-1])
        np.testing.assert_array_equal(sample["labels"], window[1:])
    assert seen == set(range(len(gds)))
    if not shuffle:
        np.testing.assert_array_equal(gds.shuffle_index, np.arange(len(gds)))
    with pytest.raises(IndexError):
        gds[len(gds)]


def test_split_ranges_and_errors():
    assert split_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges("98,2", 10) == [(0, 10), (10, 10), (10, 10)]
    assert split_ranges("0.8/0.1/0.1", 10) == [(0, 8), (8, 9), (9, 10)]
    for bad in ("a,b", "1,2,3,4", "0,0", "-1,2"):
        with pytest.raises(ValueError, match="--split"):
            split_ranges(bad, 10)


def test_empty_selection_is_a_clear_error(make_dataset):
    ds = IndexedDataset(make_dataset("e", [[1, 2, 3]]))
    with pytest.raises(ValueError, match="split portion empty"):
        GPTDataset(ds, "e", (1, 1), None, 4, 0)


def test_cache_build_wait_load(make_dataset, tmp_path, monkeypatch):
    ds = IndexedDataset(make_dataset("c", random_sequences(40, seed=4)))
    cache = str(tmp_path / "cache")
    calls = []
    barrier = lambda: calls.append(1)  # noqa: E731
    with pytest.raises(RuntimeError, match="missing after the barrier"):
        GPTDataset(ds, "c", (0, 40), 50, 6, 7, cache, rank_builds=False, barrier=barrier)
    built = GPTDataset(ds, "c", (0, 40), 50, 6, 7, cache, rank_builds=True, barrier=barrier)
    names = sorted(os.listdir(cache))
    assert len(names) == 4 and all(n.startswith(built.hash) for n in names)
    monkeypatch.setattr(gpt_dataset, "build_indices", lambda *a, **k: pytest.fail("rebuilt"))
    for builds in (False, True):  # both kinds of rank now load the cached files
        again = GPTDataset(ds, "c", (0, 40), 50, 6, 7, cache, rank_builds=builds,
                           barrier=barrier)
        assert isinstance(again.sample_index, np.memmap)
        np.testing.assert_array_equal(again[3]["tokens"], built[3]["tokens"])
    assert len(calls) == 4  # one barrier per construction, on every path
    clone = pickle.loads(pickle.dumps(again))
    assert len(pickle.dumps(again)) < 5000  # memory maps are reopened, not pickled
    np.testing.assert_array_equal(clone[5]["labels"], built[5]["labels"])
    monkeypatch.undo()
    other = GPTDataset(ds, "c", (0, 40), 50, 6, 8, cache)  # a new seed is a new cache entry
    assert other.hash != built.hash and len(os.listdir(cache)) == 8
