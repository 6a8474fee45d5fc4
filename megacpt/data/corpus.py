"""Corpus inputs shared by the tokenizer trainer and the preprocessor (no torch).

An input is a file, a glob (`data/*.parquet`, `**` allowed) or a directory (every corpus
file below it, recursively); inputs are taken in the order given, a glob's matches and a
directory's files in sorted path order. Every file is one of:

* JSON lines (`.jsonl`, `.json`, `.ndjson`): one JSON object per line holding the
  `--json-keys` as strings (see `megacpt.data.jsonl`); blank lines are ignored.
* plain text (`.txt`, `.text`): one document per line (UTF-8, `\\r\\n` or `\\n` endings,
  as transformers' `load_dataset("text")` reads it); blank lines are ignored. Its documents go
  to the one `--json-keys` name.
* Parquet (`.parquet`, detected by its `PAR1` magic): the `--json-keys` are columns of
  strings, read one row group at a time (pyarrow).

JSON lines and text may be compressed: gzip, zstd (`.zst`, several frames allowed, as
RedPajama/Dolma write them), bzip2 or xz, detected by magic bytes, never by name alone.
Any other compression (lz4, zip, 7z, snappy framing) is refused by name. A file with an
unknown extension is JSON lines if its first byte is `{`, otherwise refused.
The same documents give the same token stream whatever the container.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import io
import lzma
import os
from dataclasses import dataclass

from megacpt.data.jsonl import BadLine, parse_line

# magic bytes -> compression; the supported ones have an opener below
_MAGIC = [(b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"),
          (b"\xfd7zXZ\x00", "xz"), (b"\x04\x22\x4d\x18", "lz4"), (b"PK\x03\x04", "zip"),
          (b"7z\xbc\xaf\x27\x1c", "7z"), (b"\xff\x06\x00\x00sNaPpY", "snappy")]
SUPPORTED_COMPRESSION = ("gzip", "zstd", "bzip2", "xz")
_COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz")
_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "text",
          ".text": "text", ".parquet": "parquet"}
_OTHER_SUFFIXES = (".lz4", ".zip", ".7z", ".sz")


class CorpusError(ValueError):
    """An input that cannot be read as a corpus (message names the file and the reason)."""


@dataclass(frozen=True)
class CorpusFile:
    """One input file and how to read it."""

    path: str
    """path as given (or as a glob / directory expanded it)"""
    kind: str
    """"jsonl", "text" or "parquet\""""
    compression: str | None
    """None or one of SUPPORTED_COMPRESSION (jsonl and text only)"""


def _sniff_compression(head: bytes) -> str | None:
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def identify(path: str) -> CorpusFile:
    """How to read `path`; CorpusError for an unsupported compression or format."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CorpusError(f"{path}: cannot open ({e.strerror})") from None
    if head.startswith(b"PAR1"):
        return CorpusFile(path, "parquet", None)
    comp = _sniff_compression(head)
    if comp is not None and comp not in SUPPORTED_COMPRESSION:
        raise CorpusError(f"{path}: {comp}-compressed input is not supported (supported: "
                          f"{', '.join(SUPPORTED_COMPRESSION)}, or uncompressed); "
                          f"decompress it first")
    name = path.lower()
    for suffix in _COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    kind = _KINDS.get(os.path.splitext(name)[1])
    if kind == "parquet":
        raise CorpusError(f"{path}: named .parquet but has no PAR1 magic (not a Parquet file"
                          f"{', it is ' + comp + '-compressed' if comp else ''})")
    if kind is None:
        with open_stream(CorpusFile(path, "jsonl", comp)) as f:
            first = f.read(64).lstrip()[:1]
        if first != b"{":
            raise CorpusError(f"{path}: unknown corpus format (expected .jsonl/.json/.ndjson "
                              f"JSON lines, .txt plain text or .parquet, optionally compressed "
                              f"with {', '.join(SUPPORTED_COMPRESSION)})")
        kind = "jsonl"
    return CorpusFile(path, kind, comp)


def _is_corpus_name(name: str) -> bool:
    name = name.lower()
    for suffix in _COMPRESSED_SUFFIXES + _OTHER_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return os.path.splitext(name)[1] in _KINDS


def expand_inputs(inputs: list[str]) -> list[CorpusFile]:
    """Corpus files named by files, globs and directories, in order (see module doc)."""
    out = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(root, n) for root, _, names in os.walk(item)
                           for n in names if _is_corpus_name(n))
            if not found:
                raise CorpusError(f"--input {item}: directory holds no corpus files "
                                  f"(.jsonl, .txt, .parquet, optionally compressed)")
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise CorpusError(f"--input {item}: the pattern matches no file")
        elif os.path.isfile(item):
            found = [item]
        else:
            raise CorpusError(f"--input {item}: file not found")
        out += [identify(p) for p in found]
    return out


def open_stream(cf: CorpusFile, fileobj: io.BufferedIOBase | None = None) -> io.BufferedIOBase:
    """Binary reader of the decompressed bytes of a JSON-lines or text file (reading from
    `fileobj`, left open, if given: its tell() is then the compressed position)."""
    if cf.compression is None:
        return fileobj if fileobj is not None else open(cf.path, "rb", buffering=1 << 20)
    if cf.compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raise CorpusError(f"{cf.path}: reading zstd input needs the zstandard package: "
                              f"pip install 'megacpt[corpora]' (or pip install zstandard)"
                              ) from None
        src = fileobj if fileobj is not None else open(cf.path, "rb")
        raw = zstandard.ZstdDecompressor(max_window_size=2 ** 31).stream_reader(
            src, read_size=1 << 20, read_across_frames=True, closefd=fileobj is None)
        return io.BufferedReader(raw, buffer_size=1 << 20)
    opener = {"gzip": gzip.GzipFile, "bzip2": bz2.BZ2File, "xz": lzma.LZMAFile}[cf.compression]
    if fileobj is not None:
        return opener(fileobj=fileobj, mode="rb") if opener is gzip.GzipFile \
            else opener(fileobj, mode="rb")
    return opener(cf.path, mode="rb")


def parquet_file(path: str):
    """pyarrow's ParquetFile, with a clear message when pyarrow is missing."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path}: reading Parquet input needs pyarrow: "
                          f"pip install 'megacpt[corpora]' (or pip install pyarrow)") from None
    return pq.ParquetFile(path)


