"""Train a SentencePiece BPE tokenizer (byte fallback) on corpora.

    python tools/train_tokenizer.py --input zh.jsonl en.jsonl.gz fw/*.parquet --json-keys text \\
        --vocab-size 36152 --model-prefix tok [--character-coverage 0.9995] \\
        [--input-sentence-size 10000000]

Writes `tok.model` and `tok.vocab`. The settings follow LLaMA's tokenizer: BPE, byte fallback
(no unknown characters), digits split, identity normalisation (text is kept as written),
whitespace kept; ids 0-3 are `<unk>`, `<s>`, `</s>` (end of document) and `<pad>`.
Inputs are files, globs or directories of JSON lines, plain text or Parquet, compressed or
not, read in order and streamed (see `megacpt.data.corpus`). Each line of each document is one
training sentence. A vocabulary too small for the
corpus' characters is reported with the option to change instead of SentencePiece's
internal assertion. Character coverage: the default 0.9995 keeps nearly every character of
the corpus as its own piece; on a corpus with many distinct characters (Chinese) and a small
vocabulary that leaves almost no room for merges, so training warns when fewer than 10% of
the pieces are merges, naming both options (a larger --vocab-size, or a lower coverage so
rare characters fall back to bytes). The coverage is never changed silently. A wrong
`--json-keys` is reported from the first line of the input, before training starts.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

import sentencepiece as spm

from megacpt.data.corpus import CorpusError, CorpusFile, expand_inputs, iter_documents
from megacpt.data.jsonl import BadLine

# <unk>, <s>, </s>, <pad> and the 256 byte-fallback pieces <0x00>..<0xFF>
RESERVED_PIECES = 4 + 256
#: warn when fewer than this fraction of the vocabulary are merges (multi-character pieces)
MIN_MERGE_FRACTION = 0.1


def get_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train a SentencePiece BPE tokenizer.")
    ap.add_argument("--input", nargs="+", required=True, help="files, globs or directories of .jsonl/.txt (optionally .gz, .zst, .bz2, .xz) "
                         "or .parquet")
    ap.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding text")
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--model-prefix", required=True, help="writes PREFIX.model/.vocab")
    ap.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    ap.add_argument("--character-coverage", type=float, default=0.9995,
                    help="fraction of characters covered by single-character pieces; the "
                         "rest fall back to bytes")
    ap.add_argument("--input-sentence-size", type=int, default=10_000_000,
                    help="sample at most this many lines (0: use all)")
    ap.add_argument("--max-sentence-length", type=int, default=16384,
                    help="longer lines (bytes) are skipped")
    ap.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=1234, help="seed of the line sampling")
    ap.add_argument("--no-byte-fallback", action="store_true")
    ap.add_argument("--skip-bad-lines", action="store_true",
                    help="skip malformed JSON lines instead of stopping")
    ap.add_argument("--log-interval", type=float, default=10.0, help="seconds between logs")
    args = ap.parse_args(argv)
    if args.vocab_size <= 0:
        ap.error("--vocab-size must be positive")
    if not 0.98 <= args.character_coverage <= 1:
        ap.error(f"--character-coverage must be in [0.98, 1] (SentencePiece's range), got "
                 f"{args.character_coverage}; with byte fallback, characters outside the "
                 f"covered set are still encoded as bytes")
    try:
        args.files = expand_inputs(args.input)
    except CorpusError as e:
        ap.error(str(e))
    if not args.skip_bad_lines:
        for cf in args.files:
            problem = first_line_problem(cf, args.json_keys)
            if problem:
                ap.error(problem)
    return args


def first_line_problem(cf: CorpusFile, keys: list[str]) -> str | None:
    """Why the first document of `cf` cannot be read with `keys` (wrong --json-keys, not JSON
    lines), or None; found before SentencePiece starts, not deep inside it."""
    try:
        for _ in iter_documents(cf, keys, False):
            return None
    except (BadLine, CorpusError) as e:
        return f"{e} (check --json-keys, now {' '.join(keys)})"
    return None


def merge_report(model_file: str) -> tuple[int, int]:
    """(single-character pieces, multi-character pieces = merges) of a trained model."""
    sp = spm.SentencePieceProcessor(model_file=model_file)
    chars = merges = 0
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        piece = sp.id_to_piece(i).replace("\u2581", " ")
        if len(piece) <= 1:
            chars += 1
        else:
            merges += 1
    return chars, merges


def iter_sentences(files: list[CorpusFile], keys: list[str], skip_bad_lines: bool,
                   log_interval: float, stats: dict):
    """Non-empty lines of every document, with a progress log line every `log_interval` s."""
    t0 = last = time.time()
    for cf in files:
        path = cf.path
        for texts in iter_documents(cf, keys, skip_bad_lines):
            stats["docs"] += 1
            for text in texts:
                stats["bytes"] += len(text.encode("utf-8"))
                for line in text.split("\n"):
                    if line.strip():
                        stats["sentences"] += 1
                        yield line
            now = time.time()
            if now - last >= log_interval:
                last = now
                print(f"read {stats['docs']} documents, {stats['bytes'] / 1e6:.1f} MB "
                      f"({stats['bytes'] / 1e6 / (now - t0):.1f} MB/s) from {path}",
                      file=sys.stderr, flush=True)


def explain_failure(err: RuntimeError, args: argparse.Namespace) -> str:
    """Turn SentencePiece's internal errors into messages naming the option to change."""
    msg = str(err)
    m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:
        need = int(m.group(2))
        return (f"--vocab-size {args.vocab_size} is too small for this corpus: at "
                f"--character-coverage {args.character_coverage} it needs {need} pieces just "
                f"for its characters and the reserved pieces (<unk>, <s>, </s>, <pad>"
                f"{' and 256 byte-fallback bytes' if not args.no_byte_fallback else ''}), "
                f"before any merges. Raise --vocab-size well above {need}, or lower "
                f"--character-coverage (now {args.character_coverage}) so that rare "
                f"characters fall back to bytes.")
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if m:
        return (f"--vocab-size {args.vocab_size} is larger than this corpus supports "
                f"(at most {m.group(2)}): lower --vocab-size or add more --input text.")
    return f"SentencePiece training failed: {msg}"


