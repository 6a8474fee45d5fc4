"""GPT training samples over an indexed dataset, Megatron-style (no compiled helpers).

Three index arrays define the samples (same contents as Megatron-LM's GPTDataset for the same
documents, num_samples, seq_length and seed):

* document index  int32 [epochs * docs]: the split's sequence ids tiled once per epoch and
  shuffled with `numpy.random.RandomState(seed)`; when the last epoch would be used for
  less than 80% it is shuffled separately (appended after the others).
* sample index    int32|int64 [samples + 1, 2]: (position in the document index, token
  offset) where each sample starts. Sample j takes the seq_length + 1 tokens from row j up
  to and including row j + 1, walking across documents; consecutive samples share one
  token. Built vectorised: sample j starts at token j * seq_length of the concatenated
  epoch stream, located with `searchsorted` over the cumulative document lengths.
* shuffle index   uint32|int64 [samples]: a permutation of the samples (again two ranges
  when the last epoch is separate), drawn from the same RandomState after the document
  index.

A sample is {"tokens": int64[seq_length], "labels": int64[seq_length]} = text[:-1], text[1:].

Cache files (when `cache_dir` is set), keyed by the MD5 of the JSON description of
everything that shapes the indices (data file identity and sequence lengths, documents,
num_samples, seq_length, seed, shuffle):

    {cache_dir}/{md5}-GPTDataset-document_index.npy
    {cache_dir}/{md5}-GPTDataset-sample_index.npy
    {cache_dir}/{md5}-GPTDataset-shuffle_index.npy
    {cache_dir}/{md5}-GPTDataset-description.json   (written last: marks a complete entry)

With `rank_builds=True` the indices are built and saved when missing; then `barrier()` (if
given, e.g. `torch.distributed.barrier`) is called on every rank; ranks with
`rank_builds=False` load the files (memory-mapped) after that barrier.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from typing import Callable, Sequence

import numpy as np

from megacpt.data.indexed import IndexedDataset

logger = logging.getLogger(__name__)
INDEX_FORMAT_VERSION = 1
LAST_EPOCH_THRESHOLD = 0.80


def parse_split(split: str) -> list[float]:
    """'969,30,1' (or '98,2', '0.9/0.1') -> normalised [train, valid, test] weights."""
    parts = [p for p in re.split(r"[,/\s]+", split.strip()) if p]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected up to 3 numbers like 969,30,1") from None
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split {split!r}: expected 1-3 non-negative numbers, not all zero")
    weights += [0.0] * (3 - len(weights))
    return [w / sum(weights) for w in weights]


def split_ranges(split: str, num_sequences: int) -> list[tuple[int, int]]:
    """Sequence ranges [begin, end) of train/valid/test, Megatron's rounding of book-ends."""
    bookends = np.concatenate(([0.0], np.cumsum(parse_split(split))))
    return [(int(round(float(a) * num_sequences)), int(round(float(b) * num_sequences)))
            for a, b in zip(bookends[:-1], bookends[1:])]


def build_document_index(documents: np.ndarray, num_epochs: int,
                         rng: np.random.RandomState | None, separate_last: bool) -> np.ndarray:
    """Sequence ids tiled `num_epochs` times, shuffled (the last epoch apart if asked)."""
    if separate_last and num_epochs > 1:
        head = build_document_index(documents, num_epochs - 1, rng, False)
        return np.concatenate((head, build_document_index(documents, 1, rng, False)))
    index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)  # [epochs * docs]
    if rng is not None:
        rng.shuffle(index)
    return index


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray,
                       seq_length: int) -> np.ndarray:
    """[samples + 1, 2] start rows (document-index position, offset); see module doc."""
    doc_sizes = sizes[document_index].astype(np.int64)  # [epochs * docs]
    ends = np.cumsum(doc_sizes)  # token position where each document-index entry ends
    num_samples = (int(ends[-1]) - 1) // seq_length if len(ends) else 0
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length  # [samples + 1]
    rows = np.searchsorted(ends, starts, side="right")  # entry holding token `start`
    offsets = starts - (ends[rows] - doc_sizes[rows])
    top = max(len(document_index), int(sizes.max()) if len(sizes) else 0)
    dtype = np.int32 if top <= np.iinfo(np.int32).max else np.int64
    index = np.stack((rows, offsets), axis=1).astype(dtype)
    index[0] = 0  # Megatron starts at (0, 0) even if the first documents are empty
    return index


