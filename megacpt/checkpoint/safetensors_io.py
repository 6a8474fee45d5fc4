"""Streaming safetensors reader and writer: one tensor in memory at a time.

The safetensors file format (https://github.com/huggingface/safetensors), which this module
reads and writes without going through `safetensors.torch.load_file` / `save_file` (those hold
a whole file in memory; converting a checkpoint must not):

    bytes 0-7      N, the header length, unsigned 64-bit little-endian
    bytes 8..8+N   UTF-8 JSON header, padded with spaces so the data starts 8-byte aligned:
                   {"__metadata__": {str: str}, NAME: {"dtype": "F32", "shape": [d0, ...],
                   "data_offsets": [begin, end]}, ...}; offsets are relative to the data start
    8+N..          the tensors' raw little-endian bytes, C order, back to back, no gaps

`SafetensorsReader` parses the header once and reads a single tensor with seek + readinto
(no mmap, so pages of tensors already processed do not stay resident), or only a range of
one dim of it (`get_slice`: the resharding loader reads just the rows/columns it needs).
`SafetensorsWriter` takes the list of (name, dtype, shape) up front, writes the header, then
accepts the tensors one by one in that order; the result is loadable by the `safetensors`
library.
"""
from __future__ import annotations

import json
import math
import os
import struct

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file is unreadable or does not match what was expected."""


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise SafetensorsError(f"dtype {dtype} cannot be stored in safetensors") from None


def nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class SafetensorsReader:
    """Random access to the tensors of one safetensors file."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._f = open(path, "rb")
        except OSError as e:
            raise SafetensorsError(f"{path}: cannot open ({e.strerror})") from None
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: truncated file ({size} bytes), not safetensors")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise SafetensorsError(f"{path}: header length {n} exceeds the file size {size}; "
                                   f"the file is truncated or not safetensors")
        try:
            header = json.loads(self._f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries = header
        self.bytes_read = 0  # tensor bytes read so far (get / get_slice)
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype "
                                       f"{e.get('dtype')!r}")
            begin, end = e["data_offsets"]
            if end - begin != nbytes(DTYPES[e["dtype"]], e["shape"]) or \
                    self._data_start + end > size:
                raise SafetensorsError(f"{path}: tensor {name!r} has offsets {begin}..{end} that "
                                       f"do not fit its shape {e['shape']} or the file size "
                                       f"{size} (truncated file?)")

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entry(name)["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory."""
        e = self._entry(name)
        begin, end = e["data_offsets"]
        buf = bytearray(end - begin)
        self._f.seek(self._data_start + begin)
        if self._f.readinto(buf) != len(buf):
            raise SafetensorsError(f"{self.path}: tensor {name!r} is truncated")
        self.bytes_read += len(buf)
        dtype = DTYPES[e["dtype"]]
        if not buf:
            return torch.empty(e["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(e["shape"])

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """`get(name)` narrowed to [start, stop) on `dim`, reading only those bytes: one read
        when the range is contiguous on disk (dim 0), one per index of the leading dims else."""
        e = self._entry(name)
        shape = list(e["shape"])
        if not 0 <= start <= stop <= shape[dim]:
            raise SafetensorsError(f"{self.path}: slice {start}:{stop} of dim {dim} is outside "
                                   f"tensor {name!r} of shape {shape}")
        dtype = DTYPES[e["dtype"]]
        item = torch.empty((), dtype=dtype).element_size()
        outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:]) * item
        run, stride = (stop - start) * inner, shape[dim] * inner
        begin = self._data_start + e["data_offsets"][0] + start * inner
        buf = bytearray(outer * run)
        view = memoryview(buf)
        for i in range(outer):  # outer == 1 for dim 0: one read
            self._f.seek(begin + i * stride)
            if self._f.readinto(view[i * run: (i + 1) * run]) != run:
                raise SafetensorsError(f"{self.path}: tensor {name!r} is truncated")
        self.bytes_read += len(buf)
        shape[dim] = stop - start
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def _entry(self, name: str) -> dict:
        try:
            return self._entries[name]
        except KeyError:
            raise SafetensorsError(f"{self.path}: has no tensor {name!r}") from None

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsWriter:
    """Write a safetensors file whose tensor list is known before any data is.

    `entries` is [(name, dtype, shape)] in the order `write` will be called.
    """

    def __init__(self, path: str, entries: list[tuple[str, torch.dtype, tuple]],
                 metadata: dict[str, str] | None = None):
        self.path = path
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._order = []
        for name, dtype, shape in entries:
            if name in header:
                raise SafetensorsError(f"{path}: tensor {name!r} listed twice")
            size = nbytes(dtype, shape)
            header[name] = {"dtype": dtype_name(dtype), "shape": [int(d) for d in shape],
                            "data_offsets": [offset, offset + size]}
            self._order.append((name, dtype, tuple(int(d) for d in shape)))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise SafetensorsError(f"{self.path}: unexpected extra tensor {name!r}")
        want, dtype, shape = self._order[self._next]
        if name != want:
            raise SafetensorsError(f"{self.path}: expected tensor {want!r} next, got {name!r}")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise SafetensorsError(f"{self.path}: tensor {name!r} should be {dtype} {shape}, "
                                   f"got {tensor.dtype} {tuple(tensor.shape)}")
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            self._f.write(t.view(torch.uint8).numpy())  # buffer protocol: no extra copy
        self._next += 1

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        if self._next != len(self._order):
            missing = [n for n, _, _ in self._order[self._next:]]
            raise SafetensorsError(f"{self.path}: closed before writing {missing[:3]} "
                                   f"({len(missing)} tensors missing)")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self._f.close()


def save_tensors(path: str, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Write a dict of tensors (all in memory already) to one file."""
    entries = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with SafetensorsWriter(path, entries, metadata) as w:
        for n, t in tensors.items():
            w.write(n, t)


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """Read every tensor of a file."""
    with SafetensorsReader(path) as r:
        return {n: r.get(n) for n in r.keys()}
