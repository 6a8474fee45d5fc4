"""Which tokenizer made a dataset: a small JSON file beside Megatron's `.bin/.idx`.

`PREFIX.bin` and `PREFIX.idx` stay byte-compatible with Megatron; `tools/preprocess_data.py`
also writes `PREFIX.tokenizer.json` (merged datasets have none yet):

    {"format": "megacpt-dataset-tokenizer", "version": 1,
     "tokenizer_sha256": HEX,           # of the SentencePiece model / tokenizer.json bytes
     "tokenizer_vocab_size": int, "tokenizer_model": "path it was read from (informational)",
     "documents": int, "sequences": int, "num_tokens": int}    # of the .idx it describes

The trainer checks it at start-up against `--tokenizer-model` (`check`): data tokenized with
another tokenizer, even one of the same or smaller vocabulary, would otherwise train
silently on wrong ids. A dataset without the file (made by Megatron's own tools) is
accepted with an INFO line; a file whose counts do not match the `.idx` beside it is stale
(the data was rebuilt by another tool) and is ignored with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

log = logging.getLogger(__name__)

FORMAT, VERSION = "megacpt-dataset-tokenizer", 1
SUFFIX = ".tokenizer.json"


class TokenizerMismatch(ValueError):
    """The dataset was tokenized with another tokenizer than the one given."""


def sidecar_path(prefix: str) -> str:
    return prefix + SUFFIX


def fingerprint(tokenizer_model: str) -> str:
    """sha256 of the tokenizer file (a directory: of the tokenizer `find_tokenizer` picks)."""
    from megacpt.data.tokenizer import find_tokenizer

    path = tokenizer_model
    if os.path.isdir(path):
        path = find_tokenizer(path) or os.path.join(path, "tokenizer.json")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write(prefix: str, tokenizer_model: str, vocab_size: int) -> str:
    """Describe the finished dataset `prefix` (its .idx must exist) and its tokenizer."""
    from megacpt.data.indexed import IndexedDataset

    ds = IndexedDataset(prefix)
    record = {"format": FORMAT, "version": VERSION,
              "tokenizer_sha256": fingerprint(tokenizer_model),
              "tokenizer_vocab_size": int(vocab_size),
              "tokenizer_model": os.path.abspath(tokenizer_model),
              "documents": len(ds.document_indices) - 1, "sequences": len(ds),
              "num_tokens": int(ds.num_tokens)}
    path = sidecar_path(prefix)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
    return path


def read(prefix: str) -> dict | None:
    path = sidecar_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerMismatch(f"{path}: unreadable ({e}); delete it or rebuild the "
                                f"dataset") from None
    if record.get("format") != FORMAT:
        raise TokenizerMismatch(f"{path}: field 'format' is {record.get('format')!r}, "
                                f"expected {FORMAT!r}")
    return record


def check(prefix: str, tokenizer_model: str | None, num_sequences: int) -> str:
    """Raise TokenizerMismatch if `prefix` was made by another tokenizer; returns what was
    found ("match", "no sidecar", "stale", "no tokenizer given")."""
    record = read(prefix)
    if record is None:
        return "no sidecar"
    if int(record.get("sequences", -1)) != int(num_sequences):
        log.warning("%s describes %s sequences but %s.idx holds %d: the data was rebuilt "
                    "without it; ignoring it", sidecar_path(prefix), record.get("sequences"),
                    prefix, num_sequences)
        return "stale"
    if not tokenizer_model:
        return "no tokenizer given"
    have = fingerprint(tokenizer_model)
    if have != record.get("tokenizer_sha256"):
        raise TokenizerMismatch(
            f"{prefix}.bin was tokenized with another tokenizer than --tokenizer-model "
            f"{tokenizer_model} (it was made by {record.get('tokenizer_model')}, vocabulary "
            f"{record.get('tokenizer_vocab_size')}, sha256 "
            f"{str(record.get('tokenizer_sha256'))[:12]}; given: sha256 {have[:12]}); its "
            f"token ids mean other pieces. Re-run "
            f"tools/preprocess_data.py with this tokenizer, or pass the one it was made with")
    return "match"