def build_shuffle_index(num_samples: int, total: int,
                        rng: np.random.RandomState | None) -> np.ndarray:
    """Permutation of [0, total): [0, num_samples) and [num_samples, total) shuffled apart."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    last = np.arange(num_samples, total, dtype=dtype)
    if rng is not None:
        rng.shuffle(first)
        if len(last):
            rng.shuffle(last)
    return np.concatenate((first, last)) if len(last) else first


def num_epochs_needed(tokens_per_epoch: int, num_samples: int | None, seq_length: int) -> int:
    """Smallest E with E * tokens_per_epoch >= num_samples * seq_length + 1."""
    if num_samples is None:
        return 1
    need = num_samples * seq_length + 1
    return max(1, -(-need // tokens_per_epoch))


def build_indices(sizes: np.ndarray, documents: np.ndarray, num_samples: int | None,
                  seq_length: int, seed: int, shuffle: bool = True):
    """(document_index, sample_index, shuffle_index) exactly as Megatron's GPTDataset."""
    # the .idx stores lengths at byte 34: unaligned, which makes numpy gathers ~10x slower
    sizes = np.array(sizes, dtype=np.int32)  # aligned copy [sequences]
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
    epochs = num_epochs_needed(tokens_per_epoch, num_samples, seq_length)
    separate_last, head_samples = False, None
    if epochs > 1:
        head_samples = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_last = num_samples - head_samples < int(LAST_EPOCH_THRESHOLD * per_epoch)
    rng = np.random.RandomState(seed) if shuffle else None
    doc_index = build_document_index(documents, epochs, rng, separate_last)
    sample_index = build_sample_index(sizes, doc_index, seq_length)
    total = len(sample_index) - 1
    shuffle_index = build_shuffle_index(head_samples if separate_last else total, total, rng)
    return doc_index, sample_index, shuffle_index


