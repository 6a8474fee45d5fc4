"""MMIDIDX .bin/.idx: exact bytes, Megatron interop both ways, validation errors, merging."""
import os
import pickle
import struct

import numpy as np
import pytest

from megacpt.data import indexed
from megacpt.data.indexed import (IndexedDataset, IndexedDatasetBuilder, IndexedFormatError,
                                  best_dtype)
from megacpt.data.preprocess import merge_main

from _data_helpers import load_megatron, random_sequences, write_dataset


def test_exact_bytes_of_documented_example(tmp_path):
    prefix = write_dataset(str(tmp_path / "ex"), [[1, 2, 3], [4, 5]], np.uint16)
    idx = open(prefix + ".idx", "rb").read()
    assert len(idx) == 34 + 12 * 2 + 8 * 3 == 82
    expect = (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 2, 3)
              + np.array([3, 2], "<i4").tobytes() + np.array([0, 6], "<i8").tobytes()
              + np.array([0, 1, 2], "<i8").tobytes())
    assert idx == expect
    assert idx[:18].hex() == "4d4d494449445800000100000000000000" + "08"
    assert open(prefix + ".bin", "rb").read() == np.arange(1, 6, dtype="<u2").tobytes()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_roundtrip_views_and_documents(tmp_path, dtype):
    seqs = random_sequences(50, seed=1)
    b = IndexedDatasetBuilder(str(tmp_path / "d.bin"), dtype)
    for k, s in enumerate(seqs):  # documents of 1-3 sequences
        b.add_item(s)
        if k % 3 != 1:
            b.end_document()
    b.end_document()
    b.finalize(str(tmp_path / "d.idx"))
    ds = IndexedDataset(str(tmp_path / "d"))
    ds.verify()
    assert len(ds) == 50 and ds.dtype == np.dtype(dtype)
    for k, s in enumerate(seqs):
        np.testing.assert_array_equal(ds[k], s)
    np.testing.assert_array_equal(ds.sequence_lengths, [len(s) for s in seqs])
    docs = ds.document_indices
    assert docs[0] == 0 and docs[-1] == 50 and np.all(np.diff(docs) >= 0)
    view = ds[3]
    assert not view.flags.owndata and not view.flags.writeable  # a view of the mapping
    np.testing.assert_array_equal(ds.get(3, 1, 2), seqs[3][1:3])
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[7], seqs[7])


def test_builder_streams_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed, "_CHUNK", 3)  # force many spill/flush/stream rounds
    seqs = random_sequences(23, seed=2)
    b = IndexedDatasetBuilder(str(tmp_path / "c.bin"), np.uint16)
    toks = np.concatenate(seqs).astype(np.uint16)
    b.add_documents(toks, [len(s) for s in seqs])
    b.finalize(str(tmp_path / "c.idx"))
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    ds = IndexedDataset(str(tmp_path / "c"))
    ds.verify()
    assert [list(ds[k]) for k in range(23)] == [list(s) for s in seqs]
    np.testing.assert_array_equal(ds.document_indices, np.arange(24))


def test_best_dtype():
    assert best_dtype(36152) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(None) == np.int32


def test_megatron_reads_ours_and_we_read_theirs(tmp_path):
    megatron = load_megatron()
    if megatron is None:
        pytest.skip("megatron-core is not importable")
    mc = megatron.indexed_dataset
    import torch
    seqs = random_sequences(30, seed=3)
    ours = write_dataset(str(tmp_path / "ours"), seqs, np.uint16)
    theirs_view = mc.IndexedDataset(ours)
    assert len(theirs_view) == 30
    for k, s in enumerate(seqs):
        np.testing.assert_array_equal(theirs_view[k], s)
    np.testing.assert_array_equal(theirs_view.document_indices, np.arange(31))

    mb = mc.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.int32)
    for s in seqs[:10]:
        mb.add_item(torch.tensor(s, dtype=torch.int64))
    mb.end_document()
    for s in seqs[10:]:
        mb.add_document(torch.tensor(s, dtype=torch.int64), [len(s)])
    mb.finalize(str(tmp_path / "theirs.idx"))
    ds = IndexedDataset(str(tmp_path / "theirs"))
    ds.verify()
    assert ds.dtype == np.int32
    for k, s in enumerate(seqs):
        np.testing.assert_array_equal(ds[k], s)
    np.testing.assert_array_equal(ds.document_indices, [0] + list(range(10, 31)))
    # and byte-identical output for the same content
    again = write_dataset(str(tmp_path / "same"), [np.concatenate(seqs[:10])], np.int32)
    mb2 = mc.IndexedDatasetBuilder(str(tmp_path / "m2.bin"), dtype=np.int32)
    mb2.add_document(torch.tensor(np.concatenate(seqs[:10])), [sum(map(len, seqs[:10]))])
    mb2.finalize(str(tmp_path / "m2.idx"))
    assert open(again + ".idx", "rb").read() == open(tmp_path / "m2.idx", "rb").read()


def _corrupt(prefix, which, offset=None, data=None, truncate=None):
    path = prefix + which
    raw = bytearray(open(path, "rb").read())
    if truncate is not None:
        raw = raw[:truncate]
    if offset is not None:
        raw[offset:offset + len(data)] = data
    open(path, "wb").write(bytes(raw))
    return path


@pytest.mark.parametrize("case,match", [
    (dict(which=".idx", offset=0, data=b"XXIDIDX"), "wrong magic"),
    (dict(which=".idx", offset=17, data=b"\x09"), "unknown dtype code 9"),
    (dict(which=".idx", offset=9, data=b"\x02"), "version 2"),
    (dict(which=".idx", truncate=60), "truncated"),
    (dict(which=".idx", truncate=20), "truncated header"),
    (dict(which=".bin", truncate=7), "truncated .bin"),
])
def test_corrupt_files_name_file_and_problem(tmp_path, case, match):
    prefix = write_dataset(str(tmp_path / "x"), [[1, 2, 3], [4, 5]], np.uint16)
    path = _corrupt(prefix, **case)
    with pytest.raises(IndexedFormatError, match=match) as err:
        IndexedDataset(prefix)
    assert path in str(err.value)


def test_missing_bin_is_named(tmp_path):
    prefix = write_dataset(str(tmp_path / "y"), [[1]], np.uint16)
    os.remove(prefix + ".bin")
    with pytest.raises(IndexedFormatError, match=r"y\.bin: file not found"):
        IndexedDataset(prefix)


def test_add_index_merge_and_cli(tmp_path):
    os.makedirs(tmp_path / "parts")
    a = write_dataset(str(tmp_path / "parts" / "a"), random_sequences(7, 4), np.uint16)
    b = write_dataset(str(tmp_path / "parts" / "b"), random_sequences(5, 5), np.uint16)
    merge_main(["--input", str(tmp_path / "parts"), "--output-prefix", str(tmp_path / "m")])
    m, da, db = (IndexedDataset(p) for p in (str(tmp_path / "m"), a, b))
    m.verify()
    assert len(m) == 12
    for k in range(12):
        np.testing.assert_array_equal(m[k], da[k] if k < 7 else db[k - 7])
    np.testing.assert_array_equal(m.document_indices, np.arange(13))
    c = write_dataset(str(tmp_path / "c"), [[1, 2]], np.int32)
    with pytest.raises(SystemExit, match="different token dtypes"):
        merge_main(["--input", a, c + ".idx", "--output-prefix", str(tmp_path / "bad")])


def test_empty_dataset(tmp_path):
    prefix = write_dataset(str(tmp_path / "e"), [], np.uint16)
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_tokens == 0