def check_keys(cf: CorpusFile, keys: list[str]) -> None:
    """Refuse, before any work, keys a file cannot provide (parquet columns, text files)."""
    if cf.kind == "text" and len(keys) != 1:
        raise CorpusError(f"{cf.path}: plain text (one document per line) holds one text per "
                          f"document; give one --json-keys name for it, got {keys}")
    if cf.kind != "parquet":
        return
    schema = parquet_file(cf.path).schema_arrow
    for key in keys:
        if key not in schema.names:
            raise CorpusError(f"{cf.path}: no column {key!r} for --json-keys (columns: "
                              f"{schema.names[:12]})")
        typ = schema.field(key).type
        if str(typ) not in ("string", "large_string", "string_view"):
            raise CorpusError(f"{cf.path}: column {key!r} holds {typ}, expected strings")


def text_line(line: bytes) -> str | None:
    """The document of one plain-text line; None if blank; BadLine if not UTF-8."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if not line.strip():
        return None
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(f"invalid UTF-8 ({e.reason} at byte {e.start})") from None


def parse_unit(kind: str, line: bytes, keys: list[str]) -> list[str] | None:
    """Texts of one JSON or text line (None if blank; BadLine if malformed)."""
    if kind == "jsonl":
        return parse_line(line, keys)
    text = text_line(line)
    return None if text is None else [text]


def row_group_texts(pf, group: int, keys: list[str]):
    """([texts per key], [(row within group, reason)] of rows with a null) of a row group."""
    table = pf.read_row_group(group, columns=keys)
    columns = [table.column(k).to_pylist() for k in keys]
    bad = []
    if any(table.column(k).null_count for k in keys):
        rows = [j for j in range(table.num_rows) if any(col[j] is None for col in columns)]
        for j in rows:
            key = next(k for k, col in zip(keys, columns) if col[j] is None)
            bad.append((j, f"column {key!r} is null, expected a string"))
        keep = sorted(set(range(table.num_rows)) - set(rows))
        columns = [[col[j] for j in keep] for col in columns]
    return columns, bad


def iter_documents(cf: CorpusFile, keys: list[str], skip_bad: bool = False):
    """Yield the texts (one per key) of every document of `cf`, in order, streaming.

    A malformed line or null row raises BadLine naming `FILE:LINE` / `FILE: row N`, or is
    skipped with `skip_bad`.
    """
    check_keys(cf, keys)
    if cf.kind == "parquet":
        pf = parquet_file(cf.path)
        row0 = 0
        for g in range(pf.num_row_groups):
            columns, bad = row_group_texts(pf, g, keys)
            if bad and not skip_bad:
                raise BadLine(f"{cf.path}: row {row0 + bad[0][0]}: {bad[0][1]}")
            yield from (list(texts) for texts in zip(*columns))
            row0 += pf.metadata.row_group(g).num_rows
        return
    with open_stream(cf) as f:
        for lineno, line in enumerate(f, start=1):
            try:
                texts = parse_unit(cf.kind, line.rstrip(b"\n"), keys)
            except BadLine as e:
                if skip_bad:
                    continue
                raise BadLine(f"{cf.path}:{lineno}: {e}") from None
            if texts is not None:
                yield texts
