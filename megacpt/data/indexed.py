"""Megatron-compatible indexed token files (`.bin` + `.idx`, MMIDIDX version 1).

File format (byte-for-byte Megatron-LM's `megatron/core/datasets/indexed_dataset.py`):

`PREFIX.bin`: no header; every sequence's tokens concatenated in C order, in the index dtype.

`PREFIX.idx` (all little-endian, no padding; N sequences, D documents):

    offset        size      field
    0             9         magic  b"MMIDIDX\\x00\\x00"
    9             8         version  uint64 = 1
    17            1         dtype code uint8: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                            6 float64, 7 float32, 8 uint16
    18            8         sequence count N  uint64
    26            8         document count D + 1  uint64
    34            4N        sequence lengths  int32[N]        (tokens per sequence)
    34 + 4N       8N        sequence pointers int64[N]        (byte offset into .bin)
    34 + 12N      8(D+1)    document indices  int64[D+1]      (0, ..., N: sequence ids
                                                              where each document starts)
    [34+12N+8(D+1) N        sequence modes int8[N]: multimodal files only; read and ignored]

Tokens use uint16 when the vocabulary has fewer than 65500 ids, int32 otherwise
(`best_dtype`). Our preprocessing writes one sequence per document, so D == N.

`IndexedDataset` memory-maps both files and copies nothing: `ds[i]` is a numpy view into the
`.bin` mapping. Opening validates the magic, version, dtype code, the `.idx` size implied by
the header, and that the `.bin` size matches the last pointer + length; each failure raises
`IndexedFormatError` naming the file and what is wrong. `IndexedDatasetBuilder` streams tokens
to the `.bin` and spills lengths / document boundaries to temporary side files, so its memory
stays flat however large the corpus; `finalize` writes the `.idx` (atomically, via rename).
"""
from __future__ import annotations

import mmap
import os
import shutil
import struct

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_CHUNK = 1 << 20  # entries per streamed chunk of lengths / pointers


class IndexedFormatError(ValueError):
    """A `.idx`/`.bin` pair is missing, truncated or not in MMIDIDX version 1 format."""


