"""Tokenize corpora into Megatron indexed binaries (no torch needed).

    python tools/preprocess_data.py --input X.jsonl[.gz|.zst] Y.parquet 'dir/*.txt' DIR ... \\
        --json-keys text --tokenizer-type SentencePieceTokenizer --tokenizer-model M.model \\
        --output-prefix P --workers N [--append-eod] [--partitions K] [--log-interval D]

writes `P_{key}_document.bin/.idx` per json key (format: `megacpt.data.indexed`) and beside
each a `.tokenizer.json` record of the tokenizer that made it (`megacpt.data.sidecar`). The inputs
(files, globs, directories; JSON lines, plain text or Parquet, compressed or not: see
`megacpt.data.corpus`) are read in the order given into one dataset. Each document (a JSON
line, a text line, a Parquet row) becomes one sequence: the tokenizer's ids for its text (no
BOS), then the EOD id with `--append-eod`; document order is kept, so the same documents give
byte-identical files whatever container they came in. Blank lines are ignored; any other line
(or a Parquet row with a null) that does not hold the keys as strings stops the run with
`FILE:LINE: reason` / `FILE: row N: reason` (N from 0; outputs removed), or with
`--skip-bad-lines` is skipped and counted in the report.

How it runs: the main process reads (and decompresses) JSON lines and text in blocks of whole
lines (`--block-mb`) and hands each block to a worker process, which parses the lines, encodes
all their texts in one SentencePiece batch call and returns the tokens as one packed numpy
array plus lengths; a Parquet file is handed out one row group per task (the worker reads the
row group's key columns itself). The main process writes the results in input order. At most
2 x workers tasks are in flight, so memory stays flat on any input size (a worker holds at most
one block or row group).

`--partitions K` (one uncompressed JSON-lines or text input) splits the input into K contiguous
byte ranges (at line starts), tokenized one after another into shard prefixes `P_{k}` and then merged in order
into `P`; a shard whose `.idx` exists is reused, so a crashed run resumes at the first
unfinished partition. `--partition-index k` tokenizes only shard k (e.g. one per machine);
merge the shards afterwards with `tools/merge_datasets.py` (`merge_main` here):

    python tools/merge_datasets.py --input DIR_OR_PREFIX [...] --output-prefix OUT

where each input is a dataset prefix (`.bin`/`.idx` suffix accepted) or a directory holding
prefixes (taken in sorted name order, like Megatron's merge_datasets.py). Merging streams,
so memory stays flat, and refuses inputs of different token dtypes.
"""
from __future__ import annotations

import argparse
import collections
import functools
import itertools
import multiprocessing
import os
import sys
import time

import numpy as np

from megacpt.data.indexed import IndexedDataset, IndexedDatasetBuilder, IndexedFormatError
from megacpt.data import sidecar
from megacpt.data.indexed import best_dtype, strip_suffix
from megacpt.data.corpus import CorpusError, CorpusFile, check_keys, expand_inputs as expand_corpus
from megacpt.data.corpus import open_stream, parquet_file, parse_unit, row_group_texts
from megacpt.data.jsonl import BadLine
from megacpt.data.tokenizer import TOKENIZER_TYPES, build_tokenizer

_STATE: dict = {}  # per-process encoder state (set by _init_worker)