def train(args: argparse.Namespace) -> str:
    """Train and return the path of the written .model file."""
    out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    stats = {"docs": 0, "sentences": 0, "bytes": 0}
    spm.set_random_generator_seed(args.seed)
    t0 = time.time()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_sentences(args.files, args.json_keys, args.skip_bad_lines,
                                             args.log_interval, stats),
            model_prefix=args.model_prefix, vocab_size=args.vocab_size,
            model_type=args.model_type, character_coverage=args.character_coverage,
            byte_fallback=not args.no_byte_fallback, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            input_sentence_size=args.input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=args.max_sentence_length, num_threads=args.num_threads,
            minloglevel=2)
    except (BadLine, CorpusError) as e:
        print(f"error: {e} (check --json-keys, now {' '.join(args.json_keys)})",
              file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as e:
        raise SystemExit(f"error: {explain_failure(e, args)}") from None
    if stats["sentences"] == 0:
        raise SystemExit(f"error: no text found under keys {args.json_keys} in {args.input}")
    model = args.model_prefix + ".model"
    print(f"trained {model}: vocab {args.vocab_size}, {stats['docs']} documents, "
          f"{stats['sentences']} lines, {stats['bytes'] / 1e6:.1f} MB in "
          f"{time.time() - t0:.1f} s", file=sys.stderr)
    chars, merges = merge_report(model)
    if merges < MIN_MERGE_FRACTION * args.vocab_size:
        print(f"warning: {model} has {chars} single-character pieces and only {merges} merges "
              f"(multi-character pieces): at --character-coverage {args.character_coverage} "
              f"the corpus' characters take almost the whole --vocab-size {args.vocab_size}, "
              f"so text is encoded nearly character by character. Raise --vocab-size or lower "
              f"--character-coverage (e.g. 0.995 for Chinese; rarer characters then fall back "
              f"to bytes)", file=sys.stderr)
    return model


def main(argv=None) -> None:
    train(get_args(argv))


if __name__ == "__main__":
    main()