def best_dtype(vocab_size: int | None) -> type:
    """Smallest token dtype Megatron would use: uint16 below 65500 ids, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def strip_suffix(prefix: str) -> str:
    """Accept `x`, `x.bin` or `x.idx` for a dataset prefix."""
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def _map(path: str) -> tuple[mmap.mmap | None, memoryview]:
    """Read-only mapping of a file (empty files get an empty buffer; mmap refuses them)."""
    if os.path.getsize(path) == 0:
        return None, memoryview(b"")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return mm, memoryview(mm)


class IndexedDataset:
    """Read-only view of `PREFIX.idx` + `PREFIX.bin`; `ds[i]` is sequence i (a no-copy view).

    `sequence_lengths`, `sequence_pointers` and `document_indices` are views into the `.idx`
    mapping. The lengths start at byte 34, so they are not 4-byte aligned: take an aligned
    copy (`np.array(ds.sequence_lengths)`) before heavy random access.
    """

    def __init__(self, path_prefix: str):
        self.path_prefix = strip_suffix(path_prefix)
        self._open()

    def _open(self) -> None:
        ipath, bpath = idx_path(self.path_prefix), bin_path(self.path_prefix)
        for path in (ipath, bpath):
            if not os.path.isfile(path):
                raise IndexedFormatError(f"{path}: file not found (dataset prefix "
                                         f"{self.path_prefix!r} needs both .idx and .bin)")
        isize = os.path.getsize(ipath)
        with open(ipath, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[:len(MAGIC)] != MAGIC[:len(header)]:
            raise IndexedFormatError(f"{ipath}: not a Megatron MMIDIDX index (wrong magic "
                                     f"{header[:9]!r}, expected {MAGIC!r})")
        if len(header) < HEADER_SIZE:
            raise IndexedFormatError(f"{ipath}: truncated header ({len(header)} of "
                                     f"{HEADER_SIZE} bytes)")
        version, code, n, d1 = struct.unpack("<QBQQ", header[9:])
        if version != VERSION:
            raise IndexedFormatError(f"{ipath}: index version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise IndexedFormatError(f"{ipath}: unknown dtype code {code} at byte 17 "
                                     f"(expected one of {sorted(DTYPE_CODES)})")
        need = HEADER_SIZE + 12 * n + 8 * d1
        if isize not in (need, need + n):
            raise IndexedFormatError(
                f"{ipath}: size {isize} bytes, but the header ({n} sequences, {d1 - 1} "
                f"documents) implies {need} bytes{' (truncated)' if isize < need else ''}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self._idx_mm, idx_buf = _map(ipath)
        self.sequence_lengths = np.frombuffer(idx_buf, np.int32, n, HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(idx_buf, np.int64, n, HEADER_SIZE + 4 * n)
        self.document_indices = np.frombuffer(idx_buf, np.int64, d1, HEADER_SIZE + 12 * n)
        if d1 == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != n:
            raise IndexedFormatError(f"{ipath}: document indices must start at 0 and end at "
                                     f"the sequence count {n}")
        bsize = os.path.getsize(bpath)
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * \
            self.dtype.itemsize if n else 0
        if bsize != end:
            raise IndexedFormatError(
                f"{bpath}: size {bsize} bytes, but {ipath} says the tokens end at byte {end}"
                f"{' (truncated .bin)' if bsize < end else ''}")
        self._bin_mm, bin_buf = _map(bpath)
        self._tokens = np.frombuffer(bin_buf, self.dtype)  # [total tokens]

    def verify(self) -> None:
        """Full O(N) check that pointers are the running sum of lengths (open checks ends)."""
        lengths = self.sequence_lengths.astype(np.int64) * self.dtype.itemsize
        expect = np.concatenate(([0], np.cumsum(lengths[:-1]))) if len(lengths) else lengths
        bad = np.flatnonzero(expect != self.sequence_pointers)
        if len(bad) or (self.sequence_lengths < 0).any():
            raise IndexedFormatError(f"{idx_path(self.path_prefix)}: sequence pointers are not "
                                     f"the running sum of lengths (first bad sequence "
                                     f"{bad[0] if len(bad) else 'negative length'})")
        if (np.diff(self.document_indices) < 0).any():
            raise IndexedFormatError(f"{idx_path(self.path_prefix)}: document indices decrease")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences in "
                             f"{self.path_prefix}")
        return self.get(int(i) % len(self))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i, as a view into the mapping."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        if length is None:
            length = int(self.sequence_lengths[i]) - offset
        return self._tokens[start:start + length]

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def __getstate__(self):
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state):
        self.path_prefix = state["path_prefix"]
        self._open()


class _Spill:
    """Append-only integer array kept in a temporary file, buffered in memory."""

    def __init__(self, path: str, dtype: type):
        self.path, self.dtype = path, np.dtype(dtype)
        self._f = open(path, "wb")
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self.count = 0

    def extend(self, values) -> None:
        arr = np.asarray(values, dtype=self.dtype).reshape(-1)
        self._buf.append(arr)
        self._buffered += len(arr)
        self.count += len(arr)
        if self._buffered >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._f.write(np.concatenate(self._buf).tobytes())
        self._buf, self._buffered = [], 0

    def chunks(self):
        """Yield the stored values in order, _CHUNK at a time (closes the writer)."""
        self.flush()
        self._f.close()
        with open(self.path, "rb") as f:
            while True:
                data = f.read(_CHUNK * self.dtype.itemsize)
                if not data:
                    return
                yield np.frombuffer(data, self.dtype)

    def remove(self) -> None:
        if not self._f.closed:
            self._f.close()
        if os.path.exists(self.path):
            os.remove(self.path)


class IndexedDatasetBuilder:
    """Streams sequences into `bin_path`; `finalize(idx_path)` writes the index.

    Memory stays flat: lengths and document boundaries go to `bin_path + ".lengths.tmp"` /
    `".docs.tmp"` until `finalize`, which streams them into the `.idx` and removes them.
    """

    def __init__(self, bin_path: str, dtype: type = np.int32):
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"token dtype {self.dtype} has no MMIDIDX code "
                             f"(use one of {sorted(str(np.dtype(t)) for t in CODE_OF_DTYPE)})")
        self._bin = open(bin_path, "wb")
        self._lengths = _Spill(bin_path + ".lengths.tmp", np.int32)
        self._docs = _Spill(bin_path + ".docs.tmp", np.int64)
        self._docs.extend([0])
        self.num_tokens = 0

    @property
    def num_sequences(self) -> int:
        return self._lengths.count

    @property
    def num_documents(self) -> int:
        return self._docs.count - 1

    def add_item(self, array) -> None:
        """Append one sequence (any integer array-like; a torch tensor works via numpy)."""
        arr = np.asarray(array)
        if arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        self._bin.write(np.ascontiguousarray(arr).reshape(-1).tobytes())
        self._lengths.extend([arr.size])
        self.num_tokens += arr.size

    def end_document(self) -> None:
        """Close the current document (its sequences are those added since the last call)."""
        self._docs.extend([self._lengths.count])

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Fast path: many one-sequence documents, `tokens` concatenated in `self.dtype`."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if tokens.dtype != self.dtype or len(tokens) != int(lengths.sum()):
            raise ValueError(f"add_documents: expected {int(lengths.sum())} tokens of dtype "
                             f"{self.dtype}, got {len(tokens)} of {tokens.dtype}")
        self._bin.write(tokens.tobytes())
        first = self._lengths.count
        self._lengths.extend(lengths)
        self._docs.extend(np.arange(first + 1, first + 1 + len(lengths), dtype=np.int64))
        self.num_tokens += len(tokens)

    def add_index(self, other_prefix: str) -> None:
        """Append a whole existing dataset (merge), streaming its files."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{idx_path(other.path_prefix)}: token dtype {other.dtype} differs "
                             f"from the dataset being built ({self.dtype}); cannot merge")
        offset = self._lengths.count
        for start in range(0, len(other), _CHUNK):
            self._lengths.extend(other.sequence_lengths[start:start + _CHUNK])
        docs = other.document_indices
        for start in range(1, len(docs), _CHUNK):
            self._docs.extend(docs[start:start + _CHUNK] + offset)
        self.num_tokens += other.num_tokens
        with open(bin_path(other.path_prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, 16 << 20)

    def finalize(self, idx_path: str) -> None:
        """Close the `.bin` and write the `.idx` (to a temporary name, then renamed)."""
        self._bin.close()
        n, d1 = self._lengths.count, self._docs.count
        tmp = idx_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<QBQQ", VERSION, CODE_OF_DTYPE[self.dtype], n, d1))
            for chunk in self._lengths.chunks():
                f.write(chunk.tobytes())
            offset = 0
            for chunk in self._lengths.chunks():
                nbytes = chunk.astype(np.int64) * self.dtype.itemsize
                ends = np.cumsum(nbytes) + offset
                f.write((ends - nbytes).tobytes())
                offset = int(ends[-1])
            for chunk in self._docs.chunks():
                f.write(chunk.tobytes())
        os.replace(tmp, idx_path)
        self._lengths.remove()
        self._docs.remove()

    def abort(self) -> None:
        """Close and delete everything written so far (used when preprocessing fails)."""
        self._bin.close()
        self._lengths.remove()
        self._docs.remove()
        if os.path.exists(self.bin_path):
            os.remove(self.bin_path)