def get_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Tokenize corpora into .bin/.idx files.")
    ap.add_argument("--input", nargs="+", required=True,
                    help="files, globs or directories of .jsonl/.txt (optionally .gz, .zst, "
                         ".bz2, .xz) or .parquet, read in the order given")
    ap.add_argument("--json-keys", nargs="+", default=["text"],
                    help="JSON keys / Parquet columns holding the text (one output each)")
    ap.add_argument("--tokenizer-type", default=None, choices=TOKENIZER_TYPES,
                    help="default: from --tokenizer-model (tokenizer.json or an HF directory: "
                         "HuggingFaceTokenizer; else SentencePieceTokenizer)")
    ap.add_argument("--tokenizer-model", required=True)
    ap.add_argument("--output-prefix", required=True)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--append-eod", action="store_true")
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--partition-index", type=int, default=None,
                    help="process only this partition (shard prefix P_k), no merge")
    ap.add_argument("--keep-partitions", action="store_true", help="keep shards after merge")
    ap.add_argument("--log-interval", type=int, default=10000, help="documents between logs")
    ap.add_argument("--skip-bad-lines", action="store_true")
    ap.add_argument("--block-mb", type=float, default=1.0, help="input block per task (MB)")
    args = ap.parse_args(argv)
    if args.workers < 1 or args.partitions < 1 or args.log_interval < 1:
        ap.error("--workers, --partitions and --log-interval must be >= 1")
    if args.partition_index is not None and not 0 <= args.partition_index < args.partitions:
        ap.error(f"--partition-index {args.partition_index} not in [0, {args.partitions})")
    try:
        args.files = expand_corpus(args.input)
        for cf in args.files:
            check_keys(cf, args.json_keys)
    except CorpusError as e:
        ap.error(str(e))
    if args.partitions > 1:
        if len(args.files) != 1 or args.files[0].kind == "parquet" or args.files[0].compression:
            what = (f"{len(args.files)} inputs" if len(args.files) != 1 else
                    f"{args.files[0].path} is {args.files[0].compression or 'parquet'}")
            ap.error(f"--partitions {args.partitions} needs one uncompressed JSON-lines or text "
                     f"input, split by byte range; {what} (use 1, or preprocess each input "
                     f"separately and merge with tools/merge_datasets.py)")
    return args


def _init_worker(tokenizer_type, model, keys, append_eod, dtype):
    tok = build_tokenizer(tokenizer_type, model)
    _STATE.update(tok=tok, keys=keys, eod=tok.eod if append_eod else None, dtype=dtype,
                  parquet={})


def _task_texts(task) -> tuple[list[list[str]], list[tuple[int, str]]]:
    """([texts per key], [(unit within task, reason)] of malformed units) of one task."""
    keys = _STATE["keys"]
    if task[0] == "rowgroup":
        _, path, group = task
        cache = _STATE["parquet"]
        if path not in cache:
            cache.clear()
            cache[path] = parquet_file(path)
        return row_group_texts(cache[path], group, keys)
    _, kind, block = task
    columns = [[] for _ in keys]
    bad = []
    for j, line in enumerate(block.split(b"\n")):
        try:
            texts = parse_unit(kind, line, keys)
        except BadLine as e:
            bad.append((j, str(e)))
            continue
        if texts is not None:
            for col, text in zip(columns, texts):
                col.append(text)
    return columns, bad


def encode_task(task):
    """Parse and encode one task: ("lines", kind, block of whole lines) or ("rowgroup", path,
    group index).

    Returns ({key: (tokens [sum(lengths)] dtype, lengths [docs] int64)}, n_docs,
    [(line / row index within the task, reason)] of malformed units).
    """
    eod, dtype = _STATE["eod"], _STATE["dtype"]
    columns, bad = _task_texts(task)
    out = {}
    for key, col in zip(_STATE["keys"], columns):
        ids = _STATE["tok"].tokenize_batch(col)
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lengths.sum()))
        if eod is not None:
            tokens = np.insert(tokens, np.cumsum(lengths), np.asarray(eod, dtype))
            lengths += 1
        out[key] = (tokens, lengths)
    return out, len(columns[0]) if columns else 0, bad