class GPTDataset:
    """Samples of `seq_length` tokens (+1 for labels) from `documents` of an IndexedDataset.

    documents: a tuple (begin, end), the sequence range (e.g. from `split_ranges`), or an
    array (or list) of sequence ids.
    num_samples: at least this many samples (whole epochs are built); None = one epoch.
    """

    def __init__(self, indexed_dataset: IndexedDataset, name: str,
                 documents: tuple[int, int] | Sequence[int] | np.ndarray,
                 num_samples: int | None, seq_length: int, seed: int,
                 cache_dir: str | None = None, *, rank_builds: bool = True,
                 barrier: Callable[[], None] | None = None, shuffle: bool = True):
        self.dataset, self.name = indexed_dataset, name
        self.seq_length, self.seed, self.shuffle = int(seq_length), int(seed), bool(shuffle)
        self.num_samples = None if num_samples is None else int(num_samples)
        if isinstance(documents, tuple) and len(documents) == 2:
            begin, end = documents
            if not 0 <= begin <= end <= len(indexed_dataset):
                raise ValueError(f"GPTDataset {name!r}: document range {documents} outside "
                                 f"[0, {len(indexed_dataset)}] of {indexed_dataset.path_prefix}")
            self.documents = np.arange(begin, end, dtype=np.int32)
            doc_key = [int(begin), int(end)]
        else:
            self.documents = np.asarray(documents, dtype=np.int32).reshape(-1)
            if len(self.documents) and not (0 <= self.documents.min() and
                                            self.documents.max() < len(indexed_dataset)):
                raise ValueError(f"GPTDataset {name!r}: document ids outside [0, "
                                 f"{len(indexed_dataset)}) of {indexed_dataset.path_prefix}")
            doc_key = hashlib.md5(self.documents.tobytes()).hexdigest()
        if self.seq_length < 2:
            raise ValueError(f"GPTDataset {name!r}: seq_length must be >= 2")
        lengths = np.array(indexed_dataset.sequence_lengths)  # aligned copy, fast gathers
        tokens = int(lengths[self.documents].sum(dtype=np.int64))
        if tokens < 2:
            raise ValueError(f"GPTDataset {name!r}: the selected documents of "
                             f"{indexed_dataset.path_prefix} hold {tokens} tokens; a sample "
                             f"needs at least 2 (is the split portion empty?)")
        self.description = {
            "class": "GPTDataset", "format": INDEX_FORMAT_VERSION,
            "path_prefix": os.path.abspath(indexed_dataset.path_prefix),
            "lengths_md5": hashlib.md5(indexed_dataset.sequence_lengths.tobytes()).hexdigest(),
            "dtype": str(indexed_dataset.dtype), "documents": doc_key,
            "num_samples": self.num_samples, "seq_length": self.seq_length,
            "seed": self.seed, "shuffle": self.shuffle, "add_extra_token": 1}
        text = json.dumps(self.description, sort_keys=True)
        self.hash = hashlib.md5(text.encode()).hexdigest()
        self.cache_dir = cache_dir
        self.limit: int | None = None  # optional cap on len() (validation subsets)
        self._load_or_build(rank_builds, barrier)

    def _paths(self) -> dict[str, str]:
        base = os.path.join(self.cache_dir, f"{self.hash}-GPTDataset-")
        names = ("document_index", "sample_index", "shuffle_index")
        return {**{k: base + k + ".npy" for k in names}, "description": base + "description.json"}

    def _load_or_build(self, rank_builds: bool, barrier) -> None:
        if self.cache_dir is None:
            self._set(*self._build())
            if barrier is not None:
                barrier()
            return
        paths = self._paths()
        if rank_builds and not os.path.isfile(paths["description"]):
            os.makedirs(self.cache_dir, exist_ok=True)
            arrays = self._build()
            for key, arr in zip(("document_index", "sample_index", "shuffle_index"), arrays):
                _atomic_write(paths[key], lambda f, a=arr: np.save(f, a))
            _atomic_write(paths["description"], lambda f: f.write(
                json.dumps(self.description, indent=1, sort_keys=True).encode()))
        if barrier is not None:
            barrier()
        if not os.path.isfile(paths["description"]):
            raise RuntimeError(f"GPTDataset {self.name!r}: index cache {paths['description']} "
                               f"missing after the barrier; the building rank must use the "
                               f"same cache_dir (on a shared file system) and the same data")
        self._set(*(np.load(paths[k], mmap_mode="r") for k in
                    ("document_index", "sample_index", "shuffle_index")))

    def _build(self):
        t0 = time.time()
        arrays = build_indices(self.dataset.sequence_lengths, self.documents, self.num_samples,
                               self.seq_length, self.seed, self.shuffle)
        logger.info("GPTDataset %s: built %d samples (%d epochs of %d documents) in %.2f s",
                    self.name, len(arrays[1]) - 1, len(arrays[0]) // max(len(self.documents), 1),
                    len(self.documents), time.time() - t0)
        return arrays

    def _set(self, document_index, sample_index, shuffle_index) -> None:
        self.document_index, self.sample_index = document_index, sample_index
        self.shuffle_index = shuffle_index
        if self.num_samples is not None and len(self) < self.num_samples:
            raise RuntimeError(f"GPTDataset {self.name!r}: built {len(self)} samples, "
                               f"{self.num_samples} requested")

    def __len__(self) -> int:
        n = len(self.shuffle_index)
        return n if self.limit is None else min(n, self.limit)

    def text(self, i: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample i (int64)."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for GPTDataset {self.name!r} "
                             f"({len(self)} samples)")
        j = int(self.shuffle_index[i])
        (d0, o0), (d1, o1) = self.sample_index[j], self.sample_index[j + 1]
        d0, o0, d1, o1 = int(d0), int(o0), int(d1), int(o1)
        doc, get = self.document_index, self.dataset.get
        if d0 == d1:
            return get(int(doc[d0]), o0, o1 - o0 + 1).astype(np.int64)
        pieces = [get(int(doc[d0]), o0)]
        pieces += [get(int(doc[k])) for k in range(d0 + 1, d1)]
        pieces.append(get(int(doc[d1]), 0, o1 + 1))
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, i: int) -> dict:
        text = self.text(int(i))  # [seq_length + 1]
        return {"tokens": text[:-1], "labels": text[1:]}

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.cache_dir is not None:  # reload the memory maps instead of pickling them
            for key in ("document_index", "sample_index", "shuffle_index"):
                state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "shuffle_index" not in state:
            paths = self._paths()
            for key in ("document_index", "sample_index", "shuffle_index"):
                setattr(self, key, np.load(paths[key], mmap_mode="r"))


def _atomic_write(path: str, write: Callable) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)