def line_starts(path: str, parts: int) -> list[int]:
    """Byte offsets splitting `path` into `parts` contiguous ranges at line starts."""
    size = os.path.getsize(path)
    starts = [0]
    with open(path, "rb") as f:
        for k in range(1, parts):
            f.seek(max(k * size // parts - 1, 0))
            f.readline()
            starts.append(max(f.tell(), starts[-1]))
    return starts + [size]


def read_blocks(cf: CorpusFile, begin: int, end: int | None, block_bytes: int):
    """Yield (block, n_lines, position) for whole-line blocks of decompressed bytes
    [begin, end); position is the (compressed) file offset reached, for progress."""
    with open(cf.path, "rb") as raw, open_stream(cf, raw) as f:
        if begin:
            f.seek(begin)
        pos = begin
        while end is None or pos < end:
            block = f.read(block_bytes if end is None else min(block_bytes, end - pos))
            if not block:
                break
            if not block.endswith(b"\n"):
                block += f.readline()
            pos += len(block)
            yield block, block.count(b"\n") + (not block.endswith(b"\n")), raw.tell()


def iter_tasks(cf: CorpusFile, keys: list[str], begin: int, end: int | None,
               block_bytes: int):
    """Yield (task, n_units, nbytes, position) covering `cf` (bytes [begin, end) of lines);
    nbytes: decompressed input bytes (for Parquet the key columns' uncompressed size)."""
    if cf.kind != "parquet":
        for block, n_lines, position in read_blocks(cf, begin, end, block_bytes):
            yield ("lines", cf.kind, block), n_lines, len(block), position
        return
    meta = parquet_file(cf.path).metadata
    size = os.path.getsize(cf.path)
    wanted = [i for i in range(meta.num_columns) if meta.schema.column(i).name in keys]
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        nbytes = sum(rg.column(i).total_uncompressed_size for i in wanted)
        yield ("rowgroup", cf.path, g), rg.num_rows, nbytes, size * (g + 1) // meta.num_row_groups


class Progress:
    def __init__(self, total_bytes: int, interval: int, label: str):
        self.t0, self.total, self.interval, self.label = time.time(), total_bytes, interval, label
        self.docs = self.bytes = self.tokens = 0
        self.next_log = interval

    def update(self, docs: int, nbytes: int, tokens: int, position: int) -> None:
        """Count a finished block; log when the document count passes a multiple of interval."""
        self.docs += docs
        self.bytes += nbytes
        self.tokens += tokens
        if self.docs >= self.next_log:
            self.next_log = (self.docs // self.interval + 1) * self.interval
            dt = max(time.time() - self.t0, 1e-9)
            frac = min(position / self.total, 1.0) if self.total else 1.0
            eta = dt * (1 - frac) / frac if frac > 0 else float("nan")
            print(f"{self.label}: {self.docs} docs ({self.docs / dt:.0f} docs/s, "
                  f"{self.bytes / dt / 1e6:.2f} MB/s), {100 * frac:.1f}% of input, "
                  f"ETA {eta:.0f} s", file=sys.stderr, flush=True)


def output_prefixes(prefix: str, keys: list[str]) -> dict[str, str]:
    return {key: f"{prefix}_{key}_document" for key in keys}


def _all_tasks(files: list[CorpusFile], keys: list[str], begin: int, end: int | None,
               block_bytes: int):
    """(task, n_units, nbytes, position over all files, file, first unit) of every input."""
    done = 0
    for cf in files:
        unit = 0
        for task, n_units, nbytes, position in iter_tasks(cf, keys, begin, end, block_bytes):
            yield task, n_units, nbytes, done + position - begin, cf, unit
            unit += n_units
        done += os.path.getsize(cf.path)


def tokenize_range(args, pool, begin: int, end: int | None, prefix: str, label: str) -> dict:
    """Tokenize all inputs (or bytes [begin, end) of the one input) into `prefix`; returns
    counts for the report."""
    outs = output_prefixes(prefix, args.json_keys)
    for p in outs.values():  # an old index must not outlive a failed rewrite of its .bin
        if os.path.exists(p + ".idx"):
            os.remove(p + ".idx")
    builders = {k: IndexedDatasetBuilder(p + ".bin", args.dtype) for k, p in outs.items()}
    total = (end - begin if end is not None
             else sum(os.path.getsize(cf.path) for cf in args.files))
    first_line = functools.lru_cache(None)(lambda: 1 + _count_lines(args.files[0].path, begin))
    progress = Progress(total, args.log_interval, label)
    stats = {"bad": 0, "bad_examples": [], "lines": 0}
    pending = collections.deque()
    tasks = _all_tasks(args.files, args.json_keys, begin, end, max(int(args.block_mb * 2 ** 20), 1))

    def consume(result, n_units, nbytes, position, cf, unit):
        out, n_docs, bad = result
        for j, reason in bad:
            where = (f"{cf.path}: row {unit + j}" if cf.kind == "parquet"
                     else f"{cf.path}:{first_line() + unit + j}")
            if not args.skip_bad_lines:
                raise BadLine(f"{where}: {reason} (use --skip-bad-lines to skip such lines)")
            stats["bad"] += 1
            if len(stats["bad_examples"]) < 5:
                stats["bad_examples"].append(f"{where}: {reason}")
        stats["lines"] += n_units
        for key, (tokens, lengths) in out.items():
            builders[key].add_documents(tokens, lengths)
        progress.update(n_docs, nbytes, sum(len(t) for t, _ in out.values()), position)

    try:
        for task, *rest in tasks:
            if pool is None:
                consume(encode_task(task), *rest)
                continue
            pending.append((pool.apply_async(encode_task, (task,)), *rest))
            if len(pending) >= 2 * args.workers:
                res, *info = pending.popleft()
                consume(res.get(), *info)
        while pending:
            res, *info = pending.popleft()
            consume(res.get(), *info)
    except BaseException:
        for b in builders.values():
            b.abort()
        raise
    for key, b in builders.items():
        b.finalize(outs[key] + ".idx")
    stats.update(docs=progress.docs, bytes=progress.bytes, tokens=progress.tokens)
    return stats


def merge_shards(shards: list[str], prefix: str, keys: list[str], keep: bool) -> None:
    for key, out in output_prefixes(prefix, keys).items():
        parts = [output_prefixes(s, [key])[key] for s in shards]
        merge(parts, out)
        if not keep:
            for part in parts:
                os.remove(part + ".bin")
                os.remove(part + ".idx")


def _shard_done(shard: str, keys: list[str]) -> bool:
    try:
        for p in output_prefixes(shard, keys).values():
            IndexedDataset(p)
        return True
    except IndexedFormatError:
        return False


def run(args) -> dict:
    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    args.dtype = best_dtype(tok.vocab_size)
    init = (args.tokenizer_type, args.tokenizer_model, args.json_keys, args.append_eod,
            args.dtype)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    starts = (line_starts(args.files[0].path, args.partitions) if args.partitions > 1
              else [0, None])
    todo = range(args.partitions) if args.partition_index is None else [args.partition_index]
    pool = multiprocessing.Pool(args.workers, _init_worker, init) if args.workers > 1 else None
    if pool is None:
        _init_worker(*init)
    report = {"docs": 0, "tokens": 0, "bytes": 0, "bad": 0, "bad_examples": [], "lines": 0}
    t0 = time.time()
    try:
        for k in todo:
            shard = args.output_prefix if args.partitions == 1 else f"{args.output_prefix}_{k}"
            begin, end = starts[k], starts[k + 1]
            if args.partitions > 1 and _shard_done(shard, args.json_keys):
                print(f"partition {k}: {shard} already complete, reusing it", file=sys.stderr)
                continue
            label = f"partition {k}/{args.partitions}" if args.partitions > 1 else "preprocess"
            stats = tokenize_range(args, pool, begin, end, shard, label)
            for key in ("docs", "tokens", "bytes", "bad", "lines"):
                report[key] += stats[key]
            report["bad_examples"] += stats["bad_examples"]
    finally:
        if pool is not None:
            pool.terminate()
    if args.partitions > 1 and args.partition_index is None:
        merge_shards([f"{args.output_prefix}_{k}" for k in range(args.partitions)],
                     args.output_prefix, args.json_keys, args.keep_partitions)
    done = args.output_prefix if args.partition_index is None else \
        f"{args.output_prefix}_{args.partition_index}"
    for out in output_prefixes(done, args.json_keys).values():  # which tokenizer made it
        sidecar.write(out, args.tokenizer_model, tok.vocab_size)
    report["seconds"] = time.time() - t0
    return report


def _count_lines(path: str, end: int) -> int:
    """Newlines in bytes [0, end) of an uncompressed file (line numbers for a lone shard)."""
    count, pos = 0, 0
    with open(path, "rb") as f:
        while pos < end:
            chunk = f.read(min(64 << 20, end - pos))
            if not chunk:
                break
            count, pos = count + chunk.count(b"\n"), pos + len(chunk)
    return count


def expand_inputs(inputs: list[str]) -> list[str]:
    """Dataset prefixes named by the inputs (directories expanded, sorted)."""
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            names = sorted(f[:-4] for f in os.listdir(item) if f.endswith(".idx"))
            if not names:
                raise SystemExit(f"error: --input {item}: directory holds no .idx files")
            prefixes += [os.path.join(item, n) for n in names]
        else:
            prefixes.append(strip_suffix(item))
    return prefixes


def merge(prefixes: list[str], output_prefix: str) -> IndexedDataset:
    """Write `output_prefix.bin/.idx` holding all `prefixes` in order; returns the result."""
    if not prefixes:
        raise ValueError("merge: no input datasets")
    datasets = [IndexedDataset(p) for p in prefixes]  # validates every input up front
    dtypes = {ds.dtype for ds in datasets}
    if len(dtypes) > 1:
        detail = ", ".join(f"{ds.path_prefix}: {ds.dtype}" for ds in datasets)
        raise ValueError(f"cannot merge datasets with different token dtypes ({detail})")
    out = os.path.abspath(output_prefix)
    if any(os.path.abspath(ds.path_prefix) == out for ds in datasets):
        raise ValueError(f"--output-prefix {output_prefix} is also an input")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    builder = IndexedDatasetBuilder(output_prefix + ".bin", datasets[0].dtype)
    total = sum(os.path.getsize(ds.path_prefix + ".bin") for ds in datasets)
    done, t0 = 0, time.time()
    for k, ds in enumerate(datasets, start=1):
        builder.add_index(ds.path_prefix)
        done += os.path.getsize(ds.path_prefix + ".bin")
        dt = max(time.time() - t0, 1e-9)
        print(f"merged {k}/{len(datasets)} ({done / 1e6:.1f}/{total / 1e6:.1f} MB, "
              f"{done / 1e6 / dt:.0f} MB/s, ETA {dt * (total - done) / max(done, 1):.0f} s)",
              file=sys.stderr, flush=True)
    builder.finalize(output_prefix + ".idx")
    return IndexedDataset(output_prefix)


def merge_main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Merge .bin/.idx datasets in order.")
    ap.add_argument("--input", nargs="+", required=True, help="prefixes or directories")
    ap.add_argument("--output-prefix", required=True)
    args = ap.parse_args(argv)
    try:
        result = merge(expand_inputs(args.input), args.output_prefix)
    except ValueError as e:  # includes IndexedFormatError
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.output_prefix}.bin/.idx: {len(result)} sequences, "
          f"{len(result.document_indices) - 1} documents, {result.num_tokens} tokens",
          file=sys.stderr)


def main(argv=None) -> None:
    args = get_args(argv)
    if not os.path.exists(args.tokenizer_model):
        print(f"error: --tokenizer-model {args.tokenizer_model}: file not found (train one "
              f"with tools/train_tokenizer.py)", file=sys.stderr)
        raise SystemExit(2)
    try:
        r = run(args)
    except (BadLine, CorpusError) as e:
        raise SystemExit(f"error: {e}") from None
    except (FileNotFoundError, ValueError) as e:  # unreadable tokenizer model, bad shards
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    outs = output_prefixes(args.output_prefix if args.partition_index is None
                           else f"{args.output_prefix}_{args.partition_index}", args.json_keys)
    print(f"done: {r['docs']} documents, {r['tokens']} tokens, {r['bytes'] / 1e6:.1f} MB in "
          f"{r['seconds']:.1f} s ({r['bytes'] / 1e6 / max(r['seconds'], 1e-9):.2f} MB/s); "
          f"skipped {r['bad']} malformed lines; wrote "
          f"{', '.join(p + '.bin/.idx' for p in outs.values())}", file=sys.stderr)
    for example in r["bad_examples"]:
        print(f"  skipped {example}", file=sys.stderr)


if __name__ == "__main__":
    main()
